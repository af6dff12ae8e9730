"""diffusers building blocks shared by the Flax ports of ``UNet2DModel``, ``UNet2DConditionModel``
and ``AutoencoderKL``: the pieces (resnet, attention, resamplers) and the blocks made of them,
which take the attention that differs between the three as a module factory.

All of them compute on channels-last (NHWC) arrays. Parameter scopes follow the PyTorch module
names (``resnets_0/norm1`` for ``resnets.0.norm1``), which :class:`mmh_jax.convert.diffusers.DiffusersTable`
maps key by key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mmh_jax.models.layers import (
    GroupNorm,
    attention,
    conv2d,
    timestep_embedding,
    upsample_nearest_2x,
)

__all__ = [
    "TimestepMLP",
    "ResnetBlock2D",
    "SpatialAttention",
    "Downsample2D",
    "Upsample2D",
    "UNetBlock",
    "UNetMidBlock",
    "unet_inputs",
]


def unet_inputs(
    sample: Float[ArrayLike, "b c h w"],
    timesteps: Float[ArrayLike, " b"],
    *,
    in_channels: int,
    levels: int,
    center: bool,
) -> tuple[Float[Array, "b h w c"], Float[Array, " b"]]:
    """A diffusers UNet's call arguments, checked: the sample in NHWC (``2 * sample - 1`` with
    ``center_input_sample``) and the timesteps of shape ``[b]``.

    Args:
        sample: NCHW, ``in_channels`` channels, height and width divisible by ``2 ** levels``.
        timesteps: shape ``[b]``, or a scalar for the whole batch.
        in_channels: the UNet's ``in_channels``.
        levels: how many times the UNet halves the resolution.
        center: the UNet's ``center_input_sample``.

    Returns:
        ``(sample [b, h, w, c], timesteps [b])``.

    Raises:
        ValueError: naming the argument of the wrong shape.
    """
    sample = jnp.asarray(sample)
    if sample.ndim != 4 or sample.shape[1] != in_channels:
        raise ValueError(f"sample must have shape [b, {in_channels}, h, w], got {sample.shape}")
    if sample.shape[2] % 2**levels or sample.shape[3] % 2**levels:
        raise ValueError(
            f"sample height and width must be divisible by {2**levels}, got {sample.shape[2:]}"
        )
    batch = sample.shape[0]
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
        timesteps = jnp.broadcast_to(timesteps, (batch,))
    if timesteps.shape != (batch,):
        raise ValueError(f"timesteps must have shape [{batch}] or [], got {timesteps.shape}")
    if center:
        sample = 2 * sample - 1.0
    return jnp.transpose(sample, (0, 2, 3, 1)), timesteps


class TimestepMLP(nn.Module):
    """diffusers' ``TimestepEmbedding``: ``linear_2(silu(linear_1(x)))``."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b c"]) -> Float[Array, "b features"]:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.features, name="linear_1", **dense)(x)
        return nn.Dense(self.features, name="linear_2", **dense)(nn.silu(x))


# What the UNet ports (UNet2D, UNet2DCondition) share, read from their diffusers config keys.


def _check_block_types(
    config: Any, bad: Callable[[str, str], Exception], down: tuple[str, ...], up: tuple[str, ...]
) -> None:
    """``down_block_types`` and ``up_block_types`` are non-empty tuples of the kinds allowed."""
    for key, allowed in (("down_block_types", down), ("up_block_types", up)):
        value = getattr(config, key)
        if not isinstance(value, tuple) or not value or any(v not in allowed for v in value):
            raise bad(key, f"a non-empty tuple of {' / '.join(allowed)}")


def _resnet_settings(config: Any) -> dict[str, Any]:
    """The settings every resnet of a UNet shares (norm groups and eps, time scale-shift,
    dtypes)."""
    return dict(
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        scale_shift=config.resnet_time_scale_shift == "scale_shift",
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )


def _time_embedding(config: Any, timesteps: Array) -> Array:
    """diffusers' ``time_proj`` and ``time_embedding`` of a UNet (called inside its compact
    ``__call__``: the MLP's parameters are the UNet's ``time_embedding``)."""
    width = config.block_out_channels[0]
    emb = timestep_embedding(
        timesteps, width, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift
    )
    return TimestepMLP(
        config.time_embedding_dim or 4 * width,
        name="time_embedding",
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )(emb)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D``: pre-norm, SiLU, 3x3 convolutions, a 1x1 shortcut when the
    width changes, and (when an embedding is given) the time embedding added after ``conv1`` or
    applied as scale and shift of ``norm2``. Without an embedding (the VAE's blocks) there is no
    ``time_emb_proj``."""

    channels: int
    groups: int
    eps: float
    scale_shift: bool = False
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], emb: Float[Array, "b e"] | None = None
    ) -> Float[Array, "b h w channels"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv2d(self.channels, 3, padding=1, name="conv1", **kw)(h)
        norm2 = GroupNorm(self.groups, self.eps, name="norm2", **kw)
        if emb is None:
            h = norm2(h)
        else:
            width = 2 * self.channels if self.scale_shift else self.channels
            t = nn.Dense(width, name="time_emb_proj", **kw)(nn.silu(emb))[:, None, None, :]
            if self.scale_shift:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = norm2(h) * (1 + scale) + shift
            else:
                h = norm2(h + t)
        h = conv2d(self.channels, 3, padding=1, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.channels:
            x = conv2d(self.channels, 1, name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class SpatialAttention(nn.Module):
    """diffusers' spatial self-attention (``Attention`` over the pixels, optional group norm,
    residual, output divided by ``rescale_output_factor``)."""

    head_dim: int
    groups: int | None
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, height, width, c = x.shape
        heads = c // self.head_dim
        if heads < 1:
            raise ValueError(
                f"attention_head_dim={self.head_dim} exceeds the {c} channels of an attention block"
            )
        inner = heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = (
            x
            if self.groups is None
            else GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x)
        )
        h = h.reshape(b, height * width, c)
        q, k, v = (
            nn.Dense(inner, name=name, **kw)(h).reshape(b, -1, heads, self.head_dim)
            for name in ("to_q", "to_k", "to_v")
        )
        out = attention(q, k, v).reshape(b, height * width, inner)
        out = nn.Dense(c, name="to_out_0", **kw)(out).reshape(b, height, width, c)
        return (out + x) / self.rescale_output_factor


class Downsample2D(nn.Module):
    """diffusers' ``Downsample2D`` with a convolution: 3x3, stride 2.

    ``padding=0`` means PyTorch's pad-right-and-bottom-by-one (the original DDPM's, and the
    VAE encoder's).
    """

    channels: int
    padding: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h/2 w/2 channels"]:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv2d(
            self.channels,
            3,
            stride=2,
            padding=pad,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class Upsample2D(nn.Module):
    """diffusers' ``Upsample2D`` with a convolution: nearest 2x, then 3x3."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b 2h 2w channels"]:
        return conv2d(
            self.channels, 3, padding=1, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
        )(upsample_nearest_2x(x))


class UNetBlock(nn.Module):
    """A diffusers down or up block: ``num_layers`` resnets, each followed by ``attention`` when
    it is given, then an optional resampler.

    The down blocks (``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D``,
    ``DownEncoderBlock2D``) end in a :class:`Downsample2D`, the up blocks (``UpBlock2D``,
    ``AttnUpBlock2D``, ``CrossAttnUpBlock2D``, ``UpDecoderBlock2D``) in an :class:`Upsample2D`
    and concatenate a UNet skip connection to the input of each resnet when ``skips`` are given.

    ``attention`` builds the module after each resnet from its scope name (``attentions_{j}``),
    e.g. ``functools.partial(SpatialAttention, head_dim, groups, eps)``; it is applied to
    ``(x, *attention_inputs)``. The call returns the block's output and the output of every
    layer and of the downsampler (the skips a UNet's up blocks read back).
    """

    channels: int
    num_layers: int
    resample: Literal["down", "up"] | None
    groups: int
    eps: float
    scale_shift: bool = False
    attention: Callable[..., nn.Module] | None = None
    downsample_padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b h w c"],
        emb: Float[Array, "b e"] | None = None,
        *attention_inputs: Array,
        skips: list[Array] | None = None,
    ) -> tuple[Float[Array, "b h2 w2 channels"], list[Array]]:
        """Apply the block.

        Args:
            x: NHWC input.
            emb: the time embedding the resnets add (None: resnets without one, the VAE's).
            *attention_inputs: further inputs of each attention (a transformer's context).
            skips: an up block's skip connections; the last is read by the first resnet.

        Returns:
            ``(output, [each layer's output, then the downsampler's])``.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        outputs = []
        for j in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = ResnetBlock2D(
                self.channels, self.groups, self.eps, self.scale_shift, name=f"resnets_{j}", **kw
            )(x, emb)
            if self.attention is not None:
                x = self.attention(name=f"attentions_{j}")(x, *attention_inputs)
            outputs.append(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            outputs.append(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x, outputs


class UNetMidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` / ``UNetMidBlock2DCrossAttn``: resnet, ``attention`` (when
    given, built as in :class:`UNetBlock` and applied to ``(x, *attention_inputs)``), resnet;
    both resnets divide their output by ``output_scale_factor``."""

    channels: int
    groups: int
    eps: float
    scale_shift: bool = False
    output_scale_factor: float = 1.0
    attention: Callable[..., nn.Module] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b h w c"],
        emb: Float[Array, "b e"] | None = None,
        *attention_inputs: Array,
    ) -> Float[Array, "b h w c"]:
        """Apply the block to NHWC ``x`` with the time embedding ``emb`` (None: none) and the
        attention's further inputs."""
        resnet = dict(
            groups=self.groups,
            eps=self.eps,
            scale_shift=self.scale_shift,
            output_scale_factor=self.output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = ResnetBlock2D(self.channels, name="resnets_0", **resnet)(x, emb)
        if self.attention is not None:
            x = self.attention(name="attentions_0")(x, *attention_inputs)
        return ResnetBlock2D(self.channels, name="resnets_1", **resnet)(x, emb)
