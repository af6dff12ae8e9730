"""Classifier-free guidance over any text-conditional noise predictor.

A conditional noise predictor is ``eps_fn(x_t, t, context) -> eps`` with ``x_t [b, *event]``,
continuous ``t [b]`` in ``(0, 1]`` and a conditioning array ``context [1 or b, ...]`` (e.g. a
CLIP text embedding ``[b, 77, 768]``); Stable Diffusion's loader gives one as
``StableDiffusion.eps``. Both branches of the guidance go through the network in one call on the
doubled batch ``[x_t; x_t]`` with ``[uncond; cond]``, so the unconditional and the conditional
embedding can never trade places, and both vary with ``x_t``: the Jacobian of the guided score
(what FLIPD takes the trace of) covers both.

Paper, Eq. 2: ``s^CFG(x; t, c) = s(x; t, 0) + lambda (s(x; t, c) - s(x; t, 0))``; in noise units
``eps^CFG = eps_u + lambda (eps_c - eps_u)`` with ``s = -eps / sigma(t)`` (Eq. 10).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.partial import as_pytree_fn
from mmh_jax.schedules import Schedule, broadcast_to_event
from mmh_jax.types import CondEpsFn

__all__ = [
    "broadcast_batch",
    "eps_pair",
    "cfg_eps",
    "cfg_score",
    "cfg_score_fn",
    "conditional_score_fn",
]


def _times(t: ArrayLike, x_t: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(t, x_t.dtype), (x_t.shape[0],))


def broadcast_batch(context: ArrayLike, batch: int, *, name: str = "context") -> Array:
    """A conditioning array of batch 1 or ``batch`` broadcast to ``batch`` (else a ValueError
    naming it)."""
    context = jnp.asarray(context)
    if context.ndim < 1 or context.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have batch 1 or {batch} (that of x_t), got shape {context.shape}"
        )
    return jnp.broadcast_to(context, (batch,) + context.shape[1:])


def eps_pair(
    eps_fn: CondEpsFn,
    x_t: Float[Array, "b *event"],
    t: Float[ArrayLike, " b"],
    cond: Array,
    uncond: Array,
) -> tuple[Array, Array]:
    """``(eps(x_t, t, uncond), eps(x_t, t, cond))`` from one call of ``eps_fn`` on ``2b`` points.

    Args:
        eps_fn: the conditional noise predictor.
        x_t: noisy points.
        t: times, ``[b]`` or a scalar.
        cond: the prompt embedding, batch 1 or ``b``.
        uncond: the unconditional (empty prompt) embedding, batch 1 or ``b``.

    Returns:
        The unconditional and the conditional prediction, each shaped like ``x_t``.
    """
    b = x_t.shape[0]
    t = _times(t, x_t)
    context = jnp.concatenate(
        [broadcast_batch(uncond, b, name="uncond"), broadcast_batch(cond, b, name="cond")]
    )
    both = eps_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), context)
    return both[:b], both[b:]


def cfg_eps(
    eps_fn: CondEpsFn,
    x_t: Float[Array, "b *event"],
    t: Float[ArrayLike, " b"],
    cond: Array,
    uncond: Array,
    *,
    guidance: Float[ArrayLike, ""],
) -> Float[Array, "b *event"]:
    """The guided noise prediction ``eps_u + guidance (eps_c - eps_u)`` (paper, Eq. 2)."""
    eps_u, eps_c = eps_pair(eps_fn, x_t, t, cond, uncond)
    return eps_u + jnp.asarray(guidance, eps_u.dtype) * (eps_c - eps_u)


def cfg_score(
    eps_fn: CondEpsFn,
    x_t: Float[Array, "b *event"],
    t: Float[ArrayLike, " b"],
    cond: Array,
    uncond: Array,
    *,
    schedule: Schedule,
    guidance: Float[ArrayLike, ""],
) -> Float[Array, "b *event"]:
    """The CFG-adjusted score ``s^CFG(x_t; t, c) = -eps^CFG / sigma(t)`` (paper, Eqs. 2, 10)."""
    sigma = broadcast_to_event(schedule.sigma(_times(t, x_t)), x_t)
    return -cfg_eps(eps_fn, x_t, t, cond, uncond, guidance=guidance) / sigma


def _conditional_score(
    eps_fn: CondEpsFn,
    x_t: Float[Array, "b *event"],
    t: Float[ArrayLike, " b"],
    *,
    context: Array,
    schedule: Schedule,
) -> Array:
    t = _times(t, x_t)
    eps = eps_fn(x_t, t, broadcast_batch(context, x_t.shape[0]))
    return -eps / broadcast_to_event(schedule.sigma(t), x_t)


def conditional_score_fn(eps_fn: CondEpsFn, context: ArrayLike, *, schedule: Schedule) -> Partial:
    """``score_fn(x_t, t) = s(x_t; t, context) = -eps(x_t, t, context) / sigma(t)`` (paper,
    Eq. 10), the score of the model conditioned on one embedding (the empty prompt's: the
    unconditional model), for :mod:`mmh_jax.lid`.

    Args:
        eps_fn: the conditional noise predictor (best a :class:`~jax.tree_util.Partial` over the
            network's parameters, so that jitted estimators take them as arguments).
        context: the embedding, batch 1 or that of the points scored.
        schedule: its noise schedule.

    Returns:
        A :class:`~jax.tree_util.Partial` over ``(eps_fn, context, schedule)``.
    """
    return Partial(
        _conditional_score, as_pytree_fn(eps_fn), context=jnp.asarray(context), schedule=schedule
    )


def cfg_score_fn(
    eps_fn: CondEpsFn,
    cond: ArrayLike,
    uncond: ArrayLike,
    *,
    schedule: Schedule,
    guidance: float | ArrayLike,
) -> Partial:
    """``score_fn(x_t, t) = s^CFG(x_t; t, c)`` (paper, Eq. 2) for :mod:`mmh_jax.lid`.

    Args:
        eps_fn: the conditional noise predictor (best a :class:`~jax.tree_util.Partial`).
        cond: the prompt's embedding, batch 1 or that of the points scored.
        uncond: the unconditional (empty prompt) embedding.
        schedule: its noise schedule.
        guidance: the guidance scale ``lambda`` (1: the conditional model; 0: the unconditional).

    Returns:
        A :class:`~jax.tree_util.Partial` over ``(eps_fn, cond, uncond, schedule, guidance)``:
        the embeddings and the guidance are traced arguments, so a new prompt or scale does not
        recompile an estimator.
    """
    return Partial(
        cfg_score,
        as_pytree_fn(eps_fn),
        cond=jnp.asarray(cond),
        uncond=jnp.asarray(uncond),
        schedule=schedule,
        guidance=jnp.asarray(guidance, jnp.result_type(float)),
    )
