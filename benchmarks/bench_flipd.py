"""Benchmark: cost of FLIPD and the normal bundle relative to one forward pass of the same network.

Run it through the runner: ``python -m benchmarks run flipd [--set flipd.batch=32]``.

A CIFAR-shaped convolutional epsilon-network (``blocks`` residual blocks x ``channels`` channels
with GroupNorm, SiLU and a time embedding, NCHW at the boundary, NHWC inside, pure JAX, random
weights) stands in for a diffusion UNet, wrapped with ``score_from_eps`` and ``DDPM.linear()``,
t0 = 0.05; every function jit-compiled. Three cases, each timed in interleaved rounds after one
warm-up call per side:

* ``FLIPD`` on ``batch`` images of 3 x ``size`` x ``size``: sides ``forward`` (one evaluation of
  the score), ``flipd`` (one Hutchinson probe: one batched jvp; target at most 2.0x forward),
  ``jvp`` (a plain ``jax.jvp`` of the score) and ``two_forwards`` (primal and tangent stacked in
  one batch: a floor for a jvp);
* ``exact trace`` on 3 x ``exact_size`` x ``exact_size`` images (d = 3 exact_size^2): ``forward``,
  ``flipd`` and ``exact`` (``trace="exact"``: d jvps in chunks of ``chunk``; about d x the
  one-probe cost);
* ``normal bundle``: ``normal_bundle`` of 2 points at its default K = 4 d scores (chunks of
  ``chunk``) against ``scores``, the forward pass on 2 ``chunk`` points; the derived series
  ``score_calls`` scales it to the 2 K score evaluations the bundle makes, and the ratio
  ``score_calls / normal_bundle`` is the share of its time spent in score evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the flipd benchmark (defaults: RESULTS.md's record, batch 64)."""

    batch: int = 64
    channels: int = 64
    blocks: int = 4
    size: int = 32
    exact_size: int = 8
    chunk: int = 64
    t0: float = 0.05


TINY = Config(batch=2, channels=8, blocks=1, size=8, exact_size=4, chunk=16)


def init_net(key, in_ch, ch, blocks):
    keys = jax.random.split(key, 2 * blocks + 3)
    conv = lambda k, cin, cout: jax.random.normal(k, (3, 3, cin, cout)) / math.sqrt(9 * cin)  # noqa: E731
    return {
        "inp": conv(keys[0], in_ch, ch),
        "temb": jax.random.normal(keys[1], (64, ch)) / 8.0,
        "blocks": [
            (conv(keys[2 + 2 * i], ch, ch), conv(keys[3 + 2 * i], ch, ch)) for i in range(blocks)
        ],
        "out": conv(keys[-1], ch, in_ch) * 0.1,
    }


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _group_norm(x, groups=8, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape)


def eps_net(params, x, t):
    """NCHW at the boundary (as the PyTorch ports), NHWC inside: XLA:CPU runs NCHW
    convolutions inside loops (scan) several times slower than NHWC ones."""
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(32) / 32)
    emb = jnp.concatenate(
        [jnp.sin(t[:, None] * 1000 * freqs), jnp.cos(t[:, None] * 1000 * freqs)], axis=1
    )
    h = (
        _conv(jnp.transpose(x, (0, 2, 3, 1)), params["inp"])
        + (emb @ params["temb"])[:, None, None, :]
    )
    for w1, w2 in params["blocks"]:
        h = h + _conv(jax.nn.silu(_group_norm(_conv(jax.nn.silu(_group_norm(h)), w1))), w2)
    return jnp.transpose(_conv(jax.nn.silu(_group_norm(h)), params["out"]), (0, 3, 1, 2))


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure FLIPD, its exact trace and the normal bundle against the forward pass."""
    from mmh_jax.lid import flipd, normal_bundle
    from mmh_jax.schedules import DDPM, score_from_eps

    c = config
    schedule = DDPM.linear()
    params = init_net(jax.random.key(0), 3, c.channels, c.blocks)
    key = jax.random.key(1)

    def score_for(p):
        return score_from_eps(lambda x, t: eps_net(p, x, t), schedule=schedule)

    @jax.jit
    def forward(p, x):
        return score_for(p)(x, jnp.full((x.shape[0],), c.t0))

    @jax.jit
    def plain_jvp(p, x, v):
        return jax.jvp(lambda y: score_for(p)(y, jnp.full((x.shape[0],), c.t0)), (x,), (v,))

    @jax.jit
    def two_forwards(p, x, v):  # primal and tangent sharing every layer call: a floor for a jvp
        return jax.vmap(lambda y: forward(p, y))(jnp.stack([x, v]))

    @jax.jit
    def flipd_1(p, x):
        return flipd(score_for(p), x, t0=c.t0, schedule=schedule, key=key)

    @jax.jit
    def flipd_exact(p, x):
        return flipd(score_for(p), x, t0=c.t0, schedule=schedule, trace="exact", chunk_size=c.chunk)

    @jax.jit
    def nb(p, x):
        return normal_bundle(
            score_for(p), x, t0=c.t0, schedule=schedule, key=key, chunk_size=c.chunk
        )

    sync = jax.block_until_ready
    p = params
    x = jax.random.normal(key, (c.batch, 3, c.size, c.size))
    v = jax.random.rademacher(key, x.shape, x.dtype)
    big = interleaved(
        {
            "forward": lambda: forward(p, x),
            "flipd": lambda: flipd_1(p, x),
            "jvp": lambda: plain_jvp(p, x, v),
            "two_forwards": lambda: two_forwards(p, x, v),
        },
        repeats,
        sync,
    )
    xs = jax.random.normal(key, (c.batch, 3, c.exact_size, c.exact_size))
    d = xs[0].size
    small = interleaved(
        {
            "forward": lambda: forward(p, xs),
            "flipd": lambda: flipd_1(p, xs),
            "exact": lambda: flipd_exact(p, xs),
        },
        repeats,
        sync,
    )
    xn = xs[:2]
    k_scores = 4 * d  # normal_bundle's default num_scores
    xn_big = jax.random.normal(key, (2 * c.chunk,) + xs.shape[1:])
    bundle = interleaved(
        {"normal_bundle": lambda: nb(p, xn), "scores": lambda: forward(p, xn_big)}, repeats, sync
    )
    network = f"{c.blocks} residual blocks x {c.channels} channels"
    return [
        case_record(
            f"FLIPD, batch {c.batch}, 3x{c.size}x{c.size}, {network}",
            big,
            ratios={
                "FLIPD (1 probe) / forward": ("flipd", "forward"),
                "plain jvp / forward": ("jvp", "forward"),
                "two forwards stacked / forward": ("two_forwards", "forward"),
            },
        ),
        case_record(
            f"exact trace, batch {c.batch}, 3x{c.exact_size}x{c.exact_size} (d = {d})",
            small,
            ratios={
                "exact trace / FLIPD (1 probe)": ("exact", "flipd"),
                "FLIPD (1 probe) / forward": ("flipd", "forward"),
            },
            notes={"d": d, "chunk": c.chunk},
        ),
        case_record(
            f"normal bundle, 2 points x K = 4d = {k_scores} scores (d = {d})",
            bundle,
            ratios={"share in score evaluations": ("score_calls", "normal_bundle")},
            derived={"score_calls": [t * k_scores / c.chunk for t in bundle.times["scores"]]},
            notes={"K": k_scores, "score_batch": 2 * c.chunk},
        ),
    ]
