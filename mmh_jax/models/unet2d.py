"""Flax port of diffusers' ``UNet2DModel`` (the DDPM UNets: google/ddpm-cifar10-32, ...).

The module's attributes are the keys of a diffusers ``config.json`` that this port supports,
with diffusers' defaults; :meth:`UNet2D.from_config` reads such a config strictly. Parameter
scopes follow the PyTorch module names (``down_blocks.0.resnets.1.conv1`` is
``down_blocks_0/resnets_1/conv1``), see :mod:`mmh_jax.convert.unet2d`.

The call takes and returns NCHW arrays, like the PyTorch model, and computes in NHWC inside.
It reproduces the inference forward pass only: ``dropout`` is accepted (checkpoints record
it) and ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mmh_jax.models._config import DIFFUSERS_BOOKKEEPING, ConfigPort, unsupported
from mmh_jax.models.diffusers_blocks import (
    SpatialAttention,
    UNetBlock,
    UNetMidBlock,
    _check_block_types,
    _resnet_settings,
    _time_embedding,
    unet_inputs,
)
from mmh_jax.models.layers import GroupNorm, conv2d

__all__ = ["DDPM_CIFAR10_CONFIG", "UNet2D"]

DDPM_CIFAR10_CONFIG: dict = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    attention_head_dim=None,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)
"""The diffusers ``UNet2DModel`` config of Ho et al.'s DDPM CIFAR-10 model
(google/ddpm-cifar10-32, 35,746,307 parameters; one attention head per attention block, as
in the original DDPM)."""

DownBlockType = Literal["DownBlock2D", "AttnDownBlock2D"]
UpBlockType = Literal["UpBlock2D", "AttnUpBlock2D"]

_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
# Class conditioning: supported only when absent.
_MUST_BE_NONE = ("class_embed_type", "num_class_embeds")


class UNet2D(ConfigPort):
    """diffusers' ``UNet2DModel`` for unconditional DDPM-style UNets, in Flax.

    Attributes are diffusers' config keys (same names, same defaults); ``dtype`` is the
    compute dtype (e.g. ``jnp.bfloat16``; normalisation statistics, the timestep embedding and
    the attention softmax stay in float32) and ``param_dtype`` the parameters' dtype. Supported:
    positional time embeddings, the block types ``DownBlock2D``, ``AttnDownBlock2D``,
    ``UpBlock2D``, ``AttnUpBlock2D`` and the ``UNetMidBlock2D`` mid block (or none), convolutional
    resampling, SiLU, ``resnet_time_scale_shift`` ``"default"`` or ``"scale_shift"``, no class
    conditioning. ``attention_head_dim=None`` means one head as wide as the block;
    ``dropout`` is ignored (inference only).

    Call: ``module.apply({"params": params}, sample [b, in_channels, h, w], timesteps [b])``
    returns ``[b, out_channels, h, w]`` in ``dtype``; ``h`` and ``w`` must be divisible by
    ``2 ** (len(block_out_channels) - 1)``; timesteps may be fractional (or a scalar for all).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: Literal["positional"] = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[DownBlockType, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    mid_block_type: Literal["UNetMidBlock2D"] | None = "UNetMidBlock2D"
    up_block_types: tuple[UpBlockType, ...] = (
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: Literal["conv"] = "conv"
    upsample_type: Literal["conv"] = "conv"
    dropout: float = 0.0
    act_fn: Literal["silu", "swish"] = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    KIND: ClassVar[tuple[str, str]] = ("_class_name", "UNet2DModel")
    # read by diffusers only for time_embedding_type="learned", which this port rejects
    SKIP_KEYS: ClassVar[tuple[str, ...]] = DIFFUSERS_BOOKKEEPING + ("num_train_timesteps",)
    FIXED_KEYS: ClassVar[Mapping[str, tuple]] = {key: (None,) for key in _MUST_BE_NONE}
    KEY_HINTS: ClassVar[Mapping[str, str]] = {key: "class conditioning" for key in _MUST_BE_NONE}

    def __post_init__(self):
        super().__post_init__()
        bad = functools.partial(unsupported, "UNet2D", self)

        fixed = {
            "time_embedding_type": ("positional",),
            "downsample_type": ("conv",),
            "upsample_type": ("conv",),
            "act_fn": ("silu", "swish"),
            "resnet_time_scale_shift": ("default", "scale_shift"),
            "mid_block_type": ("UNetMidBlock2D", None),
        }
        for key, allowed in fixed.items():
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(map(repr, allowed)))
        _check_block_types(self, bad, _DOWN_BLOCKS, _UP_BLOCKS)
        channels = self.block_out_channels
        if not isinstance(channels, tuple) or not all(
            isinstance(c, int) and c > 0 for c in channels
        ):
            raise bad("block_out_channels", "a tuple of positive ints")
        if not len(channels) == len(self.down_block_types) == len(self.up_block_types):
            raise ValueError(
                f"UNet2D: block_out_channels {channels}, down_block_types and "
                "up_block_types must have the same length"
            )
        for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        for key in ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(key, "None or a positive int")
        if any(c % self.norm_num_groups for c in channels):
            raise bad("norm_num_groups", f"a divisor of every block_out_channels {channels}")
        groups = self.mid_attention_groups
        if self.mid_block_type and self.add_attention and groups and channels[-1] % groups:
            raise bad("attn_norm_num_groups", f"a divisor of {channels[-1]}")
        if not isinstance(self.downsample_padding, int) or self.downsample_padding < 0:
            raise bad("downsample_padding", "an int >= 0")

    @property
    def mid_attention_groups(self) -> int | None:
        """Groups of the mid block attention's group norm; None: it has no group norm."""
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    @nn.compact
    def __call__(
        self, sample: Float[ArrayLike, "b c h w"], timesteps: Float[ArrayLike, " b"]
    ) -> Float[Array, "b c_out h w"]:
        """The network output (for DDPM checkpoints, the predicted noise).

        Args:
            sample: noisy images in NCHW; ``h`` and ``w`` divisible by
                ``2 ** (len(block_out_channels) - 1)``.
            timesteps: 0-based diffusion steps, shape ``[b]`` (or a scalar for the whole
                batch); fractional values are fine.

        Returns:
            ``[b, out_channels, h, w]`` in the compute dtype.
        """
        channels = self.block_out_channels
        levels = len(channels) - 1
        x, timesteps = unet_inputs(
            sample,
            timesteps,
            in_channels=self.in_channels,
            levels=levels,
            center=self.center_input_sample,
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = _resnet_settings(self)

        emb = _time_embedding(self, timesteps)
        x = conv2d(channels[0], 3, padding=1, name="conv_in", **kw)(x)

        def attention(
            c: int, groups: int | None = self.norm_num_groups, rescale: float = 1.0
        ) -> functools.partial:
            return functools.partial(
                SpatialAttention, self.attention_head_dim or c, groups, self.norm_eps, rescale, **kw
            )

        skips = [x]
        for i, (kind, c) in enumerate(zip(self.down_block_types, channels)):
            x, outputs = UNetBlock(
                c,
                self.layers_per_block,
                "down" if i < levels else None,
                attention=attention(c) if kind == "AttnDownBlock2D" else None,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )(x, emb)
            skips.extend(outputs)
        if self.mid_block_type is not None:
            mid = attention(channels[-1], self.mid_attention_groups, self.mid_block_scale_factor)
            x = UNetMidBlock(
                channels[-1],
                output_scale_factor=self.mid_block_scale_factor,
                attention=mid if self.add_attention else None,
                name="mid_block",
                **common,
            )(x, emb)
        n = self.layers_per_block + 1
        for i, (kind, c) in enumerate(zip(self.up_block_types, reversed(channels))):
            skips, block_skips = skips[:-n], skips[-n:]
            x, _ = UNetBlock(
                c,
                n,
                "up" if i < levels else None,
                attention=attention(c) if kind == "AttnUpBlock2D" else None,
                name=f"up_blocks_{i}",
                **common,
            )(x, emb, skips=block_skips)

        x = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(x)
        return jnp.transpose(x, (0, 3, 1, 2))
