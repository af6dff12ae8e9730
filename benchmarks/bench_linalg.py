"""Benchmark: the CPU eigenvalue / singular-value kernels of mmh_jax._src.linalg (one matrix per
LAPACK call, which cannot deadlock several CPU devices) against jaxlib's batched call, on one
device, at the shapes the estimators use.

Run it through the runner: ``python -m benchmarks run linalg [--set linalg.gram_large=8,768,768]``.

Shapes (each a ``batch,rows,cols`` field of :class:`Config`): the normal bundle's Gram matrices
(``[b, d, d]``, eigvalsh) at d = 192 (8x8 RGB, ``gram_small``) and d = 768 (16x16 RGB,
``gram_large``); local PCA's covariances (``[b, 100, 100]``, eigvalsh, ``covariance``); a GAN
Jacobian (``[b, 3072, 64]``, singular values, ``jacobian``) as ``gan lid`` takes it at 32x32 RGB
and a 64-dimensional latent slice. Random matrices (seeded; ``A A^T`` for eigvalsh).

One case per shape; sides, interleaved round by round after one warm-up call each:

* ``ours``: ``eigvalsh_descending`` / ``singular_values`` of ``mmh_jax._src.linalg``;
* ``batched``: ``jnp.linalg.eigvalsh`` (reversed) / ``jnp.linalg.svd(compute_uv=False)``.

Ratio of record: ``ours / batched`` (per matrix over batched). Notes: the largest difference of
the two answers relative to the largest value (the run stops if it exceeds 1e-3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes of the linalg benchmark (defaults: RESULTS.md's rows)."""

    gram_small: tuple[int, ...] = (64, 192, 192)
    gram_large: tuple[int, ...] = (16, 768, 768)
    covariance: tuple[int, ...] = (256, 100, 100)
    jacobian: tuple[int, ...] = (32, 3072, 64)
    seed: int = 0


TINY = Config(
    gram_small=(4, 12, 12), gram_large=(2, 24, 24), covariance=(8, 10, 10), jacobian=(4, 48, 8)
)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure the per-matrix kernels against the batched ones, one case per shape."""
    import jax
    import jax.numpy as jnp

    from mmh_jax._src.linalg import eigvalsh_descending, singular_values

    rng = np.random.default_rng(config.seed)
    cases = []
    for kind, shape in (
        ("eigvalsh", config.gram_small),
        ("eigvalsh", config.gram_large),
        ("eigvalsh", config.covariance),
        ("svd", config.jacobian),
    ):
        if len(shape) != 3:
            raise ValueError(f"linalg shapes are batch,rows,cols; got {shape}")
        a = rng.standard_normal(shape).astype(np.float32)
        if kind == "eigvalsh":
            a = jnp.asarray(a @ np.swapaxes(a, -1, -2))
            ours = jax.jit(eigvalsh_descending)
            theirs = jax.jit(lambda m: jnp.linalg.eigvalsh(m)[..., ::-1])
        else:
            a = jnp.asarray(a)
            ours = jax.jit(singular_values)
            theirs = jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
        ref = np.asarray(theirs(a))
        difference = float(np.max(np.abs(np.asarray(ours(a)) - ref)) / np.max(ref))
        if not difference <= 1e-3:
            raise RuntimeError(f"{kind} {shape}: the two kernels differ by {difference:.1e}")
        timings = interleaved(
            {"ours": lambda a=a, f=ours: f(a), "batched": lambda a=a, f=theirs: f(a)},
            repeats,
            sync=jax.block_until_ready,
        )
        cases.append(
            case_record(
                f"{kind} {'x'.join(map(str, shape))}",
                timings,
                ratios={"per matrix / batched": ("ours", "batched")},
                notes={"max_difference_relative": difference},
            )
        )
    return cases
