"""Strict PyTorch -> Flax weight conversion and safetensors storage of converted parameters."""

from mmh_jax.convert.autoencoder_kl import (
    autoencoder_kl_abstract_params,
    autoencoder_kl_rename_table,
    convert_autoencoder_kl,
)
from mmh_jax.convert.clip import (
    clip_abstract_params,
    clip_rename_table,
    clip_text_abstract_params,
    clip_text_rename_table,
    clip_vision_abstract_params,
    clip_vision_rename_table,
    convert_clip,
    convert_clip_text,
    convert_clip_vision,
)
from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    check_params,
    conv1x1_kernel,
    conv_kernel,
    convert_state_dict,
    export_state_dict,
    flatten_params,
    identity,
    linear_kernel,
    unflatten_params,
    with_inverse,
)
from mmh_jax.convert.iddpm import convert_iddpm, iddpm_rename_table
from mmh_jax.convert.io import load_params, read_state_dict, save_params
from mmh_jax.convert.safe_pickle import TorchModuleRecord, UnsafePickleError, read_network_pickle
from mmh_jax.convert.sscd import convert_sscd, sscd_abstract_params, sscd_rename_table
from mmh_jax.convert.stylegan2 import (
    convert_stylegan2,
    stylegan2_abstract_params,
    stylegan2_rename_table,
)
from mmh_jax.convert.torchscript import read_torchscript_archive
from mmh_jax.convert.unet2d import (
    convert_unet2d,
    unet2d_abstract_params,
    unet2d_rename_table,
)
from mmh_jax.convert.unet2d_condition import (
    convert_unet2d_condition,
    unet2d_condition_abstract_params,
    unet2d_condition_rename_table,
)

__all__ = [
    "ConversionError",
    "TorchModuleRecord",
    "UnsafePickleError",
    "autoencoder_kl_abstract_params",
    "autoencoder_kl_rename_table",
    "clip_abstract_params",
    "clip_rename_table",
    "clip_text_abstract_params",
    "clip_text_rename_table",
    "clip_vision_abstract_params",
    "clip_vision_rename_table",
    "convert_autoencoder_kl",
    "convert_clip",
    "convert_clip_text",
    "convert_clip_vision",
    "convert_unet2d_condition",
    "unet2d_condition_abstract_params",
    "unet2d_condition_rename_table",
    "Rename",
    "abstract_params",
    "check_params",
    "conv1x1_kernel",
    "conv_kernel",
    "convert_iddpm",
    "convert_state_dict",
    "convert_unet2d",
    "export_state_dict",
    "flatten_params",
    "iddpm_rename_table",
    "identity",
    "linear_kernel",
    "load_params",
    "read_network_pickle",
    "read_state_dict",
    "save_params",
    "convert_stylegan2",
    "convert_sscd",
    "read_torchscript_archive",
    "sscd_abstract_params",
    "sscd_rename_table",
    "stylegan2_abstract_params",
    "stylegan2_rename_table",
    "unet2d_abstract_params",
    "unet2d_rename_table",
    "unflatten_params",
    "with_inverse",
]
