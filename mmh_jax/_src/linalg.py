"""Batched symmetric eigenvalues and singular values that cannot deadlock XLA:CPU.

jaxlib's CPU LAPACK kernels (``syevd``, ``gesdd``) split a batch of matrices into tasks on XLA's
intra-op thread pool and block until those tasks finish. With several CPU devices (``shard_map``
over ``--xla_force_host_platform_device_count``), every device's program already runs on a thread
of that same pool: when all of them reach such a kernel at once, each waits for tasks that no
free thread can run, and the process hangs with every thread idle (seen with 4 devices on 2 cores:
``normal_bundle`` of 2 points of dimension 192 per device). On CPU the kernels here therefore take
one matrix per call (``lax.map``), which runs inline; on GPU and TPU they stay batched.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["eigvalsh_descending", "singular_values"]


def _batched(fn: Callable[[Array], Array], mat: Array) -> Array:
    """``fn`` over the leading axes of ``mat [..., m, n]``: one matrix per call on CPU."""
    if mat.ndim == 2:
        return fn(mat)
    lead = mat.shape[:-2]
    flat = mat.reshape((-1,) + mat.shape[-2:])
    out = jax.lax.platform_dependent(flat, cpu=lambda a: jax.lax.map(fn, a), default=fn)
    return out.reshape(lead + out.shape[1:])


def eigvalsh_descending(mat: Float[Array, "*batch n n"]) -> Float[Array, "*batch n"]:
    """Eigenvalues of symmetric matrices, largest first."""
    return _batched(jnp.linalg.eigvalsh, mat)[..., ::-1]


def singular_values(mat: Float[Array, "*batch m n"]) -> Float[Array, "*batch k"]:
    """Singular values, largest first (``k = min(m, n)``)."""
    return _batched(lambda a: jnp.linalg.svd(a, compute_uv=False), mat)
