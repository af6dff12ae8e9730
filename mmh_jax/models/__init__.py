"""Networks: small plain-JAX epsilon-networks for the demos, and Flax ports of pretrained models."""

from mmh_jax.models.pretrained import Pretrained, eps_score_fn
from mmh_jax.models.toy import (
    ConvEpsNet,
    MLPEpsNet,
    time_features,
)

__all__ = ["ConvEpsNet", "MLPEpsNet", "Pretrained", "eps_score_fn", "time_features"]
