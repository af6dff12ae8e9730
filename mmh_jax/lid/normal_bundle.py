"""Normal-bundle (NB) LID estimator of Stanczuk et al. (2024); paper Eqs. 7-8.

Perturb ``x`` forward to ``t0`` ``K`` times, stack the ``K`` scores into
``S in R^{d x K}`` (their directions span the normal space of the model manifold
as ``t0 -> 0``) and read ``LID = d - rank S``.

The ``d x K`` matrix is never formed: scores are computed ``chunk_size`` copies at
a time and folded into the ``d x d`` Gram matrix ``S S^T``, whose eigenvalues are
the squared singular values (memory ``O(d^2)`` per point, for any ``K``).

Singular values are reported on a scale-free footing: those of
``sigma(t0) S / sqrt(K)`` (centred, see ``center``). On that scale a normal
direction reads about 1 (``sigma s`` is then pure unit noise) and a tangent
direction with data variance ``lambda`` about ``sigma^2 / (psi^2 lambda + sigma^2)``,
so spectra are comparable across ``t0``, ``K`` and points, and one global
threshold (:func:`mmh_jax.lid.percentile_threshold`) makes sense.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from mmh_jax._src.checks import (
    check_batch,
    check_int,
    check_schedule,
    check_score_fn,
    check_times,
    per_sample_keys,
)
from mmh_jax._src.linalg import eigvalsh_descending
from mmh_jax._src.partial import as_pytree_fn
from mmh_jax.lid.rank import numerical_rank
from mmh_jax.schedules import Schedule, broadcast_to_event
from mmh_jax.types import ScoreFn

__all__ = ["normal_bundle", "NormalBundleResult"]


class NormalBundleResult(NamedTuple):
    """Normal-bundle estimate per point."""

    lid: Int[Array, " b"]
    """``d - rank``: the LID estimate."""
    singular_values: Float[Array, "b d"]
    """Singular values of ``sigma(t0) S / sqrt(K)``, descending; re-threshold them with
    :func:`mmh_jax.lid.lid_from_singular_values` (``space="normal"``)."""


def _gap_rank(s: Float[Array, "b d"], noise_floor: float | None) -> Int[Array, " b"]:
    """Rank at the largest gap of consecutive log singular values.

    Singular values below the resolution of the Gram eigensolver,
    ``sqrt(d eps) s_max``, are indistinguishable and are raised to it first (else
    round-off among them, or an eigenvalue clipped to 0, would make the largest gap).
    The gap rule alone can return neither 0 nor ``d``. So, given a ``noise_floor``: if
    every singular value is at least ``noise_floor`` (all read as normal directions, e.g.
    a point mass) the rank is ``d``; if none is, it is 0; otherwise the largest gap decides.
    """
    d = s.shape[-1]
    resolution = jnp.sqrt(d * jnp.finfo(s.dtype).eps) * s[:, :1]
    log_s = jnp.log(jnp.maximum(s, jnp.maximum(resolution, jnp.finfo(s.dtype).tiny)))
    rank = (
        jnp.argmax(log_s[:, :-1] - log_s[:, 1:], axis=-1) + 1
        if d > 1
        else jnp.ones(s.shape[:1], jnp.int32)
    )
    if noise_floor is None:
        return rank
    rank = jnp.where(jnp.all(s >= noise_floor, axis=-1), d, rank)
    return jnp.where(jnp.all(s < noise_floor, axis=-1), 0, rank)


@functools.partial(jax.jit, static_argnames=("num_scores", "center", "chunk"))
def _spectrum(score_fn, x, t, *, schedule, keys, num_scores, center, chunk):
    """Normalised singular values ``[b, d]`` of the (centred) score matrix, descending."""
    b, event_shape = x.shape[0], x.shape[1:]
    d = math.prod(event_shape)
    psi_x = broadcast_to_event(schedule.psi(t), x)[:, None] * x[:, None]
    sigma = schedule.sigma(t)
    sigma_b = broadcast_to_event(sigma, x)[:, None]
    t_rep = jnp.repeat(t, chunk)

    def terms(start: Array) -> tuple[Array, Array]:
        idx = start + jnp.arange(chunk)
        noise = jax.vmap(
            lambda k: jax.vmap(
                lambda i: jax.random.normal(jax.random.fold_in(k, i), event_shape, x.dtype)
            )(idx)
        )(keys)
        x_t = (psi_x + sigma_b * noise).reshape((b * chunk,) + event_shape)
        scores = score_fn(x_t, t_rep).reshape(b, chunk, d) * sigma[:, None, None]
        scores = jnp.where((idx < num_scores)[None, :, None], scores, 0)
        return jnp.einsum("bci,bcj->bij", scores, scores), scores.sum(1)

    def body(carry, start):
        gram, total = terms(start)
        return (carry[0] + gram, carry[1] + total), None

    # The first chunk starts the sums (rather than zeros), so their type follows the inputs'
    # (inside a user's shard_map they vary over the mesh axis, as the scan's carry must).
    gram, total = terms(jnp.asarray(0))
    starts = jnp.arange(1, -(-num_scores // chunk)) * chunk
    if starts.shape[0]:
        (gram, total), _ = jax.lax.scan(body, (gram, total), starts)
    gram = gram / num_scores
    if center:
        mean = total / num_scores
        gram = gram - mean[:, :, None] * mean[:, None, :]
    eigenvalues = eigvalsh_descending(gram)
    return jnp.sqrt(jnp.maximum(eigenvalues, 0))


def normal_bundle(
    score_fn: ScoreFn,
    x: Float[Array, "b *event"],
    *,
    t0: float | Float[ArrayLike, " b"],
    schedule: Schedule,
    key: Array,
    num_scores: int | None = None,
    threshold: Literal["gap"] | float | Float[ArrayLike, " b"] = "gap",
    center: bool = True,
    chunk_size: int | None = None,
) -> NormalBundleResult:
    """Normal-bundle estimate of the model's LID at each point (paper, Eqs. 7-8).

    ``x_t^(i) = psi(t0) x + sigma(t0) eps_i`` for ``i = 1..K``;
    ``S = [s(x_t^(1), t0) | ... | s(x_t^(K), t0)]``; ``LID = d - rank S``.

    Args:
        score_fn: ``score_fn(x_t [n, *event], t [n]) -> grad log p_t`` shaped like ``x_t``.
        x: points ``[b, *event]``.
        t0: diffusion time in (0, 1], scalar or per point.
        schedule: the forward process of the score.
        key: PRNG key, one key or one per point (then a point's estimate does not depend
            on its batch).
        num_scores: ``K``, the number of perturbed copies per point; default ``4 d``
            (Stanczuk et al.).
        threshold: how the rank is read off the normalised singular values (module
            docstring): a float (or one per point) counts those above it; ``"gap"`` cuts at the largest
            gap between consecutive log singular values, except that a spectrum lying
            entirely above (below) the noise floor ``(1 - sqrt(d / K)) / 2`` -- half the
            lower edge of the Marchenko-Pastur band of pure noise -- has rank ``d`` (0).
            With ``K <= d`` there is no such floor and only the gap decides.
        center: subtract the mean score over the ``K`` copies before taking the
            spectrum. Away from a component's centre the score has a component along the
            manifold shared by all copies; uncentred it adds one singular value and can
            cost one dimension of LID. ``center=False`` is the original estimator.
        chunk_size: copies per point in one ``score_fn`` call, which then sees
            ``b * chunk_size`` points; default ``min(K, 32)``.

    Returns:
        :class:`NormalBundleResult` with integer ``lid`` ``[b]`` and
        ``singular_values`` ``[b, d]``.
    """
    x = check_batch(x)
    check_schedule(schedule)
    b, event_shape = x.shape[0], x.shape[1:]
    d = math.prod(event_shape)
    keys = per_sample_keys(key, b)
    num_scores = 4 * d if num_scores is None else check_int(num_scores, "num_scores", minimum=2)
    chunk = min(num_scores, 32 if chunk_size is None else check_int(chunk_size, "chunk_size"))
    if isinstance(threshold, str) and threshold != "gap":
        raise ValueError(f"threshold must be 'gap' or a float, got {threshold!r}")
    t = check_times(t0, b, x.dtype)
    check_score_fn(score_fn, x, t)

    singular_values = _spectrum(
        as_pytree_fn(score_fn),
        x,
        t,
        schedule=schedule,
        keys=keys,
        num_scores=num_scores,
        center=center,
        chunk=chunk,
    )

    if isinstance(threshold, str):
        floor = (1 - math.sqrt(d / num_scores)) / 2 if num_scores > d else None
        rank = _gap_rank(singular_values, floor)
    else:
        rank = numerical_rank(singular_values, threshold=threshold)
    return NormalBundleResult(lid=d - rank, singular_values=singular_values)
