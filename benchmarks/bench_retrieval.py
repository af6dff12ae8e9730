"""Benchmark: mmh_jax.retrieval.nearest_neighbours versus scikit-learn's brute-force neighbours.

Run it through the runner: ``python -m benchmarks run retrieval [--set retrieval.n_refs=...]``.

Data (float32, seeded), image-like: references ``x = z diag(s) W + noise * N(0, I)`` with
``z ~ N(0, I)`` of ``rank`` dimensions, a decaying spectrum ``s_i = i^(-decay)`` (default 1/2)
and an orthonormal ``W`` (``rank x d``), so most of the energy lies in a few hundred directions
as with CIFAR-like images; queries (the "generated images") are fresh samples of the same law,
and a tenth of them near-copies (reference plus small noise) of random references.

One case per ``k`` in ``ks`` (1: nearest training image; 50: calibrated l2's neighbours); sides,
interleaved round by round after one warm-up call each:

* ``ours``: ``nearest_neighbours(queries, references, k=k)`` (index building included; its
  search path, brute force or certified projection, is noted);
* ``sklearn``: ``NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1)`` fit on the
  references, then ``kneighbors(queries)``.

Ratio of record: ``sklearn / ours``. Notes: the fraction of queries whose k neighbour sets are
equal. The issue's target: 50,000 queries among 50,000 references at d = 3072, >= 5x faster than
scikit-learn with identical neighbour sets (``--set retrieval.n_queries=50000
--set retrieval.n_refs=50000``; about ten minutes a round on 2 cores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the retrieval benchmark (defaults: RESULTS.md's 5,000 x 5,000 rows)."""

    n_queries: int = 5000
    n_refs: int = 5000
    d: int = 3072
    rank: int = 512
    decay: float = 0.5
    noise: float = 0.01
    ks: tuple[int, ...] = (1, 50)
    batch_size: int = 512
    seed: int = 0


TINY = Config(n_queries=200, n_refs=300, d=32, rank=8, ks=(1, 5), batch_size=64)


def make_data(
    n_queries: int, n_refs: int, d: int, rank: int, decay: float, noise: float, seed: int
):
    rng = np.random.default_rng(seed)
    w, _ = np.linalg.qr(rng.standard_normal((d, rank)).astype(np.float32))
    scale = np.arange(1, rank + 1, dtype=np.float32) ** -decay

    def sample(m):
        x = (rng.standard_normal((m, rank), dtype=np.float32) * scale) @ w.T
        return x + noise * rng.standard_normal((m, d), dtype=np.float32)

    refs = sample(n_refs)
    queries = sample(n_queries)
    copies = rng.choice(n_queries, size=n_queries // 10, replace=False)
    queries[copies] = refs[
        rng.choice(n_refs, size=copies.size)
    ] + 0.1 * noise * rng.standard_normal((copies.size, d), dtype=np.float32)
    return queries.astype(np.float32), refs.astype(np.float32)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure ``nearest_neighbours`` against scikit-learn, one case per ``k``."""
    import jax
    import jax.numpy as jnp
    from sklearn.neighbors import NearestNeighbors

    from mmh_jax._src.knn import build_index
    from mmh_jax.retrieval import nearest_neighbours

    c = config
    queries, refs = make_data(c.n_queries, c.n_refs, c.d, c.rank, c.decay, c.noise, c.seed)
    qj, rj = jnp.asarray(queries), jnp.asarray(refs)
    cases = []
    for k in c.ks:
        certified = build_index(rj, k=k, exclude_self=False).proj is not None
        results = {}

        def ours(k=k, results=results):
            results["ours"] = nearest_neighbours(qj, rj, k=k, batch_size=c.batch_size)
            return results["ours"]

        def sk(k=k, results=results):
            nn = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(refs)
            results["sklearn"] = nn.kneighbors(queries)
            return results["sklearn"]

        timings = interleaved({"ours": ours, "sklearn": sk}, repeats, sync=jax.block_until_ready)
        ours_i = np.sort(np.asarray(results["ours"].indices), axis=1)
        sk_i = np.sort(results["sklearn"][1], axis=1)
        notes = {
            "same_neighbour_sets": float(np.mean(np.all(ours_i == sk_i, axis=1))),
            "search": "certified projection" if certified else "brute force",
        }
        cases.append(
            case_record(
                f"{c.n_queries} x {c.n_refs}, d={c.d}, k={k}",
                timings,
                ratios={"sklearn / ours": ("sklearn", "ours")},
                notes=notes,
            )
        )
    return cases
