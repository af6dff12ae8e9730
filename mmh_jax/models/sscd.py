"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) in Flax, with their preprocessing.

SSCD embeds an image as an L2-normalised descriptor; two images are copies when the inner
product of their descriptors is high (Somepalli et al. 2023 count a generated image as a copy
of a training image at similarity > 0.5). The released models:

* ``sscd_disc_mixup``: torchvision ResNet-50 trunk, GeM pooling (p = 3), Linear 2048 -> 512,
  L2 normalisation (``arch="resnet50", embedding_dim=512``);
* ``sscd_disc_large``: ResNeXt-101 32x4d trunk, 1024-d (``arch="resnext101_32x4d",
  embedding_dim=1024``), the model the memorization papers use.

The port takes NCHW input (as the PyTorch model) and computes in NHWC. Batch norm is the
eval-mode fixed affine ``(x - mean) / sqrt(var + 1e-5) * scale + bias`` with all four vectors
in ``params``. :func:`load_sscd` reads a ``.torchvision.pt`` state dict (``torch.load`` with
``weights_only=True``), a ``.torchscript.pt`` archive (read as data by
:func:`mmh_jax.convert.torchscript.read_torchscript_archive`; its code is never run), or a
``.safetensors`` file written by :func:`save_sscd`.
"""

from __future__ import annotations

import os
import zipfile
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
from mmh_jax.convert.sscd import convert_sscd, sscd_abstract_params
from mmh_jax.convert.torchscript import is_torchscript_archive, read_torchscript_archive

__all__ = ["SSCD", "PretrainedSSCD", "sscd_preprocess", "sscd_similarity", "load_sscd", "save_sscd"]

Arch = Literal["resnet50", "resnext101_32x4d"]
#: arch -> (bottlenecks per stage, groups of the 3x3 convolutions, width per group)
_ARCHS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
}
_ARCHITECTURE = "sscd"
_BN_EPS = 1e-5


class _FrozenBatchNorm(nn.Module):
    """Eval-mode ``torch.nn.BatchNorm2d`` over the last axis: a fixed per-channel affine."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        mult = scale * jax.lax.rsqrt(var + _BN_EPS)
        return (x * mult.astype(x.dtype) + (bias - mean * mult).astype(x.dtype)).astype(self.dtype)


def _conv(features: int, k: int, stride: int, name: str, dtype: Any, groups: int = 1) -> nn.Conv:
    pad = k // 2
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        name=name,
        dtype=dtype,
    )


class _Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride on the 3x3 convolution)."""

    planes: int
    stride: int
    groups: int
    width_per_group: int
    project: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out = nn.relu(
            _FrozenBatchNorm(self.dtype, name="bn1")(_conv(width, 1, 1, "conv1", self.dtype)(x))
        )
        out = nn.relu(
            _FrozenBatchNorm(self.dtype, name="bn2")(
                _conv(width, 3, self.stride, "conv2", self.dtype, self.groups)(out)
            )
        )
        out = _FrozenBatchNorm(self.dtype, name="bn3")(
            _conv(self.planes * 4, 1, 1, "conv3", self.dtype)(out)
        )
        if self.project:
            x = _FrozenBatchNorm(self.dtype, name="downsample_bn")(
                _conv(self.planes * 4, 1, self.stride, "downsample_conv", self.dtype)(x)
            )
        return nn.relu(out + x)


class SSCD(nn.Module):
    """The SSCD descriptor: ResNet trunk, GeM pooling, Linear, L2 normalisation.

    Attributes:
        arch: ``"resnet50"`` (``sscd_disc_mixup``) or ``"resnext101_32x4d"``
            (``sscd_disc_large``).
        embedding_dim: descriptor size (512 for ``sscd_disc_mixup``, 1024 for
            ``sscd_disc_large``).
        gem_p: the GeM exponent (3 in every release).
        dtype: compute dtype of the trunk; pooling, head and normalisation run in float32.

    ``module.apply({"params": params}, x)`` with ``x`` of shape ``[b, 3, h, w]`` (preprocessed
    by :func:`sscd_preprocess`) returns float32 descriptors ``[b, embedding_dim]`` of unit norm.
    """

    arch: Arch = "resnet50"
    embedding_dim: int = 512
    gem_p: float = 3.0
    dtype: Any = jnp.float32

    @property
    def block_counts(self) -> tuple[int, ...]:
        """Bottlenecks per stage (read by :mod:`mmh_jax.convert.sscd`)."""
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {self.arch!r}")
        return _ARCHS[self.arch][0]

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable fields that rebuild the module (dtype aside)."""
        return {"arch": self.arch, "embedding_dim": self.embedding_dim, "gem_p": self.gem_p}

    @nn.compact
    def __call__(self, x: Float[ArrayLike, "b 3 h w"]) -> Float[Array, "b d"]:
        counts = self.block_counts
        _, groups, width_per_group = _ARCHS[self.arch]
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [b, 3, h, w], got {x.shape}")
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)
        h = nn.relu(
            _FrozenBatchNorm(self.dtype, name="bn1")(_conv(64, 7, 2, "conv1", self.dtype)(h))
        )
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (count, planes) in enumerate(zip(counts, (64, 128, 256, 512)), start=1):
            for j in range(count):
                h = _Bottleneck(
                    planes,
                    2 if (j == 0 and i > 1) else 1,
                    groups,
                    width_per_group,
                    project=(j == 0),
                    dtype=self.dtype,
                    name=f"layer{i}_{j}",
                )(h)
        h = h.astype(jnp.float32)
        p = self.gem_p
        pooled = jnp.mean(jnp.maximum(h, 1e-6) ** p, axis=(1, 2)) ** (1.0 / p)
        e = nn.Dense(self.embedding_dim, name="fc")(pooled)
        norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
        return e / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps


# --- Preprocessing ------------------------------------------------------------------------

PreprocessMode = Literal["memorization", "sscd_short_side_288", "sscd_320"]
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_short_side(x: Array, size: int) -> Array:
    """torchvision ``Resize(size)``: the short side to ``size``, the long one to
    ``int(size * long / short)``; bilinear with antialiasing."""
    _, h, w, c = x.shape
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    if new == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], *new, c), "bilinear", antialias=True)


def _center_crop(x: Array, size: int) -> Array:
    """torchvision ``CenterCrop(size)`` (offsets rounded as torchvision rounds them)."""
    _, h, w, _ = x.shape
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[:, top : top + size, left : left + size]


def sscd_preprocess(
    images: ArrayLike, *, mode: PreprocessMode = "memorization"
) -> Float[Array, "b 3 h w"]:
    """Images -> the normalised NCHW float32 input of :class:`SSCD`.

    Modes:

    * ``"memorization"`` (default): resize the short side to 256, centre-crop 224x224,
      ``(x - 0.5) / 0.5``. This is what Somepalli et al. (2023) and Wen et al. use with
      ``sscd_disc_large`` to find replicated training images, so similarity thresholds and
      retrieval numbers from those papers (e.g. "copy" at > 0.5) are comparable only with it.
    * ``"sscd_short_side_288"``: the SSCD authors' recommendation: resize the short side to
      288 (aspect kept), ImageNet mean/std.
    * ``"sscd_320"``: the authors' fixed-size alternative: resize to 320x320 (aspect not kept),
      ImageNet mean/std.

    Resizing is bilinear with antialiasing (``jax.image.resize``), close to but not bit-exact
    with torchvision's PIL resize.

    Args:
        images: ``[b, h, w, 3]`` (channels last, as decoded), ``uint8`` in 0..255 or float in
            [0, 1]; all images of a batch share one size.
        mode: one of the above.

    Returns:
        float32 ``[b, 3, H, W]`` (224x224; 288 by ``int(288 * long / short)``; 320x320).
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape [b, h, w, 3], got {x.shape}")
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if mode == "memorization":
        x = _center_crop(_resize_short_side(x, 256), 224)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif mode == "sscd_short_side_288":
        x = _resize_short_side(x, 288)
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    elif mode == "sscd_320":
        x = jax.image.resize(x, (x.shape[0], 320, 320, 3), "bilinear", antialias=True)
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    else:
        raise ValueError(
            f"mode must be 'memorization', 'sscd_short_side_288' or 'sscd_320', got {mode!r}"
        )
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


# --- Loading and saving -------------------------------------------------------------------


class PretrainedSSCD(NamedTuple):
    """A loaded SSCD model.

    Attributes:
        module: the Flax :class:`SSCD`.
        params: its parameters (float32).
        embed: ``embed(x [b, 3, h, w]) -> [b, d]``, the jitted forward pass over ``params``.
    """

    module: SSCD
    params: Any
    embed: Partial


def _embed_fn(module: SSCD, params: Any) -> Partial:
    apply = jax.jit(module.apply)
    return Partial(lambda p, x: apply({"params": p}, x), params)


def load_sscd(
    path: str | os.PathLike,
    *,
    arch: Arch = "resnext101_32x4d",
    embedding_dim: int | None = None,
    dtype: Any = jnp.float32,
) -> PretrainedSSCD:
    """Load SSCD from a local file, never running code from it.

    Args:
        path: ``*.torchvision.pt`` (a torchvision-layout state dict, read with
            ``torch.load(weights_only=True)``; needs torch), ``*.torchscript.pt`` (a TorchScript
            archive, read as data: no torch needed, nothing run), a plain state dict as
            ``.safetensors``, or a ``.safetensors`` file written by :func:`save_sscd` (which
            carries its own architecture; ``arch`` is then ignored).
        arch: the trunk of a state dict or archive: ``"resnet50"`` (``sscd_disc_mixup``) or
            ``"resnext101_32x4d"`` (``sscd_disc_large``).
        embedding_dim: descriptor size; by default read off the head's weight.
        dtype: compute dtype of the trunk (parameters stay float32).

    Returns:
        ``PretrainedSSCD(module, params, embed)``.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: a file of another kind or model (a CLIP or UNet state dict, a zip that
            is neither a TorchScript archive nor a ``torch.save`` file, a converted file of
            another architecture), naming the file and listing mismatching keys; a TorchScript
            archive naming a global outside the reader's allow-list
            (:class:`~mmh_jax.convert.safe_pickle.UnsafePickleError`).
    """
    path = require_file(path, "SSCD checkpoint")
    source = repr(str(path))
    stored = None
    if path.suffix == ".safetensors":
        stored, metadata = load_params(path)
        if "architecture" in metadata:
            if metadata["architecture"] != _ARCHITECTURE:
                raise ConversionError(
                    f"{source} holds a {metadata['architecture']!r} model, not SSCD"
                )
            config = metadata.get("config") or {}
            try:
                module = SSCD(**config, dtype=dtype)
                module.block_counts  # noqa: B018 (validates arch)
            except (TypeError, ValueError) as err:
                raise ConversionError(f"{source}: bad SSCD config {config!r}: {err}") from None
            params = check_params(stored, sscd_abstract_params(module), source=source)
            params = jax.tree.map(jnp.asarray, params)
            return PretrainedSSCD(module, params, _embed_fn(module, params))
        state_dict = read_state_dict(path)
    elif zipfile.is_zipfile(path) and is_torchscript_archive(path):
        state_dict = read_torchscript_archive(path)
    else:
        state_dict = read_state_dict(path)
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if embedding_dim is None:
        head = next(
            (state_dict[k] for k in ("fc.weight", "embeddings.weight") if k in state_dict), None
        )
        if head is None or np.ndim(head) != 2:
            shown = ", ".join(sorted(state_dict)[:8])
            raise ConversionError(
                f"{source} is not an SSCD checkpoint: no fc.weight or "
                f"embeddings.weight head (keys: {shown}, ...)"
            )
        embedding_dim = int(np.shape(head)[0])
    module = SSCD(arch=arch, embedding_dim=embedding_dim, dtype=dtype)
    params = jax.tree.map(jnp.asarray, convert_sscd(state_dict, module, source=source))
    return PretrainedSSCD(module, params, _embed_fn(module, params))


def sscd_similarity(
    model: PretrainedSSCD,
    images_a: ArrayLike,
    images_b: ArrayLike,
    *,
    mode: PreprocessMode = "memorization",
    batch_size: int = 32,
) -> np.ndarray:
    """The memorization papers' image similarity: the inner product of the SSCD descriptors of
    image ``i`` of two batches (Pizzi et al. 2022; Somepalli et al. count a copy above 0.5).
    ``Partial(sscd_similarity, model)`` is the ``similarity`` scorer of
    :func:`mmh_jax.memorization.mitigate`.

    Args:
        model: from :func:`load_sscd`.
        images_a, images_b: ``[b, h, w, 3]`` batches as :func:`sscd_preprocess` takes them
            (each batch of one size; the two may differ).
        mode: the preprocessing (:func:`sscd_preprocess`; ``"memorization"``: resize 256,
            centre crop 224, as Somepalli et al. and Wen et al.).
        batch_size: images per SSCD call.

    Returns:
        float64 ``[b]``: ``<embed(a_i), embed(b_i)>``.

    Raises:
        ValueError: batches of different lengths.
    """
    if len(images_a) != len(images_b):
        raise ValueError(
            f"sscd_similarity pairs image i of two batches: got {len(images_a)} "
            f"and {len(images_b)} images"
        )

    def embed(images: ArrayLike) -> np.ndarray:
        x = np.asarray(images)
        return np.concatenate(
            [
                np.asarray(model.embed(sscd_preprocess(x[i : i + batch_size], mode=mode)))
                for i in range(0, len(x), batch_size)
            ]
        ).astype(np.float64)

    return np.sum(embed(images_a) * embed(images_b), axis=-1)


def save_sscd(path: str | os.PathLike, model: PretrainedSSCD) -> Path:
    """Write a loaded SSCD model to one ``.safetensors`` file that :func:`load_sscd` reads back
    without torch (metadata ``{"architecture": "sscd", "config": {...}}``).

    Args:
        path: the target file; must end in ``.safetensors``.
        model: what :func:`load_sscd` returned (or ``PretrainedSSCD(module, params, ...)``).

    Returns:
        The path written.
    """
    if not isinstance(model.module, SSCD):
        raise TypeError(f"model.module must be an SSCD, got {type(model.module).__name__}")
    metadata = {"architecture": _ARCHITECTURE, "config": model.module.config()}
    return save_params(path, jax.device_get(model.params), metadata=metadata)
