"""Samplers for diffusion models given a score function.

Both samplers integrate from ``t = 1`` down to ``t_end`` on a uniform time grid and
finish with a Tweedie denoising step ``x_0 = (x + sigma^2 score) / psi`` at
``t_end``, which is the posterior mean of the clean point under the model and
removes the last bit of noise. Score functions follow the package convention
``score_fn(x_t, t)`` with ``x_t`` of shape ``[b, *event]`` and ``t`` of shape ``[b]``.

With forward SDE ``dx = f(t) x dt + g(t) dW`` (paper, Eq. 3) the reverse SDE
(paper, Eq. 4) is ``dx = [f x - g^2 score] dt + g dW_bar`` and the probability-flow
ODE is ``dx/dt = f x - g^2 score / 2``.

:func:`ddim_sample` is the deterministic DDIM sampler (Song et al. 2021, eta = 0) with
classifier-free guidance on a discrete DDPM schedule, as Stable Diffusion is sampled (paper,
Appendix D.1), on the step grid of diffusers' ``DDIMScheduler``; it can return its trajectory
(latents and both noise predictions per step) so that memorization metrics reuse the network
evaluations the sampler already made.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from mmh_jax._src.ddim import ddim_scan
from mmh_jax.schedules import DDPM, Schedule, broadcast_to_event
from mmh_jax.types import CondEpsFn, ScoreFn

__all__ = ["sample", "ddim_timesteps", "ddim_sample", "DDIMGrid", "DDIMResult", "Spacing"]

Spacing = Literal["leading", "trailing", "linspace"]
"""How DDIM spreads its steps over the training timesteps, as diffusers' schedulers
(``timestep_spacing``): ``"leading"``, ``"trailing"`` or ``"linspace"``."""


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


def ddim_timesteps(
    num_train_timesteps: int, *, num_steps: int, spacing: Spacing = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The 0-based network timesteps DDIM visits, in decreasing order (diffusers' grids).

    Args:
        num_train_timesteps: ``T`` of the schedule.
        num_steps: number of sampling steps, at most ``T``.
        spacing: ``"leading"`` (``i * (T // n) + steps_offset``; Stable Diffusion v1's scheduler
            config with ``steps_offset=1`` gives 981, 961, ..., 1 for 50 steps), ``"trailing"``
            (``round(T - i T / n) - 1``) or ``"linspace"`` (``round(linspace(0, T - 1, n))``).
        steps_offset: added to the ``"leading"`` grid.

    Returns:
        int64 array ``[num_steps]``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must lie in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "leading":
        steps = np.arange(num_steps) * (num_train_timesteps // num_steps) + steps_offset
        steps = steps[::-1]
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, num_train_timesteps - 1, num_steps))[::-1]
    else:
        raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    steps = steps.astype(np.int64)
    if steps.min() < 0 or steps.max() >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} puts DDIM timesteps outside 0..{num_train_timesteps - 1}"
        )
    return steps.copy()


class DDIMGrid(NamedTuple):
    """Where DDIM's steps fall and where its last step lands: what a model's scheduler config
    fixes (diffusers' ``DDIMScheduler``: ``timestep_spacing``, ``steps_offset``,
    ``set_alpha_to_one``), as against the number of steps, a choice of each run. The defaults are
    Stable Diffusion v1's scheduler config; ``StableDiffusion.ddim_grid`` reads a pipeline's."""

    spacing: Spacing = "leading"
    """How the steps spread over the training timesteps (:func:`ddim_timesteps`)."""
    steps_offset: int = 1
    """Added to the ``"leading"`` grid."""
    set_alpha_to_one: bool = False
    """The ``abar`` after the last step is 1 (else ``abar_0``)."""

    def timesteps(self, num_train_timesteps: int, num_steps: int) -> np.ndarray:
        """:func:`ddim_timesteps` on this grid: the 0-based network timesteps, decreasing.

        Args:
            num_train_timesteps: ``T`` of the schedule.
            num_steps: number of sampling steps, at most ``T``.

        Returns:
            int64 array ``[num_steps]``.
        """
        return ddim_timesteps(
            num_train_timesteps,
            num_steps=num_steps,
            spacing=self.spacing,
            steps_offset=self.steps_offset,
        )


class DDIMResult(NamedTuple):
    """What :func:`ddim_sample` returns.

    With ``n`` steps and a batch of ``b`` (``latents``, ``eps_uncond``, ``eps_cond`` are ``None``
    unless the trajectory was asked for):
    """

    sample: Float[Array, "b *event"]
    """The final (clean) sample."""
    timesteps: Int[Array, " n"]
    """The 0-based network timesteps visited."""
    latents: Float[Array, "n b *event"] | None = None
    """``x_t`` at each step, before the step's update."""
    eps_uncond: Float[Array, "n b *event"] | None = None
    """The unconditional noise prediction at each step."""
    eps_cond: Float[Array, "n b *event"] | None = None
    """The conditional noise prediction at each step."""


def ddim_sample(
    eps_fn: CondEpsFn,
    noise: Float[ArrayLike, "b *event"],
    cond: Array,
    uncond: Array,
    *,
    schedule: DDPM,
    guidance: float | ArrayLike = 7.5,
    num_steps: int = 50,
    grid: DDIMGrid = DDIMGrid(),
    return_trajectory: bool = False,
) -> DDIMResult:
    """DDIM (eta = 0) with classifier-free guidance, one ``lax.scan`` over the steps.

    At timestep ``i`` with ``a = abar_i`` and ``a' = abar`` of the next timestep (``abar_0``, or 1
    with ``grid.set_alpha_to_one``, after the last), ``eps = eps_u + guidance (eps_c - eps_u)``,
    ``x_0 = (x - sqrt(1 - a) eps) / sqrt(a)`` and ``x <- sqrt(a') x_0 + sqrt(1 - a') eps``: the
    update of diffusers' ``DDIMScheduler`` (paper, Appendix D.1). Both branches are one call of
    ``eps_fn`` on the doubled batch.

    Args:
        eps_fn: ``eps_fn(x_t, t, context)``, continuous ``t = (timestep + 1) / T``.
        noise: the starting latents ``x_T`` (standard normal), ``[b, *event]``.
        cond: prompt embeddings, batch 1 or ``b``.
        uncond: unconditional embeddings, batch 1 or ``b``.
        schedule: the model's DDPM schedule.
        guidance: the guidance scale (a scalar; traced, so a new value does not recompile).
        num_steps: number of DDIM steps.
        grid: the model's timestep grid (:class:`DDIMGrid`; the default is Stable Diffusion
            v1's scheduler config).
        return_trajectory: also return the latents and both noise predictions of every step.

    Returns:
        :class:`DDIMResult`.
    """
    noise = jnp.asarray(noise)
    if noise.ndim < 2 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(
            f"noise must be a floating array [b, *event], got {noise.dtype} {noise.shape}"
        )
    steps = jnp.asarray(grid.timesteps(schedule.num_timesteps, num_steps))
    x, trajectory = ddim_scan(
        eps_fn,
        noise,
        jnp.asarray(cond),
        jnp.asarray(uncond),
        jnp.asarray(guidance, noise.dtype),
        steps,
        schedule,
        num_steps=num_steps,
        set_alpha_to_one=grid.set_alpha_to_one,
        return_trajectory=return_trajectory,
    )
    return DDIMResult(x, steps, *trajectory) if return_trajectory else DDIMResult(x, steps)
