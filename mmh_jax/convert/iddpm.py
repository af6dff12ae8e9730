"""Rename table and strict conversion of improved-diffusion ``UNetModel`` checkpoints.

The table is generated from the module's :meth:`~mmh_jax.models.IDDPMUNet.layout`, one rule
per layer kind, so every PyTorch key of the architecture has exactly one entry:

=========================================  ==========================================
PyTorch (under ``input_blocks.n.m`` etc.)  Flax (under ``input_blocks_{n}_{m}`` etc.)
=========================================  ==========================================
input convolution ``weight``, ``bias``     ``kernel`` (conv), ``bias``
ResBlock ``in_layers.0`` / ``.2``          ``in_norm`` (scale, bias) / ``in_conv``
ResBlock ``emb_layers.1``                  ``emb_proj`` (Dense)
ResBlock ``out_layers.0`` / ``.3``         ``out_norm`` / ``out_conv``
ResBlock ``skip_connection`` (1x1 conv)    ``skip`` (Dense)
AttentionBlock ``norm``                    ``norm``
AttentionBlock ``qkv``, ``proj_out``       ``qkv``, ``proj_out`` (Dense; 1-D convs, k=1)
Downsample ``op`` / Upsample ``conv``      ``op`` / ``conv``
``time_embed.0`` / ``.2``                  ``time_embed_0`` / ``time_embed_2`` (Dense)
``out.0`` / ``out.2``                      ``out_0`` (norm) / ``out_2`` (conv)
=========================================  ==========================================

This module does not import :mod:`mmh_jax.models` (which depends on the converters): it reads
the records of the module's ``layout()`` (``kind``, ``in_ch``, ``out_ch``) and asks the module
itself for its parameter shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmh_jax.convert.core import (
    Rename,
    abstract_params,
    conv1x1_kernel,
    conv_kernel,
    convert_state_dict,
    identity,
    linear_kernel,
)

__all__ = ["iddpm_rename_table", "iddpm_expected_params", "convert_iddpm"]


def _affine(
    table: dict[str, Rename],
    torch: str,
    flax: tuple[str, ...],
    transform: Callable[[np.ndarray], np.ndarray],
) -> None:
    """A layer with ``weight`` and ``bias``: Dense/Conv kernels, or norm scales."""
    weight = "scale" if transform is identity else "kernel"
    table[f"{torch}.weight"] = Rename(flax + (weight,), transform)
    table[f"{torch}.bias"] = Rename(flax + ("bias",))


def _layer_rules(table: dict[str, Rename], torch: str, flax: tuple[str, ...], layer: Any) -> None:
    if layer.kind == "conv":
        _affine(table, torch, flax, conv_kernel)
    elif layer.kind == "res":
        _affine(table, f"{torch}.in_layers.0", flax + ("in_norm",), identity)
        _affine(table, f"{torch}.in_layers.2", flax + ("in_conv",), conv_kernel)
        _affine(table, f"{torch}.emb_layers.1", flax + ("emb_proj",), linear_kernel)
        _affine(table, f"{torch}.out_layers.0", flax + ("out_norm",), identity)
        _affine(table, f"{torch}.out_layers.3", flax + ("out_conv",), conv_kernel)
        if layer.in_ch != layer.out_ch:
            _affine(table, f"{torch}.skip_connection", flax + ("skip",), conv1x1_kernel)
    elif layer.kind == "attn":
        _affine(table, f"{torch}.norm", flax + ("norm",), identity)
        _affine(table, f"{torch}.qkv", flax + ("qkv",), conv1x1_kernel)
        _affine(table, f"{torch}.proj_out", flax + ("proj_out",), conv1x1_kernel)
    elif layer.kind == "down":
        _affine(table, f"{torch}.op", flax + ("op",), conv_kernel)
    else:  # "up"
        _affine(table, f"{torch}.conv", flax + ("conv",), conv_kernel)


def iddpm_rename_table(module: Any) -> dict[str, Rename]:
    """Every PyTorch key of the improved-diffusion UNet that ``module`` ports, and its rule.

    Args:
        module: the Flax module (its configuration decides the blocks).

    Returns:
        ``{torch key: Rename(flax path, transform)}``, one entry per parameter.
    """
    if not callable(getattr(module, "layout", None)):
        raise TypeError(
            f"module must be an IDDPMUNet (with a layout() method), got {type(module).__name__}"
        )
    table: dict[str, Rename] = {}
    _affine(table, "time_embed.0", ("time_embed_0",), linear_kernel)
    _affine(table, "time_embed.2", ("time_embed_2",), linear_kernel)
    inputs, middle, outputs = module.layout()
    for n, block in enumerate(inputs):
        for m, layer in enumerate(block):
            _layer_rules(table, f"input_blocks.{n}.{m}", (f"input_blocks_{n}_{m}",), layer)
    for m, layer in enumerate(middle):
        _layer_rules(table, f"middle_block.{m}", (f"middle_block_{m}",), layer)
    for n, block in enumerate(outputs):
        for m, layer in enumerate(block):
            _layer_rules(table, f"output_blocks.{n}.{m}", (f"output_blocks_{n}_{m}",), layer)
    _affine(table, "out.0", ("out_0",), identity)
    _affine(table, "out.2", ("out_2",), conv_kernel)
    return table


def iddpm_expected_params(module: Any) -> Any:
    """Shapes of ``module``'s parameters (``jax.ShapeDtypeStruct`` leaves), allocating nothing."""
    x = jnp.zeros((1, module.in_channels, module.image_size, module.image_size), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    return abstract_params(lambda key: module.init(key, x, t)["params"])


def convert_iddpm(
    state_dict: Mapping[str, Any], module: Any, *, source: str = "state dict"
) -> dict:
    """Convert an improved-diffusion ``UNetModel`` state dict into ``module``'s params, strictly.

    Args:
        state_dict: ``{torch key: array}``, e.g. from :func:`mmh_jax.convert.read_state_dict`.
        module: the :class:`~mmh_jax.models.IDDPMUNet` the weights are for.
        source: the file name, used in error messages.

    Returns:
        The Flax ``params`` tree (float32 numpy leaves).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    return convert_state_dict(
        state_dict, iddpm_rename_table(module), iddpm_expected_params(module), source=source
    )
