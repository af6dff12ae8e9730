"""Numerical rank of singular-value spectra, and global thresholds over a dataset.

The normal-bundle and Jacobian-rank estimators both read LID off a spectrum of
singular values. The memorization paper (Appendix C.1) does not threshold each
spectrum on its own: it takes one threshold for the whole dataset, the 10th
percentile of all singular values. Estimators return their spectra so that this
can be done afterwards::

    result = normal_bundle(score_fn, x, t0=t0, schedule=s, key=key)   # per batch
    tau = percentile_threshold(all_singular_values, q=10)          # whole dataset
    lid = lid_from_singular_values(all_singular_values, threshold=tau, space="normal")
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from mmh_jax._src.checks import check_option, is_concrete

__all__ = ["numerical_rank", "lid_from_singular_values", "percentile_threshold"]

Space = Literal["normal", "tangent"]


def _check_spectrum(singular_values: ArrayLike) -> Array:
    s = jnp.asarray(singular_values)
    if s.ndim < 1 or s.shape[-1] == 0:
        raise ValueError(f"singular_values must have shape [..., n] with n >= 1, got {s.shape}")
    if is_concrete(s) and not bool(jnp.all(jnp.isfinite(s) & (s >= 0))):
        raise ValueError("singular_values must be finite and non-negative")
    return s


def numerical_rank(
    singular_values: Float[ArrayLike, "*b n"], *, threshold: float | Float[ArrayLike, "*b"]
) -> Int[Array, "*b"]:
    """Number of singular values strictly above ``threshold``.

    Args:
        singular_values: spectra ``[..., n]``.
        threshold: a scalar, or one threshold per spectrum ``[...]``.

    Returns:
        Integer rank per spectrum.
    """
    s = _check_spectrum(singular_values)
    tau = jnp.asarray(threshold, dtype=s.dtype)
    if tau.ndim and tau.shape != s.shape[:-1]:
        raise ValueError(
            f"threshold must be a scalar or have shape {s.shape[:-1]}, got {tau.shape}"
        )
    return jnp.sum(s > tau[..., None], axis=-1)


def lid_from_singular_values(
    singular_values: Float[ArrayLike, "*b n"],
    *,
    threshold: float | Float[ArrayLike, "*b"],
    space: Space,
) -> Int[Array, "*b"]:
    """LID from spectra and a threshold, e.g. one from :func:`percentile_threshold`.

    Args:
        singular_values: spectra ``[..., n]``.
        threshold: scalar or per-spectrum threshold.
        space: what the singular vectors above the threshold span. ``"normal"`` for the
            normal bundle (paper Eq. 8: ``LID = d - rank``, with ``n = d`` values per
            spectrum); ``"tangent"`` for a decoder Jacobian (``LID = rank``).

    Returns:
        Integer LID per spectrum.
    """
    check_option(space, "space", ("normal", "tangent"))
    rank = numerical_rank(singular_values, threshold=threshold)
    return jnp.shape(singular_values)[-1] - rank if space == "normal" else rank


def percentile_threshold(singular_values: Float[ArrayLike, "..."], *, q: float = 10.0) -> Array:
    """The ``q``-th percentile of all singular values given (pooled over every spectrum).

    The memorization paper thresholds normal-bundle and GAN-Jacobian spectra at the
    10th percentile of all singular values over the dataset (Appendix C.1).
    """
    s = _check_spectrum(singular_values)
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    return jnp.percentile(s.reshape(-1), q)
