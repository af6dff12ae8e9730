"""The one Hutchinson / exact trace kernel: ``sum_i <v_i, J v_i>`` by forward-mode ``jvp`` in
chunks. FLIPD (:mod:`mmh_jax.lid.flipd`) and the sharpness detector
(:mod:`mmh_jax.memorization.detectors`) both take their Jacobian traces through it."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

__all__ = ["sum_vjv"]


def sum_vjv(
    fn: Callable[[Array], Array],
    y: Array,
    tangent_at: Callable[[Array], Array],
    num: int,
    chunk_size: int,
) -> tuple[Array, Array]:
    """``fn(y)`` and ``sum_{i < num} <v_i, J_fn(y) v_i>`` per sample, ``v_i = tangent_at(i)``.

    ``fn`` maps ``[b, ...]`` to ``[b, ...]`` sample by sample. Tangents go through
    ``jax.jvp`` ``chunk_size`` at a time (vmapped over the chunk); only the first
    chunk keeps the primal output.
    """
    b = y.shape[0]
    num_chunks = -(-num // chunk_size)

    def chunk(start: Array) -> tuple[Array, Array]:
        idx = start + jnp.arange(chunk_size)
        v = jax.vmap(tangent_at)(idx)
        if chunk_size == 1:  # a plain jvp: vmapping over one tangent costs a few percent
            out, jv = jax.jvp(fn, (y,), (v[0],))
            jv = jv[None]
        else:
            out, jv = jax.vmap(lambda v: jax.jvp(fn, (y,), (v,)), out_axes=(None, 0))(v)
        q = jnp.sum((v * jv).reshape(chunk_size, b, -1), axis=-1)
        return out, jnp.sum(jnp.where((idx < num)[:, None], q, 0), axis=0)

    out, total = chunk(jnp.asarray(0))
    if num_chunks > 1:

        def body(acc, start):
            return acc + chunk(start)[1], None

        starts = jnp.arange(1, num_chunks) * chunk_size
        total, _ = jax.lax.scan(body, total, starts)
    return out, total
