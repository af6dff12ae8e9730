"""The starting noise of a generated image: one rule for every sampler.

Image ``j`` of a prompt, under the PRNG key of a run (``jax.random.key(seed)``), starts from
``normal(fold_in(key, j))``, drawn flat and reshaped (a flat draw compiles faster on XLA:CPU;
the numbers are the same). The prompt itself does not enter: two prompts, or a prompt and its
mitigated version, share their starting noise, and an image does not depend on the batch it is
drawn in. ``StableDiffusion.sample``, ``memorization.guarded_generate`` and the scoring engine's
prompt items all draw through :func:`image_noise`, so one prompt and seed give one image in all
three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["image_noise", "images_noise"]


def image_noise(
    key: Array, index: int | Int[Array, ""], shape: Sequence[int]
) -> Float[Array, "*shape"]:
    """The starting noise ``normal(fold_in(key, index))`` of image ``index``, shaped ``shape``."""
    shape = tuple(shape)
    return jax.random.normal(jax.random.fold_in(key, index), (math.prod(shape),)).reshape(shape)


def images_noise(key: Array, count: int, shape: Sequence[int]) -> Float[Array, "count *shape"]:
    """The starting noise of images ``0 .. count - 1``: ``[count, *shape]``."""
    return jax.vmap(lambda j: image_noise(key, j, shape))(jnp.arange(count))
