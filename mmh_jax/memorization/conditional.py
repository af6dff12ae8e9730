"""Memorization metrics of text-conditional diffusion models (paper, Section 3.2, Section 4.1
"Stable Diffusion", Appendix C; Wen et al. 2023).

All of them take a conditional noise predictor ``eps_fn(x_t, t, context)`` (Stable Diffusion's
``StableDiffusion.eps``), never a network: in latent space, with the prompt's embedding ``cond``
and the empty prompt's ``uncond`` (batch 1 or that of the latents). Every metric is per image;
average over the images of a prompt as the experiment needs.

* **CFG vector norm** (Wen et al.): ``||eps(z_t, c) - eps(z_t, 0)||`` over the whole latent, in
  noise units, not scaled by the guidance; large for memorized prompts.
* **CFG-adjusted score norm** (paper, Eq. 2, Figure 3): ``||s^CFG(z_t; t, c)||`` with
  ``s^CFG = -eps^CFG / sigma(t)``; large for memorized prompts.
* **FLIPD** (paper, Eq. 6) of the unconditional model and of the CFG-conditional one,
  ``LID_theta(z)`` and ``LID_theta(z | c)``; small for memorized images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.checks import trajectory_steps
from mmh_jax.guidance import cfg_score_fn, conditional_score_fn, eps_pair
from mmh_jax.lid import flipd
from mmh_jax.sampling import DDIMResult
from mmh_jax.schedules import DDPM, broadcast_to_event
from mmh_jax.types import CondEpsFn

__all__ = [
    "CFGNorms",
    "ConditionalFlipd",
    "generation_cfg_norms",
    "image_cfg_norms",
    "conditional_flipd",
]


class CFGNorms(NamedTuple):
    """Per-image CFG norms."""

    cfg_vector: Float[Array, " b"]
    """``||eps(z_t, c) - eps(z_t, 0)||`` (Wen et al.'s detection metric; noise units)."""
    cfg_score: Float[Array, " b"]
    """``||s^CFG(z_t; t, c)||`` (paper, Eq. 2; score units)."""


class ConditionalFlipd(NamedTuple):
    """FLIPD of one latent under the two model distributions of a text-conditional model."""

    unconditional: Float[Array, " b"]
    """``LID_theta(z)``: FLIPD of ``s(z; t, 0)`` (the empty prompt)."""
    conditional: Float[Array, " b"]
    """``LID_theta(z | c)``: FLIPD of the CFG-adjusted score ``s^CFG(z; t, c)``."""


def _norms(x: Array) -> Array:
    return jnp.sqrt(
        jnp.sum(jnp.square(x.reshape(x.shape[:-3] + (-1,)).astype(jnp.float32)), axis=-1)
    )


def generation_cfg_norms(
    result: DDIMResult,
    *,
    schedule: DDPM,
    guidance: float,
    steps: Sequence[int] | None = None,
) -> CFGNorms:
    """CFG norms of generated images from the sampler's own evaluations, averaged over steps.

    Wen et al.'s metric: the mean over the chosen DDIM steps of ``||eps_c - eps_u||``; and the
    mean of ``||eps_u + guidance (eps_c - eps_u)|| / sigma(t)``, the CFG-adjusted score norm.
    No network is called.

    Args:
        result: :func:`mmh_jax.sampling.ddim_sample` with ``return_trajectory=True``.
        schedule: the model's schedule (``sigma`` at each step's time).
        guidance: the guidance scale the sampler used.
        steps: indices into the trajectory (0 is the first, noisiest step); all by default.

    Returns:
        :class:`CFGNorms`, each ``[b]`` (float32).
    """
    index = trajectory_steps(steps, result.eps_cond, result.eps_uncond)
    eps_u, eps_c = result.eps_uncond[index], result.eps_cond[index]
    t = (result.timesteps[index] + 1) / schedule.num_timesteps
    sigma = schedule.sigma(t.astype(jnp.float32))[:, None]
    vector = _norms(eps_c - eps_u)
    score = _norms(eps_u + guidance * (eps_c - eps_u)) / sigma
    return CFGNorms(jnp.mean(vector, axis=0), jnp.mean(score, axis=0))


def image_cfg_norms(
    eps_fn: CondEpsFn,
    z0: Float[ArrayLike, "b c h w"],
    cond: Array,
    uncond: Array,
    *,
    schedule: DDPM,
    guidance: float = 7.5,
    t0: float = 0.01,
    num_steps: int = 3,
) -> CFGNorms:
    """CFG norms of real images (paper, Appendix C, "CFG norm ... in the training set").

    The encoded image ``z0`` is carried to ``t0`` by ``num_steps`` Euler steps of the
    conditional probability-flow ODE ``dz/dt = f(t) z - g(t)^2 s(z; t, c) / 2`` on a uniform
    grid from ``t = 1/T`` (the first training step, where the score is defined) to ``t0``;
    there the CFG vector ``||eps(z, c) - eps(z, 0)||`` and the CFG-adjusted score norm are read.
    The paper's setting is ``t0 = 0.01`` and 3 steps (its Figure 3 reads the norms at 0.02).
    (In score units the CFG vector is the value here divided by ``sigma(t0)``.)

    Args:
        eps_fn: the conditional noise predictor.
        z0: clean latents (``StableDiffusion.encode_image``).
        cond, uncond: the captions' and the empty prompt's embeddings.
        schedule: the model's schedule.
        guidance: the guidance scale of the CFG-adjusted score.
        t0: the time at which the norms are read, in ``(1/T, 1]``.
        num_steps: Euler steps.

    Returns:
        :class:`CFGNorms`, each ``[b]``.
    """
    z0 = jnp.asarray(z0)
    if z0.ndim != 4 or not jnp.issubdtype(z0.dtype, jnp.floating):
        raise ValueError(f"z0 must be floating latents [b, c, h, w], got {z0.dtype} {z0.shape}")
    if not 1 / schedule.num_timesteps < t0 <= 1:
        raise ValueError(f"t0 must lie in (1/T, 1] = ({1 / schedule.num_timesteps}, 1], got {t0}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return _image_cfg_norms(
        eps_fn,
        z0,
        jnp.asarray(cond),
        jnp.asarray(uncond),
        schedule,
        jnp.asarray(guidance, z0.dtype),
        jnp.asarray(t0, z0.dtype),
        num_steps=num_steps,
    )


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _image_cfg_norms(eps_fn, z0, cond, uncond, schedule, guidance, t0, *, num_steps):
    score_c = conditional_score_fn(eps_fn, cond, schedule=schedule)
    ts = jnp.linspace(1.0 / schedule.num_timesteps, t0, num_steps + 1).astype(z0.dtype)

    def euler(z, i):
        t, dt = ts[i], ts[i + 1] - ts[i]
        drift = schedule.f(t) * z - 0.5 * schedule.g2(t) * score_c(z, jnp.full(z.shape[:1], t))
        return z + dt * drift, None

    z, _ = jax.lax.scan(euler, z0, jnp.arange(num_steps))
    t = jnp.full(z.shape[:1], t0)
    eps_u, eps_c = eps_pair(eps_fn, z, t, cond, uncond)
    sigma = broadcast_to_event(schedule.sigma(t), z)
    return CFGNorms(_norms(eps_c - eps_u), _norms((eps_u + guidance * (eps_c - eps_u)) / sigma))


def conditional_flipd(
    eps_fn: CondEpsFn,
    z0: Float[ArrayLike, "b c h w"],
    cond: Array,
    uncond: Array,
    *,
    schedule: DDPM,
    key: Array,
    guidance: float = 7.5,
    t0: float = 0.05,
    num_probes: int = 1,
) -> ConditionalFlipd:
    """FLIPD of latents under the unconditional model and under the CFG-conditional one.

    ``LID_theta(z)`` is :func:`mmh_jax.lid.flipd` of the empty prompt's score and
    ``LID_theta(z | c)`` that of ``s^CFG(z; t, c)`` (paper, Eq. 6 and Eq. 26 of Appendix D);
    the trace of the CFG score's Jacobian goes through both branches (they both depend on ``z``),
    and is accumulated in the latents' dtype (float32) even when the network computes in bfloat16.
    The paper's setting: ``t0 = 0.05``, one Hutchinson probe. Both use the same probes.

    Args:
        eps_fn: the conditional noise predictor (a :class:`~jax.tree_util.Partial` over the
            network's parameters).
        z0: clean latents.
        cond, uncond: the prompts' and the empty prompt's embeddings (batch 1 or ``b``).
        schedule: the model's schedule.
        key: PRNG key for the probes (one, or one per latent).
        guidance: the guidance scale of the conditional model.
        t0: FLIPD's diffusion time.
        num_probes: Hutchinson probes.

    Returns:
        :class:`ConditionalFlipd`, each ``[b]``.
    """
    uncond_score = conditional_score_fn(eps_fn, uncond, schedule=schedule)
    guided_score = cfg_score_fn(eps_fn, cond, uncond, schedule=schedule, guidance=guidance)
    kwargs = dict(schedule=schedule, key=key, num_probes=num_probes)
    return ConditionalFlipd(
        flipd(uncond_score, z0, t0=t0, **kwargs), flipd(guided_score, z0, t0=t0, **kwargs)
    )
