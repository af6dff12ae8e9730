"""Networks: small plain-JAX epsilon-networks for the demos, and Flax ports of pretrained models."""

from mmh_jax.models.autoencoder_kl import AutoencoderKL
from mmh_jax.models.clip import CLIPModel, CLIPTextModel, CLIPVisionModel
from mmh_jax.models.iddpm import IDDPMUNet, iddpm_schedule, load_iddpm
from mmh_jax.models.load import ModelKind, load_model
from mmh_jax.models.loaders import ddpm_from_scheduler_config, load_unet2d, save_unet2d
from mmh_jax.models.pretrained import EpsModel, Pretrained, PretrainedGenerator, eps_score_fn
from mmh_jax.models.sscd import SSCD, load_sscd, save_sscd, sscd_preprocess, sscd_similarity
from mmh_jax.models.stable_diffusion import (
    StableDiffusion,
    load_stable_diffusion,
    save_stable_diffusion,
    save_stable_diffusion_folder,
    stable_diffusion_components,
)
from mmh_jax.models.stylegan2 import StyleGAN2Generator, load_stylegan2, save_stylegan2
from mmh_jax.models.toy import (
    ConvEpsNet,
    MLPEpsNet,
    time_features,
)
from mmh_jax.models.unet2d import DDPM_CIFAR10_CONFIG, UNet2D
from mmh_jax.models.unet2d_condition import SD15_UNET_CONFIG, UNet2DCondition

__all__ = [
    "DDPM_CIFAR10_CONFIG",
    "SD15_UNET_CONFIG",
    "AutoencoderKL",
    "CLIPModel",
    "CLIPTextModel",
    "CLIPVisionModel",
    "ConvEpsNet",
    "EpsModel",
    "IDDPMUNet",
    "MLPEpsNet",
    "ModelKind",
    "Pretrained",
    "PretrainedGenerator",
    "SSCD",
    "StableDiffusion",
    "StyleGAN2Generator",
    "UNet2D",
    "UNet2DCondition",
    "ddpm_from_scheduler_config",
    "eps_score_fn",
    "iddpm_schedule",
    "load_iddpm",
    "load_model",
    "load_sscd",
    "load_stable_diffusion",
    "load_stylegan2",
    "load_unet2d",
    "save_sscd",
    "save_stable_diffusion",
    "save_stable_diffusion_folder",
    "save_stylegan2",
    "save_unet2d",
    "sscd_preprocess",
    "sscd_similarity",
    "stable_diffusion_components",
    "time_features",
]
