"""Batched exact k-nearest neighbours in JAX, shared by the data-only LID estimators.

Brute force: for a chunk of queries, one matrix product gives the scores
``2 q.x - ||x||^2 = ||q||^2 - ||q - x||^2`` (per query, ordered as minus the squared distance),
and ``jax.lax.top_k`` picks the k best; memory is ``batch_size * n`` scores per chunk.

Large high-dimensional data (``d >= 1024``, ``n >= 16384``) take a certified shortcut that
gives the same neighbours for a fraction of the matrix products.  Let ``V`` be an orthonormal
basis of an ``r``-dimensional subspace (``r = 256``: a randomized estimate of the data's top
principal subspace) and write ``x - mu = V p(x) + e(x)`` with ``e(x)`` orthogonal to it.  Then
``||x - y||^2 = ||p(x) - p(y)||^2 + ||e(x) - e(y)||^2 >= ||xt - yt||^2`` with
``xt = (p(x), ||e(x)||)`` in ``R^(r + 1)``: distances between the projected points are lower
bounds.  Each query takes its ``M = max(2k, 64)`` best candidates by the lower bound (cheap:
``r + 1`` dimensions instead of ``d``; fewer when the data hold fewer points), ranks them by
their exact distances (from the differences), and keeps the k nearest.  The result is certified
when the k-th exact distance is at most the ``(M + 1)``-th smallest lower bound (minus a
rounding margin): no other point can be closer.  The floor of 64 candidates matters for small
k: every lower bound falls short of its distance by ``||e(x) - e(y)||^2 - (||e(x)|| -
||e(y)||)^2`` (the residuals' directions are lost), so with ``M = 2k = 2`` a nearest neighbour
is certified only if it beats the third-smallest lower bound by that much, which 15-18% of
the queries failed on image-like data with 50,000 references (the probe then declined k = 1),
while the ``(M + 1)``-th lower bound grows with M; the extra candidates cost ``M d`` per
query against ``n (r + 1)`` for the projected search.
Uncertified queries are redone by brute force, so the answer never depends on how good the
subspace is; only the speed does.  Data whose spectrum does not decay (noise, natural image
patches at this ``r``) leave many queries uncertified; a probe chunk detects that and the
search is then brute force.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from mmh_jax._src.checks import check_int, is_concrete
from mmh_jax._src.rng import numpy_generator

__all__ = [
    "NeighbourIndex",
    "as_float_array",
    "build_index",
    "check_batch_size",
    "check_data",
    "check_k",
    "iter_chunks",
    "knn",
    "knn_in_blocks",
    "search_chunk",
]

# Subspace dimension of the certified search and the sizes from which it is used: below
# about 10,000 points its fixed cost per query (exact distances to 2k candidates) makes it no
# faster than brute force (measured with d = 3072, k = 100 on a 2-core CPU).
PROJECTION_DIM = 256
_MIN_DIM = 4 * PROJECTION_DIM
_MIN_POINTS = 16384
# build_index falls back to brute force when more than this fraction of a probe chunk of
# data points is not certified: each group of _REPAIR_ROWS uncertified queries costs a pass
# over the data, and at about a third of the queries the repairs cost more than brute force.
_MAX_UNCERTIFIED = 0.10
_PROBE_ROWS = 256
# Uncertified queries are redone by brute force in groups of this many.
_REPAIR_ROWS = 16
# Fewest candidates ranked by exact distance per query (see the module docstring).  Measured
# for k = 1 on benchmarks/bench_retrieval.py's data (50,000 references, d = 3072, spectrum
# i^-1, noise 0.001; 4,096 queries): 2 candidates left 15% of the queries uncertified (the
# probe declined: brute force), 8 left 0.05%, 16 to 128 none; a 512-query chunk took 1.25 s
# with 2 (repairs included), 0.53-0.55 s with 16 to 64 and 0.63 s with 128 (2 shared cores).
_MIN_CANDIDATES = 64


def _num_candidates(k: int, available: int) -> int:
    """Candidates ranked by exact distance per query: ``max(2k, _MIN_CANDIDATES)``, at most
    ``available - 1`` (one point must stay outside the candidates for the bound)."""
    return min(max(2 * k, _MIN_CANDIDATES), available - 1)


def as_float_array(x, name: str) -> Array:
    """Convert ``x`` to a floating JAX array (ints become the default float dtype)."""
    try:
        arr = jnp.asarray(x)
    except TypeError as err:  # e.g. strings, objects
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from err
    if not (
        jnp.issubdtype(arr.dtype, jnp.floating)
        or jnp.issubdtype(arr.dtype, jnp.integer)
        or arr.dtype == jnp.bool_
    ):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return arr


def check_data(data, queries, *, min_points: int = 2) -> tuple[Array, Array | None]:
    """Validate ``data`` (2-D, finite, >= ``min_points`` rows) and optional ``queries``."""
    data = as_float_array(data, "data")
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D [n_points, n_features], got shape {tuple(data.shape)}")
    if data.shape[0] < min_points or data.shape[1] < 1:
        raise ValueError(
            f"data must have at least {min_points} points and 1 feature, got shape {tuple(data.shape)}"
        )
    if is_concrete(data) and not bool(jnp.all(jnp.isfinite(data))):
        raise ValueError("data must be finite (found NaN or inf)")
    if queries is None:
        return data, None
    queries = as_float_array(queries, "queries")
    if queries.ndim != 2:
        raise ValueError(
            f"queries must be 2-D [n_queries, n_features], got shape {tuple(queries.shape)}"
        )
    if queries.shape[1] != data.shape[1]:
        raise ValueError(
            f"queries must have the same number of features as data ({data.shape[1]}), "
            f"got {queries.shape[1]}"
        )
    if is_concrete(queries) and not bool(jnp.all(jnp.isfinite(queries))):
        raise ValueError("queries must be finite (found NaN or inf)")
    dtype = jnp.promote_types(data.dtype, queries.dtype)
    return data.astype(dtype), queries.astype(dtype)


def check_k(k, n_available: int, name: str = "k", minimum: int = 1) -> int:
    """``k`` must be an int with ``minimum <= k <= n_available``."""
    k = check_int(k, name, minimum=minimum)
    if k > n_available:
        raise ValueError(
            f"{name}={k} is too large: only {n_available} candidate neighbours are available "
            f"(the number of data points, minus the point itself when queries is None)"
        )
    return k


def check_batch_size(batch_size) -> int:
    return check_int(batch_size, "batch_size")


def iter_chunks(queries: Array, batch_size: int):
    """Yield ``(start, padded_chunk, n_valid)``; the last chunk is padded by repetition so that
    every chunk has the same shape (one compilation)."""
    m = queries.shape[0]
    b = min(batch_size, m)
    for start in range(0, m, b):
        chunk = queries[start : start + b]
        n_valid = chunk.shape[0]
        if n_valid < b:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], b - n_valid, axis=0)], axis=0)
        yield start, chunk, n_valid


def _top_scores(points, points_sqnorm, q, rows, *, k: int, exclude_self: bool):
    """The ``k`` largest scores ``2 q.x - ||x||^2`` of each query over ``points`` and their
    indices (best first).  With ``exclude_self``, query ``i`` is data point ``rows[i]`` and that
    index is excluded (by index, so exact duplicates of the query stay candidates).

    The per-query constant ``||q||^2`` is left out: kept inside the same expression, XLA:CPU
    fuses it into the matrix product and runs about 2x slower.
    """
    scores = 2.0 * (q @ points.T) - points_sqnorm[None, :]
    if exclude_self:
        cols = jnp.arange(points.shape[0])
        scores = jnp.where(cols[None, :] == rows[:, None], -jnp.inf, scores)
    return jax.lax.top_k(scores, k)


def _brute_chunk(data, data_sqnorm, q, rows, *, k, exclude_self):
    """Approximate squared distances (expansion formula) and indices of the k nearest."""
    s, idx = _top_scores(data, data_sqnorm, q, rows, k=k, exclude_self=exclude_self)
    d2 = jnp.maximum(jnp.sum(q * q, axis=1)[:, None] - s, 0.0)
    return d2, idx


@jax.jit
def exact_sq_dists(data, q, idx):
    """``||data[idx[i, j]] - q[i]||^2`` from the differences, a few queries at a time (the
    gather, subtraction and reduction fuse)."""

    def one(args):
        i, qi = args
        diff = data[i] - qi
        return jnp.sum(diff * diff, axis=-1)

    return jax.lax.map(one, (idx, q), batch_size=4)


def knn_in_blocks(
    data: Float[Array, "n d"], queries: Float[Array, "b d"], *, k: int, block: int
) -> tuple[Float[Array, "b k"], Int[Array, "b k"]]:
    """The k nearest rows of ``data`` of each query, by brute force over ``block`` data rows at a
    time: memory is ``b * block`` scores whatever ``n``, and it traces as one program (under
    ``jit``, and inside ``shard_map`` with the data replicated and the queries split).

    Returns:
        ``(sq_dists, indices)``, both ``[b, k]``, sorted by increasing distance; the squared
        distances are exact (from the differences ``x_j - q``).
    """
    n = data.shape[0]
    block = min(check_int(block, "block"), n)
    k = check_k(k, n)

    def top(rows: Array, start) -> tuple[Array, Array]:
        scores, index = _top_scores(
            rows,
            jnp.sum(rows * rows, axis=1),
            queries,
            None,
            k=min(k, rows.shape[0]),
            exclude_self=False,
        )
        return scores, index + start

    def merge(best: tuple[Array, Array], new: tuple[Array, Array]) -> tuple[Array, Array]:
        scores, j = jax.lax.top_k(jnp.concatenate([best[0], new[0]], axis=1), k)
        return scores, jnp.take_along_axis(jnp.concatenate([best[1], new[1]], axis=1), j, axis=1)

    full = n // block
    best = top(data[:block], 0)  # computed from the queries: it varies as they do in shard_map

    def body(best, start):
        return merge(best, top(jax.lax.dynamic_slice_in_dim(data, start, block), start)), None

    best, _ = jax.lax.scan(body, best, block * jnp.arange(1, full, dtype=jnp.int32))
    if n > full * block:
        best = merge(best, top(data[full * block :], full * block))
    d2 = exact_sq_dists(data, queries, best[1])
    order = jnp.argsort(d2, axis=1, stable=True)
    return jnp.take_along_axis(d2, order, axis=1), jnp.take_along_axis(best[1], order, axis=1)


class NeighbourIndex(NamedTuple):
    """What a neighbour search over ``data`` needs, built once by :func:`build_index`.

    ``proj`` holds ``(p(x), ||e(x)||)`` of every data point (see the module docstring) or is
    ``None`` for brute force; ``basis`` and ``mean`` project queries.
    """

    data: Array
    data_sqnorm: Array
    mean: Array | None
    basis: Array | None
    proj: Array | None
    proj_sqnorm: Array | None


@partial(jax.jit, static_argnames=("r",))
def _subspace(sample: Array, mean: Array, *, r: int) -> Array:
    """Orthonormal ``[d, r]`` basis of an estimate of the top-``r`` principal subspace of
    ``sample`` (randomized subspace iteration with a fixed key: deterministic, and the search is
    exact whatever subspace this returns)."""
    x = sample - mean
    omega = jax.random.normal(jax.random.key(0), (x.shape[1], r), x.dtype)
    basis, _ = jnp.linalg.qr(x.T @ (x @ omega))
    for _ in range(2):
        basis, _ = jnp.linalg.qr(x.T @ (x @ basis))
    return basis


@jax.jit
def _project(x: Array, mean: Array, basis: Array) -> Array:
    """``[(x - mean) V, ||(x - mean) - (x - mean) V V^T||]``, shape ``[m, r + 1]``."""
    xc = x - mean
    p = xc @ basis
    resid = xc - p @ basis.T
    return jnp.concatenate([p, jnp.sqrt(jnp.sum(resid * resid, axis=1, keepdims=True))], axis=1)


def _project_rows(x: Array, mean: Array, basis: Array, block: int = 4096) -> Array:
    return jnp.concatenate(
        [_project(x[i : i + block], mean, basis) for i in range(0, x.shape[0], block)]
    )


def build_index(
    data: Float[Array, "n d"],
    *,
    k: int,
    exclude_self: bool,
    projection_dim: int | None = None,
) -> NeighbourIndex:
    """Prepare the search for ``k`` neighbours among ``data``.

    By default the certified search (see the module docstring) is used with ``r = 256`` when
    ``d >= 1024``, ``n >= 16384``, ``2k`` candidates leave at least one point out (the
    candidates are ``max(2k, 64)``, fewer if the data are too few), and (for
    concrete data) at least 90% of a probe chunk of 256 evenly spaced data points is certified;
    otherwise brute force.  ``projection_dim`` forces the certified search with a subspace of
    that dimension (no probe), ``0`` forces brute force.
    """
    n, d = data.shape
    available = n - 1 if exclude_self else n
    if projection_dim is None:
        r = PROJECTION_DIM if (d >= _MIN_DIM and n >= _MIN_POINTS) else 0
    else:
        r = projection_dim
    sqn = jnp.sum(data * data, axis=1)
    brute = NeighbourIndex(data, sqn, None, None, None, None)
    if r == 0 or 2 * k + 1 > available or r >= d:
        return brute
    mean = jnp.mean(data, axis=0)
    sample = data[jnp.asarray(np.linspace(0, n - 1, min(n, 8 * r)).round().astype(np.int32))]
    basis = _subspace(sample, mean, r=r)
    proj = _project_rows(data, mean, basis)
    index = NeighbourIndex(data, sqn, mean, basis, proj, jnp.sum(proj * proj, axis=1))
    if projection_dim is None and is_concrete(data):
        rows = jnp.asarray(np.linspace(0, n - 1, min(n, _PROBE_ROWS)).round().astype(np.int32))
        n_bad = _certified_chunk(index, data[rows], rows, k=k, exclude_self=True)[2]
        if int(n_bad) > _MAX_UNCERTIFIED * rows.shape[0]:
            return brute
    return index


@partial(jax.jit, static_argnames=("k", "exclude_self"))
def _certified_chunk(index: NeighbourIndex, q, rows, *, k: int, exclude_self: bool):
    available = index.proj.shape[0] - (1 if exclude_self else 0)
    num_cand = _num_candidates(k, available)
    qp = _project(q, index.mean, index.basis)
    qp_sq = jnp.sum(qp * qp, axis=1)
    # The barrier keeps XLA:CPU from recomputing the top-k inside the loop of exact_sq_dists
    # when its outputs have more than one consumer (measured 5x slower without it).  qp_sq
    # rides along so that the barrier's operand is never the top-k's own result tuple: under
    # shard_map XLA:CPU's TopkDecomposer aborts on a top-k whose user is not a tuple element.
    s, cand, qp_sq = jax.lax.optimization_barrier(
        (
            *_top_scores(
                index.proj, index.proj_sqnorm, qp, rows, k=num_cand + 1, exclude_self=exclude_self
            ),
            qp_sq,
        )
    )
    # Every point outside the candidates has lower bound >= bound; rounding of the float
    # lower bounds is covered by a margin relative to the squared norms involved.
    bound = qp_sq - s[:, num_cand]
    cand = cand[:, :num_cand]
    d2c = exact_sq_dists(index.data, q, cand)
    neg, j = jax.lax.top_k(-d2c, k)
    d2 = -neg
    idx = jnp.take_along_axis(cand, j, axis=1)
    eps = jnp.finfo(q.dtype).eps
    margin = 8.0 * eps * np.sqrt(q.shape[1]) * (qp_sq + jnp.max(index.proj_sqnorm))
    ok = d2[:, -1] <= bound - margin
    # Redo the uncertified rows by brute force, _REPAIR_ROWS at a time (uncertified first).
    order = jnp.argsort(ok, stable=True)
    n_bad = jnp.sum(~ok)
    group = min(_REPAIR_ROWS, q.shape[0])

    def repair(carry):
        i, d2, idx = carry
        # (The last group may be shifted back to fit; it then redoes certified rows too.)
        sel = jax.lax.dynamic_slice_in_dim(order, i * group, group)
        d2r, idxr = _brute_chunk(
            index.data, index.data_sqnorm, q[sel], rows[sel], k=k, exclude_self=exclude_self
        )
        return i + 1, d2.at[sel].set(d2r), idx.at[sel].set(idxr)

    _, d2, idx = jax.lax.while_loop(
        lambda c: c[0] * group < n_bad, repair, (jnp.zeros((), jnp.int32), d2, idx)
    )
    return d2, idx, n_bad


@partial(jax.jit, static_argnames=("k", "exclude_self"))
def _brute_chunk_jit(index: NeighbourIndex, q, rows, *, k: int, exclude_self: bool):
    d2, idx = _brute_chunk(index.data, index.data_sqnorm, q, rows, k=k, exclude_self=exclude_self)
    return d2, idx, jnp.zeros((), jnp.int32)


def search_chunk(
    index: NeighbourIndex, q: Float[Array, "b d"], start: int, *, k: int, exclude_self: bool
) -> tuple[Float[Array, "b k"], Int[Array, "b k"], Int[Array, ""]]:
    """The k nearest data points of a chunk of queries: ``(sq_dists, indices, n_brute)``.

    Rows are sorted by increasing distance.  With ``exclude_self`` the query in row ``i`` is
    data point ``start + i`` and is not its own neighbour.  ``sq_dists`` are exact (from the
    differences) for rows answered by the certified search and from the expansion formula for
    rows answered by brute force; ``n_brute`` counts the latter's uncertified rows.
    """
    rows = start + jnp.arange(q.shape[0])
    fn = _brute_chunk_jit if index.proj is None else _certified_chunk
    return fn(index, q, rows, k=k, exclude_self=exclude_self)


def knn(
    data: Float[Array, "n d"],
    queries: Float[Array, "m d"] | None = None,
    *,
    k: int,
    batch_size: int = 512,
    exact_distances: bool = True,
    projection_dim: int | None = None,
) -> tuple[Float[Array, "m k"], Int[Array, "m k"]]:
    """Exact k nearest neighbours (Euclidean) of each query among ``data``.

    Args:
        data: reference points.
        queries: query points; ``None`` means the data points themselves, and then a point is not
            its own neighbour (as in scikit-learn's ``kneighbors()`` without arguments).
        k: number of neighbours (static).
        batch_size: queries per chunk; memory is ``O(batch_size * n)``.
        exact_distances: recompute the selected distances from the differences ``x_j - q``
            (accurate for near-duplicates) and re-sort them.
        projection_dim: see :func:`build_index`.

    Returns:
        ``(distances, indices)``, both ``[m, k]``, sorted by increasing distance.
    """
    exclude_self = queries is None
    if queries is None:
        queries = data
    index = build_index(data, k=k, exclude_self=exclude_self, projection_dim=projection_dim)
    dists, inds = [], []
    for start, chunk, n_valid in iter_chunks(queries, batch_size):
        d2, idx, _ = search_chunk(index, chunk, start, k=k, exclude_self=exclude_self)
        if exact_distances:
            d2 = exact_sq_dists(data, chunk, idx)
            order = jnp.argsort(d2, axis=1, stable=True)
            d2 = jnp.take_along_axis(d2, order, axis=1)
            idx = jnp.take_along_axis(idx, order, axis=1)
        dists.append(d2[:n_valid])
        inds.append(idx[:n_valid])
    return jnp.sqrt(jnp.concatenate(dists)), jnp.concatenate(inds)


def pairwise_distance_percentile(
    data: Float[Array, "n d"], *, q: float, max_points: int, key: Array | None
) -> Array:
    """The ``q``-th percentile (linear interpolation, as ``numpy.percentile``) of the distances
    ``||x_i - x_j||`` over all pairs ``i < j``; exact when ``n <= max_points``, otherwise over all
    pairs of a uniform random subset of ``max_points`` points drawn under ``key`` (then required):
    an unbiased U-statistic estimate of the pair-distance distribution."""
    n = data.shape[0]
    if n > max_points:
        if key is None:
            raise ValueError(
                f"key is required to draw {max_points} of the {n} points for the "
                "distance percentile: pass key=jax.random.key(seed)"
            )
        sel = np.sort(numpy_generator(key).choice(n, size=max_points, replace=False))
        data = data[jnp.asarray(sel)]
    return _pairwise_percentile(data, jnp.asarray(q, dtype=data.dtype))


@jax.jit
def _pairwise_percentile(x, q):
    sq = jnp.sum(x * x, axis=1)
    d2 = jnp.maximum(sq[:, None] - 2.0 * (x @ x.T) + sq[None, :], 0.0)
    iu = jnp.triu_indices(x.shape[0], k=1)
    return jnp.percentile(jnp.sqrt(d2[iu]), q)


def masked_percentile(values: Array, mask: Array, q) -> Array:
    """``numpy.percentile(values[mask], q)`` (linear interpolation) with static shapes; 0 if
    the mask is empty."""
    v = jnp.where(mask, values, jnp.inf).ravel()
    v = jnp.sort(v)
    count = jnp.sum(mask)
    pos = (jnp.asarray(q, v.dtype) / 100.0) * jnp.maximum(count - 1, 0).astype(v.dtype)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    frac = pos - lo.astype(v.dtype)
    vlo, vhi = v[lo], v[hi]
    out = vlo + frac * (vhi - vlo)
    out = jnp.where(frac == 0, vlo, out)  # avoids inf - inf when hi is out of the valid range
    return jnp.where(count > 0, out, jnp.zeros((), v.dtype))


def default_rtol(dtype, size: int) -> float:
    """Relative floor below which an eigenvalue is numerically zero."""
    return float(size) * float(jnp.finfo(dtype).eps)
