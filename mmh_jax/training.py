"""Denoising score matching for small epsilon-networks, with optax.

The loss is the usual epsilon-prediction objective

    L(theta) = E_{x_0, t, eps} || eps_theta(psi(t) x_0 + sigma(t) eps, t) - eps ||^2,

which trains ``-eps_theta / sigma`` to approximate the score of the forward
process with kernel ``N(psi(t) x_0, sigma(t)^2 I)`` (paper, Eq. 5 and Eq. 10).
Times are drawn log-uniformly from ``[t_min, 1]`` so that the small noise levels
used by FLIPD and the normal bundle are well covered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from mmh_jax.schedules import Schedule, broadcast_to_event
from mmh_jax.types import EpsApply

__all__ = ["TrainResult", "dsm_loss", "train_eps"]

TimeSampling = Literal["log-uniform", "mixed"]


class TrainResult(NamedTuple):
    """Outcome of :func:`train_eps`.

    Attributes:
        params: trained parameters.
        losses: mean training loss of each chunk of steps, shape ``[num_chunks]``.
    """

    params: PyTree
    losses: Float[np.ndarray, " c"]


def dsm_loss(
    apply: EpsApply,
    params: PyTree,
    x0: Float[Array, "b *event"],
    *,
    schedule: Schedule,
    key: PRNGKeyArray,
    t_min: float = 1e-4,
    time_sampling: TimeSampling = "log-uniform",
) -> Float[Array, ""]:
    """Epsilon-prediction denoising score-matching loss on one batch.

    Args:
        apply: ``apply(params, x_t, t) -> eps``.
        params: network parameters.
        x0: clean data batch.
        schedule: forward-process schedule (``psi``, ``sigma``).
        key: PRNG key for times and noise.
        t_min: lower end of the time distribution.
        time_sampling: ``"log-uniform"`` (default): ``log t`` uniform on
            ``[log t_min, 0]``; ``"mixed"``: each example's time is log-uniform or
            uniform on ``[t_min, 1]`` with probability 1/2 each, which trains the
            large noise levels (that set how much mass each mode gets) more often.

    Returns:
        Scalar loss, mean over batch and coordinates.
    """
    kt, ke = jax.random.split(key)
    b = x0.shape[0]
    log_t = jax.random.uniform(kt, (b,), minval=jnp.log(t_min), maxval=0.0)
    t = jnp.exp(log_t)
    if time_sampling == "mixed":
        ku, kc = jax.random.split(jax.random.fold_in(kt, 1))
        t_uni = jax.random.uniform(ku, (b,), minval=t_min, maxval=1.0)
        t = jnp.where(jax.random.bernoulli(kc, 0.5, (b,)), t_uni, t)
    elif time_sampling != "log-uniform":
        raise ValueError(f"time_sampling must be 'log-uniform' or 'mixed', got {time_sampling!r}")
    eps = jax.random.normal(ke, x0.shape, x0.dtype)
    x_t = (
        broadcast_to_event(schedule.psi(t), x0) * x0
        + broadcast_to_event(schedule.sigma(t), x0) * eps
    )
    return jnp.mean((apply(params, x_t, t) - eps) ** 2)


def train_eps(
    apply: EpsApply,
    params: PyTree,
    data: Float[Array, "n *event"],
    *,
    schedule: Schedule,
    key: PRNGKeyArray,
    steps: int,
    batch_size: int = 512,
    learning_rate: float = 2e-3,
    t_min: float = 1e-4,
    chunk: int = 100,
    time_sampling: TimeSampling = "log-uniform",
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train an epsilon-network with Adam, a cosine learning-rate decay and stratified batches.

    Steps run inside ``jax.lax.scan`` in chunks of ``chunk`` steps; ``progress`` (if
    given) is called with the number of steps just finished after each chunk, which
    is how a progress bar is driven without slowing the loop down.

    Args:
        apply: ``apply(params, x_t, t) -> eps``.
        params: initial parameters.
        data: the training set; each batch is a run of ``batch_size`` consecutive
            points of a fixed random order (wrapping around), from a random start.
        schedule: forward-process schedule.
        key: PRNG key for batches, times and noise.
        steps: number of optimisation steps (rounded up to a multiple of ``chunk``).
        batch_size: examples per step.
        learning_rate: peak Adam learning rate.
        t_min: lower end of the log-uniform training times.
        chunk: steps per compiled chunk.
        time_sampling: training-time distribution, see :func:`dsm_loss`.
        progress: optional callback ``progress(num_steps_done_in_chunk)``.

    Returns:
        :class:`TrainResult` with the parameters and the per-chunk mean loss.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    chunk = max(1, min(chunk, steps))
    num_chunks = -(-steps // chunk)
    total = num_chunks * chunk
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=min(200, total // 10),
        decay_steps=total,
        end_value=learning_rate * 0.05,
    )
    opt = optax.adam(lr)
    data = jnp.asarray(data)
    n = data.shape[0]
    order = jax.random.permutation(jax.random.fold_in(key, 1), n)

    def step(carry, k):
        p, s = carry
        kb, kl = jax.random.split(k)
        # Stratified batches: consecutive positions of a fixed shuffled order, starting at
        # a random offset, so every point appears floor(B/n) or ceil(B/n) times per batch
        # when B >= n. Rare points (one isolated example among many) then give a steady
        # gradient signal instead of a Poisson-distributed one.
        idx = order[(jnp.arange(batch_size) + jax.random.randint(kb, (), 0, n)) % n]
        loss, grads = jax.value_and_grad(
            lambda q: dsm_loss(
                apply,
                q,
                data[idx],
                schedule=schedule,
                key=kl,
                t_min=t_min,
                time_sampling=time_sampling,
            )
        )(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    @jax.jit
    def run_chunk(p, s, k):
        (p, s), losses = jax.lax.scan(step, (p, s), jax.random.split(k, chunk))
        return p, s, jnp.mean(losses)

    state = opt.init(params)
    losses = []
    for k in jax.random.split(key, num_chunks):
        params, state, loss = run_chunk(params, state, k)
        losses.append(loss)
        if progress is not None:
            progress(chunk)
    return TrainResult(params, np.asarray(jax.device_get(jnp.stack(losses))))
