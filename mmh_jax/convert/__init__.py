"""Strict PyTorch -> Flax weight conversion and safetensors storage of converted parameters."""

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
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

__all__ = [
    "ConversionError",
    "Rename",
    "abstract_params",
    "conv1x1_kernel",
    "conv_kernel",
    "convert_iddpm",
    "convert_state_dict",
    "flatten_params",
    "iddpm_rename_table",
    "identity",
    "linear_kernel",
    "load_params",
    "read_state_dict",
    "save_params",
    "unflatten_params",
]
