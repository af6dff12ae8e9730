"""Flax port of the StyleGAN2-ADA generator (NVlabs/stylegan2-ada-pytorch, ``training/networks.py``).

:class:`StyleGAN2Generator` holds the original ``Generator``'s init kwargs as flat attributes
(same defaults) and reproduces its inference forward pass in float32, i.e. the original's
``force_fp32=True`` path: the mapping network (``z``, optional class labels ``c``) to the
intermediate latents ``ws``, with truncation towards ``w_avg``, and the synthesis network
(architectures ``orig``, ``skip`` and ``resnet``) from ``ws`` to an NCHW image (no ``tanh``;
the original's images are roughly in ``[-1, 1]``).

How it computes, and why it equals the original:

* Modulated convolutions scale the input channels by the styles, run one convolution shared by
  the whole batch and scale the output channels by the demodulation coefficients
  ``rsqrt(sum_{i,kh,kw} (w_oikk s_i)^2 + 1e-8)``. This is the original's non-fused form and
  mathematically equal to its fused (grouped-convolution) form; it keeps the kernels shared,
  which is what ``jax.vmap``/``jax.jvp`` over many tangents want.
* Up-sampling layers (``conv0`` of every block after the first) are a stride-2 transposed
  convolution followed by the FIR filter ``resample_filter`` (normalised outer product, gain 4),
  with the paddings of the original's ``conv2d_resample``; the running RGB image (``skip``) and
  the ``resnet`` shortcut are up-sampled by zero insertion and the same filter, as
  ``upfirdn2d.upsample2d``. The filter is a constant applied as two 1-D depthwise convolutions,
  not a parameter.
* ``bias_act``: bias, activation, gain (``sqrt(2)`` for ``lrelu``), then the clamp (also in
  float32, as the original).

The computation is channels-last (NHWC) inside. ``w_avg`` and the layers' ``noise_const`` are
buffers of the original (data, not trained); they are stored here as parameters so that one
``params`` tree holds everything a checkpoint provides. ``num_fp16_res`` is recorded only.
With ``dtype=jnp.bfloat16`` the synthesis convolutions run in bfloat16 while the parameters, the
mapping network, the styles, the demodulation coefficients and the accumulated image stay in
float32; the image is returned in float32 either way.

Parameter tree (``params``): ``mapping/{embed,fc<i>}/{kernel,bias}``, ``mapping/w_avg``,
``synthesis/b<res>/const`` ``[4, 4, C]``, ``synthesis/b<res>/conv{0,1}/{kernel,bias,
noise_strength,noise_const}`` and ``.../affine/{kernel,bias}``, ``synthesis/b<res>/torgb/...``,
``synthesis/b<res>/skip/kernel``; Dense kernels ``[in, out]``, convolution kernels
``[kh, kw, in, out]``. :mod:`mmh_jax.convert.stylegan2` converts the original's state dicts.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.files import require_file
from mmh_jax.convert.core import ConversionError, check_params
from mmh_jax.convert.io import load_params, read_state_dict, save_params
from mmh_jax.convert.stylegan2 import convert_stylegan2, stylegan2_abstract_params
from mmh_jax.models._config import unsupported
from mmh_jax.models.pretrained import PretrainedGenerator

__all__ = ["StyleGAN2Generator", "fir_filter", "load_stylegan2", "save_stylegan2"]

Activation = Literal[
    "linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"
]
NoiseMode = Literal["const", "random", "none"]

_SQRT2 = float(np.sqrt(2))
# name -> (function, default gain), as the original's bias_act defines them (lrelu slope 0.2)
_ACTIVATIONS = {
    "linear": (lambda x: x, 1.0),
    "relu": (jax.nn.relu, _SQRT2),
    "lrelu": (lambda x: jnp.where(x >= 0, x, x * 0.2), _SQRT2),
    "tanh": (jnp.tanh, 1.0),
    "sigmoid": (jax.nn.sigmoid, 1.0),
    "elu": (jax.nn.elu, 1.0),
    "selu": (jax.nn.selu, 1.0),
    "softplus": (jax.nn.softplus, 1.0),
    "swish": (lambda x: jax.nn.sigmoid(x) * x, _SQRT2),
}

_ARCHITECTURES = ("orig", "skip", "resnet")
_TOP_KEYS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
# original kwarg -> attribute
_MAPPING_KEYS = {
    "num_layers": "num_layers",
    "embed_features": "embed_features",
    "layer_features": "layer_features",
    "activation": "mapping_activation",
    "lr_multiplier": "lr_multiplier",
}
_SYNTHESIS_KEYS = {
    "channel_base": "channel_base",
    "channel_max": "channel_max",
    "num_fp16_res": "num_fp16_res",
    "conv_clamp": "conv_clamp",
    "architecture": "architecture",
    "resample_filter": "resample_filter",
    "use_noise": "use_noise",
    "activation": "activation",
}


def fir_filter(taps: tuple[float, ...]) -> np.ndarray:
    """The 2-D resampling filter the original keeps as the ``resample_filter`` buffers.

    Args:
        taps: the 1-D filter (``(1, 3, 3, 1)`` by default).

    Returns:
        float32 ``outer(f, f)`` with ``f = taps / sum(taps)`` (sums to 1). The original stores
        this 2-D form for filters of fewer than 8 taps and ``f`` itself for longer ones.
    """
    f = np.asarray(taps, np.float32)
    f = f / f.sum()
    return np.outer(f, f).astype(np.float32)


def _bias_act(x: Array, bias: Array, activation: str, gain: float, clamp: float | None) -> Array:
    """The original's ``bias_act`` on channels-last ``x``: bias, activation, gain, clamp."""
    func, default_gain = _ACTIVATIONS[activation]
    x = func(x + bias.astype(x.dtype))
    gain = default_gain * gain
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = jnp.clip(x, -clamp, clamp)
    return x


def _normalize_2nd_moment(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True) + 1e-8)


def _fir(
    x: Float[Array, "b h w c"],
    taps: tuple[float, ...],
    pad: tuple[int, int],
    *,
    up: int = 1,
    gain: float = 1.0,
) -> Float[Array, "b h2 w2 c"]:
    """The original's ``upfirdn2d`` (no down-sampling) on NHWC ``x``, separably.

    Inserts ``up - 1`` zeros after every pixel, pads (negative: crops) by ``pad`` on both
    spatial axes, and convolves (a true convolution: the filter is flipped) every channel with
    ``outer(f, f) * gain``, ``f = taps / sum(taps)``.
    """
    f = np.asarray(taps, np.float64)
    f = (f / f.sum() * math.sqrt(gain))[::-1].astype(np.float32)
    zero = jnp.zeros((), x.dtype)
    cfg = (pad[0], pad[1] + up - 1, up - 1)
    x = jax.lax.pad(x, zero, ((0, 0, 0), cfg, cfg, (0, 0, 0)))
    c = x.shape[-1]
    for shape in ((len(f), 1, 1, 1), (1, len(f), 1, 1)):
        kernel = jnp.broadcast_to(jnp.asarray(f.reshape(shape), x.dtype), shape[:3] + (c,))
        x = jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )
    return x


def _upsample2d(x: Float[Array, "b h w c"], taps: tuple[float, ...]) -> Float[Array, "b 2h 2w c"]:
    """The original's ``upfirdn2d.upsample2d`` (factor 2) on NHWC ``x``."""
    n = len(taps)
    return _fir(x, taps, ((n + 1) // 2, (n - 2) // 2), up=2, gain=4.0)


class _FullyConnected(nn.Module):
    """The original's ``FullyConnectedLayer``: ``act(x @ (W * lr / sqrt(in)) + b * lr)``.

    ``kernel`` is ``[in, out]``; the stored values are the original's (unscaled) ones.
    """

    features: int
    activation: str = "linear"
    lr_multiplier: float = 1.0
    bias_init: float = 0.0

    @nn.compact
    def __call__(self, x: Float[Array, "b i"]) -> Float[Array, "b o"]:
        fan_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.normal(1.0 / self.lr_multiplier),
            (fan_in, self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias", nn.initializers.constant(self.bias_init), (self.features,), jnp.float32
        )
        x = x @ (kernel * (self.lr_multiplier / np.sqrt(fan_in)))
        return _bias_act(x, bias * self.lr_multiplier, self.activation, 1.0, None)


class _Mapping(nn.Module):
    """The original's ``MappingNetwork`` (inference: no ``w_avg`` update)."""

    z_dim: int
    c_dim: int
    w_dim: int
    num_ws: int
    num_layers: int
    embed_features: int | None
    layer_features: int | None
    activation: str
    lr_multiplier: float

    def setup(self):
        if self.c_dim > 0:
            embed = self.embed_features if self.embed_features is not None else self.w_dim
            self.embed = _FullyConnected(embed)
        hidden = self.layer_features if self.layer_features is not None else self.w_dim
        self.layers = [
            _FullyConnected(
                self.w_dim if i == self.num_layers - 1 else hidden,
                self.activation,
                self.lr_multiplier,
                name=f"fc{i}",
            )
            for i in range(self.num_layers)
        ]
        self.w_avg = self.param("w_avg", nn.initializers.zeros, (self.w_dim,), jnp.float32)

    def __call__(self, z: Array, c: Array | None) -> Array:
        """``w [b, w_dim]``: the layers on ``z`` (and the embedded ``c``), each normalised."""
        x = _normalize_2nd_moment(z.astype(jnp.float32))
        if self.c_dim > 0:
            x = jnp.concatenate(
                [x, _normalize_2nd_moment(self.embed(c.astype(jnp.float32)))], axis=1
            )
        for layer in self.layers:
            x = layer(x)
        return x

    def broadcast(self, w: Array, truncation_psi: Any, truncation_cutoff: int | None) -> Array:
        """``ws [b, num_ws, w_dim]``: ``num_ws`` copies of ``w``, truncated toward ``w_avg``."""
        ws = jnp.broadcast_to(w[:, None, :], (w.shape[0], self.num_ws, self.w_dim))
        if isinstance(truncation_psi, (int, float)) and truncation_psi == 1:
            return ws
        truncated = self.w_avg + truncation_psi * (ws - self.w_avg)
        if truncation_cutoff is None:
            return truncated
        keep = (jnp.arange(self.num_ws) < truncation_cutoff)[None, :, None]
        return jnp.where(keep, truncated, ws)


class _SynthesisOptions(NamedTuple):
    """The original's ``synthesis_kwargs`` that reach every block and layer."""

    architecture: str
    resample_filter: tuple[float, ...]
    conv_clamp: float | None
    use_noise: bool
    activation: str


class _SynthesisLayer(nn.Module):
    """The original's ``SynthesisLayer``: modulated 3x3 convolution (up-sampling by 2 when
    ``up``), demodulation, noise, bias, activation, gain and clamp."""

    features: int
    resolution: int
    up: bool
    options: _SynthesisOptions
    dtype: Any

    @nn.compact
    def __call__(
        self, x: Array, w: Array, noise_mode: str, key: Array | None, gain: float = 1.0
    ) -> Array:
        cin, k = x.shape[-1], 3
        styles = _FullyConnected(cin, bias_init=1.0, name="affine")(w)  # [b, in], float32
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0), (k, k, cin, self.features), jnp.float32
        )
        if self.options.use_noise:
            noise_const = self.param(
                "noise_const",
                nn.initializers.normal(1.0),
                (self.resolution, self.resolution),
                jnp.float32,
            )
            strength = self.param("noise_strength", nn.initializers.zeros, (), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)

        dcoefs = jax.lax.rsqrt(
            jnp.square(styles) @ jnp.sum(jnp.square(kernel), axis=(0, 1)) + 1e-8
        )  # [b, out]
        x = x * styles.astype(self.dtype)[:, None, None, :]
        dn = ("NHWC", "HWIO", "NHWC")
        if self.up:
            # transposed stride-2 convolution = correlation of the zero-dilated input with the
            # spatially flipped kernel, then the FIR filter with the original's paddings
            x = jax.lax.conv_general_dilated(
                x,
                kernel[::-1, ::-1].astype(self.dtype),
                (1, 1),
                ((k - 1, k - 1),) * 2,
                lhs_dilation=(2, 2),
                dimension_numbers=dn,
            )
            n = len(self.options.resample_filter)
            pad = (k // 2 + (n + 1) // 2 - (k - 1), k // 2 + (n - 2) // 2 - (k - 2))
            x = _fir(x, self.options.resample_filter, pad, gain=4.0)
        else:
            x = jax.lax.conv_general_dilated(
                x, kernel.astype(self.dtype), (1, 1), ((k // 2, k // 2),) * 2, dimension_numbers=dn
            )
        x = x * dcoefs.astype(self.dtype)[:, None, None, :]
        if self.options.use_noise and noise_mode == "const":
            x = x + (noise_const * strength).astype(self.dtype)[None, :, :, None]
        elif self.options.use_noise and noise_mode == "random":
            noise = jax.random.normal(key, (x.shape[0], self.resolution, self.resolution, 1))
            x = x + (noise * strength).astype(self.dtype)
        clamp = self.options.conv_clamp * gain if self.options.conv_clamp is not None else None
        return _bias_act(x, bias, self.options.activation, gain, clamp)


class _ToRGB(nn.Module):
    """The original's ``ToRGBLayer``: modulated 1x1 convolution without demodulation, bias,
    clamp."""

    features: int
    conv_clamp: float | None
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, w: Array) -> Array:
        cin = x.shape[-1]
        styles = _FullyConnected(cin, bias_init=1.0, name="affine")(w) / np.sqrt(cin)
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0), (1, 1, cin, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x * styles.astype(self.dtype)[:, None, None, :]
        x = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0].astype(self.dtype))
        return _bias_act(x, bias, "linear", 1.0, self.conv_clamp)


class _Skip(nn.Module):
    """The ``resnet`` shortcut (the original's ``Conv2dLayer`` with kernel 1, ``up=2``, no
    bias): 1x1 convolution with weight gain ``1 / sqrt(in)``, up-sampling, times
    ``sqrt(0.5)``."""

    features: int
    resample_filter: tuple[float, ...]
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0), (1, 1, cin, self.features), jnp.float32
        )
        x = jnp.einsum("bhwi,io->bhwo", x, (kernel[0, 0] / np.sqrt(cin)).astype(self.dtype))
        return _upsample2d(x, self.resample_filter) * np.sqrt(0.5)


class _Block(nn.Module):
    """The original's ``SynthesisBlock`` (its ``force_fp32`` path)."""

    in_channels: int  # 0: the first block (a learned constant input)
    out_channels: int
    resolution: int
    img_channels: int
    is_last: bool
    options: _SynthesisOptions
    dtype: Any

    @nn.compact
    def __call__(
        self, x: Array | None, img: Array | None, ws: Array, noise_mode: str, key: Array | None
    ) -> tuple[Array, Array | None]:
        o = self.options
        layer = dict(options=o, dtype=self.dtype)
        keys = [None, None] if key is None else list(jax.random.split(key, 2))
        r, c = self.resolution, self.out_channels
        if self.in_channels == 0:
            const = self.param("const", nn.initializers.normal(1.0), (r, r, c), jnp.float32)
            x = jnp.broadcast_to(const.astype(self.dtype), (ws.shape[0], r, r, c))
            x = _SynthesisLayer(c, r, False, name="conv1", **layer)(
                x, ws[:, 0], noise_mode, keys[1]
            )
            i = 1
        else:
            x = x.astype(self.dtype)
            gain = np.sqrt(0.5) if o.architecture == "resnet" else 1.0
            y = (
                _Skip(c, o.resample_filter, self.dtype, name="skip")(x)
                if o.architecture == "resnet"
                else None
            )
            x = _SynthesisLayer(c, r, True, name="conv0", **layer)(x, ws[:, 0], noise_mode, keys[0])
            x = _SynthesisLayer(c, r, False, name="conv1", **layer)(
                x, ws[:, 1], noise_mode, keys[1], gain
            )
            if y is not None:
                x = y + x
            i = 2
        if img is not None:
            img = _upsample2d(img, o.resample_filter)
        if self.is_last or o.architecture == "skip":
            y = _ToRGB(self.img_channels, o.conv_clamp, self.dtype, name="torgb")(x, ws[:, i])
            y = y.astype(jnp.float32)
            img = y if img is None else img + y
        return x, img


class _Synthesis(nn.Module):
    """The original's ``SynthesisNetwork``."""

    w_dim: int
    img_resolution: int
    img_channels: int
    channel_base: int
    channel_max: int
    options: _SynthesisOptions
    dtype: Any

    @nn.compact
    def __call__(self, ws: Array, noise_mode: str, key: Array | None) -> Array:
        resolutions = _block_resolutions(self.img_resolution)
        ws = ws.astype(jnp.float32)
        x = img = None
        w_idx = 0
        for res in resolutions:
            cin = _channels(self.channel_base, self.channel_max, res // 2) if res > 4 else 0
            is_last = res == self.img_resolution
            num_conv = 1 if res == 4 else 2
            num_torgb = 1 if is_last or self.options.architecture == "skip" else 0
            block_key = None if key is None else jax.random.fold_in(key, res)
            block = _Block(
                cin,
                _channels(self.channel_base, self.channel_max, res),
                res,
                self.img_channels,
                is_last,
                self.options,
                self.dtype,
                name=f"b{res}",
            )
            x, img = block(
                x, img, ws[:, w_idx : w_idx + num_conv + num_torgb], noise_mode, block_key
            )
            w_idx += num_conv
        return jnp.transpose(img, (0, 3, 1, 2))


def _block_resolutions(img_resolution: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(2, int(np.log2(img_resolution)) + 1))


def _channels(base: int, maximum: int, res: int) -> int:
    return min(base // res, maximum)


class StyleGAN2Generator(nn.Module):
    """The StyleGAN2-ADA ``Generator`` (NVlabs/stylegan2-ada-pytorch) in Flax, for inference.

    Attributes mirror the original's init kwargs (same defaults), flattened:
    ``z_dim, c_dim, w_dim, img_resolution, img_channels`` (the ``Generator``'s own),
    ``num_layers, embed_features, layer_features, mapping_activation, lr_multiplier``
    (``mapping_kwargs``; ``activation`` there is ``mapping_activation`` here) and
    ``channel_base, channel_max, num_fp16_res, conv_clamp, architecture, resample_filter,
    use_noise, activation`` (``synthesis_kwargs``). ``num_fp16_res`` changes only the
    original's compute precision and is recorded, not used: the port computes like the
    original with ``force_fp32=True``. ``dtype`` is the synthesis convolutions' compute dtype
    (float32 by default; bfloat16 keeps parameters, styles and the image in float32).

    Methods (through ``module.apply({"params": params}, ..., method=...)``):
    :meth:`mapping` (``z``, ``c`` -> ``ws``), :meth:`synthesis` (``ws`` -> image) and
    ``__call__`` (both). :meth:`from_init_kwargs` builds the module from the original's
    ``G.init_kwargs``; :meth:`init_kwargs` gives them back.
    """

    z_dim: int
    c_dim: int
    w_dim: int
    img_resolution: int
    img_channels: int
    # mapping_kwargs
    num_layers: int = 8
    embed_features: int | None = None
    layer_features: int | None = None
    mapping_activation: Activation = "lrelu"
    lr_multiplier: float = 0.01
    # synthesis_kwargs
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    architecture: Literal["orig", "skip", "resnet"] = "skip"
    resample_filter: tuple[float, ...] = (1, 3, 3, 1)
    use_noise: bool = True
    activation: Activation = "lrelu"
    dtype: Any = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        bad = functools.partial(unsupported, "StyleGAN2Generator", self)

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for key in ("z_dim", "w_dim", "img_channels", "num_layers", "channel_base", "channel_max"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        for key in ("c_dim", "num_fp16_res"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise bad(key, "an int >= 0")
        for key in ("embed_features", "layer_features"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 1):
                raise bad(key, "None or a positive int")
        r = self.img_resolution
        if not is_int(r) or r < 4 or r & (r - 1):
            raise bad("img_resolution", "a power of two >= 4")
        if self.channel_base // r < 1:
            raise bad("channel_base", f"at least img_resolution={r} (one channel at the top)")
        for key in ("mapping_activation", "activation"):
            if getattr(self, key) not in _ACTIVATIONS:
                raise bad(key, " or ".join(map(repr, _ACTIVATIONS)))
        if self.architecture not in _ARCHITECTURES:
            raise bad("architecture", " or ".join(map(repr, _ARCHITECTURES)))
        if (
            isinstance(self.lr_multiplier, bool)
            or not isinstance(self.lr_multiplier, (int, float))
            or not self.lr_multiplier > 0
        ):
            raise bad("lr_multiplier", "a positive number")
        clamp = self.conv_clamp
        if clamp is not None and (
            isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or clamp < 0
        ):
            raise bad("conv_clamp", "None or a number >= 0")
        taps = self.resample_filter
        if (
            not isinstance(taps, tuple)
            or not taps
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in taps)
            or sum(taps) == 0
        ):
            raise bad(
                "resample_filter", "a non-empty tuple of numbers with a non-zero sum (the 1-D taps)"
            )
        if not isinstance(self.use_noise, bool):
            raise bad("use_noise", "a bool")

    # ---------------------------------------------------------------- config

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        """The synthesis blocks' resolutions, ``(4, 8, ..., img_resolution)``."""
        return _block_resolutions(self.img_resolution)

    @property
    def num_ws(self) -> int:
        """The number of ``w`` vectors the synthesis network takes (convolutions + 1)."""
        return 2 * len(self.block_resolutions)

    def channels(self, res: int) -> int:
        """The feature channels of the block at resolution ``res``."""
        return _channels(self.channel_base, self.channel_max, res)

    @classmethod
    def from_init_kwargs(
        cls, kwargs: Mapping[str, Any], *, dtype: Any = jnp.float32
    ) -> "StyleGAN2Generator":
        """The module the original ``Generator(**kwargs)`` describes, read strictly.

        Args:
            kwargs: the original's init kwargs (a network pickle's ``G_ema.init_kwargs``):
                ``z_dim, c_dim, w_dim, img_resolution, img_channels`` (required),
                ``mapping_kwargs`` and ``synthesis_kwargs`` (optional mappings). Accepted and
                dropped because they do not change inference: ``mapping_kwargs.w_avg_beta``
                (a number; ``None``, which means no ``w_avg`` buffer, is refused) and
                ``synthesis_kwargs.fp16_channels_last``. ``synthesis_kwargs.kernel_size`` (a
                ``SynthesisLayer`` kwarg) must be 3.
            dtype: compute dtype.

        Returns:
            The (unbound) module.

        Raises:
            TypeError: ``kwargs`` (or a nested kwargs) is not a mapping.
            ValueError: naming the first key that is missing, unknown or holds an unsupported
                value.
        """

        def mapping_of(value: Any, what: str) -> Mapping[str, Any]:
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"StyleGAN2 init kwargs: {what} must be a mapping, got {type(value).__name__}"
                )
            return value

        kwargs = mapping_of(kwargs, "the init kwargs")
        known = set(_TOP_KEYS) | {"mapping_kwargs", "synthesis_kwargs"}
        for key in kwargs:
            if key not in known:
                raise ValueError(f"StyleGAN2 init kwargs: unknown key {key!r}")
        missing = [key for key in _TOP_KEYS if key not in kwargs]
        if missing:
            raise ValueError(f"StyleGAN2 init kwargs: missing key {missing[0]!r}")
        out: dict[str, Any] = {key: kwargs[key] for key in _TOP_KEYS}
        mapping = mapping_of(kwargs.get("mapping_kwargs", {}), "mapping_kwargs")
        synthesis = mapping_of(kwargs.get("synthesis_kwargs", {}), "synthesis_kwargs")
        for key, value in mapping.items():
            if key == "w_avg_beta":
                if value is None:
                    raise ValueError(
                        "StyleGAN2 init kwargs: mapping_kwargs.w_avg_beta=None "
                        "(a generator without the w_avg buffer) is not supported"
                    )
                continue
            if key not in _MAPPING_KEYS:
                raise ValueError(f"StyleGAN2 init kwargs: unknown key mapping_kwargs.{key!r}")
            out[_MAPPING_KEYS[key]] = value
        for key, value in synthesis.items():
            if key == "fp16_channels_last":
                continue
            if key == "kernel_size":
                if value != 3:
                    raise ValueError(
                        f"StyleGAN2 init kwargs: synthesis_kwargs.kernel_size="
                        f"{value!r} is not supported; expected 3"
                    )
                continue
            if key not in _SYNTHESIS_KEYS:
                raise ValueError(f"StyleGAN2 init kwargs: unknown key synthesis_kwargs.{key!r}")
            if key == "resample_filter" and isinstance(value, (list, tuple, np.ndarray)):
                value = np.asarray(value).tolist()
                if any(isinstance(v, list) for v in value):
                    raise ValueError(
                        "StyleGAN2 init kwargs: synthesis_kwargs.resample_filter "
                        f"={value!r} is not supported; expected 1-D taps"
                    )
                value = tuple(value)
            out[_SYNTHESIS_KEYS[key]] = value
        return cls(**out, dtype=dtype)

    def init_kwargs(self) -> dict[str, Any]:
        """The original's ``Generator`` init kwargs (JSON-serialisable) that
        :meth:`from_init_kwargs` reads back into an equal module (``dtype`` aside)."""
        out: dict[str, Any] = {key: getattr(self, key) for key in _TOP_KEYS}
        out["mapping_kwargs"] = {k: getattr(self, a) for k, a in _MAPPING_KEYS.items()}
        synthesis = {k: getattr(self, a) for k, a in _SYNTHESIS_KEYS.items()}
        synthesis["resample_filter"] = list(self.resample_filter)
        out["synthesis_kwargs"] = synthesis
        return out

    # ---------------------------------------------------------------- forward

    def setup(self):
        self._mapping = _Mapping(
            self.z_dim,
            self.c_dim,
            self.w_dim,
            self.num_ws,
            self.num_layers,
            self.embed_features,
            self.layer_features,
            self.mapping_activation,
            self.lr_multiplier,
            name="mapping",
        )
        options = _SynthesisOptions(
            self.architecture,
            self.resample_filter,
            self.conv_clamp,
            self.use_noise,
            self.activation,
        )
        self._synthesis = _Synthesis(
            self.w_dim,
            self.img_resolution,
            self.img_channels,
            self.channel_base,
            self.channel_max,
            options,
            self.dtype,
            name="synthesis",
        )

    def class_vectors(self, c: ArrayLike | None, batch: int) -> Array | None:
        """The conditioning the mapping network takes, checked: ``c`` as float32
        ``[batch, c_dim]`` (integer class labels ``[batch]`` one-hot encoded), ``None`` for an
        unconditional generator. Needs no parameters (call it on the unbound module).

        Raises:
            ValueError: ``c`` missing for a conditional generator, given to an unconditional
                one, of the wrong shape, or labels out of ``[0, c_dim)`` (when concrete).
        """
        if self.c_dim == 0:
            if c is not None and tuple(jnp.shape(c)) != (batch, 0):
                raise ValueError(
                    f"c must be None (or of shape [{batch}, 0]) for an "
                    f"unconditional generator (c_dim=0), got shape {jnp.shape(c)}"
                )
            return None
        if c is None:
            raise ValueError(
                f"c is required: this generator is conditional (c_dim="
                f"{self.c_dim}); pass one-hot labels [b, {self.c_dim}] or class "
                "indices [b]"
            )
        c = jnp.asarray(c)
        if jnp.issubdtype(c.dtype, jnp.integer) and c.ndim == 1:
            if c.shape != (batch,):
                raise ValueError(f"c (class labels) must have shape [{batch}], got {c.shape}")
            if not isinstance(c, jax.core.Tracer):
                labels = np.asarray(c)
                if labels.size and (labels.min() < 0 or labels.max() >= self.c_dim):
                    raise ValueError(
                        f"c: class labels must be in [0, {self.c_dim}), got "
                        f"{labels.min()} .. {labels.max()}"
                    )
            return jax.nn.one_hot(c, self.c_dim, dtype=jnp.float32)
        if c.shape != (batch, self.c_dim):
            raise ValueError(
                f"c must have shape [{batch}, {self.c_dim}] (c_dim={self.c_dim}) "
                f"or be integer class labels [{batch}], got {c.shape}"
            )
        return c.astype(jnp.float32)

    def mapping(
        self,
        z: Float[ArrayLike, "b z_dim"],
        c: ArrayLike | None = None,
        *,
        truncation_psi: float | Float[ArrayLike, ""] = 1.0,
        truncation_cutoff: int | None = None,
    ) -> Float[Array, "b num_ws w_dim"]:
        """The mapping network: latents (and labels) to the intermediate latents ``ws``.

        As the original's ``MappingNetwork.forward`` (in float32): ``z`` normalised to unit
        second moment; for a conditional generator also ``embed(c)`` normalised and
        concatenated after it; the ``fc`` layers; broadcast to ``num_ws`` copies; truncation
        ``w_avg + psi (w - w_avg)`` on all of them or on the first ``truncation_cutoff``.

        Args:
            z: ``[b, z_dim]``.
            c: ``[b, c_dim]`` (one-hot or any float labels) or integer class labels ``[b]``;
                required when ``c_dim > 0``, ``None`` (or ``[b, 0]``) otherwise.
            truncation_psi: the truncation factor (a Python number or a traced scalar);
                a Python ``1`` skips the truncation as the original does.
            truncation_cutoff: truncate only the first this many ``ws`` (a static int);
                ``None``: all.

        Returns:
            ``ws``, float32 ``[b, num_ws, w_dim]``.

        Raises:
            ValueError: ``z`` or ``c`` has the wrong shape, ``c`` is missing, class labels are
                out of range (when concrete), or ``truncation_cutoff`` is not an int or None.
        """
        z = jnp.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(
                f"z must have shape [b, {self.z_dim}] (z_dim={self.z_dim}), got {z.shape}"
            )
        labels = self.class_vectors(c, z.shape[0])
        return self.broadcast_w(
            self._mapping(z, labels),
            truncation_psi=truncation_psi,
            truncation_cutoff=truncation_cutoff,
        )

    def broadcast_w(
        self,
        w: Float[ArrayLike, "b w_dim"],
        *,
        truncation_psi: float | Float[ArrayLike, ""] = 1.0,
        truncation_cutoff: int | None = None,
    ) -> Float[Array, "b num_ws w_dim"]:
        """The last step of :meth:`mapping`: ``num_ws`` copies of one ``w`` per sample, with
        the truncation ``w_avg + psi (w - w_avg)`` on all of them or the first
        ``truncation_cutoff``. ``mapping(z, c)[:, 0]`` (``psi = 1``) is the ``w`` of ``z``.

        Args:
            w: ``[b, w_dim]``.
            truncation_psi: as in :meth:`mapping`.
            truncation_cutoff: as in :meth:`mapping`.

        Returns:
            ``ws``, float32 ``[b, num_ws, w_dim]``.
        """
        w = jnp.asarray(w, jnp.float32)
        if w.ndim != 2 or w.shape[1] != self.w_dim:
            raise ValueError(
                f"w must have shape [b, {self.w_dim}] (w_dim={self.w_dim}), got {w.shape}"
            )
        if truncation_cutoff is not None and (
            isinstance(truncation_cutoff, bool)
            or not isinstance(truncation_cutoff, (int, np.integer))
        ):
            raise ValueError(
                f"truncation_cutoff must be a static int or None, got {truncation_cutoff!r}"
            )
        return self._mapping.broadcast(w, truncation_psi, truncation_cutoff)

    def synthesis(
        self,
        ws: Float[ArrayLike, "b num_ws w_dim"],
        *,
        noise_mode: NoiseMode = "const",
        key: Array | None = None,
    ) -> Float[Array, "b img_channels res res"]:
        """The synthesis network: ``ws`` to an image, as the original with ``force_fp32=True``.

        Args:
            ws: ``[b, num_ws, w_dim]``; block ``b<res>`` reads its slice as the original's
                ``SynthesisNetwork.forward`` cuts it.
            noise_mode: ``"const"``: each layer's stored ``noise_const``; ``"random"``: fresh
                N(0, 1) noise ``[b, res, res]`` per layer, drawn from ``key``; ``"none"``: no
                noise.
            key: a PRNG key, required for ``noise_mode="random"`` (split per block and layer
                inside).

        Returns:
            float32 NCHW images ``[b, img_channels, img_resolution, img_resolution]``.

        Raises:
            ValueError: ``ws`` has the wrong shape, an unknown ``noise_mode``, or no ``key``
                for random noise.
        """
        ws = jnp.asarray(ws)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"ws must have shape [b, {self.num_ws}, {self.w_dim}] (num_ws, "
                f"w_dim), got {ws.shape}"
            )
        if noise_mode not in ("const", "random", "none"):
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        if noise_mode == "random" and key is None:
            raise ValueError("noise_mode='random' needs a PRNG key: pass key=")
        return self._synthesis(ws, noise_mode, key if noise_mode == "random" else None)

    def __call__(
        self,
        z: Float[ArrayLike, "b z_dim"],
        c: ArrayLike | None = None,
        *,
        truncation_psi: float | Float[ArrayLike, ""] = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "const",
        key: Array | None = None,
    ) -> Float[Array, "b img_channels res res"]:
        """``synthesis(mapping(z, c, ...), ...)``: the original's ``G(z, c, ...,
        force_fp32=True)``; see :meth:`mapping` and :meth:`synthesis` for the arguments.

        Returns:
            float32 NCHW images ``[b, img_channels, img_resolution, img_resolution]``.
        """
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, key=key)


# ---------------------------------------------------------------- loading

_ARCHITECTURE = "stylegan2"
_NETWORKS = ("G", "G_ema")


@functools.cache
def _generate_fn(module: StyleGAN2Generator):
    """``generate(params, z, c=None, **settings)`` of one module (one function object per
    equal module, so that their :class:`~jax.tree_util.Partial`\\ s share compiled code)."""

    def generate(params: Any, z: Array, c: Array | None = None, **settings: Any) -> Array:
        return module.apply({"params": params}, z, c, **settings)

    return generate


def _from_record(record: Any, source: str, network: str) -> tuple[dict, dict]:
    """``(init_kwargs, state_dict)`` of a pickle's generator record, checked to be one."""
    from mmh_jax.convert.safe_pickle import TorchModuleRecord

    if not isinstance(record, TorchModuleRecord) or record.class_name != "Generator":
        what = (
            f"a {record.class_name!r} network"
            if isinstance(record, TorchModuleRecord)
            else f"a {type(record).__name__}"
        )
        raise ConversionError(f"{source}: {network!r} is {what}, not a StyleGAN2-ADA Generator")
    synthesis = record.modules.get("synthesis")
    blocks = sorted(synthesis.modules) if synthesis is not None else []
    if not blocks or not all(name[:1] == "b" and name[1:].isdigit() for name in blocks):
        raise ConversionError(
            f"{source}: {network!r} is a Generator whose synthesis network holds "
            f"{', '.join(blocks[:4]) or 'nothing'}{' ...' if len(blocks) > 4 else ''}, not the "
            "StyleGAN2-ADA blocks b4, b8, ... (a StyleGAN3 or another family's pickle?)"
        )
    if record.init_args:
        raise ConversionError(
            f"{source}: {network!r} was built with positional arguments "
            f"{record.init_args!r}; StyleGAN2-ADA generators take keywords"
        )
    return record.init_kwargs, record.state_dict()


def load_stylegan2(
    path: str | os.PathLike,
    *,
    network: Literal["G", "G_ema"] = "G_ema",
    init_kwargs: Mapping[str, Any] | None = None,
    dtype: Any = jnp.float32,
) -> PretrainedGenerator:
    """Load a StyleGAN2-ADA generator from a local file, never running code from it.

    Args:
        path: an official network pickle (``.pkl``: a training snapshot or a released network
            such as ``cifar10.pkl``), read by :func:`mmh_jax.convert.safe_pickle.read_network_pickle`,
            which imports and executes nothing named in the file; a file written by
            :func:`save_stylegan2` (``mmh-jax convert stylegan2``); or a plain state dict of the
            original ``Generator`` (``.safetensors``, or ``.pt``/``.pth`` read with
            ``weights_only=True``) together with ``init_kwargs``.
        network: the generator of a snapshot to read: ``"G_ema"`` (the moving average, what
            the official ``generate.py`` uses) or ``"G"``.
        init_kwargs: the original ``Generator``'s constructor arguments, for a plain state
            dict (a pickle and a converted file carry their own).
        dtype: compute dtype of the synthesis convolutions (parameters stay float32).

    Returns:
        ``PretrainedGenerator(module, params, generate)``.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: an unreadable or refused file (a pickle naming anything outside the
            reader's allow-list: :class:`~mmh_jax.convert.safe_pickle.UnsafePickleError`), a
            pickle of another network family, or weights that do not match the generator's
            configuration (listing the mismatching tensors).
        ValueError: ``network`` not ``"G"`` or ``"G_ema"``, a state dict without
            ``init_kwargs``, or init kwargs the port does not support (naming the key).
    """
    from mmh_jax.convert.safe_pickle import read_network_pickle

    if network not in _NETWORKS:
        raise ValueError(f"network must be 'G' or 'G_ema', got {network!r}")
    path = require_file(path, "StyleGAN2 checkpoint")
    source = repr(str(path))
    if path.suffix not in (".pkl", ".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise ConversionError(
            f"StyleGAN2 checkpoint {source}: expected an official network "
            "pickle (.pkl), a .safetensors file or a torch.save state dict "
            f"(.pt, .pth, .bin, .ckpt), got suffix {path.suffix!r}"
        )
    stored = None
    if path.suffix == ".pkl":
        top = read_network_pickle(path)
        if not isinstance(top, Mapping) or network not in top:
            keys = sorted(map(str, top)) if isinstance(top, Mapping) else type(top).__name__
            raise ConversionError(
                f"{source} holds no {network!r} network (found {keys}); "
                "expected a StyleGAN2-ADA network pickle"
            )
        pickled_kwargs, state_dict = _from_record(top[network], source, network)
        if init_kwargs is not None:
            raise ValueError(f"init_kwargs is for a plain state dict; {source} carries its own")
        init_kwargs = pickled_kwargs
    elif path.suffix == ".safetensors":
        try:
            stored, metadata = load_params(path)
        except ConversionError:  # not written by save_params: a plain state dict
            stored, metadata = None, {}
        if "architecture" in metadata:
            if metadata["architecture"] != _ARCHITECTURE:
                raise ConversionError(
                    f"{source} holds a {metadata['architecture']!r} model, "
                    f"not a StyleGAN2 generator"
                )
            if init_kwargs is not None:
                raise ValueError(f"init_kwargs is for a plain state dict; {source} carries its own")
            init_kwargs = metadata.get("init_kwargs")
        else:
            stored = None
    if stored is None and path.suffix != ".pkl":
        state_dict = read_state_dict(path)  # an unreadable file is reported as such
    if init_kwargs is None:
        raise ValueError(
            f"{source} is a plain state dict: pass the generator's init_kwargs "
            "(z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, "
            "synthesis_kwargs; on the command line --init-kwargs FILE.json)"
        )
    try:
        module = StyleGAN2Generator.from_init_kwargs(init_kwargs, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    if stored is not None:
        params = check_params(stored, stylegan2_abstract_params(module), source=source)
    else:
        params = convert_stylegan2(state_dict, module, source=source)
    params = jax.tree.map(jnp.asarray, params)
    return PretrainedGenerator(module, params, Partial(_generate_fn(module), params))


def save_stylegan2(path: str | os.PathLike, model: PretrainedGenerator) -> Path:
    """Write a loaded generator (parameters and init kwargs) to one ``.safetensors`` file that
    :func:`load_stylegan2` reads back without torch or the pickle.

    Args:
        path: the target file; must end in ``.safetensors``.
        model: what :func:`load_stylegan2` returned.

    Returns:
        The path written.
    """
    if not isinstance(model.module, StyleGAN2Generator):
        raise TypeError(
            f"model.module must be a StyleGAN2Generator, got {type(model.module).__name__}"
        )
    metadata = {"architecture": _ARCHITECTURE, "init_kwargs": model.module.init_kwargs()}
    return save_params(path, jax.device_get(model.params), metadata=metadata)
