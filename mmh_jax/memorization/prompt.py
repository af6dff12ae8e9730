"""Differentiable memorization metrics of a prompt embedding, token attributions and prompt-
embedding optimisation (paper, Section 4.2 and Appendix D.2-D.3; Wen et al. 2023).

A metric ``A(c)`` is an average, over points ``x_t`` at times ``t`` drawn from the guided
model's marginals (a DDIM trajectory's latents, :func:`trajectory_points`, or generated latents
noised again, :func:`noised_points`), of one of three per-point values (in the paper's DDIM
coordinates ``x~ = x_t / psi(t)``, Eq. 11-14, where ``sigma~^2 ||s~||^2 = ||eps||^2``):

* ``"cfg"``: ``||eps(x_t; t, c) - eps(x_t; t, 0)||^2`` (Wen et al.'s metric, Eq. 15; Eq. 24
  up to the constant ``lambda^2``). Large when memorized.
* ``"cfg_score"``: ``sigma~^2 ||s~^CFG(x~_t; t, c)||^2 = ||eps^CFG(x_t; t, c)||^2`` (Eq. 25).
  Large when memorized.
* ``"flipd"``: ``FLIPD~^CFG(x~_t; t, c) = d + sigma~^2 (tr grad s~^CFG + ||s~^CFG||^2)``
  (Eq. 26), which equals ``d - sigma(t) tr(grad eps^CFG(x_t)) + ||eps^CFG||^2``; its average is
  ``A^FLIPD(c)`` (Eq. 28). Small when memorized. The trace (one Hutchinson probe by default)
  goes through both guidance branches, ``tr grad eps^CFG = (1 - lambda) tr grad eps_u +
  lambda tr grad eps_c``.

The paper's time distributions: ``U(0, 1]`` for the two CFG metrics (all DDIM steps, as Wen
et al.), ``U(0, 0.2]`` for FLIPD (the public code: DDIM steps 10-49 of 50). Every metric is a
function of the conditional embedding ``c`` only: the points are constants (the trajectory is
not differentiated through) and the unconditional branch is computed under
``stop_gradient``, so ``jax.grad`` with respect to ``c`` costs one network backward of the
conditional branch per point, and no gradient reaches the unconditional embedding (the public
code's mistake was the reverse: it differentiated the unconditional slot only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.checks import check_int, check_option, per_sample_keys, trajectory_steps
from mmh_jax.guidance import broadcast_batch
from mmh_jax.lid.flipd import hutchinson_probe
from mmh_jax.memorization.signals import memorized_when_high
from mmh_jax.sampling import DDIMResult
from mmh_jax.schedules import DDPM
from mmh_jax.types import CondEpsFn

__all__ = [
    "Metric",
    "MetricPoints",
    "TokenAttribution",
    "EmbeddingOptimization",
    "trajectory_points",
    "noised_points",
    "metric_values",
    "prompt_metric",
    "token_attributions",
    "optimize_embedding",
    "optimize_embedding_traced",
]

Metric = Literal["cfg", "cfg_score", "flipd"]
"""A differentiable metric of a prompt embedding (paper Appendix D.2): ``"cfg"`` (Wen et al.'s
``||eps_c - eps_u||^2``), ``"cfg_score"`` (the squared norm of the CFG-adjusted noise) or
``"flipd"`` (FLIPD of the CFG-adjusted score, ``A^FLIPD``)."""
_METRICS = ("cfg", "cfg_score", "flipd")


class MetricPoints(NamedTuple):
    """Noisy latents at which a metric is evaluated, with their times."""

    latents: Float[Array, "n *event"]
    """``x_t`` (not scaled by ``1 / psi(t)``: the network's input)."""
    t: Float[Array, " n"]
    """Continuous times in ``(0, 1]``, ``t = (timestep + 1) / T``."""


class TokenAttribution(NamedTuple):
    """What :func:`token_attributions` returns."""

    scores: Float[Array, " n_ctx"]
    """Per context position: the L2 norm over the embedding dimension of the gradient of the
    point's metric with respect to the embedding, averaged over the points."""
    value: Float[Array, ""]
    """The metric ``A(c)``: the mean of the per-point values."""


class EmbeddingOptimization(NamedTuple):
    """What :func:`optimize_embedding` returns."""

    embedding: Float[Array, "1 n_ctx dim"]
    """The optimised conditional embedding."""
    values: Float[Array, " steps"]
    """``A(c)`` before each update, then after the last one (``steps_taken + 1`` values)."""
    steps_taken: int
    """Updates made (fewer than asked when the target was reached)."""


def trajectory_points(
    result: DDIMResult, *, schedule: DDPM, steps: Sequence[int] | None = None
) -> MetricPoints:
    """The latents of DDIM trajectories as metric points (Wen et al.; paper, Eq. 15).

    Args:
        result: :func:`mmh_jax.sampling.ddim_sample` with ``return_trajectory=True`` (``n``
            steps of ``b`` images).
        schedule: the model's schedule (for ``T``).
        steps: indices into the trajectory (0 is the first, noisiest step; negative indices
            count from the end); all by default. The public code's FLIPD attribution uses
            steps 10-49 of 50.

    Returns:
        :class:`MetricPoints` of ``len(steps) * b`` points, step-major.
    """
    index = trajectory_steps(steps, result.latents)
    latents = jax.lax.stop_gradient(result.latents[index])
    b = latents.shape[1]
    t = schedule.time(result.timesteps[index]).astype(latents.dtype)
    return MetricPoints(latents.reshape((-1,) + latents.shape[2:]), jnp.repeat(t, b))


def noised_points(
    z0: Float[ArrayLike, "b *event"],
    *,
    schedule: DDPM,
    key: Array,
    times_per_latent: int = 1,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> MetricPoints:
    """Clean latents (e.g. generated with the prompt) noised to random times as metric points.

    ``t`` is drawn uniformly from the training grid ``{i / T}`` in ``(t_lo, t_hi]`` (the
    paper's scheduling distribution ``T(0, 1)``: ``(0, 1]`` for the CFG metrics, ``(0, 0.2]``
    for FLIPD) and ``x_t = psi(t) z0 + sigma(t) noise``: a draw from the model's marginal at
    ``t`` when ``z0`` is a draw from the model.

    Args:
        z0: clean latents ``[b, *event]``.
        schedule: the model's schedule.
        key: PRNG key of the times and the noise.
        times_per_latent: points per latent.
        t_range: ``(t_lo, t_hi)`` with ``0 <= t_lo < t_hi <= 1`` and at least one grid step
            in between.

    Returns:
        :class:`MetricPoints` of ``b * times_per_latent`` points, latent-major.
    """
    z0 = jnp.asarray(z0)
    if z0.ndim < 2 or z0.shape[0] == 0 or not jnp.issubdtype(z0.dtype, jnp.floating):
        raise ValueError(f"z0 must be floating latents [b, ...], got {z0.dtype} {z0.shape}")
    times_per_latent = check_int(times_per_latent, "times_per_latent")
    lo, hi = (float(v) for v in t_range)
    T = schedule.num_timesteps
    first, last = math.floor(lo * T) + 1, math.floor(hi * T)
    if not 0 <= lo < hi <= 1 or first > last:
        raise ValueError(
            f"t_range must satisfy 0 <= t_lo < t_hi <= 1 with a grid time i / {T} "
            f"in (t_lo, t_hi], got {t_range}"
        )
    k_t, k_noise = jax.random.split(key)
    n = z0.shape[0] * times_per_latent
    x0 = jnp.repeat(z0, times_per_latent, axis=0)
    i = jax.random.randint(k_t, (n,), first, last + 1)
    t = (i / T).astype(z0.dtype)
    noise = jax.random.normal(k_noise, x0.shape, z0.dtype)
    shape = (n,) + (1,) * (z0.ndim - 1)
    x_t = schedule.psi(t).reshape(shape) * x0 + schedule.sigma(t).reshape(shape) * noise
    return MetricPoints(x_t.astype(z0.dtype), t)


def _accumulator(dtype) -> jnp.dtype:
    """float32 for float32 and narrower networks (bfloat16), float64 under x64."""
    return jnp.promote_types(dtype, jnp.float32)


def _squared_norm(x: Array) -> Array:
    return jnp.sum(jnp.square(x.astype(_accumulator(x.dtype))).reshape(x.shape[0], -1), axis=-1)


def _branch(eps_fn: CondEpsFn, x: Array, t: Array, context: Array, probes: Array | None):
    """``eps(x, t, context)`` and, given probes ``[p, n, *event]``, ``sum_p <v_p, J v_p>``."""
    if probes is None:
        return eps_fn(x, t, context), None
    eps, vjv = None, 0.0
    for v in probes:  # a handful of probes: unrolled
        out, jv = jax.jvp(lambda y: eps_fn(y, t, context), (x,), (v,))
        eps = out if eps is None else eps
        acc = _accumulator(jv.dtype)
        vjv = vjv + jnp.sum((v.astype(acc) * jv.astype(acc)).reshape(x.shape[0], -1), axis=-1)
    return eps, vjv


def _point_values(inputs, x, t, cond, uncond, probes, metric):
    """Per-point metric values; differentiable in ``cond`` only (see the module docstring)."""
    eps_fn, guidance, schedule = inputs.eps_fn, inputs.guidance, inputs.schedule
    eps_u, vjv_u = jax.lax.stop_gradient(_branch(eps_fn, x, t, uncond, probes))
    eps_c, vjv_c = _branch(eps_fn, x, t, cond, probes)
    acc = _accumulator(eps_c.dtype)
    eps_u, eps_c = eps_u.astype(acc), eps_c.astype(acc)
    if metric == "cfg":
        return _squared_norm(eps_c - eps_u)
    eps = eps_u + guidance * (eps_c - eps_u)
    if metric == "cfg_score":
        return _squared_norm(eps)
    d = math.prod(x.shape[1:])
    trace = ((1 - guidance) * vjv_u + guidance * vjv_c) / probes.shape[0]
    return d - schedule.sigma(t).astype(acc) * trace + _squared_norm(eps)


def _probes(keys: Array, shape: tuple[int, ...], num_probes: int, dtype) -> Array:
    """Rademacher probes ``[p, n, *shape]`` drawn as :func:`mmh_jax.lid.flipd` draws them
    (probe ``i`` of a point from ``fold_in(point key, i)``)."""
    return jnp.stack(
        [hutchinson_probe(keys, i, event_shape=shape, dtype=dtype) for i in range(num_probes)]
    )


def _check_points(points: MetricPoints) -> MetricPoints:
    latents, t = jnp.asarray(points.latents), jnp.asarray(points.t)
    if latents.ndim < 2 or latents.shape[0] == 0 or not jnp.issubdtype(latents.dtype, jnp.floating):
        raise ValueError(
            f"points.latents must be floating [n, ...], got {latents.dtype} {latents.shape}"
        )
    if t.shape != latents.shape[:1]:
        raise ValueError(f"points.t must have shape ({latents.shape[0]},), got {t.shape}")
    return MetricPoints(latents, t.astype(latents.dtype))


class _Inputs(NamedTuple):
    """Everything a metric evaluation takes besides ``cond`` (a pytree of jit arguments)."""

    eps_fn: CondEpsFn
    points: MetricPoints
    uncond: Array
    keys: Array | None
    """One key per point for the ``"flipd"`` probes, else ``None``."""
    guidance: Array
    schedule: DDPM


def _prepare(eps_fn, points, cond, uncond, metric, schedule, guidance, key, num_probes):
    """Check the arguments every public function shares: ``(cond, inputs, num_probes)``."""
    check_option(metric, "metric", _METRICS)
    points = _check_points(points)
    n = points.latents.shape[0]
    cond, uncond = jnp.asarray(cond), jnp.asarray(uncond)
    broadcast_batch(cond, n, name="cond")  # shape checks with the argument's name
    broadcast_batch(uncond, n, name="uncond")
    num_probes = check_int(num_probes, "num_probes")
    keys = per_sample_keys(key, n) if metric == "flipd" else None
    inputs = _Inputs(eps_fn, points, uncond, keys, jnp.asarray(guidance, jnp.float32), schedule)
    return cond, inputs, num_probes


def metric_values(
    eps_fn: CondEpsFn,
    points: MetricPoints,
    cond: Float[ArrayLike, "1_or_n n_ctx dim"],
    uncond: Float[ArrayLike, "1_or_n n_ctx dim"],
    *,
    metric: Metric,
    schedule: DDPM,
    guidance: float = 7.5,
    key: Array | None = None,
    num_probes: int = 1,
) -> Float[Array, " n"]:
    """Per-point memorization metric (paper, Eqs. 15, 25, 26; see the module docstring).

    Args:
        eps_fn: the conditional noise predictor ``eps_fn(x_t, t, context)`` (a
            :class:`~jax.tree_util.Partial` over the network's parameters).
        points: :func:`trajectory_points` or :func:`noised_points`.
        cond: the prompt's embedding, batch 1 or one per point.
        uncond: the empty prompt's embedding (no gradient flows into it).
        metric: ``"cfg"``, ``"cfg_score"`` or ``"flipd"``.
        schedule: the model's schedule.
        guidance: the guidance scale ``lambda`` (not used by ``"cfg"``).
        key: PRNG key of the Hutchinson probes (``"flipd"``); one, or one per point.
        num_probes: Hutchinson probes per point (``"flipd"``).

    Returns:
        ``[n]`` values, float32 (float64 under x64 with a float64 network).
    """
    cond, inputs, num_probes = _prepare(
        eps_fn, points, cond, uncond, metric, schedule, guidance, key, num_probes
    )
    return _metric_values(cond, inputs, metric=metric, num_probes=num_probes)


@functools.partial(jax.jit, static_argnames=("metric", "num_probes"))
def _metric_values(cond, inputs: _Inputs, *, metric, num_probes):
    x, t = jax.lax.stop_gradient(inputs.points.latents), inputs.points.t
    n = x.shape[0]
    keys = inputs.keys
    probes = None if keys is None else _probes(keys, x.shape[1:], num_probes, x.dtype)
    uncond = broadcast_batch(inputs.uncond, n, name="uncond")
    return _point_values(
        inputs, x, t, broadcast_batch(cond, n, name="cond"), uncond, probes, metric
    )


def prompt_metric(
    eps_fn: CondEpsFn,
    cond: Float[ArrayLike, "1_or_n n_ctx dim"],
    uncond: Float[ArrayLike, "1_or_n n_ctx dim"],
    points: MetricPoints,
    *,
    metric: Metric,
    schedule: DDPM,
    guidance: float = 7.5,
    key: Array | None = None,
    num_probes: int = 1,
) -> Float[Array, ""]:
    """``A^CFG(c)``, ``A^{s^CFG}(c)`` or ``A^FLIPD(c)`` (paper, Eqs. 24, 25, 28): the mean of
    :func:`metric_values` over the points, a differentiable function of ``cond``.

    ``jax.grad(prompt_metric, argnums=1)`` differentiates through all points at once (one
    batched backward); :func:`token_attributions` takes one point at a time. Arguments as
    :func:`metric_values`.
    """
    return jnp.mean(
        metric_values(
            eps_fn,
            points,
            cond,
            uncond,
            metric=metric,
            schedule=schedule,
            guidance=guidance,
            key=key,
            num_probes=num_probes,
        )
    )


def token_attributions(
    eps_fn: CondEpsFn,
    cond: Float[ArrayLike, "1 n_ctx dim"],
    uncond: Float[ArrayLike, "1 n_ctx dim"],
    points: MetricPoints,
    *,
    metric: Metric,
    schedule: DDPM,
    guidance: float = 7.5,
    key: Array | None = None,
    num_probes: int = 1,
) -> TokenAttribution:
    """Which positions of the prompt embedding drive the metric (Wen et al.; paper, Section 4.2,
    Figures 7, 11).

    For every point, the gradient of its metric value with respect to ``cond`` (one network
    backward of the conditional branch at batch 1, inside a ``lax.scan``, so memory is that of
    one backward whatever the number of points); the L2 norm over the embedding dimension per
    position; averaged over points (the public code: 4 images x 50 DDIM steps for the CFG
    metrics, 1 image and steps 10-49 for FLIPD).

    Memory at Stable Diffusion v1.5 shapes (64 x 64 latents, float32; XLA's plan for the
    compiled scan, ``benchmarks/bench_attribution.py``): 3.2 GiB of weights and inputs plus
    9.3 GiB of temporaries for the CFG metrics and 13.8 GiB for FLIPD (reverse mode over the
    trace's jvp), so one prompt fits in 24 GB without rematerialisation (``jax.checkpoint`` of
    the per-point metric was measured to raise the plan to 16.7 GiB, not lower it).

    Args:
        eps_fn, uncond, points, metric, schedule, guidance, key, num_probes: as
            :func:`metric_values`.
        cond: one prompt's embedding ``[1, n_ctx, dim]``.

    Returns:
        :class:`TokenAttribution` with ``scores [n_ctx]`` (every position, special tokens and
        padding included: pick the prompt's tokens with the tokenizer) and ``value``.
    """
    cond = jnp.asarray(cond)
    if cond.ndim != 3 or cond.shape[0] != 1:
        raise ValueError(
            f"cond must be one prompt's embedding [1, n_ctx, dim], got shape {cond.shape}"
        )
    cond, inputs, num_probes = _prepare(
        eps_fn, points, cond, uncond, metric, schedule, guidance, key, num_probes
    )
    if inputs.keys is None:  # unused: a placeholder to scan over
        inputs = inputs._replace(keys=jax.random.split(jax.random.key(0), len(inputs.points.t)))
    if inputs.uncond.shape[0] != 1:
        raise ValueError(
            f"uncond must have batch 1 for token_attributions, got {inputs.uncond.shape}"
        )
    return _token_attributions(cond, inputs, metric=metric, num_probes=num_probes)


@functools.partial(jax.jit, static_argnames=("metric", "num_probes"))
def _token_attributions(cond, inputs: _Inputs, *, metric, num_probes):
    points, keys = inputs.points, inputs.keys
    x_all = jax.lax.stop_gradient(points.latents)

    def value(c, x, t, k):
        probes = _probes(k[None], x.shape[1:], num_probes, x.dtype) if metric == "flipd" else None
        return _point_values(inputs, x, t, c, inputs.uncond, probes, metric)[0]

    def one(carry, inp):
        x, t, k = inp
        v, g = jax.value_and_grad(value)(cond, x[None], t[None], k)
        norms = jnp.sqrt(jnp.sum(jnp.square(g[0].astype(acc)), axis=-1))
        return (carry[0] + norms, carry[1] + v), None

    acc = jax.eval_shape(value, cond, x_all[:1], points.t[:1], keys[0]).dtype
    # zeros shaped like the sums, and (inside a shard_map, as the scoring engine's columns) of
    # the inputs' varying type, as the scan's carry must be
    like = cond[0, :, 0] + x_all.reshape(-1)[0]
    init = (jnp.zeros_like(like, acc), jnp.zeros_like(like[0], acc))
    (total, value_sum), _ = jax.lax.scan(one, init, (x_all, points.t, keys))
    n = x_all.shape[0]
    return TokenAttribution(total / n, value_sum / n)


def optimize_embedding(
    eps_fn: CondEpsFn,
    cond: Float[ArrayLike, "1 n_ctx dim"],
    uncond: Float[ArrayLike, "1 n_ctx dim"],
    points: MetricPoints,
    *,
    metric: Metric,
    schedule: DDPM,
    guidance: float = 7.5,
    learning_rate: float = 0.05,
    num_steps: int = 10,
    target: float | None = None,
    weight_decay: float = 0.01,
    key: Array | None = None,
    num_probes: int = 1,
) -> EmbeddingOptimization:
    """Move the prompt embedding away from memorization by AdamW on the metric (Wen et al.'s
    inference-time mitigation; paper, Appendix D.3).

    The CFG metrics are lowered, ``A^FLIPD`` is raised. As Wen et al., the first position (the
    start token, the same for every prompt) is left unchanged and the optimisation stops once
    the metric reaches ``target`` (Wen et al.: ``||eps_c - eps_u|| <= 3`` at the first DDIM
    step, lr 0.05, at most 10 steps; the paper's FLIPD variant: step 40, lr 0.05, 20 steps).
    Sample with the returned embedding from the same starting noise to get the mitigated image.

    Args:
        eps_fn, uncond, points, metric, schedule, guidance, key, num_probes: as
            :func:`metric_values`; the points stay fixed (e.g. the latents of DDIM step
            ``j``: ``trajectory_points(result, schedule=..., steps=[j])``) and so do the
            probes.
        cond: one prompt's embedding ``[1, n_ctx, dim]``.
        learning_rate, weight_decay: AdamW's (``optax.adamw``).
        num_steps: at most this many updates.
        target: stop before an update once ``A(c) <= target`` (CFG metrics) or
            ``>= target`` (FLIPD); ``None`` runs every step.

    Returns:
        :class:`EmbeddingOptimization`.
    """
    cond = jnp.asarray(cond)
    if cond.ndim != 3 or cond.shape[0] != 1 or not jnp.issubdtype(cond.dtype, jnp.floating):
        raise ValueError(
            f"cond must be one prompt's floating embedding [1, n_ctx, dim], got "
            f"{cond.dtype} {cond.shape}"
        )
    num_steps = check_int(num_steps, "num_steps")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    cond, inputs, num_probes = _prepare(
        eps_fn, points, cond, uncond, metric, schedule, guidance, key, num_probes
    )
    # the hyper-parameters are traced: one compilation for all prompts and targets
    out = _optimize_jit(
        cond,
        inputs,
        _hyper(cond, learning_rate, weight_decay, target),
        metric=metric,
        num_steps=num_steps,
        num_probes=num_probes,
        has_target=target is not None,
    )
    taken = int(out.steps_taken)
    return EmbeddingOptimization(out.embedding, out.values[: taken + 1], taken)


def optimize_embedding_traced(
    eps_fn: CondEpsFn,
    cond: Float[ArrayLike, "1 n_ctx dim"],
    uncond: Float[ArrayLike, "1 n_ctx dim"],
    points: MetricPoints,
    *,
    metric: Metric,
    schedule: DDPM,
    guidance: float | Array = 7.5,
    learning_rate: float | Array = 0.05,
    num_steps: int = 10,
    target: float | Array | None = None,
    weight_decay: float | Array = 0.01,
    key: Array | None = None,
    num_probes: int = 1,
) -> EmbeddingOptimization:
    """:func:`optimize_embedding` as one traceable loop (``lax.while_loop``), for use under
    ``jit`` (e.g. inside the scoring engine); :func:`optimize_embedding` calls it.

    Same optimisation (paper, Appendix D.3; Wen et al.): AdamW on ``sign * A(c)``, the start
    token's row frozen, stopping before an update once ``A(c)`` reaches ``target``. The
    learning rate, weight decay, guidance and target may be traced; ``metric``,
    ``num_steps``, ``num_probes`` and whether there is a target are static.

    Args:
        eps_fn, cond, uncond, points, metric, schedule: as :func:`optimize_embedding`.
        guidance, learning_rate, target, weight_decay: as :func:`optimize_embedding`;
            may be traced (and are then not checked).
        num_steps, key, num_probes: as :func:`optimize_embedding`.

    Returns:
        :class:`EmbeddingOptimization` with fixed shapes: ``values`` has ``num_steps + 1``
        entries, the first ``steps_taken + 1`` meaningful, the rest NaN; ``steps_taken`` is
        a traced integer.
    """
    num_steps = check_int(num_steps, "num_steps")
    cond, inputs, num_probes = _prepare(
        eps_fn, points, cond, uncond, metric, schedule, guidance, key, num_probes
    )
    return _optimize_loop(
        cond,
        inputs,
        _hyper(cond, learning_rate, weight_decay, target),
        metric=metric,
        num_steps=num_steps,
        num_probes=num_probes,
        has_target=target is not None,
    )


def _hyper(cond: Array, learning_rate, weight_decay, target) -> Array:
    """``[learning rate, weight decay, target]`` in ``cond``'s dtype (NaN: no target)."""
    values = (learning_rate, weight_decay, jnp.nan if target is None else target)
    return jnp.stack([jnp.asarray(v, cond.dtype) for v in values])


def _optimize_loop(cond, inputs: _Inputs, hyper, *, metric, num_steps, num_probes, has_target):
    """The loop of :func:`optimize_embedding_traced`; ``hyper`` = (lr, weight decay, target)."""
    sign = 1.0 if memorized_when_high(metric) else -1.0
    step_hyper = jnp.stack([hyper[0], hyper[1], jnp.asarray(sign, hyper.dtype)])
    static = dict(metric=metric, num_probes=num_probes)
    # the carry takes the inputs' varying type (inside shard_map, e.g. the scoring engine), as
    # the loop's outputs have it
    like = cond.reshape(-1)[0] + inputs.points.latents.reshape(-1)[0].astype(cond.dtype)

    def vary(a):
        return a + jnp.zeros_like(like, a.dtype)

    state = jax.tree_util.tree_map(vary, optax.adamw(hyper[0], weight_decay=hyper[1]).init(cond))
    values = vary(jnp.full(num_steps + 1, jnp.nan, jnp.float32))

    def running(carry):
        i, done = carry[0], carry[4]
        return (i < num_steps) & ~done

    def body(carry):
        i, c, s, vals, _ = carry
        new, new_state, value = _embedding_update(c, s, step_hyper, inputs, **static)
        vals = vals.at[i].set(value.astype(jnp.float32))
        reached = (sign * (value - hyper[2]) <= 0) if has_target else vary(jnp.asarray(False))
        keep = functools.partial(jnp.where, reached)
        return (i + 1, keep(c, new), jax.tree_util.tree_map(keep, s, new_state), vals, reached)

    i, cond, _, values, done = jax.lax.while_loop(
        running, body, (vary(jnp.asarray(0)), cond, state, values, vary(jnp.asarray(False)))
    )
    last = jax.lax.cond(
        done,
        lambda c: vary(jnp.asarray(jnp.nan, jnp.float32)),
        lambda c: jnp.mean(_metric_values(c, inputs, **static)).astype(jnp.float32),
        cond,
    )
    values = jnp.where(done, values, values.at[num_steps].set(last))
    return EmbeddingOptimization(cond, values, i - done.astype(i.dtype))


_optimize_jit = jax.jit(
    _optimize_loop, static_argnames=("metric", "num_steps", "num_probes", "has_target")
)


def _embedding_update(cond, state, hyper, inputs: _Inputs, *, metric, num_probes):
    """One AdamW update of ``sign * A(cond)``, the start token's row frozen; the value before."""
    learning_rate, weight_decay, sign = hyper[0], hyper[1], hyper[2]
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    mask = jnp.ones(cond.shape[1], cond.dtype).at[0].set(0)[None, :, None]

    def loss(c):
        return jnp.mean(_metric_values(c, inputs, metric=metric, num_probes=num_probes))

    value, grad = jax.value_and_grad(loss)(cond)
    updates, state = optimizer.update(sign * grad * mask, state, cond)
    return optax.apply_updates(cond, updates * mask), state, value
