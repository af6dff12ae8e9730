"""Rename-table builder shared by the diffusers converters (``UNet2DModel``,
``UNet2DConditionModel``, ``AutoencoderKL``).

A Flax scope is the PyTorch module path with every list index attached to its list
(``down_blocks.0.resnets.1.conv1`` -> ``down_blocks_0/resnets_1/conv1``). One method per
PyTorch layer kind adds the entries of one layer, so a table is written as the same walk over
the config that diffusers makes when it builds the model; :meth:`DiffusersTable.block`,
:meth:`DiffusersTable.mid_block` and :meth:`DiffusersTable.unet` add the entries of whole blocks
(the Flax ``UNetBlock`` and ``UNetMidBlock``) and of a whole UNet. Checkpoints saved before diffusers
renamed its attention layers (``query``, ``key``, ``value``, ``proj_attn`` instead of
``to_q``, ``to_k``, ``to_v``, ``to_out.0``) are read with ``legacy_attention=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from mmh_jax.convert.core import Rename, conv1x1_kernel, conv_kernel, identity, linear_kernel

__all__ = ["DiffusersTable", "scope", "uses_legacy_attention"]

_ATTENTION = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out.0"}
#: Adds the entries of the attention layer at a module path (``...attentions.0``).
AddAttention = Callable[[str], None]

_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def scope(module_path: str) -> tuple[str, ...]:
    """``"down_blocks.0.resnets.1.conv1"`` -> ``("down_blocks_0", "resnets_1", "conv1")``."""
    parts: list[str] = []
    for part in module_path.split("."):
        if part.isdigit():
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def uses_legacy_attention(state_dict: Mapping[str, Any]) -> bool:
    """Whether a checkpoint names its spatial attention layers as diffusers did before 0.14."""
    return any(key.endswith(".proj_attn.weight") for key in state_dict)


class DiffusersTable:
    """Accumulates ``torch key -> Rename`` entries (in :attr:`entries`), one method per layer kind."""

    def __init__(self, legacy_attention: bool = False):
        self.entries: dict[str, Rename] = {}
        self.attention_names = _LEGACY_ATTENTION if legacy_attention else _ATTENTION

    def _add(
        self,
        torch_module: str,
        flax_scope: tuple[str, ...],
        weight: str,
        transform,
        bias: bool = True,
    ) -> None:
        self.entries[f"{torch_module}.weight"] = Rename(flax_scope + (weight,), transform)
        if bias:
            self.entries[f"{torch_module}.bias"] = Rename(flax_scope + ("bias",), identity)

    def conv(self, path: str) -> None:
        """A ``Conv2d`` (kernel ``[kh, kw, in, out]``)."""
        self._add(path, scope(path), "kernel", conv_kernel)

    def conv1x1_as_dense(self, path: str) -> None:
        """A 1x1 ``Conv2d`` that the Flax port applies as a ``Dense`` layer."""
        self._add(path, scope(path), "kernel", conv1x1_kernel)

    def linear(self, path: str, torch_path: str | None = None, *, bias: bool = True) -> None:
        """A ``Linear`` (kernel ``[in, out]``), optionally stored under another torch name."""
        self._add(torch_path or path, scope(path), "kernel", linear_kernel, bias)

    def norm(self, path: str) -> None:
        """A ``GroupNorm`` or ``LayerNorm`` (``scale`` and ``bias``)."""
        self._add(path, scope(path), "scale", identity)

    def resnet(
        self, path: str, in_channels: int, out_channels: int, *, time_embedding: bool = True
    ) -> None:
        """A ``ResnetBlock2D`` (with ``time_emb_proj`` unless it takes no embedding)."""
        self.norm(f"{path}.norm1")
        self.conv(f"{path}.conv1")
        if time_embedding:
            self.linear(f"{path}.time_emb_proj")
        self.norm(f"{path}.norm2")
        self.conv(f"{path}.conv2")
        if in_channels != out_channels:
            self.conv(f"{path}.conv_shortcut")

    def attention(self, path: str, group_norm: bool) -> None:
        """diffusers' spatial self-attention (``SpatialAttention``), legacy names if asked."""
        if group_norm:
            self.norm(f"{path}.group_norm")
        for flax_name, torch_name in self.attention_names.items():
            self.linear(f"{path}.{flax_name}", f"{path}.{torch_name}")

    def block(
        self,
        path: str,
        in_channels: Sequence[int],
        out_channels: int,
        *,
        resample: Literal["down", "up"] | None,
        attention: AddAttention | None = None,
        time_embedding: bool = True,
    ) -> None:
        """A down or up block: one resnet per entry of ``in_channels`` (its input width, skip
        connection included), each followed by ``attention`` when given, then the resampler."""
        for j, cin in enumerate(in_channels):
            self.resnet(f"{path}.resnets.{j}", cin, out_channels, time_embedding=time_embedding)
            if attention is not None:
                attention(f"{path}.attentions.{j}")
        if resample is not None:
            self.conv(f"{path}.{resample}samplers.0.conv")

    def mid_block(
        self,
        path: str,
        channels: int,
        *,
        attention: AddAttention | None = None,
        time_embedding: bool = True,
    ) -> None:
        """A mid block: resnet, ``attention`` when given, resnet."""
        self.resnet(f"{path}.resnets.0", channels, channels, time_embedding=time_embedding)
        if attention is not None:
            attention(f"{path}.attentions.0")
        self.resnet(f"{path}.resnets.1", channels, channels, time_embedding=time_embedding)

    def unet(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        *,
        down_attention: Sequence[AddAttention | None],
        up_attention: Sequence[AddAttention | None],
        mid_block: bool,
        mid_attention: AddAttention | None,
    ) -> None:
        """A diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``): ``conv_in``, the time
        embedding, the down blocks (``layers[i]`` resnets, ``down_attention[i]``), the mid block
        if any, the up blocks (up block ``i`` mirrors down block ``r = len - 1 - i``: ``layers[r]
        + 1`` resnets reading the skip connections, ``up_attention[i]``), ``conv_norm_out`` and
        ``conv_out``."""
        last = len(channels) - 1
        self.conv("conv_in")
        self.linear("time_embedding.linear_1")
        self.linear("time_embedding.linear_2")
        out = channels[0]
        for i, attention in enumerate(down_attention):
            cin, out = out, channels[i]
            self.block(
                f"down_blocks.{i}",
                [cin] + [out] * (layers[i] - 1),
                out,
                resample="down" if i < last else None,
                attention=attention,
            )
        if mid_block:
            self.mid_block("mid_block", channels[-1], attention=mid_attention)
        for i, attention in enumerate(up_attention):
            r = last - i
            previous, out, skip = out, channels[r], channels[max(r - 1, 0)]
            in_channels = [previous + out] + [2 * out] * (layers[r] - 1) + [out + skip]
            self.block(
                f"up_blocks.{i}",
                in_channels,
                out,
                resample="up" if i < last else None,
                attention=attention,
            )
        self.norm("conv_norm_out")
        self.conv("conv_out")
