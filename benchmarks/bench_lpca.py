"""Benchmark: mmh_jax.lid.lpca versus scikit-dimension's pointwise lPCA on the same data.

Run it through the runner: ``python -m benchmarks run lpca [--set lpca.n=50000 ...]``.

Data (float32, seeded): by default a ``manifold_dim``-dimensional nonlinear manifold in R^d,
``x = sin(z W + b) + noise * N(0, I)`` with ``z ~ U[0, 1]^m``, ``W ~ N(0, 1)^(m x d)``,
``b ~ U[0, 2 pi]^d``; with ``data="patches"``, random 32 x 32 RGB patches of scikit-image's
colour images (d = 3072; needs scikit-image).

Sides, interleaved round by round after one warm-up call each (the first call of ``lpca``
compiles its chunk kernels; it is reported as the warm-up):

* ``ours``: ``lpca(X, k=k, method="fo")``;
* ``skdim_knn``: scikit-dimension's kNN step (``skdim._commonfuncs.get_nn``, what
  ``lPCA(ver="FO").fit_pw(X, n_neighbors=k, n_jobs=1)`` calls) on all points;
* ``skdim_pca_subset``: its per-point PCA on ``skdim_subset`` random points (``fit_pw`` with
  those rows of the kNN indices as ``precomputed_knn``: the loop ``fit_pw`` runs), or on all
  points when ``skdim_subset`` is 0 or >= n;
* ``skdim`` (derived, per round): kNN + the PCA time scaled linearly to all n points (the
  per-point cost is one SVD of a k x d neighbourhood: it does not depend on n).

Ratio of record: ``skdim / ours``. Notes: the agreement of the LIDs on the PCA subset, the
search path of ``lpca`` (certified projection or brute force), and our LIDs' histogram.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the lpca benchmark (defaults: the default run; RESULTS.md's record is n = 50000)."""

    data: Literal["manifold", "patches"] = "manifold"
    n: int = 5000
    d: int = 3072
    k: int = 100
    manifold_dim: int = 10
    noise: float = 1e-3
    batch_size: int = 256
    skdim_subset: int = 100
    seed: int = 0


TINY = Config(n=300, d=64, k=10, manifold_dim=3, batch_size=64, skdim_subset=20)


def make_data(n: int, d: int, m: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 1.0, size=(n, m)).astype(np.float32)
    w = rng.normal(0.0, 1.0, size=(m, d)).astype(np.float32)
    b = rng.uniform(0.0, 2 * np.pi, size=(d,)).astype(np.float32)
    x = np.sin(z @ w + b)
    x += noise * rng.standard_normal((n, d), dtype=np.float32)
    return x.astype(np.float32)


def image_patches(n: int, seed: int) -> np.ndarray:
    """``n`` random 32 x 32 RGB patches (d = 3072, values in [0, 1]) of the colour images that
    scikit-image ships (natural images: a slowly decaying spectrum)."""
    try:
        import skimage.data as images
    except ImportError as err:
        raise SystemExit("data='patches' needs scikit-image: pip install scikit-image") from err
    pics = [images.astronaut(), images.coffee(), images.chelsea(), images.rocket(), images.cat()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 32 * 32 * 3), np.float32)
    for i in range(n):
        pic = pics[i % len(pics)]
        y, x = rng.integers(0, pic.shape[0] - 32), rng.integers(0, pic.shape[1] - 32)
        out[i] = pic[y : y + 32, x : x + 32, :3].reshape(-1) / 255.0
    return out


def _histogram(lid: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(lid, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure ``lpca`` against scikit-dimension (see the module docstring); one case."""
    import jax.numpy as jnp
    import skdim
    from skdim._commonfuncs import get_nn

    from mmh_jax._src.knn import build_index
    from mmh_jax.lid import lpca

    c = config
    X = (
        image_patches(c.n, c.seed)
        if c.data == "patches"
        else make_data(c.n, c.d, c.manifold_dim, c.noise, c.seed)
    )
    n = X.shape[0]
    Xj = jnp.asarray(X)
    if c.skdim_subset <= 0 or c.skdim_subset >= n:
        sel = np.arange(n)
    else:
        sel = np.sort(
            np.random.default_rng(c.seed + 1).choice(n, size=c.skdim_subset, replace=False)
        )
    knn = get_nn(X, k=c.k, n_jobs=1)[1]  # the PCA side's input, computed once outside the timing
    est = skdim.id.lPCA(ver="FO", alphaFO=0.05)
    answers = {}

    def ours():
        answers["ours"] = np.asarray(lpca(Xj, k=c.k, method="fo", batch_size=c.batch_size))

    def skdim_knn():
        get_nn(X, k=c.k, n_jobs=1)

    def skdim_pca_subset():
        est.fit_pw(X, precomputed_knn=knn[sel], n_neighbors=c.k, n_jobs=1)
        answers["skdim"] = est.dimension_pw_

    timings = interleaved(
        {"ours": ours, "skdim_knn": skdim_knn, "skdim_pca_subset": skdim_pca_subset}, repeats
    )
    scale = n / len(sel)
    total = [
        a + scale * b for a, b in zip(timings.times["skdim_knn"], timings.times["skdim_pca_subset"])
    ]
    certified = build_index(Xj, k=c.k, exclude_self=True).proj is not None
    agree = float(np.mean(answers["skdim"] == answers["ours"][sel]))
    notes = {
        "points_compared": len(sel),
        "agreement": agree,
        "search": "certified projection" if certified else "brute force",
        "pca_extrapolated": bool(len(sel) < n),
        "ours_lid_histogram": _histogram(answers["ours"]),
    }
    return [
        case_record(
            f"n={n} d={X.shape[1]} k={c.k}",
            timings,
            ratios={"skdim / ours": ("skdim", "ours")},
            derived={"skdim": total},
            notes=notes,
        )
    ]
