"""Samplers for diffusion models given a score function.

Both samplers integrate from ``t = 1`` down to ``t_end`` on a uniform time grid and
finish with a Tweedie denoising step ``x_0 = (x + sigma^2 score) / psi`` at
``t_end``, which is the posterior mean of the clean point under the model and
removes the last bit of noise. Score functions follow the package convention
``score_fn(x_t, t)`` with ``x_t`` of shape ``[b, *event]`` and ``t`` of shape ``[b]``.

With forward SDE ``dx = f(t) x dt + g(t) dW`` (paper, Eq. 3) the reverse SDE
(paper, Eq. 4) is ``dx = [f x - g^2 score] dt + g dW_bar`` and the probability-flow
ODE is ``dx/dt = f x - g^2 score / 2``.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from mmh_jax.schedules import Schedule, broadcast_to_event

__all__ = ["sample"]

ScoreFn = Callable[[Array, Array], Array]


def sample(
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    *,
    schedule: Schedule,
    key: PRNGKeyArray,
    method: Literal["sde", "ode"] = "sde",
    num_steps: int = 500,
    t_end: float = 1e-3,
    denoise: bool = True,
) -> Float[Array, "b *event"]:
    """Draw samples by Euler(-Maruyama) integration of the reverse SDE or PF-ODE.

    Args:
        score_fn: ``score_fn(x_t, t) -> grad log p_t(x_t)``.
        shape: ``(b, *event_shape)`` of the output.
        schedule: the forward-process schedule the model was trained with.
        key: PRNG key for the initial noise and (for ``"sde"``) the Brownian increments.
        method: ``"sde"`` for the reverse SDE (paper, Eq. 4), ``"ode"`` for the
            probability-flow ODE.
        num_steps: number of integration steps between ``t = 1`` and ``t_end``.
        t_end: final time of the integration.
        denoise: apply the final Tweedie step at ``t_end``.

    Returns:
        Samples of shape ``shape``.
    """
    if method not in ("sde", "ode"):
        raise ValueError(f"method must be 'sde' or 'ode', got {method!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    b = shape[0]
    k0, kw = jax.random.split(key)
    x = jax.random.normal(k0, shape) * schedule.sigma(jnp.ones(()))
    ts = jnp.linspace(1.0, t_end, num_steps + 1)
    stochastic = method == "sde"

    def body(x, inp):
        i, k = inp
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next  # positive step backwards in time
        tb = jnp.full((b,), t)
        f = schedule.f(t)
        g2 = schedule.g2(t)
        s = score_fn(x, tb)
        if stochastic:
            drift = f * x - g2 * s
            x = x - drift * dt + jnp.sqrt(g2 * dt) * jax.random.normal(k, x.shape, x.dtype)
        else:
            drift = f * x - 0.5 * g2 * s
            x = x - drift * dt
        return x, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(num_steps), jax.random.split(kw, num_steps)))
    if denoise:
        tb = jnp.full((b,), t_end)
        sig = broadcast_to_event(schedule.sigma(tb), x)
        x = (x + sig**2 * score_fn(x, tb)) / broadcast_to_event(schedule.psi(tb), x)
    return x
