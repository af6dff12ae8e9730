"""FLIPD: LID of a diffusion model from the Fokker-Planck rate of its log density.

Kamkari et al. (2024b); paper Eq. 6:

    FLIPD(x, t0) = d + sigma(t0)^2 (tr grad s(psi(t0) x, t0) + ||s(psi(t0) x, t0)||^2).

The trace is taken with forward-mode ``jax.jvp`` only: Hutchinson's estimator
(``E[v^T J v]`` over Rademacher or Gaussian probes) or exactly (``d`` basis
tangents). Tangents are pushed through the score network in chunks, each chunk
as one batched ``jvp``; the network output (the score) comes from the first
chunk's primal, so one Hutchinson probe costs one ``jvp``.
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
    check_option,
    check_schedule,
    check_score_fn,
    check_times,
    is_concrete,
    per_sample_keys,
)
from mmh_jax._src.partial import as_pytree_fn
from mmh_jax._src.trace import sum_vjv
from mmh_jax.schedules import Schedule, broadcast_to_event
from mmh_jax.types import ScoreFn

__all__ = ["flipd", "flipd_curve", "flipd_knee", "FlipdKnee"]

Trace = Literal["hutchinson", "exact"]
Probe = Literal["rademacher", "gaussian"]


def hutchinson_probe(
    keys: Array,
    index: int | Array,
    *,
    event_shape: tuple[int, ...],
    dtype,
    probe: Probe = "rademacher",
) -> Array:
    """Probe ``index`` of every sample, ``draw(fold_in(keys[s], index))`` ``[b, *event_shape]``:
    the probes :func:`flipd` uses (``keys`` one per sample), so other FLIPD computations (the
    prompt metrics, the guarded sampler) can reproduce them exactly."""
    draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
    return jax.vmap(lambda k: draw(jax.random.fold_in(k, index), event_shape, dtype))(keys)


class _TraceSettings(NamedTuple):
    """The trace estimator's checked settings (static under ``jit``)."""

    trace: Trace
    num_probes: int
    probe: Probe
    chunk_size: int | None


@functools.partial(jax.jit, static_argnames=("estimator",))
def _flipd(
    score_fn: ScoreFn,
    x: Array,
    t: Array,
    *,
    schedule: Schedule,
    keys: Array | None,
    estimator: _TraceSettings,
) -> Array:
    """FLIPD on validated inputs: ``t`` has shape ``[b]``, ``keys`` one key per sample."""
    trace, num_probes, probe, chunk_size = estimator
    event_shape = x.shape[1:]
    d = math.prod(event_shape)
    psi = broadcast_to_event(schedule.psi(t), x)
    sigma2 = schedule.sigma(t) ** 2

    if trace == "exact":
        num = d

        def tangent_at(i: Array) -> Array:
            basis = jax.nn.one_hot(i, d, dtype=x.dtype).reshape(event_shape)
            return jnp.broadcast_to(basis, x.shape)
    else:
        num = num_probes

        def tangent_at(i: Array) -> Array:
            return hutchinson_probe(keys, i, event_shape=event_shape, dtype=x.dtype, probe=probe)

    chunk = min(num, 32) if chunk_size is None else min(num, chunk_size)
    score, vjv = sum_vjv(lambda y: score_fn(y, t), psi * x, tangent_at, num, chunk)
    trace_estimate = vjv if trace == "exact" else vjv / num_probes
    squared_norm = jnp.sum(score.reshape(score.shape[0], -1) ** 2, axis=-1)
    return d + sigma2 * (trace_estimate + squared_norm)


def _check_flipd_args(score_fn, x, schedule, trace, num_probes, probe, chunk_size, key):
    x = check_batch(x)
    check_schedule(schedule)
    check_option(trace, "trace", ("hutchinson", "exact"))
    check_option(probe, "probe", ("rademacher", "gaussian"))
    num_probes = check_int(num_probes, "num_probes")
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size")
    keys = per_sample_keys(key, x.shape[0]) if trace == "hutchinson" else None
    t_probe = jnp.full((x.shape[0],), 0.5, dtype=x.dtype)
    check_score_fn(score_fn, x, t_probe)
    return x, keys, _TraceSettings(trace, num_probes, probe, chunk_size)


def flipd(
    score_fn: ScoreFn,
    x: Float[Array, "b *event"],
    *,
    t0: float | Float[ArrayLike, " b"],
    schedule: Schedule,
    key: Array | None = None,
    trace: Trace = "hutchinson",
    num_probes: int = 1,
    probe: Probe = "rademacher",
    chunk_size: int | None = None,
) -> Float[Array, " b"]:
    """FLIPD estimate of the model's LID at each point of a batch (paper, Eq. 6).

    ``FLIPD(x, t0) = d + sigma(t0)^2 (tr grad s(psi(t0) x, t0) + ||s(psi(t0) x, t0)||^2)``.

    Args:
        score_fn: ``score_fn(x_t, t)`` with ``x_t [b, *event]``, ``t [b]``, returning
            ``grad log p_t(x_t)`` shaped like ``x_t``; it must treat samples independently.
        x: points ``[b, *event]`` (clean data space; they are scaled by ``psi(t0)`` here).
        t0: diffusion time in (0, 1], a scalar or one per point.
        schedule: the forward process the score belongs to.
        key: PRNG key for the Hutchinson probes; one key, or one per point (then a point's
            estimate does not depend on the batch it is in). Required for ``"hutchinson"``.
        trace: ``"hutchinson"`` (stochastic, ``num_probes`` jvps) or ``"exact"`` (``d`` jvps).
        num_probes: number of Hutchinson probes.
        probe: Rademacher (lower variance) or Gaussian probes.
        chunk_size: tangents per batched ``jvp``; ``score_fn`` then sees ``b * chunk_size``
            points at once. Defaults to ``min(32, number of tangents)``.

    Returns:
        FLIPD per point, shape ``[b]``, in ``x.dtype``.
    """
    x, keys, estimator = _check_flipd_args(
        score_fn, x, schedule, trace, num_probes, probe, chunk_size, key
    )
    t = check_times(t0, x.shape[0], x.dtype)
    return _flipd(as_pytree_fn(score_fn), x, t, schedule=schedule, keys=keys, estimator=estimator)


def flipd_curve(
    score_fn: ScoreFn,
    x: Float[Array, "b *event"],
    *,
    ts: Float[ArrayLike, " n"],
    schedule: Schedule,
    key: Array | None = None,
    trace: Trace = "hutchinson",
    num_probes: int = 1,
    probe: Probe = "rademacher",
    chunk_size: int | None = None,
) -> Float[Array, "b n"]:
    """FLIPD at every ``t0`` in ``ts`` for every point: the FLIPD curve, in one compiled loop.

    The same Hutchinson probes are used at every ``t0`` (common random numbers), so the
    curve is smooth in ``t0`` and its knee (:func:`flipd_knee`) is stable.

    Args:
        ts: increasing diffusion times in (0, 1], shape ``[n]``.
        Others as in :func:`flipd`.

    Returns:
        ``[b, n]`` FLIPD values.
    """
    x, keys, estimator = _check_flipd_args(
        score_fn, x, schedule, trace, num_probes, probe, chunk_size, key
    )
    ts = jnp.asarray(ts, dtype=x.dtype)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"ts must be a 1-D array of diffusion times, got shape {ts.shape}")
    check_times(ts, ts.shape[0], x.dtype, name="ts")

    return _flipd_curve(
        as_pytree_fn(score_fn), x, ts, schedule=schedule, keys=keys, estimator=estimator
    )


@functools.partial(jax.jit, static_argnames=("estimator",))
def _flipd_curve(score_fn, x, ts, *, schedule, keys, estimator):
    def at(t0: Array) -> Array:
        t = jnp.broadcast_to(t0, (x.shape[0],))
        return _flipd(score_fn, x, t, schedule=schedule, keys=keys, estimator=estimator)

    return jax.lax.map(at, ts).T


class FlipdKnee(NamedTuple):
    """Knee of a FLIPD curve, per point."""

    t0: Float[Array, " b"]
    """The ``t0`` at the knee (the middle of the flattest window)."""
    lid: Float[Array, " b"]
    """FLIPD there, averaged over the window: the LID estimate."""
    index: Int[Array, " b"]
    """Index in ``ts`` where the flattest window starts."""


def flipd_knee(
    ts: Float[ArrayLike, " n"], curve: Float[ArrayLike, "b n"], *, window: int = 3
) -> FlipdKnee:
    """Choose ``t0`` where each FLIPD curve settles onto its plateau.

    The FLIPD paper reads LID at the knee of the curve ``t0 -> FLIPD(x, t0)``: at very
    small ``t0`` a learned score is unreliable and FLIPD swings, then it settles onto a
    plateau near the LID, and at large ``t0`` it leaves it again (towards 0 as
    ``p_t`` becomes Gaussian). We take the knee as the flattest point of the curve in
    ``log t0``: the smallest mean ``|d FLIPD / d log t0|`` over ``window`` consecutive
    intervals. Keep ``ts`` to the range where the plateau can lie (e.g. ``t0 <= 0.5``):
    the Gaussian limit near ``t0 = 1`` is flat too.

    Args:
        ts: increasing times in (0, 1], ``[n]`` with ``n >= window + 1``, as given to
            :func:`flipd_curve`.
        curve: FLIPD values ``[b, n]`` from :func:`flipd_curve`.
        window: number of consecutive intervals whose slopes are averaged.

    Returns:
        :class:`FlipdKnee` with ``t0``, ``lid`` (FLIPD at the knee, averaged over the
        window's points) and ``index`` (first point of the window) per point.
    """
    window = check_int(window, "window")
    ts = jnp.asarray(ts)
    curve = jnp.asarray(curve)
    if ts.ndim != 1 or ts.shape[0] < window + 1:
        raise ValueError(
            f"ts must be 1-D with at least window + 1 = {window + 1} times, got shape {ts.shape}"
        )
    if curve.ndim != 2 or curve.shape[1] != ts.shape[0]:
        raise ValueError(f"curve must have shape [b, {ts.shape[0]}] to match ts, got {curve.shape}")
    if is_concrete(ts) and not bool(jnp.all((jnp.diff(ts) > 0) & (ts[1:] <= 1)) and ts[0] > 0):
        raise ValueError("ts must be strictly increasing and lie in (0, 1]")
    slope = jnp.abs(jnp.diff(curve, axis=1)) / jnp.diff(jnp.log(ts))
    kernel = jnp.ones(window, curve.dtype) / window
    mean_slope = jax.vmap(lambda s: jnp.convolve(s, kernel, mode="valid"))(slope)
    index = jnp.argmin(mean_slope, axis=1)
    points = index[:, None] + jnp.arange(window + 1)
    lid = jnp.mean(jnp.take_along_axis(curve, points, axis=1), axis=1)
    return FlipdKnee(t0=ts[index + window // 2], lid=lid, index=index)
