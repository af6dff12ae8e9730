"""LID of a decoder or GAN generator as the numerical rank of its Jacobian.

For ``x = G(z)`` with ``z in R^{d'}``, ``LID_theta(x) = rank grad G(z)`` (paper,
Appendix B.3). The Jacobian is built column by column with forward-mode ``jvp``
(``d'`` tangents, chunked), which suits generators whose latent is smaller than
their output; its singular values are then thresholded.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from mmh_jax._src.checks import check_batch, check_int
from mmh_jax._src.linalg import singular_values
from mmh_jax._src.partial import as_pytree_fn
from mmh_jax.lid.rank import numerical_rank
from mmh_jax.types import GeneratorFn

__all__ = ["jacobian_rank", "JacobianRankResult"]


class JacobianRankResult(NamedTuple):
    """Jacobian-rank estimate per latent."""

    lid: Int[Array, " b"]
    """Number of singular values above the threshold."""
    singular_values: Float[Array, "b r"]
    """Singular values of the Jacobian, descending, ``r = min(d_out, d_latent)``;
    re-threshold with :func:`mmh_jax.lid.lid_from_singular_values` (``space="tangent"``)."""


@functools.partial(jax.jit, static_argnames=("chunk",))
def _jacobian_singular_values(fn, z, *, chunk):
    b, latent_shape = z.shape[0], z.shape[1:]
    d_latent = math.prod(latent_shape)
    num_chunks = -(-d_latent // chunk)

    def columns(start: Array) -> Array:
        idx = start + jnp.arange(chunk)
        basis = jax.nn.one_hot(idx, d_latent, dtype=z.dtype).reshape((chunk,) + latent_shape)
        tangents = jnp.broadcast_to(basis[:, None], (chunk,) + z.shape)
        cols = jax.vmap(lambda v: jax.jvp(fn, (z,), (v,))[1])(tangents)
        return cols.reshape(chunk, b, -1)

    cols = jax.lax.map(columns, jnp.arange(num_chunks) * chunk)  # [chunks, chunk, b, d_out]
    jac = jnp.moveaxis(
        cols.reshape(num_chunks * chunk, b, -1)[:d_latent], 0, -1
    )  # [b, d_out, d_latent]
    return singular_values(jac)


def jacobian_rank(
    fn: GeneratorFn,
    z: Float[Array, "b *latent"],
    *,
    threshold: float | Float[ArrayLike, " b"] | None = None,
    chunk_size: int | None = None,
) -> JacobianRankResult:
    """LID of ``fn(z)`` as the numerical rank of the Jacobian ``d fn / d z``.

    Args:
        fn: maps latents ``[b, *latent]`` to outputs ``[b, *out]`` sample by sample (a
            generator with its parameters closed over).
        z: latents ``[b, *latent]``.
        threshold: singular values strictly above it count (scalar or per latent). ``None``:
            the exact-arithmetic rank up to rounding, ``s_max * max(d_out, d_latent) * eps`` per
            latent (``numpy.linalg.matrix_rank``'s tolerance), for generators whose rank is
            exact by construction. A trained generator's Jacobian has full rank in that sense;
            the paper thresholds all spectra of a sample set at their pooled 10th percentile
            (Appendix C.1): keep ``singular_values`` and use
            :func:`mmh_jax.lid.percentile_threshold` and
            :func:`mmh_jax.lid.lid_from_singular_values`.
        chunk_size: latent directions per batched ``jvp`` (``fn`` then sees
            ``b * chunk_size`` latents); default ``min(d_latent, 32)``.

    Returns:
        :class:`JacobianRankResult` with ``lid`` ``[b]`` and ``singular_values``.
    """
    z = check_batch(z, "z")
    b, latent_shape = z.shape[0], z.shape[1:]
    d_latent = math.prod(latent_shape)
    out = jax.eval_shape(fn, z)
    if not hasattr(out, "shape") or out.ndim < 1 or out.shape[0] != b:
        raise ValueError(
            f"fn(z) must return an array of shape [{b}, ...], got {getattr(out, 'shape', out)}"
        )
    chunk = min(d_latent, 32 if chunk_size is None else check_int(chunk_size, "chunk_size"))
    singular_values = _jacobian_singular_values(as_pytree_fn(fn), z, chunk=chunk)
    if threshold is None:
        eps = jnp.finfo(singular_values.dtype).eps
        threshold = singular_values[:, 0] * max(math.prod(out.shape[1:]), d_latent) * eps
    return JacobianRankResult(
        lid=numerical_rank(singular_values, threshold=threshold), singular_values=singular_values
    )
