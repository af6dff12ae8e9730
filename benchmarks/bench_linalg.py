"""Benchmark: the CPU eigenvalue / singular-value kernels of mmh_jax._src.linalg (one matrix per
LAPACK call, which cannot deadlock several CPU devices) against jaxlib's batched call, on one
device, at the shapes the estimators use.

Shapes: the normal bundle's Gram matrices (``[b, d, d]``, eigvalsh) at d = 192 (8x8 RGB) and
d = 768 (16x16 RGB); a GAN Jacobian (``[b, 3072, 64]``, singular values) as ``gan lid`` takes
it at 32x32 RGB and a 64-dimensional latent slice; local PCA's covariances (``[b, 100, 100]``).

Example: python -m benchmarks.bench_linalg --repeats 7
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import cpu_model, interleaved, ratio_summary
from mmh_jax._src.linalg import eigvalsh_descending, singular_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"load {os.getloadavg()[0]:.2f}, {len(jax.devices())} device(s)"
    )
    print(
        "| kernel | shape | per matrix, min / median (ms) | batched LAPACK, min / median (ms) "
        "| per matrix / batched |"
    )
    print("| --- | --- | --- | --- | --- |")
    cases = [
        ("eigvalsh", (64, 192, 192)),
        ("eigvalsh", (16, 768, 768)),
        ("eigvalsh", (256, 100, 100)),
        ("svd", (32, 3072, 64)),
    ]
    for kind, shape in cases:
        a = rng.standard_normal(shape).astype(np.float32)
        if kind == "eigvalsh":
            a = jnp.asarray(a @ np.swapaxes(a, -1, -2))
            ours = jax.jit(eigvalsh_descending)
            theirs = jax.jit(lambda m: jnp.linalg.eigvalsh(m)[..., ::-1])
        else:
            a = jnp.asarray(a)
            ours = jax.jit(singular_values)
            theirs = jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
        np.testing.assert_allclose(
            ours(a), theirs(a), rtol=1e-3, atol=1e-3 * float(theirs(a).max())
        )
        times = interleaved(
            {"ours": functools.partial(ours, a), "batched": functools.partial(theirs, a)},
            args.repeats,
            sync=jax.block_until_ready,
        ).times
        ms = {k: (1e3 * min(v), 1e3 * statistics.median(v)) for k, v in times.items()}
        print(
            f"| {kind} | {'x'.join(map(str, shape))} | {ms['ours'][0]:.1f} / {ms['ours'][1]:.1f} "
            f"| {ms['batched'][0]:.1f} / {ms['batched'][1]:.1f} "
            f"| {ratio_summary(times['ours'], times['batched'])} |"
        )


if __name__ == "__main__":
    main()
