"""Flax port of diffusers' ``UNet2DConditionModel`` as Stable Diffusion v1.x and v2.x use it.

The module's attributes are the keys of a diffusers ``config.json`` that this port supports,
with diffusers' defaults; :meth:`UNet2DCondition.from_config` reads such a config strictly
(keys that must keep one value here, e.g. class or SDXL "text_time" conditioning, are checked
and refused by name). Parameter scopes follow the PyTorch module names
(``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`` is
``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``), see
:mod:`mmh_jax.convert.unet2d_condition`.

The call takes and returns NCHW arrays, like the PyTorch model, and computes in NHWC inside.
It reproduces the inference forward pass only: ``dropout`` is accepted and ignored.

A naming quirk carried over from diffusers: ``attention_head_dim`` is the number of attention
heads of each block (SD v1: 8 heads everywhere; SD v2: ``(5, 10, 20, 20)``, 64 channels per
head); ``num_attention_heads`` must be None, as diffusers itself requires.
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
    UNetBlock,
    UNetMidBlock,
    _check_block_types,
    _resnet_settings,
    _time_embedding,
    unet_inputs,
)
from mmh_jax.models.layers import GroupNorm, attention, conv2d

__all__ = ["SD15_UNET_CONFIG", "UNet2DCondition"]

SD15_UNET_CONFIG: dict = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    center_input_sample=False,
)
"""The diffusers ``UNet2DConditionModel`` config of Stable Diffusion v1.5 (859,520,964
parameters)."""

DownBlockType = Literal["CrossAttnDownBlock2D", "DownBlock2D"]
UpBlockType = Literal["UpBlock2D", "CrossAttnUpBlock2D"]

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
# diffusers keys that select features this port does not have: each must keep the value given
# (any of the listed values), which is diffusers' default or equivalent to it.
_FIXED: dict[str, tuple] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None, False),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_block(value: Any, n: int) -> tuple:
    return value if isinstance(value, tuple) else (value,) * n


class _Attention(nn.Module):
    """diffusers' ``Attention`` as ``BasicTransformerBlock`` uses it: q/k/v without bias,
    ``to_out.0`` with bias; self-attention when no context is given."""

    heads: int
    head_dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(
        self, x: Float[Array, "b n c"], context: Float[Array, "b m e"] | None = None
    ) -> Float[Array, "b n c"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        b, n, c = x.shape
        inner = self.heads * self.head_dim

        def heads(name: str, y: Array) -> Array:
            return nn.Dense(inner, use_bias=False, name=name, **kw)(y).reshape(
                b, -1, self.heads, self.head_dim
            )

        out = attention(heads("to_q", x), heads("to_k", context), heads("to_v", context))
        return nn.Dense(c, name="to_out_0", **kw)(out.reshape(b, n, inner))


class _GEGLU(nn.Module):
    """diffusers' ``GEGLU``: one projection split into (hidden, gate), ``hidden * gelu(gate)``
    with the exact (erf) gelu."""

    features: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(
            2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class _FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net.2(net.0(x))`` (``net.1`` is dropout)."""

    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class _BasicTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (layer norms): self-attention, cross-attention on
    the context, GEGLU feed-forward, each pre-normed and residual."""

    heads: int
    head_dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(
        self, x: Float[Array, "b n c"], context: Float[Array, "b m e"]
    ) -> Float[Array, "b n c"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name: str) -> nn.LayerNorm:
            # statistics in float32 (flax promotes), centred variance as torch computes it
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)

        attn = dict(heads=self.heads, head_dim=self.head_dim, **kw)
        x = x + _Attention(name="attn1", **attn)(norm("norm1")(x))
        x = x + _Attention(name="attn2", **attn)(norm("norm2")(x), context)
        return x + _FeedForward(name="ff", **kw)(norm("norm3")(x))


class _Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous input: group norm, ``proj_in``,
    transformer blocks, ``proj_out``, residual. ``proj_in``/``proj_out`` are 1x1 convolutions
    (or ``Linear`` layers with ``use_linear_projection``); both are a ``Dense`` over the channel
    axis here, which is the same map in NHWC."""

    heads: int
    num_layers: int
    groups: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], context: Float[Array, "b m e"]
    ) -> Float[Array, "b h w c"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        head_dim = c // self.heads
        inner = self.heads * head_dim
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        h = nn.Dense(inner, name="proj_in", **kw)(h).reshape(b, height * width, inner)
        for k in range(self.num_layers):
            h = _BasicTransformerBlock(self.heads, head_dim, name=f"transformer_blocks_{k}", **kw)(
                h, context
            )
        h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, height, width, c)
        return h + x


class UNet2DCondition(ConfigPort):
    """diffusers' ``UNet2DConditionModel`` for Stable Diffusion v1.x / v2.x, in Flax.

    Attributes are diffusers' config keys (same names, same defaults); ``dtype`` is the
    compute dtype (e.g. ``jnp.bfloat16``; normalisation statistics, the timestep embedding and
    the attention softmax stay in float32) and ``param_dtype`` the parameters' dtype.
    Supported: positional time embeddings; the block types ``CrossAttnDownBlock2D``,
    ``DownBlock2D``, ``UpBlock2D``, ``CrossAttnUpBlock2D`` and the ``UNetMidBlock2DCrossAttn``
    mid block (or none); SiLU; ``resnet_time_scale_shift`` ``"default"`` or ``"scale_shift"``;
    ``attention_head_dim`` (the number of heads, see the module docstring), ``layers_per_block``
    and ``transformer_layers_per_block`` as one int or one per block; 1x1-convolution or linear
    transformer projections; odd ``conv_in_kernel``/``conv_out_kernel``. ``upcast_attention``
    is accepted and needs nothing: the attention softmax is always in float32. Not supported
    (refused by :meth:`from_config`): class, text-time (SDXL) or other added conditioning,
    ``only_cross_attention``, dual cross-attention, per-block ``cross_attention_dim``.

    Call: ``module.apply({"params": params}, sample [b, in_channels, h, w], timesteps [b],
    encoder_hidden_states [b, n, cross_attention_dim])`` returns ``[b, out_channels, h, w]`` in
    ``dtype``; ``h`` and ``w`` must be divisible by ``2 ** (len(block_out_channels) - 1)``;
    timesteps are 0-based and may be fractional (or a scalar for the whole batch).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: Literal["UNetMidBlock2DCrossAttn"] | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[UpBlockType, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: Literal["silu", "swish"] = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    time_embedding_type: Literal["positional"] = "positional"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    KIND: ClassVar[tuple[str, str]] = ("_class_name", "UNet2DConditionModel")
    # read by diffusers only for an addition_embed_type this port refuses
    SKIP_KEYS: ClassVar[tuple[str, ...]] = DIFFUSERS_BOOKKEEPING + (
        "addition_embed_type_num_heads",
    )
    FIXED_KEYS: ClassVar[Mapping[str, tuple]] = _FIXED
    KEY_HINTS: ClassVar[Mapping[str, str]] = {
        "addition_embed_type": "added conditioning such as SDXL's text_time; SDXL is not supported"
    }

    def __post_init__(self):
        super().__post_init__()
        bad = functools.partial(unsupported, "UNet2DCondition", self)

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        fixed = {
            "time_embedding_type": ("positional",),
            "act_fn": ("silu", "swish"),
            "resnet_time_scale_shift": ("default", "scale_shift"),
            "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
            "num_attention_heads": (None,),
            "dual_cross_attention": (False,),
        }
        for key, allowed in fixed.items():
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(map(repr, allowed)))
        only = self.only_cross_attention
        if not (only is False or (isinstance(only, tuple) and not any(only))):
            raise bad(
                "only_cross_attention",
                "False (cross-attention-only transformers are not supported)",
            )
        _check_block_types(self, bad, _DOWN_BLOCKS, _UP_BLOCKS)
        channels = self.block_out_channels
        if not isinstance(channels, tuple) or not all(map(positive_int, channels)):
            raise bad("block_out_channels", "a tuple of positive ints")
        n = len(channels)
        if not n == len(self.down_block_types) == len(self.up_block_types):
            raise ValueError(
                f"UNet2DCondition: block_out_channels {channels}, down_block_types "
                "and up_block_types must have the same length"
            )
        for key in ("in_channels", "out_channels", "norm_num_groups", "cross_attention_dim"):
            if not positive_int(getattr(self, key)):
                raise bad(key, "a positive int")
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, key)
            if not (
                positive_int(value)
                or (isinstance(value, tuple) and len(value) == n and all(map(positive_int, value)))
            ):
                raise bad(key, f"a positive int or a tuple of {n} positive ints (one per block)")
        if isinstance(only, tuple) and len(only) != n:
            raise bad("only_cross_attention", f"False or a tuple of {n} False")
        if self.time_embedding_dim is not None and not positive_int(self.time_embedding_dim):
            raise bad("time_embedding_dim", "None or a positive int")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if not positive_int(getattr(self, key)) or getattr(self, key) % 2 == 0:
                raise bad(key, "an odd positive int")
        if any(c % self.norm_num_groups for c in channels):
            raise bad("norm_num_groups", f"a divisor of every block_out_channels {channels}")
        heads = _per_block(self.attention_head_dim, n)
        for i, (c, h) in enumerate(zip(channels, heads)):
            if h > c or (self.use_linear_projection and c % h):
                raise bad(
                    "attention_head_dim",
                    f"head counts that divide block_out_channels "
                    f"{channels} (block {i}: {h} heads for {c} channels)",
                )
        if not isinstance(self.downsample_padding, int) or self.downsample_padding < 0:
            raise bad("downsample_padding", "an int >= 0")

    @nn.compact
    def __call__(
        self,
        sample: Float[ArrayLike, "b c h w"],
        timesteps: Float[ArrayLike, " b"],
        encoder_hidden_states: Float[ArrayLike, "b n d"],
    ) -> Float[Array, "b c_out h w"]:
        """The network output (for Stable Diffusion, the predicted noise or v).

        Args:
            sample: latents in NCHW; ``h`` and ``w`` divisible by
                ``2 ** (len(block_out_channels) - 1)``.
            timesteps: 0-based diffusion steps, shape ``[b]`` (or a scalar for the whole
                batch); fractional values are fine.
            encoder_hidden_states: the text encoder's hidden states,
                ``[b, n, cross_attention_dim]``.

        Returns:
            ``[b, out_channels, h, w]`` in the compute dtype.
        """
        channels = self.block_out_channels
        n_blocks = len(channels)
        levels = n_blocks - 1
        x, timesteps = unet_inputs(
            sample,
            timesteps,
            in_channels=self.in_channels,
            levels=levels,
            center=self.center_input_sample,
        )
        batch = x.shape[0]
        context = jnp.asarray(encoder_hidden_states)
        if (
            context.ndim != 3
            or context.shape[0] != batch
            or context.shape[2] != self.cross_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must have shape [{batch}, n, "
                f"{self.cross_attention_dim}] (batch of sample, cross_attention_dim), "
                f"got {context.shape}"
            )
        context = context.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = _resnet_settings(self)
        layers = _per_block(self.layers_per_block, n_blocks)
        transformer_layers = _per_block(self.transformer_layers_per_block, n_blocks)
        heads = _per_block(self.attention_head_dim, n_blocks)

        emb = _time_embedding(self, timesteps)
        x = conv2d(
            channels[0],
            self.conv_in_kernel,
            padding=(self.conv_in_kernel - 1) // 2,
            name="conv_in",
            **kw,
        )(x)

        def transformer(i: int) -> functools.partial:
            return functools.partial(
                _Transformer2D, heads[i], transformer_layers[i], self.norm_num_groups, **kw
            )

        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, outputs = UNetBlock(
                channels[i],
                layers[i],
                "down" if i < levels else None,
                attention=transformer(i) if kind == "CrossAttnDownBlock2D" else None,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )(x, emb, context)
            skips.extend(outputs)
        if self.mid_block_type is not None:
            x = UNetMidBlock(
                channels[-1],
                output_scale_factor=self.mid_block_scale_factor,
                attention=transformer(-1),
                name="mid_block",
                **common,
            )(x, emb, context)
        for i, kind in enumerate(self.up_block_types):
            r = n_blocks - 1 - i  # the down block this up block mirrors
            n = layers[r] + 1
            skips, block_skips = skips[:-n], skips[-n:]
            x, _ = UNetBlock(
                channels[r],
                n,
                "up" if i < levels else None,
                attention=transformer(r) if kind == "CrossAttnUpBlock2D" else None,
                name=f"up_blocks_{i}",
                **common,
            )(x, emb, context, skips=block_skips)

        x = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv2d(
            self.out_channels,
            self.conv_out_kernel,
            padding=(self.conv_out_kernel - 1) // 2,
            name="conv_out",
            **kw,
        )(x)
        return jnp.transpose(x, (0, 3, 1, 2))
