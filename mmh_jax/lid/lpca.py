"""Local PCA estimate of local intrinsic dimension (Fukunaga & Olsen, 1971), vectorised in JAX.

Every query point gets the eigen-spectrum of the covariance of its k-nearest-neighbour
neighbourhood; the LID is the number of "significant" explained variances, decided by one of
several rules (see :func:`lpca`).  Neighbour search and PCA run chunk by chunk of queries: the
exact neighbour search of :mod:`mmh_jax._src.knn` (certified through a low-dimensional
projection when the data are high-dimensional), one jitted kernel for the centred k x k Gram
matrices (or d x d scatter matrices), then a batched symmetric eigen-solve (numpy's LAPACK on
CPU, where XLA's batched eigh/SVD of many small matrices is about 10x slower; XLA's SVD
elsewhere), then a jitted count; memory is ``O(batch_size * (n + k d))``.  Chunk ``i + 1`` is
dispatched before the eigenvalues of chunk ``i`` are computed, so the two overlap.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from threadpoolctl import threadpool_limits

from mmh_jax._src.checks import check_option, is_concrete
from mmh_jax._src.knn import (
    build_index,
    check_batch_size,
    check_data,
    check_k,
    default_rtol,
    iter_chunks,
    masked_percentile,
    pairwise_distance_percentile,
    search_chunk,
)
from mmh_jax._src.linalg import singular_values

__all__ = ["lpca", "local_spectra"]

LPCAMethod = Literal["fo", "maxgap", "ratio", "paper"]
_METHODS = ("fo", "maxgap", "ratio", "paper")


@partial(jax.jit, static_argnames=("include_self", "use_gram"))
def _neighbourhood_matrices(
    data: Float[Array, "n d"],
    q: Float[Array, "b d"],
    idx: Int[Array, "b k"],
    radius: Float[Array, ""],
    *,
    include_self: bool,
    use_gram: bool,
) -> tuple[Float[Array, "b s s"], Float[Array, " b"]]:
    """Scatter matrices (Gram ``Y Y^T`` if ``use_gram`` else ``Y^T Y``) of the centred, masked
    neighbourhoods ``Y`` (the rows ``data[idx[i]]``) of a chunk of queries, and the
    neighbourhood sizes."""
    # Differences to the query: exact zeros for exact duplicates, so a point mass centres to 0.
    if use_gram:
        # Raw Gram of the differences, a few queries at a time: the gather, the subtraction and
        # one k x k matrix product per query fuse, which on CPU runs about 2.5x faster than
        # gathering the whole [b, k, d] block and one batched einsum.
        def gram(args):
            i, qi = args
            diff = data[i] - qi
            return diff @ diff.T

        g = jax.lax.map(gram, (idx, q), batch_size=4)
        if include_self:  # the query's own difference is exactly 0: a zero row and column
            g = jnp.pad(g, ((0, 0), (1, 0), (1, 0)))
        dist = jnp.sqrt(jnp.maximum(jnp.diagonal(g, axis1=1, axis2=2), 0.0))
    else:
        diff = data[idx] - q[:, None, :]  # [b, k, d]
        if include_self:
            diff = jnp.concatenate([jnp.zeros_like(diff[:, :1]), diff], axis=1)
        dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    within = dist <= radius  # the query itself (distance 0) is always within
    if include_self:
        has_close = jnp.any(within[:, 1:], axis=1, keepdims=True)
        within = within.at[:, 0].set(True)
    else:
        has_close = jnp.any(within, axis=1, keepdims=True)
    w = jnp.where(has_close, within, True).astype(data.dtype)  # restriction mask, [b, k']
    m = jnp.sum(w, axis=1)  # neighbourhood sizes
    if use_gram:
        # Y = W (I - 1 w^T / m) D  =>  Y Y^T = W (G - a 1^T - 1 a^T + c 1 1^T) W with
        # a = G w / m, c = w^T G w / m^2: same nonzero eigenvalues as Y^T Y, cheaper when k < d.
        a = jnp.einsum("bij,bj->bi", g, w) / m[:, None]
        c = jnp.einsum("bi,bi->b", a, w) / m
        cen = g - a[:, :, None] - a[:, None, :] + c[:, None, None]
        mat = w[:, :, None] * cen * w[:, None, :]
    else:
        mean = jnp.sum(w[..., None] * diff, axis=1) / m[:, None]
        y = w[..., None] * (diff - mean[:, None, :])  # masked rows are exactly 0
        mat = jnp.einsum("bid,bie->bde", y, y)
    return mat, m


@jax.jit
def _xla_eigvals_desc(mat: Array) -> Array:
    # Singular values of a symmetric PSD matrix are its eigenvalues (descending, >= 0).
    return singular_values(mat)


def _host_eigvals_desc(mat: Array) -> np.ndarray:
    # numpy's batched LAPACK eigvalsh: on CPU about 10x faster than XLA's batched eigh / SVD for
    # many small (100 x 100) matrices.
    # float64 LAPACK is both more accurate and (measured, OpenBLAS) faster than float32 here.
    mat = np.asarray(mat)
    ev = np.linalg.eigvalsh(mat.astype(np.float64))[..., ::-1]
    return np.maximum(ev, 0.0).astype(mat.dtype)


@jax.jit
def _finish(ev: Array, m: Array, rtol: Array) -> Array:
    ev = ev / jnp.maximum(m - 1.0, 1.0)[:, None]  # sample covariance scaling, as sklearn's PCA
    return jnp.where(ev > rtol * ev[:, :1], ev, 0.0)  # numerical zeros become exact zeros


def _valid_mask(ev: Array, m: Array, d: int) -> Array:
    """Entries that a centred set of ``m`` points in R^d can make nonzero: min(m - 1, d)."""
    s = ev.shape[1]
    rank_bound = jnp.minimum(m - 1.0, float(d))
    return jnp.arange(s)[None, :] < rank_bound[:, None]


@partial(jax.jit, static_argnames=("method", "d"))
def _count(ev, m, alpha, ratio, tau, *, method: str, d: int) -> Int[Array, " b"]:
    valid = _valid_mask(ev, m, d)
    ev = jnp.where(valid, ev, 0.0)
    ev0 = ev[:, 0]
    if method == "fo":
        dim = jnp.sum(ev > alpha * ev0[:, None], axis=1)
    elif method == "ratio":
        cs = jnp.cumsum(ev, axis=1)
        frac = cs / jnp.where(cs[:, -1:] > 0, cs[:, -1:], 1.0)
        dim = jnp.sum(frac < ratio, axis=1) + 1
    elif method == "maxgap":
        num, den = ev[:, :-1], ev[:, 1:]
        gaps = jnp.where(
            den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, -jnp.inf)
        )  # x/0 = inf, 0/0 ignored
        gaps = jnp.where(valid[:, 1:], gaps, -jnp.inf)
        if gaps.shape[1] == 0:
            dim = jnp.ones(ev.shape[0], jnp.int32)
        else:
            dim = jnp.argmax(gaps, axis=1) + 1
            dim = jnp.where(jnp.sum(valid, axis=1) <= 1, 1, dim)
    else:  # paper
        dim = jnp.sum((ev > tau) & valid, axis=1)
    return jnp.where(ev0 > 0, dim, 0).astype(jnp.int32)


def _check_float(x, name: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    ok_lo = x > lo if lo_open else x >= lo
    ok_hi = x < hi if hi_open else x <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {x}")
    return x


def local_spectra(
    data: Float[Array, "n d"],
    queries: Float[Array, "m d"] | None = None,
    *,
    k: int = 100,
    radius: float | None = None,
    include_self: bool = False,
    batch_size: int = 256,
    rtol: float | None = None,
    eig_backend: Literal["auto", "host", "xla"] = "auto",
) -> tuple[Float[Array, "m s"], Float[Array, " m"]]:
    """Explained variances of each query's k-nearest-neighbour neighbourhood.

    Args:
        data: points ``[n, d]``.
        queries: ``[m, d]``; ``None`` means the data points, each excluded from its own
            neighbourhood.
        k: neighbours per query.
        radius: if given, a query with at least one of its k neighbours at distance ``<= radius``
            keeps only those neighbours (others get weight 0).
        include_self: add the query point itself to its neighbourhood.
        batch_size: queries per chunk.
        rtol: eigenvalues ``<= rtol * largest`` are set to 0 (default ``max(k', d) * eps``).
        eig_backend: "xla" (batched SVD in XLA), "host" (numpy's batched LAPACK ``eigvalsh``
            on each chunk's matrices, between jitted steps), or "auto": "host" on the CPU backend
            with concrete inputs, else "xla" (so ``lpca`` also runs under ``jit``).

    Returns:
        ``(variances, sizes)``: ``variances[i]`` holds the ``s = min(k', d)`` explained variances
        ``lambda_1 >= ... >= lambda_s`` of neighbourhood ``i`` (eigenvalues of
        ``(1 / (m_i - 1)) sum_j (x_j - xbar)(x_j - xbar)^T`` with ``k' = k (+1)`` rows), and
        ``sizes[i] = m_i`` the number of points in it.
    """
    data, queries_ = check_data(data, queries)
    n, d = data.shape
    exclude_self = queries is None
    k = check_k(k, n - 1 if exclude_self else n)
    batch_size = check_batch_size(batch_size)
    kk = k + int(include_self)
    if eig_backend not in ("auto", "host", "xla"):
        raise ValueError(f"eig_backend must be 'auto', 'host' or 'xla', got {eig_backend!r}")
    if eig_backend == "host" and not is_concrete(data):
        raise ValueError("eig_backend='host' cannot run under jit; use 'xla' or 'auto'")
    host_eig = eig_backend == "host" or (
        eig_backend == "auto" and jax.default_backend() == "cpu" and is_concrete(data)
    )
    if rtol is None:
        rtol = default_rtol(data.dtype, max(kk, d))
    qs = data if queries_ is None else queries_
    index = build_index(data, k=k, exclude_self=exclude_self)
    rad = jnp.asarray(jnp.inf if radius is None else radius, data.dtype)
    rt = jnp.asarray(rtol, data.dtype)
    evs, ms = [], []

    def finish(pending):
        mat, m, n_valid = pending
        ev = _host_eigvals_desc(mat) if host_eig else _xla_eigvals_desc(mat)
        evs.append(_finish(jnp.asarray(ev), m, rt)[:n_valid])
        ms.append(m[:n_valid])

    pending = None
    # One BLAS thread for the host eigenvalues: they overlap XLA's work on the next chunk, and
    # a second BLAS thread only competes with it (on 2 cores, 50 chunks took 39.1 s with two
    # BLAS threads against 30.9 s with one).
    with threadpool_limits(1 if host_eig else None, user_api="blas"):
        for start, chunk, n_valid in iter_chunks(qs, batch_size):
            # Dispatch (asynchronously) the next chunk before the host eigenvalues of the
            # previous one, so that XLA's matrix products and LAPACK overlap.
            _, idx, _ = search_chunk(index, chunk, start, k=k, exclude_self=exclude_self)
            mat, m = _neighbourhood_matrices(
                data, chunk, idx, rad, include_self=include_self, use_gram=kk < d
            )
            if pending is not None:
                finish(pending)
            pending = (mat, m, n_valid)
        finish(pending)
    return jnp.concatenate(evs), jnp.concatenate(ms)


def lpca(
    data: Float[Array, "n d"],
    queries: Float[Array, "m d"] | None = None,
    *,
    k: int = 100,
    method: LPCAMethod = "fo",
    alpha: float = 0.05,
    ratio: float = 0.95,
    q: float = 10.0,
    distance_q: float = 10.0,
    batch_size: int = 256,
    distance_max_points: int = 2048,
    key: Array | None = None,
    rtol: float | None = None,
    eig_backend: Literal["auto", "host", "xla"] = "auto",
) -> Int[Array, " m"]:
    r"""Local PCA LID estimate (Fukunaga & Olsen 1971) for every query point.

    For query ``x`` with neighbourhood ``N(x)`` (``m`` points), let
    ``lambda_1 >= ... >= lambda_s`` be the eigenvalues of the sample covariance
    ``C = 1/(m-1) sum_{y in N(x)} (y - ybar)(y - ybar)^T`` (PCA's explained variances; computed
    from the ``k x k`` Gram matrix of the centred neighbourhood when ``k < d``, which has the same
    nonzero eigenvalues, else from ``C``).  Eigenvalues ``<= rtol * lambda_1`` are set to 0.
    Then, with ``r = min(m - 1, d)`` the number of eigenvalues that can be nonzero:

    * ``"fo"``: ``LID = #{j : lambda_j > alpha * lambda_1}`` (Fukunaga-Olsen).
    * ``"maxgap"``: ``LID = argmax_{j < r} lambda_j / lambda_{j+1}`` (1-based; ``x/0 = inf``,
      ``0/0`` ignored).
    * ``"ratio"``: ``LID = 1 + #{j : sum_{i<=j} lambda_i / sum_i lambda_i < ratio}``, i.e. the
      number of components needed to reach a fraction ``ratio`` of the variance.
    * ``"paper"``: Appendix C.1 of Ross et al. (2025): ``LID = #{j <= r : lambda_j > tau}`` with
      one global ``tau`` = the ``q``-th percentile of all explained variances ``lambda_j``,
      ``j <= r_i``, of the neighbourhoods of all data points; and the neighbourhood of ``x`` is
      ``{x} U {y in kNN(x) : ||y - x|| <= rho}`` when that set has a neighbour, else
      ``{x} U kNN(x)``, where ``rho`` is the ``distance_q``-th percentile of the distances
      between all pairs of distinct data points.

    For "fo", "maxgap" and "ratio" the neighbourhood is the k nearest neighbours of ``x``
    (``x`` itself excluded when ``queries is None``), centred, exactly as scikit-dimension's
    ``lPCA(ver=...).fit_pw(X, n_neighbors=k)``; the answers agree pointwise with it, except in
    degenerate cases where scikit-dimension's answer depends on rounding noise or is undefined:
    a neighbourhood with all variances 0 (a point mass) gives 0 here for every method; "maxgap"
    only compares the ``min(k-1, d)`` eigenvalues that can be nonzero (scikit-dimension also
    uses the ``k``-th, structurally zero one when ``k <= d``, whose ratio is rounding noise, and
    on rank-deficient data it compares noise eigenvalues that are zeroed here).  The default
    ``ratio=0.95`` differs from scikit-dimension's ``alphaRatio=0.05`` (which nearly always
    answers 1); pass ``ratio=0.05`` to reproduce it.

    Choices for ``"paper"`` (the paper leaves them open):

    * The query point itself belongs to its neighbourhood, so a point with exact copies among
      its close neighbours sees a neighbourhood of identical points: all variances are exactly 0
      (differences to the query are exact zeros, so centring introduces no rounding) and it reads
      0 -- also for a single copy.  A neighbourhood of one point reads 0.  An explicit query
      equal to a data point is a copy of it (that point is among its neighbours), so
      ``lpca(data, data, ...)`` differs from ``lpca(data, ...)``: a generated sample that
      replicates a training point with no other data within ``rho`` reads 0.
    * Neighbourhoods of different sizes are handled with 0/1 weights on the k nearest
      neighbours (static shapes under jit), not ragged arrays.
    * ``rho`` is exact when ``n <= distance_max_points``; otherwise it is estimated from all pairs
      among ``distance_max_points`` data points drawn uniformly without replacement under
      ``key`` (about 2 million pairs by default; the kNN distances alone cannot give it, since
      for ``k << n`` the percentile usually lies beyond the k-th neighbour).
    * ``tau`` is computed over the data's neighbourhoods even when ``queries`` are given (one
      extra pass over the data).  If every variance is 0, ``tau = 0`` and every point reads 0.
    * The percentile threshold assumes that at least ``q``% of the pooled explained variances
      are off-manifold (numerically zero or noise) and that they are all smaller than the
      on-manifold ones: then ``tau`` falls in the gap.  If fewer than ``q``% of the variances are
      off-manifold, ``tau`` cuts into the on-manifold ones and some points read below their
      dimension; if noise variances spread above the ``q``-th percentile they are counted.  On
      exactly low-dimensional linear pieces (e.g. a 2-D plane in R^5) the off-manifold variances
      are rounding noise, zeroed by ``rtol``, so ``tau = 0`` and the count is the rank.

    Args:
        data: data set ``[n, d]`` (2-D, finite).
        queries: points ``[m, d]`` at which to estimate; default: the data points, each excluded
            from its own k nearest neighbours.
        k: number of nearest neighbours, ``1 <= k < n`` (``k <= n`` with explicit queries).
        method: rule counting significant variances, see above.
        alpha: "fo" fraction of the largest variance a variance must exceed, in (0, 1).
        ratio: "ratio" fraction of the total variance to reach, in (0, 1].
        q: "paper" percentile (0-100) of all explained variances used as threshold ``tau``.
        distance_q: "paper" percentile (0-100) of all pairwise distances used as radius ``rho``.
        batch_size: query points per chunk (memory ``O(batch_size (n + k d))``).
        distance_max_points: "paper": above this many data points, ``rho`` is estimated on a
            random subset of this size.
        key: "paper": PRNG key of that subset; required when ``n > distance_max_points``.
        rtol: relative zero floor for eigenvalues; default ``max(k', d) * eps(dtype)``.
        eig_backend: how the batched eigenvalues are computed, see :func:`local_spectra`.

    Returns:
        Integer LID estimates, shape ``[m]`` (``m = n`` when ``queries`` is None).
    """
    check_option(method, "method", _METHODS)
    alpha = _check_float(alpha, "alpha", 0.0, 1.0, lo_open=True, hi_open=True)
    ratio = _check_float(ratio, "ratio", 0.0, 1.0, lo_open=True, hi_open=False)
    q = _check_float(q, "q", 0.0, 100.0, lo_open=False, hi_open=False)
    distance_q = _check_float(distance_q, "distance_q", 0.0, 100.0, lo_open=False, hi_open=False)
    if (
        isinstance(distance_max_points, bool)
        or not isinstance(distance_max_points, numbers.Integral)
        or distance_max_points < 2
    ):
        raise ValueError(f"distance_max_points must be an int >= 2, got {distance_max_points!r}")
    data, queries_ = check_data(data, queries)
    n, d = data.shape
    check_k(k, n - 1 if queries is None else n)
    dtype = data.dtype
    zero = jnp.zeros((), dtype)

    if method != "paper":
        ev, m = local_spectra(
            data, queries_, k=k, batch_size=batch_size, rtol=rtol, eig_backend=eig_backend
        )
        return _count(
            ev, m, jnp.asarray(alpha, dtype), jnp.asarray(ratio, dtype), zero, method=method, d=d
        )

    rho = pairwise_distance_percentile(
        data, q=distance_q, max_points=int(distance_max_points), key=key
    )
    common = dict(
        k=k,
        radius=rho,
        include_self=True,
        batch_size=batch_size,
        rtol=rtol,
        eig_backend=eig_backend,
    )
    ev_data, m_data = local_spectra(data, None, **common)
    tau = masked_percentile(ev_data, _valid_mask(ev_data, m_data, d), q)
    if queries_ is None:
        ev, m = ev_data, m_data
    else:
        ev, m = local_spectra(data, queries_, **common)
    return _count(ev, m, zero, zero, tau, method="paper", d=d)
