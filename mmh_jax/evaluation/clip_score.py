"""CLIP score (torchmetrics' definition) with the Flax ``CLIPModel`` of :mod:`mmh_jax.models.clip`.

``clip_score(model, images, prompts)[i] = 100 * max(cos(image_emb_i, text_emb_i), 0)``, where the
embeddings are the projected CLIP features of image ``i`` and prompt ``i``. torchmetrics
returns the batch mean; :func:`clip_score` returns one score per pair (take ``.mean()``).

Images are preprocessed as the model folder's ``preprocessor_config.json`` says, reproducing
transformers' ``CLIPImageProcessor`` (its PIL path): bicubic resize (PIL's antialiased filter,
``a = -0.5``) of the shortest edge to ``size["shortest_edge"]`` (the long edge
``int(size * long / short)``), centre crop to ``crop_size``, ``rescale_factor`` (1/255) if
``do_rescale``, then ``(x - image_mean) / image_std``. uint8 images are rounded and clipped to
uint8 after each resize pass, as PIL does; float images are first mapped to the uint8 scale
``[0, 255]`` and resized without rounding.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from mmh_jax.convert import convert_clip, read_state_dict
from mmh_jax.models.clip import CLIPModel
from mmh_jax.models.stable_diffusion import tokenize

__all__ = ["CLIP", "clip_preprocess", "clip_score", "load_clip"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
# preprocessor_config.json keys that name the class or do not change the pixels of RGB images
_PROCESSOR_SKIP = (
    "image_processor_type",
    "feature_extractor_type",
    "processor_class",
    "do_convert_rgb",
    "_processor_class",
)
_PROCESSOR_KEYS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


class CLIP(NamedTuple):
    """A loaded CLIP model.

    Attributes:
        module: the Flax :class:`~mmh_jax.models.clip.CLIPModel`.
        params: its parameters.
        tokenizer: transformers' ``CLIPTokenizer`` of the folder.
        preprocessor: the checked image-processor settings (``do_resize``, ``size`` as
            ``{"shortest_edge": n}`` or ``{"height", "width"}``, ``do_center_crop``,
            ``crop_size`` ``{"height", "width"}``, ``do_rescale``, ``rescale_factor``,
            ``do_normalize``, ``image_mean``, ``image_std``).
    """

    module: CLIPModel
    params: PyTree
    tokenizer: Any
    preprocessor: dict


# --- loading ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist (expected a transformers CLIPModel folder)"
        )
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return value


def _size_dict(value: Any, key: str, source: str, *, square: bool) -> dict[str, int]:
    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if positive(value):  # old feature-extractor files: an int
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"} and positive(value["shortest_edge"]) and not square:
            return dict(value)
        if set(value) == {"height", "width"} and all(map(positive, value.values())):
            return dict(value)
    allowed = "{'height', 'width'}" if square else "{'shortest_edge'} or {'height', 'width'}"
    raise ValueError(
        f"{source}: {key}={value!r} is not supported; expected a positive int or "
        f"a dict with keys {allowed}"
    )


def _read_preprocessor(config: dict, source: str) -> dict:
    """The image-processor settings of a ``preprocessor_config.json``, checked strictly."""
    unknown = sorted(set(config) - set(_PROCESSOR_KEYS) - set(_PROCESSOR_SKIP))
    if unknown:
        raise ValueError(
            f"{source}: unknown image-processor keys {unknown} (this port "
            f"reproduces CLIPImageProcessor: {', '.join(_PROCESSOR_KEYS)})"
        )
    kind = config.get("image_processor_type", config.get("feature_extractor_type"))
    if kind is not None and not str(kind).startswith("CLIP"):
        raise ValueError(f"{source}: image processor {kind!r}, expected CLIPImageProcessor")
    out = {
        "do_resize": bool(config.get("do_resize", True)),
        "do_center_crop": bool(config.get("do_center_crop", True)),
        "do_rescale": bool(config.get("do_rescale", True)),
        "rescale_factor": float(config.get("rescale_factor", 1 / 255)),
        "do_normalize": bool(config.get("do_normalize", True)),
    }
    out["size"] = _size_dict(
        config.get("size", {"shortest_edge": 224}), "size", source, square=False
    )
    out["crop_size"] = _size_dict(
        config.get("crop_size", {"height": 224, "width": 224}), "crop_size", source, square=True
    )
    if config.get("resample", _BICUBIC) != _BICUBIC:
        raise ValueError(
            f"{source}: resample={config['resample']!r} is not supported; "
            f"expected {_BICUBIC} (bicubic)"
        )
    for key, default in (
        ("image_mean", (0.48145466, 0.4578275, 0.40821073)),
        ("image_std", (0.26862954, 0.26130258, 0.27577711)),
    ):
        value = np.asarray(config.get(key, default), np.float64).reshape(-1)
        if value.shape not in ((1,), (3,)) or (key == "image_std" and np.any(value <= 0)):
            raise ValueError(
                f"{source}: {key}={config.get(key)!r} is not supported; expected "
                "3 (or 1) numbers" + (", all positive" if key == "image_std" else "")
            )
        out[key] = tuple(float(v) for v in np.broadcast_to(value, (3,)))
    return out


def load_clip(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> CLIP:
    """Load a local transformers ``CLIPModel`` folder (as ``save_pretrained`` writes it).

    Args:
        path: the folder: ``config.json`` (``model_type`` ``"clip"``), ``model.safetensors``
            or ``pytorch_model.bin``, ``preprocessor_config.json`` and the tokenizer files
            (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``). Nothing is downloaded.
        dtype: the compute dtype of both towers; parameters stay float32 and the embeddings
            and scores are float32.

    Returns:
        :class:`CLIP` ``(module, params, tokenizer, preprocessor)``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the folder is not a ``CLIPModel``'s (e.g. a diffusers UNet's), or a config
            key is not supported.
        ConversionError: the weights do not match the config.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{str(root)!r} is not a folder (expected a transformers CLIPModel folder)"
        )
    config_file = root / "config.json"
    config = _read_json(config_file)
    if config.get("model_type") != "clip":
        found = (
            f"_class_name={config['_class_name']!r}"
            if "_class_name" in config
            else f"model_type={config.get('model_type')!r}"
        )
        raise ValueError(
            f"{str(config_file)!r} describes {found}, not a transformers CLIPModel "
            "(model_type 'clip'); give the folder of a CLIPModel"
        )
    try:
        module = CLIPModel.from_config(config, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(config_file)!r}: {err}") from None
    preprocessor_file = root / "preprocessor_config.json"
    preprocessor = _read_preprocessor(_read_json(preprocessor_file), repr(str(preprocessor_file)))
    crop = preprocessor["crop_size"]
    size = module.vision_model.image_size
    if preprocessor["do_center_crop"] and (crop["height"], crop["width"]) != (size, size):
        raise ValueError(
            f"{str(preprocessor_file)!r}: crop_size {crop} does not match the "
            f"vision tower's image_size={size}"
        )
    found = [root / name for name in _WEIGHTS if (root / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{str(root)!r} holds none of {', '.join(_WEIGHTS)}")
    params = convert_clip(read_state_dict(found[0]), module, source=repr(str(found[0])))
    if not (root / "tokenizer.json").is_file() and not (
        (root / "vocab.json").is_file() and (root / "merges.txt").is_file()
    ):
        raise FileNotFoundError(
            f"{str(root)!r}: no tokenizer (neither tokenizer.json nor vocab.json and merges.txt)"
        )
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root, local_files_only=True)
    return CLIP(module, params, tokenizer, preprocessor)


# --- preprocessing ------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PIL's antialiased bicubic resampling along one axis: the
    filter is widened by the downscaling factor and each row normalised over the input
    samples it covers."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    support = 2.0 * widen
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps - center + 0.5) / widen)
        weights[i, lo:hi] = w / w.sum()
    return weights


def _resize(x: np.ndarray, height: int, width: int, quantise: bool) -> np.ndarray:
    """Resize ``[b, h, w, c]`` (values on the uint8 scale): width pass, then height pass, each
    rounded and clipped to uint8 when ``quantise`` (PIL's order and rounding)."""

    def finish(y: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(y + 0.5), 0, 255) if quantise else y

    if x.shape[2] != width:
        x = finish(np.einsum("ow,bhwc->bhoc", _resize_matrix(x.shape[2], width), x))
    if x.shape[1] != height:
        x = finish(np.einsum("oh,bhwc->bowc", _resize_matrix(x.shape[1], height), x))
    return x


def _as_nhwc(images: Any, layout: str | None) -> tuple[np.ndarray, bool]:
    """``images`` as one ``[b, h, w, 3]`` array, and whether it was uint8."""
    if layout not in (None, "NHWC", "NCHW"):
        raise ValueError(f"layout must be None (infer), 'NHWC' or 'NCHW', got {layout!r}")
    if isinstance(images, (list, tuple)):
        items = [np.asarray(x) for x in images]
        if not items:
            raise ValueError("images is empty")
        for i, item in enumerate(items):
            if item.ndim != 3:
                raise ValueError(
                    f"images[{i}] must be one image [h, w, 3] or [3, h, w], got shape {item.shape}"
                )
    else:
        batch = np.asarray(images)
        if batch.ndim != 4:
            raise ValueError(
                f"images must be [b, h, w, 3] or [b, 3, h, w] (or a list of "
                f"images), got shape {batch.shape}"
            )
        items = list(batch)
    channels_first = []
    for i, item in enumerate(items):
        if layout is not None:
            first = layout == "NCHW"
        elif item.shape[-1] == 3 and item.shape[0] != 3:
            first = False
        elif item.shape[0] == 3 and item.shape[-1] != 3:
            first = True
        elif item.shape[0] == 3:
            raise ValueError(
                f"images[{i}] has shape {item.shape}: both axis 0 and the last "
                "axis could be channels; pass layout='NHWC' or 'NCHW'"
            )
        else:
            raise ValueError(
                f"images[{i}] has shape {item.shape}: expected 3 (RGB) channels first or last"
            )
        if (item.shape[0] if first else item.shape[-1]) != 3:
            raise ValueError(
                f"images[{i}] has shape {item.shape}, not 3 (RGB) channels in layout {layout}"
            )
        channels_first.append(first)
    items = [np.moveaxis(x, 0, -1) if first else x for x, first in zip(items, channels_first)]
    for i, item in enumerate(items):
        if item.shape != items[0].shape:
            raise ValueError(
                f"images[{i}] is {item.shape[0]}x{item.shape[1]} but images[0] is "
                f"{items[0].shape[0]}x{items[0].shape[1]} (height x width); "
                "clip_score takes one image size per call"
            )
        if item.dtype != items[0].dtype:
            raise TypeError(f"images[{i}] has dtype {item.dtype} but images[0] {items[0].dtype}")
    return np.stack(items), items[0].dtype == np.uint8


def clip_preprocess(
    preprocessor: dict,
    images: Any,
    *,
    value_range: tuple[float, float] | None = None,
    layout: Literal["NHWC", "NCHW"] | None = None,
) -> Float[np.ndarray, "b 3 h w"]:
    """The model's pixel values ``[b, 3, crop, crop]`` (NCHW, float32) of ``images``.

    Args:
        preprocessor: :attr:`CLIP.preprocessor`.
        images: ``[b, h, w, 3]`` or ``[b, 3, h, w]``, or a list of ``[h, w, 3]`` /
            ``[3, h, w]`` images of one size: uint8 (0 .. 255), or floats in
            ``value_range``.
        value_range: ``(0, 1)`` or ``(-1, 1)``, required for float images (and refused for
            uint8 ones); values outside it are refused.
        layout: ``"NHWC"`` or ``"NCHW"``; ``None`` infers it from where the 3 channels are.

    Raises:
        TypeError: images neither uint8 nor floating point.
        ValueError: naming the offending image: a different size from ``images[0]``, not
            3 channels, an ambiguous layout, values outside ``value_range``; or a resized
            image smaller than ``crop_size``.
    """
    x, is_uint8 = _as_nhwc(images, layout)
    if is_uint8:
        if value_range is not None:
            raise ValueError("value_range is for float images; uint8 images are 0 .. 255")
        x = x.astype(np.float64)
    elif np.issubdtype(x.dtype, np.floating):
        if value_range is None or tuple(value_range) not in ((0, 1), (-1, 1)):
            raise ValueError(
                f"float images need value_range=(0, 1) or (-1, 1), got {value_range!r}"
            )
        lo, hi = value_range
        x = x.astype(np.float64)
        bad = np.flatnonzero(
            (x.min(axis=(1, 2, 3)) < lo)
            | (x.max(axis=(1, 2, 3)) > hi)
            | ~np.isfinite(x).all(axis=(1, 2, 3))
        )
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"images[{i}] has values in [{x[i].min()}, {x[i].max()}], outside "
                f"value_range={tuple(value_range)}"
            )
        x = (x - lo) / (hi - lo) * 255.0
    else:
        raise TypeError(f"images must be uint8 or floating point, got dtype {x.dtype}")
    p = preprocessor
    if p["do_resize"]:
        h, w = x.shape[1:3]
        if "shortest_edge" in p["size"]:
            short = p["size"]["shortest_edge"]
            if h <= w:
                h, w = short, int(short * w / h)
            else:
                h, w = int(short * h / w), short
        else:
            h, w = p["size"]["height"], p["size"]["width"]
        x = _resize(x, h, w, quantise=is_uint8)
    if p["do_center_crop"]:
        ch, cw = p["crop_size"]["height"], p["crop_size"]["width"]
        h, w = x.shape[1:3]
        if ch > h or cw > w:
            raise ValueError(
                f"the images are {h}x{w} after resizing, smaller than crop_size "
                f"{ch}x{cw} (padding is not supported)"
            )
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, top : top + ch, left : left + cw]
    if p["do_rescale"]:
        x = x * p["rescale_factor"]
    if p["do_normalize"]:
        x = (x - np.asarray(p["image_mean"])) / np.asarray(p["image_std"])
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32)


# --- the score ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _scores(module: CLIPModel, params: PyTree, pixels: Array, ids: Array) -> Array:
    image = module.apply({"params": params}, pixels, method="embed_images")
    text = module.apply({"params": params}, ids, method="embed_texts")
    return 100.0 * jnp.maximum(jnp.sum(image * text, axis=-1), 0.0)


def clip_score(
    model: CLIP,
    images: Any,
    prompts: str | Sequence[str],
    *,
    value_range: tuple[float, float] | None = None,
    layout: Literal["NHWC", "NCHW"] | None = None,
) -> Float[Array, "b"]:
    """torchmetrics' CLIP score of each image with its prompt: ``100 * max(cos, 0)``.

    Args:
        model: from :func:`load_clip`.
        images: ``b`` images as :func:`clip_preprocess` takes them (uint8, or floats in
            ``value_range`` (0, 1) or (-1, 1); NHWC or NCHW; one size).
        prompts: ``b`` strings (a single string scores a single image); prompts longer than
            the text tower's ``max_position_embeddings`` tokens are truncated with a warning.
        value_range: see :func:`clip_preprocess`.
        layout: see :func:`clip_preprocess`.

    Returns:
        ``[b]`` float32 scores in ``[0, 100]`` (torchmetrics reports their mean).

    Raises:
        ValueError: the numbers of images and prompts differ, or an image is refused by
            :func:`clip_preprocess`.
    """
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a CLIP from load_clip, got {type(model).__name__}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pixels = clip_preprocess(model.preprocessor, images, value_range=value_range, layout=layout)
    if len(prompts) != pixels.shape[0]:
        raise ValueError(
            f"got {pixels.shape[0]} images but {len(prompts)} prompts; "
            "clip_score pairs image i with prompt i"
        )
    ids = tokenize(model.tokenizer, prompts, model.module.text_model.max_position_embeddings)
    return _scores(model.module, model.params, jnp.asarray(pixels), jnp.asarray(ids))
