"""Strict conversion of diffusers ``UNet2DConditionModel`` state dicts (Stable Diffusion v1.x /
v2.x UNets) into :class:`mmh_jax.models.unet2d_condition.UNet2DCondition` parameters.

The rename table is built from the module's config by the same walk diffusers makes when it
builds the PyTorch model, with :class:`~mmh_jax.convert.diffusers.DiffusersTable` (one rule per
layer kind, one entry per PyTorch parameter). The transformers' ``proj_in``/``proj_out`` are
1x1 convolutions (SD v1) or ``Linear`` layers (``use_linear_projection``, SD v2); the Flax
module applies both as a ``Dense`` over the channel axis.

This module does not import :mod:`mmh_jax.models` (which depends on the converters): it reads
the config attributes of the module it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jaxtyping import PyTree

from mmh_jax.convert.core import Rename, abstract_params, convert_state_dict, require_attributes
from mmh_jax.convert.diffusers import DiffusersTable

__all__ = [
    "unet2d_condition_rename_table",
    "unet2d_condition_abstract_params",
    "convert_unet2d_condition",
]

# The config attributes the table is built from.
_ATTRIBUTES = (
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "layers_per_block",
    "transformer_layers_per_block",
    "use_linear_projection",
    "in_channels",
    "cross_attention_dim",
    "param_dtype",
    "init",
)


def _require_unet2d_condition(module: Any) -> None:
    require_attributes(module, _ATTRIBUTES, "UNet2DCondition")


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _transformer(
    table: DiffusersTable, path: str, num_layers: int, linear_projection: bool
) -> None:
    """A ``Transformer2DModel`` (continuous input) of ``num_layers`` transformer blocks."""
    project = table.linear if linear_projection else table.conv1x1_as_dense
    table.norm(f"{path}.norm")
    project(f"{path}.proj_in")
    for k in range(num_layers):
        block = f"{path}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            table.norm(f"{block}.norm{attn[-1]}")
            for name in ("to_q", "to_k", "to_v"):
                table.linear(f"{block}.{attn}.{name}", bias=False)
            table.linear(f"{block}.{attn}.to_out.0")
        table.norm(f"{block}.norm3")
        table.linear(f"{block}.ff.net.0.proj")
        table.linear(f"{block}.ff.net.2")
    project(f"{path}.proj_out")


def unet2d_condition_rename_table(module: Any) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a
    ``UNet2DConditionModel``.

    Args:
        module: the Flax ``UNet2DCondition`` whose config the checkpoint was trained with.

    Returns:
        One entry per parameter of the PyTorch ``UNet2DConditionModel(**module.to_config())``.
    """
    _require_unet2d_condition(module)
    table = DiffusersTable()
    n = len(module.block_out_channels)
    last = n - 1
    transformer_layers = _per_block(module.transformer_layers_per_block, n)

    def transformer(i: int) -> functools.partial:
        return functools.partial(
            _transformer,
            table,
            num_layers=transformer_layers[i],
            linear_projection=bool(module.use_linear_projection),
        )

    table.unet(
        module.block_out_channels,
        _per_block(module.layers_per_block, n),
        down_attention=[
            transformer(i) if kind == "CrossAttnDownBlock2D" else None
            for i, kind in enumerate(module.down_block_types)
        ],
        up_attention=[
            transformer(last - i) if kind == "CrossAttnUpBlock2D" else None
            for i, kind in enumerate(module.up_block_types)
        ],
        mid_block=module.mid_block_type is not None,
        mid_attention=transformer(-1),
    )
    return table.entries


def unet2d_condition_abstract_params(module: Any) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them."""
    _require_unet2d_condition(module)
    side = 2 ** (len(module.block_out_channels) - 1)
    sample = jnp.zeros((1, module.in_channels, side, side), jnp.float32)
    context = jnp.zeros((1, 1, module.cross_attention_dim), jnp.float32)
    return abstract_params(lambda key: module.init(key, sample, jnp.zeros((1,)), context)["params"])


def convert_unet2d_condition(
    state_dict: Mapping[str, Any], module: Any, *, source: str = "state dict"
) -> dict:
    """Convert a diffusers ``UNet2DConditionModel`` state dict into ``module``'s parameters,
    strictly.

    Args:
        state_dict: ``{torch key: array}``, e.g. from :func:`mmh_jax.convert.read_state_dict`.
        module: the Flax ``UNet2DCondition`` built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    table = unet2d_condition_rename_table(module)
    return convert_state_dict(
        state_dict,
        table,
        unet2d_condition_abstract_params(module),
        source=source,
        dtype=module.param_dtype,
    )
