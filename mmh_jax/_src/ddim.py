"""The DDIM kernel (eta = 0, classifier-free guidance) shared by ``mmh_jax.sampling`` and the
guarded sampler of ``mmh_jax.memorization``: one alpha rule, one update, one scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array

from mmh_jax.guidance import eps_pair
from mmh_jax.schedules import DDPM

__all__ = ["ddim_alphas", "ddim_x0", "ddim_update", "ddim_scan"]


def ddim_alphas(
    schedule: DDPM, steps: Array, num_steps: int, set_alpha_to_one: bool, dtype
) -> tuple[Array, Array]:
    """``abar`` at each DDIM timestep and at the one after it (``abar_0``, or 1 with
    ``set_alpha_to_one``, after the last), as diffusers' ``DDIMScheduler`` reads them."""
    abar = schedule.alphas_cumprod.astype(dtype)
    final = jnp.ones((), dtype) if set_alpha_to_one else abar[0]
    prev = steps - schedule.num_timesteps // num_steps
    return abar[steps], jnp.where(prev >= 0, abar[jnp.maximum(prev, 0)], final)


def ddim_x0(x: Array, eps: Array, a: Array) -> Array:
    """The clean point DDIM predicts from ``x`` at ``abar = a``: ``(x - sqrt(1 - a) eps) /
    sqrt(a)``."""
    return (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)


def ddim_update(x: Array, eps: Array, a: Array, a_next: Array) -> Array:
    """One DDIM (eta = 0) step: ``x_0`` (:func:`ddim_x0`), then
    ``sqrt(a') x_0 + sqrt(1 - a') eps``."""
    return jnp.sqrt(a_next) * ddim_x0(x, eps, a) + jnp.sqrt(1 - a_next) * eps


@functools.partial(jax.jit, static_argnames=("num_steps", "set_alpha_to_one", "return_trajectory"))
def ddim_scan(
    eps_fn,
    noise,
    cond,
    uncond,
    guidance,
    steps,
    schedule,
    *,
    num_steps,
    set_alpha_to_one,
    return_trajectory,
):
    """DDIM with guidance from ``noise`` over the 0-based timesteps ``steps``: ``(x_0, None)``,
    or ``(x_0, (latents, eps_uncond, eps_cond))`` of every step with ``return_trajectory``."""
    T = schedule.num_timesteps
    a_now, a_prev = ddim_alphas(schedule, steps, num_steps, set_alpha_to_one, noise.dtype)

    def body(x, inputs):
        step, a, a_next = inputs
        t = jnp.full((x.shape[0],), (step + 1) / T, x.dtype)
        eps_u, eps_c = eps_pair(eps_fn, x, t, cond, uncond)
        eps = eps_u + guidance * (eps_c - eps_u)
        return ddim_update(x, eps, a, a_next), ((x, eps_u, eps_c) if return_trajectory else None)

    return jax.lax.scan(body, noise, (steps, a_now, a_prev))
