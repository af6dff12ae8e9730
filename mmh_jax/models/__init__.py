"""Networks: small plain-JAX epsilon-networks for the demos, and Flax ports of pretrained models."""

from mmh_jax.models.iddpm import IDDPMUNet, iddpm_schedule, load_iddpm
from mmh_jax.models.loaders import ddpm_from_scheduler_config, load_unet2d, save_unet2d
from mmh_jax.models.pretrained import Pretrained, eps_score_fn
from mmh_jax.models.toy import (
    ConvEpsNet,
    MLPEpsNet,
    time_features,
)
from mmh_jax.models.unet2d import DDPM_CIFAR10_CONFIG, UNet2D

__all__ = [
    "DDPM_CIFAR10_CONFIG",
    "ConvEpsNet",
    "IDDPMUNet",
    "MLPEpsNet",
    "Pretrained",
    "UNet2D",
    "ddpm_from_scheduler_config",
    "eps_score_fn",
    "iddpm_schedule",
    "load_iddpm",
    "load_unet2d",
    "save_unet2d",
    "time_features",
]
