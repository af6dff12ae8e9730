"""Strict PyTorch -> Flax weight conversion and safetensors storage of converted parameters."""

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    check_params,
    conv1x1_kernel,
    conv_kernel,
    convert_state_dict,
    flatten_params,
    identity,
    linear_kernel,
    unflatten_params,
)
from mmh_jax.convert.iddpm import convert_iddpm, iddpm_rename_table
from mmh_jax.convert.io import load_params, read_state_dict, save_params
from mmh_jax.convert.unet2d import (
    convert_unet2d,
    unet2d_abstract_params,
    unet2d_rename_table,
)

__all__ = [
    "ConversionError",
    "Rename",
    "abstract_params",
    "check_params",
    "conv1x1_kernel",
    "conv_kernel",
    "convert_iddpm",
    "convert_state_dict",
    "convert_unet2d",
    "flatten_params",
    "iddpm_rename_table",
    "identity",
    "linear_kernel",
    "load_params",
    "read_state_dict",
    "save_params",
    "unet2d_abstract_params",
    "unet2d_rename_table",
    "unflatten_params",
]
