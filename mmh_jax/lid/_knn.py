"""Batched exact k-nearest neighbours in JAX, shared by the data-only LID estimators.

Distances are found with the expansion ``||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2`` (one matrix
product per chunk of queries) followed by ``jax.lax.top_k``; memory is bounded by
``batch_size * n`` distances per chunk.  The expansion loses relative precision for very close
points, so :func:`knn` can recompute the selected distances exactly from the differences.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from mmh_jax.lid._checks import check_int, is_concrete

__all__ = ["knn", "as_float_array", "check_data", "check_k", "check_batch_size"]


def as_float_array(x, name: str) -> Array:
    """Convert ``x`` to a floating JAX array (ints become the default float dtype)."""
    try:
        arr = jnp.asarray(x)
    except TypeError as err:  # e.g. strings, objects
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from err
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
            or arr.dtype == jnp.bool_):
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


@partial(jax.jit, static_argnames=("k", "exclude_self"))
def knn_chunk(
    data: Float[Array, "n d"],
    data_sqnorm: Float[Array, " n"],
    q: Float[Array, "b d"],
    start: Int[Array, ""],
    *,
    k: int,
    exclude_self: bool,
) -> tuple[Float[Array, "b k"], Int[Array, "b k"]]:
    """Approximate squared distances (expansion formula) and indices of the k nearest points.

    When ``exclude_self`` the query in row ``i`` of the chunk is taken to be data point
    ``start + i`` and that index is excluded (by index, not by distance, so exact duplicates of the
    query stay candidates).  Rows are sorted by increasing distance.
    """
    qn = jnp.sum(q * q, axis=1)
    d2 = qn[:, None] - 2.0 * (q @ data.T) + data_sqnorm[None, :]
    d2 = jnp.maximum(d2, 0.0)
    if exclude_self:
        rows = start + jnp.arange(q.shape[0])
        d2 = jnp.where(jnp.arange(data.shape[0])[None, :] == rows[:, None], jnp.inf, d2)
    neg, idx = jax.lax.top_k(-d2, k)
    return -neg, idx


def iter_chunks(queries: Array, batch_size: int):
    """Yield ``(start, padded_chunk, n_valid)``; the last chunk is padded by repetition so that
    every chunk has the same shape (one compilation)."""
    m = queries.shape[0]
    b = min(batch_size, m)
    for start in range(0, m, b):
        chunk = queries[start:start + b]
        n_valid = chunk.shape[0]
        if n_valid < b:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], b - n_valid, axis=0)], axis=0)
        yield start, chunk, n_valid


@partial(jax.jit, static_argnames=())
def _exact_sq_dists(data, q, idx):
    diff = data[idx] - q[:, None, :]
    return jnp.sum(diff * diff, axis=-1)


def knn(
    data: Float[Array, "n d"],
    queries: Float[Array, "m d"] | None = None,
    *,
    k: int,
    batch_size: int = 512,
    exact_distances: bool = True,
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

    Returns:
        ``(distances, indices)``, both ``[m, k]``, sorted by increasing distance.
    """
    exclude_self = queries is None
    if queries is None:
        queries = data
    data_sqnorm = jnp.sum(data * data, axis=1)
    dists, inds = [], []
    for start, chunk, n_valid in iter_chunks(queries, batch_size):
        d2, idx = knn_chunk(data, data_sqnorm, chunk, jnp.asarray(start), k=k,
                            exclude_self=exclude_self)
        if exact_distances:
            d2 = _exact_sq_dists(data, chunk, idx)
            order = jnp.argsort(d2, axis=1, stable=True)
            d2 = jnp.take_along_axis(d2, order, axis=1)
            idx = jnp.take_along_axis(idx, order, axis=1)
        dists.append(d2[:n_valid])
        inds.append(idx[:n_valid])
    return jnp.sqrt(jnp.concatenate(dists)), jnp.concatenate(inds)


def pairwise_distance_percentile(
    data: Float[Array, "n d"], q: float, *, max_points: int, seed: int
) -> Array:
    """The ``q``-th percentile (linear interpolation, as ``numpy.percentile``) of the distances
    ``||x_i - x_j||`` over all pairs ``i < j``; exact when ``n <= max_points``, otherwise over all
    pairs of a uniform random subset of ``max_points`` points (seeded): an unbiased U-statistic
    estimate of the pair-distance distribution."""
    n = data.shape[0]
    if n > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
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
