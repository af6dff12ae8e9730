"""Strict conversion of diffusers ``AutoencoderKL`` state dicts (the Stable Diffusion VAE) into
the parameters of :class:`mmh_jax.models.autoencoder_kl.AutoencoderKL`.

The rename table is built from the module's config by the same walk diffusers makes when it
builds the PyTorch ``Encoder`` and ``Decoder``, with
:class:`~mmh_jax.convert.diffusers.DiffusersTable` (one entry per PyTorch parameter). Two older
layouts of the mid-block attention convert too: the names diffusers used before 0.14
(``query``, ``key``, ``value``, ``proj_attn``) and 1x1-convolution weights ``[out, in, 1, 1]``
in place of ``Linear`` weights ``[out, in]``.

This module reads the Flax module only through its config attributes (it does not import
:mod:`mmh_jax.models`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    convert_state_dict,
    linear_kernel,
    require_attributes,
    with_inverse,
)
from mmh_jax.convert.diffusers import DiffusersTable, uses_legacy_attention

__all__ = [
    "autoencoder_kl_rename_table",
    "autoencoder_kl_abstract_params",
    "convert_autoencoder_kl",
    "linear_or_conv1x1_kernel",
]

_CONFIG_ATTRIBUTES = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)

# Key prefixes that mark a checkpoint as another model family (first match wins).
_OTHER_FAMILIES = (
    ("decoder.condition_encoder.", "an AsymmetricAutoencoderKL"),
    ("encoder.layers.", "an AutoencoderTiny"),
    ("decoder.layers.", "an AutoencoderTiny"),
    ("quantize.", "a VQModel"),
    ("first_stage_model.", "a whole Stable Diffusion checkpoint in the original (LDM) layout"),
    ("encoder.down.", "a VAE in the original (LDM/CompVis) layout, not diffusers'"),
    ("encoder.mid.", "a VAE in the original (LDM/CompVis) layout, not diffusers'"),
)


@with_inverse(linear_kernel)
def linear_or_conv1x1_kernel(w: np.ndarray) -> np.ndarray:
    """An attention projection stored as ``Linear.weight [out, in]`` or as a 1x1 convolution
    weight ``[out, in, 1(, 1)]`` (old VAE checkpoints) -> ``Dense`` kernel ``[in, out]``; its
    inverse writes the ``Linear`` layout, as diffusers >= 0.14 does."""
    if w.ndim < 2 or any(s != 1 for s in w.shape[2:]):
        raise ValueError(
            f"expected a Linear weight [out, in] or a 1x1 convolution weight "
            f"[out, in, 1, 1], got shape {tuple(w.shape)}"
        )
    return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T)


def _require_config(module: Any) -> None:
    require_attributes(module, _CONFIG_ATTRIBUTES, "AutoencoderKL")


def _mid_attention(table: DiffusersTable, path: str) -> None:
    """The mid block's one-head attention, its q/k/v/out weights stored as ``Linear`` or (older
    checkpoints) 1x1 convolution weights."""
    table.attention(path, group_norm=True)
    for name in table.attention_names.values():
        key = f"{path}.{name}.weight"
        table.entries[key] = Rename(table.entries[key].path, linear_or_conv1x1_kernel)


def autoencoder_kl_rename_table(
    module: Any, *, legacy_attention: bool = False
) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of an ``AutoencoderKL``.

    Args:
        module: the Flax ``AutoencoderKL`` whose config the checkpoint was trained with (read
            through its attributes only).
        legacy_attention: name the mid-block attention layers as diffusers did before 0.14
            (``query``, ``key``, ``value``, ``proj_attn``).

    Returns:
        One entry per parameter of the PyTorch ``AutoencoderKL(**module.to_config())``.
    """
    _require_config(module)
    table = DiffusersTable(legacy_attention)
    channels = tuple(module.block_out_channels)
    layers = module.layers_per_block
    last = len(channels) - 1

    mid = dict(
        attention=functools.partial(_mid_attention, table)
        if module.mid_block_add_attention
        else None,
        time_embedding=False,
    )

    table.conv("encoder.conv_in")
    out = channels[0]
    for i in range(len(channels)):
        cin, out = out, channels[i]
        table.block(
            f"encoder.down_blocks.{i}",
            [cin] + [out] * (layers - 1),
            out,
            resample="down" if i < last else None,
            time_embedding=False,
        )
    table.mid_block("encoder.mid_block", channels[-1], **mid)
    table.norm("encoder.conv_norm_out")
    table.conv("encoder.conv_out")
    if module.use_quant_conv:
        table.conv("quant_conv")

    if module.use_post_quant_conv:
        table.conv("post_quant_conv")
    table.conv("decoder.conv_in")
    table.mid_block("decoder.mid_block", channels[-1], **mid)
    out = channels[-1]
    for i in range(len(channels)):
        cin, out = out, channels[last - i]
        table.block(
            f"decoder.up_blocks.{i}",
            [cin] + [out] * layers,
            out,
            resample="up" if i < last else None,
            time_embedding=False,
        )
    table.norm("decoder.conv_norm_out")
    table.conv("decoder.conv_out")
    return table.entries


def autoencoder_kl_abstract_params(module: Any) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them."""
    _require_config(module)
    side = 2 ** (len(module.block_out_channels) - 1)
    sample = jnp.zeros((1, module.in_channels, side, side), jnp.float32)
    return abstract_params(lambda key: module.init(key, sample)["params"])


def _check_family(state_dict: Mapping[str, Any], source: str) -> None:
    """Refuse, with a message saying so, a checkpoint of another model family."""
    keys = list(state_dict)
    for prefix, family in _OTHER_FAMILIES:
        if any(key.startswith(prefix) for key in keys):
            raise ConversionError(
                f"{source} is not an AutoencoderKL checkpoint: its key "
                f"prefix {prefix!r} marks {family}"
            )
    if not any(key.startswith(("encoder.", "decoder.")) for key in keys):
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise ConversionError(
            f"{source} is not an AutoencoderKL checkpoint: none of its "
            f"{len(keys)} keys ({shown}) starts with 'encoder.' or "
            "'decoder.' (a UNet or another model?)"
        )


def convert_autoencoder_kl(
    state_dict: Mapping[str, Any], module: Any, *, source: str = "state dict"
) -> dict:
    """Convert a diffusers ``AutoencoderKL`` state dict into ``module``'s parameters, strictly.

    Args:
        state_dict: ``{torch key: array}``, e.g. from :func:`mmh_jax.convert.read_state_dict`.
            Legacy attention names are recognised by the presence of any ``*.proj_attn.weight``
            key (a checkpoint must then use them throughout); the attention projections may be
            ``Linear`` or 1x1-convolution shaped.
        module: the Flax ``AutoencoderKL`` built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: when the checkpoint is obviously not an ``AutoencoderKL``, or listing
            every missing, unexpected and mis-shaped key.
    """
    _check_family(state_dict, source)
    table = autoencoder_kl_rename_table(module, legacy_attention=uses_legacy_attention(state_dict))
    return convert_state_dict(
        state_dict,
        table,
        autoencoder_kl_abstract_params(module),
        source=source,
        dtype=module.param_dtype,
    )
