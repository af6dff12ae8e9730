"""The one conversion between stored pixels and model inputs: uint8 ``[..., h, w, c]`` <->
float32 ``[..., c, h, w]`` in ``[-1, 1]`` (``x = u / 127.5 - 1``; back: ``round((x + 1) 127.5)``,
clipped to 0..255), as the diffusion models of the paper read and write images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["to_model_range", "to_uint8"]


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., h, w, c]`` -> float32 ``[..., c, h, w]`` in ``[-1, 1]``."""
    x = np.asarray(pixels, np.float32) / 127.5 - 1.0
    return np.moveaxis(x, -1, -3)


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """float ``[..., c, h, w]`` in ``[-1, 1]`` -> uint8 ``[..., h, w, c]`` (rounded, clipped);
    a JAX array (traced too, inside ``jit``) gives a JAX array, anything else a NumPy array."""
    xp = jnp if isinstance(x, jax.Array) else np
    u = xp.clip(xp.round((xp.moveaxis(xp.asarray(x), -3, -1) + 1.0) * 127.5), 0, 255)
    return u.astype(xp.uint8)
