"""Data-only LID estimators from nearest-neighbour distances: Levina-Bickel MLE and TwoNN.

(Local PCA lives in :mod:`mmh_jax.lid.lpca`.)  Both use the batched exact kNN of
:mod:`mmh_jax._src.knn`; distances of the selected neighbours are recomputed from the
differences, so they are accurate also for near-duplicates.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from mmh_jax._src.checks import is_concrete
from mmh_jax._src.knn import check_batch_size, check_data, check_k, knn

__all__ = ["mle", "twonn", "mle_from_distances", "twonn_from_distances"]


@partial(jax.jit, static_argnames=("unbiased",))
def mle_from_distances(dists: Float[Array, "m k"], *, unbiased: bool = False) -> Float[Array, " m"]:
    r"""Levina-Bickel MLE from sorted neighbour distances ``T_1 <= ... <= T_k`` (each row).

    ``m(x) = (k - 1) / sum_{j=1}^{k} log(T_k / T_j)`` (``k - 2`` in the numerator when
    ``unbiased``), the variant scikit-dimension's ``MLE`` computes pointwise.  A zero distance
    (a duplicate) makes the sum infinite and the estimate 0, and so does ``T_k = 0`` (all ``k``
    neighbours are duplicates: the point sits on a 0-dimensional cluster, as :func:`lpca` reads
    it too).
    """
    k = dists.shape[1]
    kfac = (k - 2) if unbiased else (k - 1)
    tk = dists[:, -1:]
    safe = jnp.where(tk > 0, tk, 1.0)
    return jnp.where(tk[:, 0] > 0, kfac / jnp.sum(jnp.log(safe / dists), axis=1), 0.0)


def mle(
    data: Float[Array, "n d"],
    queries: Float[Array, "m d"] | None = None,
    *,
    k: int = 20,
    unbiased: bool = False,
    batch_size: int = 512,
) -> Float[Array, " m"]:
    r"""Pointwise Levina-Bickel (2005) maximum-likelihood LID.

    With ``T_j(x)`` the distance from ``x`` to its j-th nearest data point,

    ``m(x) = (k - 1) / sum_{j=1}^{k} log(T_k(x) / T_j(x))``

    (the ``j = k`` term is 0; ``k - 2`` instead of ``k - 1`` when ``unbiased``).  This is the
    estimate scikit-dimension's ``MLE(unbiased=...).fit(X, n_neighbors=k).dimension_pw_``
    returns (its default: no noise model, Haro approximation unused).

    Args:
        data: ``[n, d]`` data (2-D, finite).
        queries: ``[m, d]`` query points; default: the data points, each excluded from its own
            neighbours.
        k: neighbours, ``2 <= k < n`` (``3 <= k`` when ``unbiased``).
        unbiased: use ``k - 2`` in the numerator.
        batch_size: queries per kNN chunk.

    Returns:
        Float LID estimate per query ``[m]``; 0 where a neighbour is an exact duplicate.
    """
    data, queries_ = check_data(data, queries)
    n = data.shape[0]
    k = check_k(k, n - 1 if queries is None else n, minimum=3 if unbiased else 2)
    batch_size = check_batch_size(batch_size)
    dists, _ = knn(data, queries_, k=k, batch_size=batch_size)
    return mle_from_distances(dists, unbiased=bool(unbiased))


@partial(jax.jit, static_argnames=("method",))
def twonn_from_distances(
    r1: Float[Array, " n"], r2: Float[Array, " n"], *, n_keep, method: str = "linear"
) -> Float[Array, ""]:
    """TwoNN estimate from first and second nearest-neighbour distances (see :func:`twonn`);
    ``n_keep`` is the number of smallest finite ratios kept."""
    mu = r2 / r1
    finite = jnp.isfinite(mu)
    big = jnp.finfo(mu.dtype).max
    mu = jnp.sort(jnp.where(finite, mu, big))
    n_total = jnp.sum(finite)
    nf = n_total.astype(mu.dtype)
    n_keep = jnp.asarray(n_keep, n_total.dtype)
    i = jnp.arange(mu.shape[0])
    keep = i < n_keep
    log_mu = jnp.where(keep, jnp.log(mu), 0.0)
    if method == "mle":
        last = jnp.log(mu[jnp.maximum(n_keep - 1, 0)])
        return (n_keep - 1).astype(mu.dtype) / (jnp.sum(log_mu) + (nf - n_keep) * last)
    femp = (i + 1).astype(mu.dtype) / nf
    y = jnp.where(keep, -jnp.log1p(-jnp.where(keep, femp, 0.0)), 0.0)
    return jnp.sum(log_mu * y) / jnp.sum(log_mu * log_mu)


def twonn(
    data: Float[Array, "n d"],
    *,
    discard_fraction: float = 0.1,
    method: Literal["linear", "mle"] = "linear",
    batch_size: int = 512,
) -> Float[Array, ""]:
    r"""Global TwoNN intrinsic dimension (Facco et al., 2017).

    For each point, ``mu_i = r_2(i) / r_1(i)`` (second over first nearest-neighbour distance)
    follows ``Pareto(1, d)``: ``-log(1 - F(mu)) = d log(mu)``.  Points with ``r_1 = 0``
    (duplicates) have no finite ratio and are dropped; of the ``N`` remaining ratios, sorted, the
    ``n_keep = floor(N (1 - discard_fraction))`` smallest are kept and

    * ``"linear"`` (Facco et al.; scikit-dimension's default): least-squares slope through the
      origin, ``d = sum_i x_i y_i / sum_i x_i^2`` with ``x_i = log mu_(i)``,
      ``y_i = -log(1 - i / N)``, ``i = 1..n_keep``;
    * ``"mle"``: censored maximum likelihood,
      ``d = (n_keep - 1) / (sum_{i <= n_keep} log mu_(i) + (N - n_keep) log mu_(n_keep))``.

    Both agree with scikit-dimension's ``TwoNN(discard_fraction, method=...)``.

    Args:
        data: ``[n, d]`` data (2-D, finite, at least 3 points).
        discard_fraction: fraction of the largest ratios to discard, in [0, 1).
        method: "linear" or "mle".
        batch_size: points per kNN chunk.

    Returns:
        Scalar estimate.

    Raises:
        ValueError: fewer than 2 ratios kept, or ``"linear"`` with nothing discarded.
    """
    if method not in ("linear", "mle"):
        raise ValueError(f"method must be 'linear' or 'mle', got {method!r}")
    if (
        isinstance(discard_fraction, bool)
        or not isinstance(discard_fraction, numbers.Real)
        or not 0.0 <= float(discard_fraction) < 1.0
    ):
        raise ValueError(f"discard_fraction must be a float in [0, 1), got {discard_fraction!r}")
    data, _ = check_data(data, None, min_points=3)
    batch_size = check_batch_size(batch_size)
    dists, _ = knn(data, None, k=2, batch_size=batch_size)
    r1, r2 = dists[:, 0], dists[:, 1]
    n_finite = jnp.sum(jnp.isfinite(r2 / r1))
    n_keep = jnp.floor(n_finite * (1.0 - float(discard_fraction))).astype(
        n_finite.dtype
    )  # as skdim
    if not is_concrete(n_keep):  # under jit: the checks below need values
        return twonn_from_distances(r1, r2, n_keep=n_keep, method=method)
    if n_keep < 2:
        raise ValueError(f"twonn needs at least 2 finite ratios r2/r1 to keep, got {int(n_keep)}")
    if method == "linear" and n_keep >= n_finite:
        raise ValueError(
            "method='linear' needs discard_fraction large enough to drop at least one ratio "
            "(the largest has -log(1 - F) = inf); use method='mle' for discard_fraction=0"
        )
    return twonn_from_distances(r1, r2, n_keep=n_keep, method=method)
