"""Strict conversion of diffusers ``UNet2DModel`` state dicts into :class:`UNet2D` parameters.

The rename table is built from the module's config by the same walk diffusers makes when it
builds the PyTorch model, with :class:`~mmh_jax.convert.diffusers.DiffusersTable` (one rule per
layer kind, one entry per PyTorch parameter). Checkpoints saved before diffusers renamed its
attention layers (``query``, ``key``, ``value``, ``proj_attn``) convert too.

This module does not import :mod:`mmh_jax.models` (which depends on the converters): it reads
the Flax module's config attributes and asks the module itself for its parameter shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jaxtyping import PyTree

from mmh_jax.convert.core import Rename, abstract_params, convert_state_dict, require_attributes
from mmh_jax.convert.diffusers import DiffusersTable, uses_legacy_attention

__all__ = ["unet2d_rename_table", "unet2d_abstract_params", "convert_unet2d"]


_CONFIG_ATTRIBUTES = (
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "add_attention",
    "mid_attention_groups",
    "in_channels",
    "param_dtype",
    "init",
)


def _require_unet2d(module: Any) -> None:
    require_attributes(module, _CONFIG_ATTRIBUTES, "UNet2D")


def unet2d_rename_table(module: Any, *, legacy_attention: bool = False) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a ``UNet2DModel``.

    Args:
        module: the Flax module whose config the checkpoint was trained with.
        legacy_attention: name the attention layers as diffusers did before 0.14
            (``query``, ``key``, ``value``, ``proj_attn``).

    Returns:
        One entry per parameter of the PyTorch ``UNet2DModel(**module.to_config())``.
    """
    _require_unet2d(module)
    table = DiffusersTable(legacy_attention)
    n = len(module.block_out_channels)
    attention = functools.partial(table.attention, group_norm=True)
    mid_attention = functools.partial(
        table.attention, group_norm=module.mid_attention_groups is not None
    )
    table.unet(
        module.block_out_channels,
        (module.layers_per_block,) * n,
        down_attention=[
            attention if kind == "AttnDownBlock2D" else None for kind in module.down_block_types
        ],
        up_attention=[
            attention if kind == "AttnUpBlock2D" else None for kind in module.up_block_types
        ],
        mid_block=module.mid_block_type is not None,
        mid_attention=mid_attention if module.add_attention else None,
    )
    return table.entries


def unet2d_abstract_params(module: Any) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them."""
    _require_unet2d(module)
    side = 2 ** (len(module.block_out_channels) - 1)
    sample = jnp.zeros((1, module.in_channels, side, side), jnp.float32)
    return abstract_params(lambda key: module.init(key, sample, jnp.zeros((1,)))["params"])


def convert_unet2d(
    state_dict: Mapping[str, Any], module: Any, *, source: str = "state dict"
) -> dict:
    """Convert a diffusers ``UNet2DModel`` state dict into ``module``'s parameters, strictly.

    Args:
        state_dict: ``{torch key: array}``, e.g. from :func:`mmh_jax.convert.read_state_dict`.
            Legacy attention names are recognised by the presence of any ``*.proj_attn.weight``
            key; a checkpoint must then use them throughout.
        module: the Flax module built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    table = unet2d_rename_table(module, legacy_attention=uses_legacy_attention(state_dict))
    return convert_state_dict(
        state_dict, table, unet2d_abstract_params(module), source=source, dtype=module.param_dtype
    )
