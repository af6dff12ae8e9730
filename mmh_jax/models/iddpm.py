"""Flax port of the improved-diffusion UNet (Nichol & Dhariwal 2021, "iDDPM") and its loader.

:class:`IDDPMUNet` reproduces ``improved_diffusion.unet.UNetModel`` as built by
improved-diffusion's ``create_model`` from its command-line flags (:meth:`IDDPMUNet.from_flags`
takes the same flags, with the same defaults). Its public boundary is NCHW like the original;
inside it transposes once to NHWC. Numerics follow the original where they matter: group
normalisation is computed in float32 whatever the compute dtype, the attention splits heads
before queries/keys/values (the "legacy" ``qkv`` channel order ``[head, (q|k|v), d]``) and takes
its softmax in float32, and as in the original's float16 mode only the torso (input, middle
and output blocks) runs in the reduced ``dtype``: the timestep MLP and the output head stay in
float32.

:func:`load_iddpm` reads an improved-diffusion checkpoint (or a file written by
:func:`mmh_jax.convert.save_params`) and returns a :class:`~mmh_jax.models.Pretrained` with
the matching DDPM schedule and score function. With improved-diffusion's default
``rescale_timesteps=True`` the network was trained on timesteps ``i * 1000 / T`` (``i`` the
0-based step), which the score function applies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from mmh_jax.convert.core import ConversionError, check_params
from mmh_jax.convert.iddpm import convert_iddpm, iddpm_expected_params
from mmh_jax.convert.io import load_params, read_state_dict
from mmh_jax.models.layers import (
    GroupNorm,
    attention,
    conv2d,
    timestep_embedding,
    upsample_nearest_2x,
)
from mmh_jax.models.pretrained import Pretrained, eps_score_fn
from mmh_jax.schedules import DDPM

__all__ = ["IDDPMUNet", "IDDPMLayer", "iddpm_schedule", "load_iddpm", "IDDPM_FLAGS"]

_GROUPS = 32  # improved-diffusion's GroupNorm32

# create_model's channel multipliers per image size.
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}

# improved-diffusion's model_and_diffusion_defaults(), plus our channel_mult (None: create_model's).
MODEL_FLAGS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "channel_mult": None,
}
DIFFUSION_FLAGS: dict[str, Any] = {
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "rescale_timesteps": True,
    "predict_xstart": False,
    # sampling/training-only flags: accepted so that flag lines can be passed unchanged
    "sigma_small": False,
    "timestep_respacing": "",
    "use_kl": False,
    "rescale_learned_sigmas": True,
}

IDDPM_FLAGS: tuple[str, ...] = (*MODEL_FLAGS, *DIFFUSION_FLAGS)
"""Every flag :func:`load_iddpm` takes (improved-diffusion's model and diffusion flags)."""


class IDDPMLayer(NamedTuple):
    """One layer of a UNet block, as :meth:`IDDPMUNet.layout` lists them.

    Attributes:
        kind: ``"conv"`` (the input convolution), ``"res"`` (ResBlock), ``"attn"``
            (AttentionBlock), ``"down"`` (strided 3x3 convolution) or ``"up"`` (nearest 2x
            upsampling and a 3x3 convolution).
        in_ch: input channels.
        out_ch: output channels.
        heads: attention heads (``"attn"`` only, else 0).
    """

    kind: Literal["conv", "res", "attn", "down", "up"]
    in_ch: int
    out_ch: int
    heads: int = 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _silu(x: Array) -> Array:
    return x * nn.sigmoid(x)


def _norm(x: Array, name: str, param_dtype: Any) -> Array:
    """improved-diffusion's GroupNorm32: normalise in float32, return in the input dtype."""
    return GroupNorm(_GROUPS, dtype=x.dtype, param_dtype=param_dtype, name=name)(x)


class _ResBlock(nn.Module):
    """ResBlock: norm-SiLU-conv, timestep conditioning (added, or FiLM with scale-shift norm),
    norm-SiLU-(dropout)-conv, plus a 1x1-convolution skip when the channel count changes."""

    in_ch: int
    out_ch: int
    use_scale_shift_norm: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], emb: Float[Array, "b e"]) -> Array:
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(self.out_ch, 3, padding=1, name="in_conv", **conv)(
            _silu(_norm(x, "in_norm", self.param_dtype))
        )
        width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        # the original keeps this Linear in float32 in its float16 mode
        e = nn.Dense(width, name="emb_proj", dtype=jnp.float32, param_dtype=self.param_dtype)(
            _silu(emb)
        ).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = _norm(h, "out_norm", self.param_dtype) * (1 + scale) + shift
        else:
            h = _norm(h + e, "out_norm", self.param_dtype)
        h = conv2d(self.out_ch, 3, padding=1, name="out_conv", **conv)(_silu(h))
        if self.in_ch != self.out_ch:
            x = nn.Dense(self.out_ch, name="skip", **conv)(x)
        return x + h


class _AttentionBlock(nn.Module):
    """Self-attention over all pixels, heads split before q/k/v (improved-diffusion's order)."""

    channels: int
    heads: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Array:
        b, height, width, c = x.shape
        tokens = x.reshape(b, height * width, c)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.Dense(3 * c, name="qkv", **dense)(_norm(tokens, "norm", self.param_dtype))
        # channel index of the original's qkv is head * 3d + {q, k, v} * d + i
        q, k, v = jnp.split(
            qkv.reshape(b, height * width, self.heads, 3 * (c // self.heads)), 3, axis=-1
        )
        a = attention(q, k, v).reshape(b, height * width, c)
        out = tokens + nn.Dense(c, name="proj_out", **dense)(a)
        return out.reshape(b, height, width, c)


class _Resample(nn.Module):
    """Downsample (3x3 convolution with stride 2, padding 1, parameters ``op``) or Upsample
    (nearest 2x, then a 3x3 convolution ``conv``)."""

    channels: int
    up: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Array:
        if self.up:
            return conv2d(
                self.channels,
                3,
                padding=1,
                name="conv",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(upsample_nearest_2x(x))
        return conv2d(
            self.channels,
            3,
            stride=2,
            padding=1,
            name="op",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class IDDPMUNet(nn.Module):
    """improved-diffusion's ``UNetModel`` (unconditional, 2-D, learned resampling convolutions).

    Attribute names follow the original constructor; :meth:`from_flags` builds it from the
    command-line flags instead. Flax parameter names mirror the PyTorch keys: top-level layers
    are ``time_embed_0``, ``time_embed_2``, ``input_blocks_{n}_{m}``, ``middle_block_{m}``,
    ``output_blocks_{n}_{m}``, ``out_0`` (norm) and ``out_2`` (convolution).

    Attributes:
        image_size: height and width of the inputs.
        in_channels: image channels.
        model_channels: base channel count (the ``num_channels`` flag).
        out_channels: output channels (twice ``in_channels`` with learned variances,
            ``learn_sigma``: epsilon first, then the variance interpolation).
        num_res_blocks: ResBlocks per resolution level.
        attention_resolutions: downsample rates (1, 2, 4, ...) whose blocks have attention,
            as the original constructor takes them (the flag gives resolutions instead).
        channel_mult: channel multiplier per resolution level.
        num_heads: attention heads of the input and middle blocks.
        num_heads_upsample: attention heads of the output blocks (-1: ``num_heads``).
        use_scale_shift_norm: condition ResBlocks by FiLM (``norm(h) * (1 + s) + b``) rather
            than by adding the embedding before the norm.
        dropout: the training dropout rate. Recorded for completeness; the module is an
            inference port and never drops.
        dtype: compute dtype of the torso (e.g. ``jnp.bfloat16``).
        param_dtype: parameter dtype.
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = 1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in (
            "image_size",
            "in_channels",
            "model_channels",
            "out_channels",
            "num_res_blocks",
            "num_heads",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (
            _is_int(self.num_heads_upsample)
            and (self.num_heads_upsample == -1 or self.num_heads_upsample >= 1)
        ):
            raise ValueError(
                f"num_heads_upsample must be -1 or a positive int, got {self.num_heads_upsample!r}"
            )
        if not self.channel_mult or not all(_is_int(m) and m >= 1 for m in self.channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty tuple of positive ints, "
                f"got {self.channel_mult!r}"
            )
        if self.channel_mult[0] != 1:
            raise ValueError(
                f"channel_mult must start with 1 (the output head convolves "
                f"model_channels channels), got {self.channel_mult!r}"
            )
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**{levels - 1} "
                f"({levels} resolution levels)"
            )
        rates = [2**level for level in range(levels)]
        for rate in self.attention_resolutions:
            if rate not in rates:
                raise ValueError(
                    f"attention_resolutions: downsample rate {rate!r} is not one "
                    f"of the UNet's levels {rates}"
                )
        for mult in self.channel_mult:
            if mult * self.model_channels % _GROUPS:
                raise ValueError(
                    f"model_channels (num_channels) * channel_mult = "
                    f"{mult * self.model_channels} is not divisible by {_GROUPS} "
                    f"(the group normalisation's groups)"
                )
        inputs, middle, outputs = self.layout()
        for layer in [layer for block in inputs + [middle] + outputs for layer in block]:
            if layer.kind == "attn" and layer.out_ch % layer.heads:
                raise ValueError(
                    f"{layer.heads} attention heads (num_heads / "
                    f"num_heads_upsample) do not divide {layer.out_ch} channels"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        super().__post_init__()

    @classmethod
    def from_flags(
        cls,
        *,
        image_size: int = 64,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        learn_sigma: bool = False,
        class_cond: bool = False,
        use_checkpoint: bool = False,
        attention_resolutions: str | Sequence[int] = "16,8",
        num_heads: int = 4,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        dropout: float = 0.0,
        channel_mult: Sequence[int] | None = None,
        dtype: Any = jnp.float32,
    ) -> "IDDPMUNet":
        """The UNet that improved-diffusion's ``create_model`` builds from these flags.

        Defaults are improved-diffusion's ``model_and_diffusion_defaults()``.

        Args:
            image_size: 32, 64 or 256 (``create_model``'s sizes); any size divisible by
                ``2 ** (len(channel_mult) - 1)`` when ``channel_mult`` is given.
            num_channels: base channel count.
            num_res_blocks: ResBlocks per level.
            learn_sigma: whether the model also outputs variances (6 output channels).
            class_cond: must be False: class-conditional models are not supported.
            use_checkpoint: gradient checkpointing in the original; no effect here.
            attention_resolutions: comma-separated resolutions (``"16,8"``) or a sequence of
                ints; each must be ``image_size / 2**k`` for a level ``k``.
            num_heads: attention heads.
            num_heads_upsample: attention heads of the output blocks (-1: ``num_heads``).
            use_scale_shift_norm: FiLM conditioning of the ResBlocks.
            dropout: training dropout rate (recorded only).
            channel_mult: channel multipliers per level; None takes ``create_model``'s for
                ``image_size`` (not a flag of the original: it allows other sizes).
            dtype: compute dtype of the torso.

        Returns:
            The (unbound) module.

        Raises:
            ValueError: naming the flag whose value is invalid or unsupported.
        """
        for name, value in (
            ("learn_sigma", learn_sigma),
            ("class_cond", class_cond),
            ("use_checkpoint", use_checkpoint),
            ("use_scale_shift_norm", use_scale_shift_norm),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if class_cond:
            raise ValueError("class_cond=True: class-conditional models are not supported")
        if not _is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if channel_mult is None:
            if image_size not in CHANNEL_MULT:
                raise ValueError(
                    f"image_size={image_size}: improved-diffusion defines channel "
                    f"multipliers only for {sorted(CHANNEL_MULT)}; pass "
                    f"channel_mult for other sizes"
                )
            channel_mult = CHANNEL_MULT[image_size]
        if isinstance(attention_resolutions, str):
            try:
                resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
            except ValueError:
                raise ValueError(
                    f"attention_resolutions must be comma-separated ints, got "
                    f"{attention_resolutions!r}"
                ) from None
        else:
            resolutions = list(attention_resolutions)
        rates = []
        for res in resolutions:
            if not _is_int(res) or res < 1 or image_size % res:
                raise ValueError(
                    f"attention_resolutions: {res!r} does not divide image_size={image_size}"
                )
            rates.append(image_size // res)
        if not _is_int(num_channels) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number, got {dropout!r}")
        return cls(
            image_size=image_size,
            in_channels=3,
            model_channels=num_channels,
            out_channels=6 if learn_sigma else 3,
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(rates),
            channel_mult=tuple(channel_mult),
            num_heads=num_heads,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            dropout=float(dropout),
            dtype=dtype,
        )

    def layout(self) -> tuple[list[list[IDDPMLayer]], list[IDDPMLayer], list[list[IDDPMLayer]]]:
        """The layers of every block, in the original's order.

        Returns:
            ``(input_blocks, middle_block, output_blocks)``: lists of blocks, each a list of
            :class:`IDDPMLayer` (the middle block is one list). Block ``n``'s layer ``m`` is the
            PyTorch module ``input_blocks.n.m`` (``middle_block.m``, ``output_blocks.n.m``).
        """
        heads_up = self.num_heads_upsample if self.num_heads_upsample != -1 else self.num_heads
        inputs = [[IDDPMLayer("conv", self.in_channels, self.model_channels)]]
        skip_chans = [self.model_channels]
        ch, rate = self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                block = [IDDPMLayer("res", ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if rate in self.attention_resolutions:
                    block.append(IDDPMLayer("attn", ch, ch, self.num_heads))
                inputs.append(block)
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                inputs.append([IDDPMLayer("down", ch, ch)])
                skip_chans.append(ch)
                rate *= 2
        middle = [
            IDDPMLayer("res", ch, ch),
            IDDPMLayer("attn", ch, ch, self.num_heads),
            IDDPMLayer("res", ch, ch),
        ]
        outputs = []
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                block = [IDDPMLayer("res", ch + skip_chans.pop(), mult * self.model_channels)]
                ch = mult * self.model_channels
                if rate in self.attention_resolutions:
                    block.append(IDDPMLayer("attn", ch, ch, heads_up))
                if level and i == self.num_res_blocks:
                    block.append(IDDPMLayer("up", ch, ch))
                    rate //= 2
                outputs.append(block)
        return inputs, middle, outputs

    def _layer(self, layer: IDDPMLayer, name: str, h: Array, emb: Array) -> Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if layer.kind == "conv":
            return conv2d(layer.out_ch, 3, padding=1, **common)(h)
        if layer.kind == "res":
            return _ResBlock(layer.in_ch, layer.out_ch, self.use_scale_shift_norm, **common)(h, emb)
        if layer.kind == "attn":
            return _AttentionBlock(layer.out_ch, layer.heads, **common)(h)
        return _Resample(layer.out_ch, layer.kind == "up", **common)(h)

    @nn.compact
    def __call__(
        self, x: Float[Array, "b c h w"], timesteps: Float[Array, " b"]
    ) -> Float[Array, "b c_out h w"]:
        """Apply the network.

        Args:
            x: images, NCHW, ``[b, in_channels, image_size, image_size]``.
            timesteps: the network's (possibly fractional) timesteps, shape ``[b]``, as the
                original receives them (already multiplied by ``1000 / T`` for models trained
                with ``rescale_timesteps``).

        Returns:
            float32 output, NCHW, ``[b, out_channels, image_size, image_size]``.
        """
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"x must have shape [b, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}"
            )
        if timesteps.shape != (x.shape[0],):
            raise ValueError(
                f"timesteps must have shape [{x.shape[0]}] (one per image), "
                f"got {tuple(timesteps.shape)}"
            )
        emb_dim = 4 * self.model_channels
        emb = timestep_embedding(timesteps, self.model_channels, flip_sin_to_cos=True, freq_shift=0)
        emb = nn.Dense(emb_dim, name="time_embed_0", param_dtype=self.param_dtype)(emb)
        emb = nn.Dense(emb_dim, name="time_embed_2", param_dtype=self.param_dtype)(_silu(emb))

        inputs, middle, outputs = self.layout()
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)
        skips = []
        for n, block in enumerate(inputs):
            for m, layer in enumerate(block):
                h = self._layer(layer, f"input_blocks_{n}_{m}", h, emb)
            skips.append(h)
        for m, layer in enumerate(middle):
            h = self._layer(layer, f"middle_block_{m}", h, emb)
        for n, block in enumerate(outputs):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            for m, layer in enumerate(block):
                h = self._layer(layer, f"output_blocks_{n}_{m}", h, emb)
        h = _silu(_norm(h.astype(jnp.float32), "out_0", self.param_dtype))
        h = conv2d(self.out_channels, 3, padding=1, name="out_2", param_dtype=self.param_dtype)(h)
        return jnp.transpose(h, (0, 3, 1, 2))


def iddpm_schedule(diffusion_steps: int, noise_schedule: str) -> DDPM:
    """improved-diffusion's named beta schedules (``get_named_beta_schedule``) as a DDPM.

    Args:
        diffusion_steps: the number of steps ``T``.
        noise_schedule: ``"linear"`` (Ho et al.'s betas from ``1e-4`` to ``0.02``, both scaled by
            ``1000 / T`` so that the schedule keeps its shape for any ``T``) or ``"cosine"``
            (``abar(t) = cos((t/T + 0.008) / 1.008 * pi/2)^2``, betas clipped at 0.999).

    Returns:
        The schedule.

    Raises:
        ValueError: naming ``diffusion_steps`` or ``noise_schedule``.
    """
    if not _is_int(diffusion_steps) or diffusion_steps < 2:
        raise ValueError(f"diffusion_steps must be an int >= 2, got {diffusion_steps!r}")
    if noise_schedule == "linear":
        scale = 1000 / diffusion_steps
        return DDPM.linear(T=diffusion_steps, beta_start=scale * 0.0001, beta_end=scale * 0.02)
    if noise_schedule == "cosine":
        return DDPM.cosine(T=diffusion_steps, s=0.008, max_beta=0.999)
    raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {noise_schedule!r}")


def _normalised(value: Any) -> Any:
    """A flag value as it reads back from JSON metadata (tuples become lists)."""
    return json.loads(json.dumps(value))


def load_iddpm(path: str | os.PathLike, *, dtype: Any = jnp.float32, **flags: Any) -> Pretrained:
    """Load an improved-diffusion checkpoint as a :class:`~mmh_jax.models.Pretrained`.

    The flags are improved-diffusion's command-line flags with its defaults
    (``model_and_diffusion_defaults()``), so a published run's ``MODEL_FLAGS`` and
    ``DIFFUSION_FLAGS`` carry over, e.g. for the CIFAR-10 ``L_hybrid`` model
    ``load_iddpm("cifar10_uncond_50M_500K.pt", image_size=32, num_channels=128,
    num_res_blocks=3, learn_sigma=True, dropout=0.3, diffusion_steps=4000,
    noise_schedule="cosine")``. Model flags: see :meth:`IDDPMUNet.from_flags`. Diffusion
    flags: ``diffusion_steps``, ``noise_schedule`` (see :func:`iddpm_schedule`),
    ``rescale_timesteps`` (default True: the network sees step ``i`` as ``i * 1000 / T``),
    ``predict_xstart`` (must be False: only epsilon prediction is supported). The
    sampling/training flags ``sigma_small``, ``timestep_respacing``, ``use_kl`` and
    ``rescale_learned_sigmas`` are accepted and do not change the network or its score.

    Args:
        path: a PyTorch state dict saved by improved-diffusion (``.pt``, read with
            ``weights_only=True``), the same as ``.safetensors``, or a ``.safetensors`` file
            written by :func:`mmh_jax.convert.save_params` with metadata
            ``{"architecture": "iddpm", "flags": {...}}`` (the flags of this function; they
            are the defaults for the call, which needs no torch).
        dtype: compute dtype of the network's torso (parameters stay float32).
        **flags: improved-diffusion flags.

    Returns:
        The module, its float32 parameters, the schedule, and ``score_fn(x_t, t)`` for
        continuous ``t`` in ``(0, 1]`` (``t = i / T`` is 1-based step ``i``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TypeError: an unknown flag name.
        ValueError: a flag value is invalid, unsupported, or contradicts the file's metadata.
        ConversionError: the file is unreadable or refused, or its weights do not match the
            flags (listing the mismatching keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"improved-diffusion checkpoint {str(path)!r} does not exist")
    saved_params = None
    if path.suffix == ".safetensors":
        try:
            saved_params, metadata = load_params(path)
        except ConversionError:  # not written by save_params: read as a state dict below
            metadata = {}
        if "architecture" not in metadata:
            saved_params = None
        elif metadata["architecture"] != "iddpm":
            raise ConversionError(
                f"{str(path)!r} holds a {metadata['architecture']!r} model, "
                f"not an improved-diffusion ('iddpm') one"
            )
        else:
            saved = metadata.get("flags", {})
            for name, value in flags.items():
                if name in saved and _normalised(value) != saved[name]:
                    raise ValueError(
                        f"flag {name}={value!r} contradicts {name}={saved[name]!r} "
                        f"stored in {str(path)!r}"
                    )
            flags = {**saved, **flags}
    unknown = sorted(set(flags) - set(MODEL_FLAGS) - set(DIFFUSION_FLAGS))
    if unknown:
        raise TypeError(
            f"unknown improved-diffusion flag(s) {unknown}; known flags: "
            f"{sorted(MODEL_FLAGS) + sorted(DIFFUSION_FLAGS)}"
        )
    flags = {**MODEL_FLAGS, **DIFFUSION_FLAGS, **flags}
    for name in ("rescale_timesteps", "predict_xstart"):
        if not isinstance(flags[name], bool):
            raise ValueError(f"{name} must be True or False, got {flags[name]!r}")
    if flags["predict_xstart"]:
        raise ValueError("predict_xstart=True: only epsilon-prediction models are supported")
    module = IDDPMUNet.from_flags(**{name: flags[name] for name in MODEL_FLAGS}, dtype=dtype)
    schedule = iddpm_schedule(flags["diffusion_steps"], flags["noise_schedule"])
    source = repr(str(path))
    if saved_params is None:
        state_dict = read_state_dict(path)  # an unreadable file is reported as such
        try:
            params = convert_iddpm(state_dict, module, source=source)
        except ConversionError as err:
            raise ConversionError(
                f"{err}\n(a plain improved-diffusion state dict needs the flags it was trained "
                "with; `mmh-jax convert iddpm CHECKPOINT -o OUT.safetensors --image-size ...` "
                "takes them (see its --help) and writes a file that needs none)"
            ) from None
    else:
        params = check_params(saved_params, iddpm_expected_params(module), source=source)
    params = jax.tree.map(jnp.asarray, params)
    scale = 1000.0 / schedule.num_timesteps if flags["rescale_timesteps"] else 1.0
    score_fn = eps_score_fn(module, params, schedule, timestep_scale=scale)
    return Pretrained(module, params, schedule, score_fn)
