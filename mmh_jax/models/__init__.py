"""Small epsilon-networks in plain JAX for the demos (no Flax needed)."""

from mmh_jax.models.toy import (
    ConvEpsNet,
    MLPEpsNet,
    time_features,
)

__all__ = ["MLPEpsNet", "ConvEpsNet", "time_features"]
