"""mmh_jax: memorization in generative models read off local intrinsic dimension."""

from mmh_jax import distributions, lid, memorization, schedules

__all__ = ["distributions", "lid", "memorization", "schedules"]
__version__ = "0.1.0"
