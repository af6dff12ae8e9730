"""mmh_jax: memorization in generative models read off local intrinsic dimension."""

from mmh_jax import distributions, guidance, lid, memorization, sampling, schedules, types

__all__ = ["distributions", "guidance", "lid", "memorization", "sampling", "schedules", "types"]
__version__ = "0.1.0"
