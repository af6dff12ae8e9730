"""NumPy randomness derived from a JAX PRNG key.

A few library functions draw with NumPy (subsets, bootstrap resamples, made-up words, token
positions) but take their randomness as a JAX ``key`` like every other function. The key's data
words, read as one big-endian integer, seed the generator. For the default ``threefry2x32``
implementation ``jax.random.key(seed)`` reads back as ``seed`` itself, so a config's integer seed
gives the NumPy stream of ``numpy.random.default_rng([seed, *streams])``.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["key_seed", "numpy_generator"]


def key_seed(key: jax.Array) -> int:
    """The non-negative integer a single PRNG key stands for: its data words, big-endian.

    Args:
        key: one typed key (``jax.random.key``) or one raw ``uint32`` key (``PRNGKey``).

    Returns:
        ``seed`` for ``jax.random.key(seed)`` under ``threefry2x32``.
    """
    key = key if isinstance(key, jax.Array) else np.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single key, got shape {key.shape}")
        words = np.asarray(jax.random.key_data(key))
    elif key.dtype == np.uint32 and key.ndim == 1:
        words = np.asarray(key)
    else:
        raise TypeError(f"key must be a JAX PRNG key (jax.random.key), got {key!r}")
    seed = 0
    for word in words:
        seed = (seed << 32) | int(word)
    return seed


def numpy_generator(key: jax.Array, *streams: int) -> np.random.Generator:
    """``numpy.random.default_rng([key_seed(key), *streams])``: a NumPy generator determined by
    ``key``; ``streams`` tell independent uses of one key apart."""
    return np.random.default_rng([key_seed(key), *streams])
