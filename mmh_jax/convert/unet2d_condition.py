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

from typing import Any, Mapping

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
_ATTRIBUTES = ("block_out_channels", "down_block_types", "up_block_types", "mid_block_type",
               "layers_per_block", "transformer_layers_per_block", "use_linear_projection",
               "in_channels", "cross_attention_dim", "param_dtype", "init")


def _require_unet2d_condition(module: Any) -> None:
    require_attributes(module, _ATTRIBUTES, "UNet2DCondition")


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _transformer(table: DiffusersTable, path: str, num_layers: int, linear_projection: bool
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
    channels = tuple(module.block_out_channels)
    n = len(channels)
    last = n - 1
    layers = _per_block(module.layers_per_block, n)
    transformer_layers = _per_block(module.transformer_layers_per_block, n)
    linear_projection = bool(module.use_linear_projection)
    table.conv("conv_in")
    table.linear("time_embedding.linear_1")
    table.linear("time_embedding.linear_2")

    out = channels[0]
    for i, kind in enumerate(module.down_block_types):
        prefix, cin, out = f"down_blocks.{i}", out, channels[i]
        for j in range(layers[i]):
            table.resnet(f"{prefix}.resnets.{j}", cin if j == 0 else out, out)
            if kind == "CrossAttnDownBlock2D":
                _transformer(table, f"{prefix}.attentions.{j}", transformer_layers[i],
                             linear_projection)
        if i < last:
            table.conv(f"{prefix}.downsamplers.0.conv")

    if module.mid_block_type is not None:
        table.resnet("mid_block.resnets.0", channels[-1], channels[-1])
        _transformer(table, "mid_block.attentions.0", transformer_layers[-1], linear_projection)
        table.resnet("mid_block.resnets.1", channels[-1], channels[-1])

    reversed_channels = channels[::-1]
    out = reversed_channels[0]
    for i, kind in enumerate(module.up_block_types):
        prefix, previous, out = f"up_blocks.{i}", out, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, last)]
        num_layers = layers[last - i] + 1
        for j in range(num_layers):
            skip = skip_in if j == num_layers - 1 else out
            table.resnet(f"{prefix}.resnets.{j}", (previous if j == 0 else out) + skip, out)
            if kind == "CrossAttnUpBlock2D":
                _transformer(table, f"{prefix}.attentions.{j}", transformer_layers[last - i],
                             linear_projection)
        if i < last:
            table.conv(f"{prefix}.upsamplers.0.conv")

    table.norm("conv_norm_out")
    table.conv("conv_out")
    return table.entries


def unet2d_condition_abstract_params(module: Any) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them."""
    _require_unet2d_condition(module)
    side = 2 ** (len(module.block_out_channels) - 1)
    sample = jnp.zeros((1, module.in_channels, side, side), jnp.float32)
    context = jnp.zeros((1, 1, module.cross_attention_dim), jnp.float32)
    return abstract_params(
        lambda key: module.init(key, sample, jnp.zeros((1,)), context)["params"])


def convert_unet2d_condition(state_dict: Mapping[str, Any], module: Any, *,
                             source: str = "state dict") -> dict:
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
    return convert_state_dict(state_dict, table, unet2d_condition_abstract_params(module),
                              source=source, dtype=module.param_dtype)
