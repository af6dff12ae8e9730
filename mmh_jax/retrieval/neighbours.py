"""Exact nearest training images of generated images, and Carlini et al.'s calibrated l2.

Memorization is usually detected by retrieval: a generated image that lies much closer to one
training image than to the others is a (near-)copy (Carlini et al., "Extracting Training Data
from Diffusion Models", USENIX Security 2023; used for the memorized samples studied in "A
Geometric Framework for Understanding Memorization in Generative Models").  The searches here
are exact: they reuse the batched k-nearest-neighbour search of :mod:`mmh_jax._src.knn`
(brute force, or for large high-dimensional training sets its certified projection shortcut,
which returns the same neighbours), with a separate reference set and, on several devices, the
queries split over a 1-D mesh with :func:`jax.shard_map` (references replicated).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float, Int

from mmh_jax._src.checks import check_int, check_option
from mmh_jax._src.knn import (
    NeighbourIndex,
    as_float_array,
    build_index,
    exact_sq_dists,
    iter_chunks,
    search_chunk,
)

__all__ = ["CalibratedL2", "Neighbours", "calibrated_l2", "nearest_neighbours"]

Metric = Literal["l2", "cosine"]


class Neighbours(NamedTuple):
    """The k nearest references of every query, nearest first.

    Attributes:
        distances: ``[q, k]`` l2 distances (metric ``"l2"``) or cosine distances
            ``1 - cos(query, reference)`` (metric ``"cosine"``), increasing along each row.
        indices: ``[q, k]`` row indices into the references.
    """

    distances: Float[Array, "q k"]
    indices: Int[Array, "q k"]


class CalibratedL2(NamedTuple):
    """Carlini et al.'s calibrated l2 of every query (see :func:`calibrated_l2`).

    Attributes:
        score: ``[q]`` calibrated l2; small means a (near-)copy of ``nearest``.
        nearest: ``[q]`` index of the nearest reference.
        distances: ``[q, n]`` l2 distances to the ``n`` nearest references, increasing.
    """

    score: Float[Array, " q"]
    nearest: Int[Array, " q"]
    distances: Float[Array, "q n"]


def _as_items(x, name: str) -> Array:
    """``x`` as a floating array ``[n, ...]`` with at least one item; values are checked later."""
    arr = as_float_array(x, name)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [n_items, ...] with at least one item, "
            f"got shape {tuple(arr.shape)}"
        )
    return arr


def _prepare(queries, references, k: int, k_name: str, metric: str) -> tuple[Array, Array]:
    """Validated, flattened ``[q, d]`` queries and ``[n, d]`` references in a common dtype
    (unit-normalised for the cosine metric)."""
    q = _as_items(queries, "queries")
    r = _as_items(references, "references")
    if q.shape[1:] != r.shape[1:]:
        raise ValueError(
            f"queries and references must have the same item shape: queries have shape "
            f"{tuple(q.shape)} (items {tuple(q.shape[1:])}), references have shape "
            f"{tuple(r.shape)} (items {tuple(r.shape[1:])})"
        )
    if k > r.shape[0]:
        raise ValueError(
            f"{k_name}={k} is larger than the training set: references hold only "
            f"{r.shape[0]} items, so the {k} nearest do not exist (use {k_name} <= {r.shape[0]})"
        )
    dtype = jnp.promote_types(q.dtype, r.dtype)
    q = q.reshape(q.shape[0], -1).astype(dtype)
    r = r.reshape(r.shape[0], -1).astype(dtype)
    for arr, name in ((q, "queries"), (r, "references")):
        if not bool(jnp.all(jnp.isfinite(arr))):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
    if metric == "cosine":
        q = _unit_rows(q, "queries")
        r = _unit_rows(r, "references")
    return q, r


def _unit_rows(x: Array, name: str) -> Array:
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    if bool(jnp.any(norms == 0)):
        bad = int(jnp.argmax(norms[:, 0] == 0))
        raise ValueError(
            f"the cosine metric is undefined for all-zero items: {name}[{bad}] is zero"
        )
    return x / norms


def _local_search(index: NeighbourIndex, q: Array, *, k: int) -> tuple[Array, Array]:
    """Squared distances (exact, from the differences) and indices of the k nearest, sorted."""
    _, idx, _ = search_chunk(index, q, 0, k=k, exclude_self=False)
    d2 = exact_sq_dists(index.data, q, idx)
    order = jnp.argsort(d2, axis=1, stable=True)
    return jnp.take_along_axis(d2, order, axis=1), jnp.take_along_axis(idx, order, axis=1)


_search_jit = jax.jit(_local_search, static_argnames=("k",))


@partial(jax.jit, static_argnames=("k", "mesh"))
def _search_sharded(index: NeighbourIndex, q: Array, *, k: int, mesh: Mesh):
    axis = mesh.axis_names[0]
    fn = jax.shard_map(
        partial(_local_search, k=k),
        mesh=mesh,
        in_specs=(P(), P(axis)),
        out_specs=(P(axis), P(axis)),
    )
    return fn(index, q)


def _resolve_mesh(mesh) -> tuple[Mesh | None, jax.Device | None]:
    """``(mesh, None)`` to shard over several devices, or ``(None, device)`` for one device."""
    if mesh is None:
        devices = jax.local_devices()
        if len(devices) == 1:
            return None, devices[0]
        return Mesh(np.array(devices), ("data",)), None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"mesh must be 1-D (one axis to split the queries over), got axes {mesh.axis_names}"
        )
    if mesh.devices.size == 1:
        return None, mesh.devices.flat[0]
    return mesh, None


def _search(q: Array, r: Array, *, k: int, batch_size: int, mesh, projection_dim):
    """Squared distances and indices ``[q, k]`` of the k nearest rows of ``r`` for each row of
    ``q`` (both validated and flattened)."""
    mesh, device = _resolve_mesh(mesh)
    index = build_index(r, k=k, exclude_self=False, projection_dim=projection_dim)
    m = q.shape[0]
    if mesh is None:
        index = jax.device_put(index, device)
        step = partial(_search_jit, k=k)
        chunk_rows = batch_size
    else:
        n_dev = mesh.devices.size
        index = jax.device_put(index, NamedSharding(mesh, P()))
        step = partial(_search_sharded, k=k, mesh=mesh)
        # batch_size rows per device and step (fewer when there are few queries); queries padded
        # by repetition to whole steps, so every step has the same shape (one compilation).
        per_device = min(batch_size, -(-m // n_dev))
        chunk_rows = per_device * n_dev
        padded = -(-m // chunk_rows) * chunk_rows
        if padded > m:
            q = jnp.concatenate([q, jnp.repeat(q[-1:], padded - m, axis=0)], axis=0)
    outs = [(step(index, chunk), n_valid) for _, chunk, n_valid in iter_chunks(q, chunk_rows)]
    d2 = np.concatenate([np.asarray(d)[:nv] for (d, _), nv in outs])[:m]
    idx = np.concatenate([np.asarray(i)[:nv] for (_, i), nv in outs])[:m]
    return jnp.asarray(d2), jnp.asarray(idx)


def nearest_neighbours(
    queries: Float[ArrayLike, "q *item"],
    references: Float[ArrayLike, "n *item"],
    *,
    k: int = 1,
    metric: Metric = "l2",
    batch_size: int = 512,
    mesh: Mesh | None = None,
    projection_dim: int | None = None,
) -> Neighbours:
    """Exact k nearest references (e.g. training images) of every query (e.g. generated image).

    Items are flattened (``[n, ...] -> [n, d]``) and compared in the common floating dtype.
    The search is :mod:`mmh_jax._src.knn`'s: chunks of ``batch_size`` queries against all
    references (one jit-compiled matrix product and top-k per chunk), or, for at least 16,384
    references of dimension >= 1024 with a decaying spectrum (images), its certified projection
    shortcut, which gives the same neighbours.  The selected distances are recomputed from the
    differences, so near-duplicates (distances near 0, the memorized copies) are accurate.
    Used to find the training images closest to generated ones, as in Carlini et al. 2023
    ("Extracting Training Data from Diffusion Models") and the memorization analyses of "A
    Geometric Framework for Understanding Memorization in Generative Models".

    Args:
        queries: ``[q, ...]`` items whose neighbours are wanted.
        references: ``[n, ...]`` items searched (same item shape as ``queries``).
        k: number of neighbours, ``1 <= k <= n``.
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"``: both sides are l2-normalised and
            searched in l2 order, and the distance reported is ``1 - cosine similarity``
            (``= ||u - v||^2 / 2`` for unit vectors).  All-zero items are rejected for cosine.
        batch_size: queries per chunk (per device when sharded); memory is
            ``O(batch_size * n)`` per device.
        mesh: a 1-D :class:`jax.sharding.Mesh`; the queries are split over its devices with
            :func:`jax.shard_map` and the references replicated (same results as one device).
            ``None``: every local device when there are several, otherwise plain ``jit``.  A
            one-device mesh runs unsharded on that device.
        projection_dim: the certified search's subspace dimension; ``None`` lets
            :func:`mmh_jax._src.knn.build_index` decide, ``0`` forces brute force.  The answer
            does not depend on it, only the speed.

    Returns:
        :class:`Neighbours` ``(distances [q, k], indices [q, k])``, nearest first.

    Raises:
        ValueError: different item shapes, no items, ``k < 1`` or ``k`` larger than the number
            of references, non-finite values, an unknown metric, a mesh that is not 1-D.
        TypeError: non-numeric inputs, a non-integer ``k`` or ``batch_size``.
    """
    check_option(metric, "metric", ("l2", "cosine"))
    k = check_int(k, "k")
    batch_size = check_int(batch_size, "batch_size")
    q, r = _prepare(queries, references, k, "k", metric)
    d2, idx = _search(q, r, k=k, batch_size=batch_size, mesh=mesh, projection_dim=projection_dim)
    dist = 0.5 * d2 if metric == "cosine" else jnp.sqrt(d2)
    return Neighbours(dist, idx)


@jax.jit
def _calibrate(dist: Array, alpha: Array) -> Array:
    nearest = dist[:, 0]
    ref = alpha * jnp.mean(dist, axis=1)
    # An exact copy whose n nearest references are all copies too gives 0 / 0: score 0.
    return jnp.where(nearest == 0, jnp.zeros_like(nearest), nearest / jnp.where(ref == 0, 1, ref))


def calibrated_l2(
    queries: Float[ArrayLike, "q *item"],
    references: Float[ArrayLike, "n *item"],
    *,
    n: int = 50,
    alpha: float = 0.5,
    batch_size: int = 512,
    mesh: Mesh | None = None,
    projection_dim: int | None = None,
) -> CalibratedL2:
    """Carlini et al.'s calibrated l2 distance of every query to the references.

    ``score(x) = ||x - y_1|| / (alpha * mean_{j <= n} ||x - y_j||)`` where ``y_1, ..., y_n``
    are the ``n`` nearest references of ``x`` in l2 (``y_1`` included in the mean), on
    flattened items (Carlini et al., "Extracting Training Data from Diffusion Models", USENIX
    Security 2023, Sec. 4; the memorization criterion behind the copies studied in "A Geometric
    Framework for Understanding Memorization in Generative Models").  The score is at most
    ``1 / alpha`` (2 with the defaults); a small score means ``x`` is much closer to its
    nearest training image than to the other near ones, i.e. a copy (Carlini et al. call a
    generation extracted below a threshold such as 0.1-0.15).  This follows the public code's
    formula (n = 50, alpha = 0.5, l2 on flattened images, the nearest counted in the mean).
    We differ only in one corner case: when the nearest distance is 0 the score is 0 (an exact
    copy), also when all ``n`` distances are 0, where the formula gives 0 / 0.

    Args:
        queries: ``[q, ...]`` generated items.
        references: ``[N, ...]`` training items (same item shape), ``N >= n``.
        n: number of nearest references averaged in the denominator, ``n >= 1``.
        alpha: scale of the denominator, ``> 0``.
        batch_size, mesh, projection_dim: as in :func:`nearest_neighbours`.

    Returns:
        :class:`CalibratedL2` ``(score [q], nearest [q], distances [q, n])``.

    Raises:
        ValueError: different item shapes, a training set with fewer than ``n`` items,
            ``n < 1``, ``alpha <= 0`` or not finite, non-finite values.
    """
    n = check_int(n, "n")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    batch_size = check_int(batch_size, "batch_size")
    q, r = _prepare(queries, references, n, "n", "l2")
    d2, idx = _search(q, r, k=n, batch_size=batch_size, mesh=mesh, projection_dim=projection_dim)
    dist = jnp.sqrt(d2)
    score = _calibrate(dist, jnp.asarray(alpha, dist.dtype))
    return CalibratedL2(score, idx[:, 0], dist)
