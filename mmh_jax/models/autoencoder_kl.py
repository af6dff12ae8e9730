"""Flax port of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE).

The module's attributes are the keys of a diffusers ``config.json`` for ``AutoencoderKL``, with
diffusers' defaults; :meth:`AutoencoderKL.from_config` reads such a config strictly. Parameter
scopes follow the PyTorch module names (``encoder.down_blocks.0.resnets.1.conv1`` is
``encoder/down_blocks_0/resnets_1/conv1``), see :mod:`mmh_jax.convert.autoencoder_kl`.

``encode`` and ``decode`` take and return NCHW arrays, like the PyTorch model, and compute in
NHWC inside. They work on *unscaled* latents, as diffusers' ``vae.encode(x).latent_dist`` and
``vae.decode(z).sample`` do; the diffusion model sees :func:`scale_latents` of them.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, ClassVar, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mmh_jax.models._config import DIFFUSERS_BOOKKEEPING, ConfigPort, unsupported
from mmh_jax.models.diffusers_blocks import SpatialAttention, UNetBlock, UNetMidBlock
from mmh_jax.models.layers import GroupNorm, conv2d

__all__ = ["AutoencoderKL", "LatentDistribution", "scale_latents", "unscale_latents"]

# diffusers hard-codes these in its Encoder, Decoder and their blocks.
_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)
# Per-channel latent statistics (some SDXL-family VAEs): supported only when absent.
_MUST_BE_NONE = ("latents_mean", "latents_std")


class LatentDistribution(NamedTuple):
    """The diagonal Gaussian posterior ``q(z | x)`` of the encoder, NCHW, unscaled latents.

    ``std = exp(logvar / 2)`` with ``logvar`` clamped to ``[-30, 20]``, as in diffusers'
    ``DiagonalGaussianDistribution``.
    """

    mean: Float[Array, "b c h w"]
    std: Float[Array, "b c h w"]

    def sample(self, key: jax.Array) -> Float[Array, "b c h w"]:
        """One draw ``mean + std * eps``, ``eps ~ N(0, I)`` from ``key`` (drawn in float32),
        like diffusers' ``latent_dist.sample()``; the dtype of ``mean``."""
        # Drawn flat, then reshaped: the same numbers (threefry is partitionable), but XLA:CPU
        # compiles a multi-dimensional draw of, e.g., shape [2, 3, 8, 12] ~50x slower.
        noise = jax.random.normal(key, (self.mean.size,), jnp.float32).reshape(self.mean.shape)
        return (self.mean + self.std * noise).astype(self.mean.dtype)


class _Coder(nn.Module):
    """diffusers' VAE ``Encoder`` with ``double_z=True`` (NHWC image -> NHWC moments: the down
    blocks, then the mid block) or ``Decoder`` with group norms (NHWC latents -> NHWC image: the
    mid block, then the up blocks, which have one resnet more), between ``conv_in`` and
    ``conv_norm_out``, SiLU, ``conv_out``."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_attention: bool
    decoder: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = self.block_out_channels[::-1] if self.decoder else self.block_out_channels
        kind = "up" if self.decoder else "down"
        inner = self.block_out_channels[-1]  # the mid block's width; one attention head
        attention = functools.partial(SpatialAttention, inner, self.groups, _EPS, **kw)
        mid = UNetMidBlock(
            inner,
            self.groups,
            _EPS,
            attention=attention if self.mid_attention else None,
            name="mid_block",
            **kw,
        )
        x = conv2d(channels[0], 3, padding=1, name="conv_in", **kw)(x)
        if self.decoder:
            x = mid(x)
        for i, c in enumerate(channels):
            x, _ = UNetBlock(
                c,
                self.layers_per_block + self.decoder,
                kind if i < len(channels) - 1 else None,
                self.groups,
                _EPS,
                downsample_padding=0,
                name=f"{kind}_blocks_{i}",
                **kw,
            )(x)
        if not self.decoder:
            x = mid(x)
        x = nn.silu(GroupNorm(self.groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(x)


def _nchw_to_nhwc(x: Array) -> Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: Array) -> Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(ConfigPort):
    """diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE), in Flax.

    Attributes are diffusers' config keys (same names, same defaults); ``dtype`` is the compute
    dtype (e.g. ``jnp.bfloat16``; group-norm statistics, the attention softmax and the
    posterior's ``exp`` stay in float32) and ``param_dtype`` the parameters' dtype. Supported:
    ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, SiLU, the optional quant convs and
    mid-block attention, ``shift_factor``; not supported: per-channel ``latents_mean`` /
    ``latents_std``. ``force_upcast`` and ``sample_size`` are recorded and ignored (no tiling).

    Methods (``module.apply({"params": params}, x, method="encode")`` and so on):

    * :meth:`encode`: images ``[b, in_channels, h, w]`` -> :class:`LatentDistribution` of
      ``[b, latent_channels, h / 2**(L-1), w / 2**(L-1)]`` with ``L = len(block_out_channels)``;
    * :meth:`decode`: latents ``[b, latent_channels, h', w']`` -> images
      ``[b, out_channels, h' * 2**(L-1), w' * 2**(L-1)]``;
    * ``__call__``: ``decode(encode(x).mean)`` (what ``init`` runs, creating every parameter).

    All three work on unscaled latents; see :func:`scale_latents`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: Literal["silu", "swish"] = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: None = None
    latents_std: None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    KIND: ClassVar[tuple[str, str]] = ("_class_name", "AutoencoderKL")
    SKIP_KEYS: ClassVar[tuple[str, ...]] = DIFFUSERS_BOOKKEEPING

    def __post_init__(self):
        super().__post_init__()
        bad = functools.partial(unsupported, "AutoencoderKL", self)

        if self.act_fn not in ("silu", "swish"):
            raise bad("act_fn", "'silu' or 'swish'")
        for key, kind in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not value or any(v != kind for v in value):
                raise bad(key, f"a non-empty tuple of {kind!r}")
        channels = self.block_out_channels
        if (
            not isinstance(channels, tuple)
            or not channels
            or not all(_is_int(c) and c > 0 for c in channels)
        ):
            raise bad("block_out_channels", "a non-empty tuple of positive ints")
        if not len(channels) == len(self.down_block_types) == len(self.up_block_types):
            raise ValueError(
                f"AutoencoderKL: block_out_channels {channels}, down_block_types and "
                "up_block_types must have the same length"
            )
        for key in (
            "in_channels",
            "out_channels",
            "layers_per_block",
            "latent_channels",
            "norm_num_groups",
        ):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        if any(c % self.norm_num_groups for c in channels):
            raise bad("norm_num_groups", f"a divisor of every block_out_channels {channels}")
        if not _is_real(self.scaling_factor) or not self.scaling_factor > 0:
            raise bad("scaling_factor", "a positive number")
        if self.shift_factor is not None and not _is_real(self.shift_factor):
            raise bad("shift_factor", "None or a number")
        for key in _MUST_BE_NONE:
            if getattr(self, key) is not None:
                raise bad(key, "None (per-channel latent statistics are not supported)")
        for key in (
            "force_upcast",
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_block_add_attention",
        ):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "a bool")
        size = self.sample_size
        if not (
            _is_int(size)
            or isinstance(size, tuple)
            and len(size) == 2
            and all(_is_int(s) for s in size)
        ):
            raise bad("sample_size", "an int or a pair of ints")

    @property
    def downscale(self) -> int:
        """How much smaller the latents are than the images, per side: ``2 ** (L - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_attention=self.mid_block_add_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = _Coder(out_channels=2 * self.latent_channels, decoder=False, **kw)
        self.decoder = _Coder(out_channels=self.out_channels, decoder=True, **kw)
        conv = dict(
            kernel_size=(1, 1), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, **conv)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, **conv)

    def encode(self, x: Float[ArrayLike, "b c h w"]) -> LatentDistribution:
        """The posterior over (unscaled) latents, like diffusers' ``vae.encode(x).latent_dist``.

        Args:
            x: images in NCHW, ``[b, in_channels, h, w]`` (Stable Diffusion: in ``[-1, 1]``);
                ``h`` and ``w`` divisible by :attr:`downscale`.

        Returns:
            ``LatentDistribution(mean, std)``, each ``[b, latent_channels, h / downscale,
            w / downscale]`` in the compute dtype.
        """
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [b, {self.in_channels}, h, w], got {x.shape}")
        if x.shape[2] % self.downscale or x.shape[3] % self.downscale:
            raise ValueError(
                f"x height and width must be divisible by {self.downscale}, got {x.shape[2:]}"
            )
        moments = self.encoder(_nchw_to_nhwc(x))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar.astype(jnp.float32), *_LOGVAR_RANGE)
        std = jnp.exp(0.5 * logvar).astype(mean.dtype)
        return LatentDistribution(_nhwc_to_nchw(mean), _nhwc_to_nchw(std))

    def decode(self, z: Float[ArrayLike, "b c h w"]) -> Float[Array, "b c_out H W"]:
        """Images from (unscaled) latents, like diffusers' ``vae.decode(z).sample``.

        Args:
            z: latents in NCHW, ``[b, latent_channels, h, w]``.

        Returns:
            ``[b, out_channels, h * downscale, w * downscale]`` in the compute dtype.
        """
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must have shape [b, {self.latent_channels}, h, w], got {z.shape}")
        z = _nchw_to_nhwc(z)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return _nhwc_to_nchw(self.decoder(z))

    def __call__(self, x: Float[ArrayLike, "b c h w"]) -> Float[Array, "b c_out h w"]:
        """The reconstruction ``decode(encode(x).mean)``."""
        return self.decode(self.encode(x).mean)


def scale_latents(module: AutoencoderKL, z: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """VAE latents -> the diffusion model's latents: ``(z - shift_factor) * scaling_factor``
    (``shift_factor=None`` means 0), as diffusers' pipelines scale them."""
    shift = module.shift_factor or 0.0
    return (jnp.asarray(z) - shift) * module.scaling_factor


def unscale_latents(module: AutoencoderKL, z: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
    """The inverse of :func:`scale_latents`: ``z / scaling_factor + shift_factor``."""
    shift = module.shift_factor or 0.0
    return jnp.asarray(z) / module.scaling_factor + shift


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
