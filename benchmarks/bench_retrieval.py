"""Benchmark: mmh_jax.retrieval.nearest_neighbours versus scikit-learn's brute-force neighbours.

Data (float32, seeded), image-like: references ``x = z diag(s) W + noise * N(0, I)`` with
``z ~ N(0, I)`` of ``--rank`` dimensions, a decaying spectrum ``s_i = i^(-decay)`` (``--decay``, default 1/2) and an
orthonormal ``W`` (``rank x d``), so most of the energy lies in a few hundred directions as with
CIFAR-like images; queries (the "generated images") are fresh samples of the same law, and a
tenth of them near-copies (reference plus small noise) of random references.

Timed, interleaved round by round (load drift hits both sides alike): for each ``k`` in
``--ks`` (1: nearest training image; 50: calibrated l2's neighbours),
* ours: ``nearest_neighbours(queries, references, k=k)`` (index building included; its search
  path, brute force or certified projection, is printed);
* scikit-learn: ``NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1)`` fit on the
  references, then ``kneighbors(queries)``.
Agreement: the fraction of queries whose k neighbour sets are equal (ties aside).

The issue's target: 50,000 queries among 50,000 references at d = 3072, >= 5x faster than
scikit-learn with identical neighbour sets (the defaults).  A quick check:
    python benchmarks/bench_retrieval.py --n-queries 5000 --n-refs 5000 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import cpu_model, interleaved, ratio_summary


def make_data(n_queries: int, n_refs: int, d: int, rank: int, decay: float, noise: float,
              seed: int):
    rng = np.random.default_rng(seed)
    w, _ = np.linalg.qr(rng.standard_normal((d, rank)).astype(np.float32))
    scale = np.arange(1, rank + 1, dtype=np.float32) ** -decay

    def sample(m):
        x = (rng.standard_normal((m, rank), dtype=np.float32) * scale) @ w.T
        return x + noise * rng.standard_normal((m, d), dtype=np.float32)

    refs = sample(n_refs)
    queries = sample(n_queries)
    copies = rng.choice(n_queries, size=n_queries // 10, replace=False)
    queries[copies] = refs[rng.choice(n_refs, size=copies.size)] + 0.1 * noise * \
        rng.standard_normal((copies.size, d), dtype=np.float32)
    return queries.astype(np.float32), refs.astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-queries", type=int, default=50000)
    p.add_argument("--n-refs", type=int, default=50000)
    p.add_argument("--d", type=int, default=3072)
    p.add_argument("--rank", type=int, default=512, help="dimensions of the signal")
    p.add_argument("--decay", type=float, default=0.5,
                   help="singular values of the signal fall as i^-decay")
    p.add_argument("--noise", type=float, default=0.01, help="isotropic noise per coordinate")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 50])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from sklearn.neighbors import NearestNeighbors

    from mmh_jax._src.knn import build_index
    from mmh_jax.retrieval import nearest_neighbours

    print(f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
          f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"load={os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    queries, refs = make_data(args.n_queries, args.n_refs, args.d, args.rank, args.decay,
                              args.noise, args.seed)
    print(f"data: {args.n_queries} queries, {args.n_refs} references, d={args.d}, low rank "
          f"{args.rank} (s_i = i^-{args.decay:g}) + noise {args.noise}, 10% near-copies, float32; "
          f"generated in {time.perf_counter() - t:.1f} s")
    qj, rj = jnp.asarray(queries), jnp.asarray(refs)

    for k in args.ks:
        certified = build_index(rj, k=k, exclude_self=False).proj is not None
        results = {}

        def ours(k=k, results=results):
            out = nearest_neighbours(qj, rj, k=k, batch_size=args.batch_size)
            results["ours"] = out
            return out

        def sk(k=k, results=results):
            nn = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(refs)
            out = nn.kneighbors(queries)
            results["sklearn"] = out
            return out

        times = interleaved({"ours": ours, "sklearn": sk}, args.repeats,
                            sync=lambda out: jax.block_until_ready(out))
        ours_i = np.sort(np.asarray(results["ours"].indices), axis=1)
        sk_i = np.sort(results["sklearn"][1], axis=1)
        agree = float(np.mean(np.all(ours_i == sk_i, axis=1)))
        print(f"k={k}: ours ({'certified projection' if certified else 'brute force'}) "
              f"{statistics.median(times['ours']):.2f} s, scikit-learn "
              f"{statistics.median(times['sklearn']):.2f} s (medians of {args.repeats}); "
              f"speed-up sklearn/ours {ratio_summary(times['sklearn'], times['ours'])}; "
              f"identical neighbour sets for {agree * 100:.2f}% of queries")
    print(f"load at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
