"""Networks: small plain-JAX epsilon-networks for the demos, and Flax ports of pretrained models."""

from mmh_jax.models.iddpm import IDDPMUNet, iddpm_schedule, load_iddpm
from mmh_jax.models.pretrained import Pretrained, eps_score_fn
from mmh_jax.models.toy import (
    ConvEpsNet,
    MLPEpsNet,
    time_features,
)

__all__ = [
    "ConvEpsNet",
    "IDDPMUNet",
    "MLPEpsNet",
    "Pretrained",
    "eps_score_fn",
    "iddpm_schedule",
    "load_iddpm",
    "time_features",
]
