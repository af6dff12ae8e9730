"""mmh_jax: memorization in generative models read off local intrinsic dimension."""

from mmh_jax import lid, schedules

__all__ = ["lid", "schedules"]
__version__ = "0.1.0"
