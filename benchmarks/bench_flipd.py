"""Cost of FLIPD and the normal bundle relative to one forward pass of the same network.

A CIFAR-shaped convolutional epsilon-network (residual blocks with GroupNorm, SiLU and
a time embedding, NCHW, pure JAX) stands in for a diffusion UNet. Everything is timed
in one run, jit-compiled, in interleaved rounds after a warm-up (``benchmarks._common.interleaved``):

- forward: one evaluation of the score network on the batch;
- FLIPD with one Hutchinson probe (one batched jvp; target: at most 2.0x forward);
- FLIPD with the exact trace on a smaller image (d jvps, chunked; about d x the
  single-probe cost);
- the normal bundle's share of time spent in score evaluations.

Usage (from the repository root): python -m benchmarks.bench_flipd [--batch 64] [--channels 64] [--blocks 4]
"""

from __future__ import annotations

import argparse
import math
import statistics

import jax
import jax.numpy as jnp

from benchmarks._common import cpu_model, interleaved, ratio_summary
from mmh_jax.lid import flipd, normal_bundle
from mmh_jax.schedules import DDPM, score_from_eps


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument(
        "--size", type=int, default=32, help="image side for forward/Hutchinson FLIPD"
    )
    parser.add_argument("--exact-size", type=int, default=8, help="image side for the exact trace")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    schedule = DDPM.linear()
    params = init_net(jax.random.key(0), 3, args.channels, args.blocks)
    key = jax.random.key(1)

    def score_for(p):
        return score_from_eps(lambda x, t: eps_net(p, x, t), schedule=schedule)

    @jax.jit
    def forward(p, x):
        return score_for(p)(x, jnp.full((x.shape[0],), 0.05))

    @jax.jit
    def plain_jvp(p, x, v):
        return jax.jvp(lambda y: score_for(p)(y, jnp.full((x.shape[0],), 0.05)), (x,), (v,))

    @jax.jit
    def two_forwards(p, x, v):  # primal and tangent sharing every layer call: a floor for a jvp
        return jax.vmap(lambda y: forward(p, y))(jnp.stack([x, v]))

    @jax.jit
    def flipd_1(p, x, key):
        return flipd(score_for(p), x, t0=0.05, schedule=schedule, key=key)

    @jax.jit
    def flipd_exact(p, x):
        return flipd(score_for(p), x, t0=0.05, schedule=schedule, trace="exact", chunk_size=64)

    @jax.jit
    def nb(p, x, key):
        return normal_bundle(score_for(p), x, t0=0.05, schedule=schedule, key=key, chunk_size=64)

    sync = jax.block_until_ready
    x = jax.random.normal(key, (args.batch, 3, args.size, args.size))
    v = jax.random.rademacher(key, x.shape, x.dtype)
    big = interleaved(
        {
            "forward": lambda: forward(params, x),
            "flipd": lambda: flipd_1(params, x, key),
            "jvp": lambda: plain_jvp(params, x, v),
            "two": lambda: two_forwards(params, x, v),
        },
        args.repeats,
        sync,
    ).times
    t_fwd, t_flipd, t_jvp, t_two = (
        statistics.median(big[k]) for k in ("forward", "flipd", "jvp", "two")
    )

    xs = jax.random.normal(key, (args.batch, 3, args.exact_size, args.exact_size))
    d_small = xs[0].size
    small = interleaved(
        {
            "forward": lambda: forward(params, xs),
            "flipd": lambda: flipd_1(params, xs, key),
            "exact": lambda: flipd_exact(params, xs),
        },
        max(1, args.repeats // 2),
        sync,
    ).times
    t_fwd_small, t_flipd_small, t_exact = (
        statistics.median(small[k]) for k in ("forward", "flipd", "exact")
    )

    xn = xs[:2]
    k_scores = 4 * d_small
    xn_big = jax.random.normal(key, (2 * 64,) + xs.shape[1:])
    nbt = interleaved(
        {"nb": lambda: nb(params, xn, key), "scores": lambda: forward(params, xn_big)},
        max(1, args.repeats // 2),
        sync,
    ).times
    t_nb = statistics.median(nbt["nb"])
    t_score_calls = statistics.median(nbt["scores"]) * (k_scores / 64)

    print(
        f"machine: {cpu_model()}, {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    print(
        f"network: {args.blocks} residual blocks x {args.channels} channels, batch {args.batch}, float32; "
        f"medians of interleaved rounds"
    )
    print(f"forward, 3x{args.size}x{args.size}:                 {t_fwd * 1e3:9.1f} ms")
    print(
        f"FLIPD 1 Hutchinson probe:               {t_flipd * 1e3:9.1f} ms  = "
        f"{ratio_summary(big['flipd'], big['forward'])} forward"
    )
    print(
        f"plain jax.jvp of the score:             {t_jvp * 1e3:9.1f} ms  = "
        f"{ratio_summary(big['jvp'], big['forward'])} forward"
    )
    print(
        f"two forwards stacked in one batch:      {t_two * 1e3:9.1f} ms  = "
        f"{ratio_summary(big['two'], big['forward'])} forward"
    )
    print(
        f"forward, 3x{args.exact_size}x{args.exact_size} (d = {d_small}):          {t_fwd_small * 1e3:9.1f} ms"
    )
    print(
        f"FLIPD 1 probe, d = {d_small}:                  {t_flipd_small * 1e3:9.1f} ms  = "
        f"{ratio_summary(small['flipd'], small['forward'])} forward"
    )
    print(
        f"FLIPD exact trace, d = {d_small}:              {t_exact * 1e3:9.1f} ms  = "
        f"{ratio_summary(small['exact'], small['flipd'])} one-probe FLIPD (d = {d_small})"
    )
    print(
        f"normal bundle, 2 points x {k_scores} scores:   {t_nb * 1e3:9.1f} ms; score evaluations alone {t_score_calls * 1e3:.1f} ms"
        f" = {100 * t_score_calls / t_nb:.0f}% of it"
    )


if __name__ == "__main__":
    main()
