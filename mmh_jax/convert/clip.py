"""Strict conversion of transformers CLIP state dicts into Flax parameters: ``CLIPTextModel``,
``CLIPVisionModel`` and the two-tower ``CLIPModel``.

The text tower's rename table is built from the module's config: one entry per PyTorch parameter of
``transformers.CLIPTextModel``. Its keys come in two layouts, and a checkpoint must use one
throughout: files written by transformers 4 (Stable Diffusion's ``text_encoder/`` folders)
prefix every key with ``text_model.``; transformers 5 dropped the prefix (its
``CLIPTextModel`` holds the layers directly, and its ``save_pretrained`` writes them so, while
its loader still reads the prefixed files). A Flax scope is the PyTorch module path without
the prefix and with every list index attached to its list
(``text_model.encoder.layers.0.self_attn.q_proj`` -> ``encoder/layers_0/self_attn/q_proj``).
Linear weights are transposed; embeddings, biases and LayerNorm weights are copied.

Checkpoints saved by older transformers (e.g. Stable Diffusion 1.x's ``text_encoder/``) also
hold the buffer ``text_model.embeddings.position_ids``; it is accepted, and dropped, only when
it is ``0 .. max_position_embeddings - 1``. The state dict of a whole ``CLIPModel`` (text and
vision towers) or of a ``CLIPTextModelWithProjection`` is refused with an error saying so.

The vision tower (:func:`convert_clip_vision`) follows the same rules with the prefix
``vision_model.``; the patch convolution (no bias) is laid out as a Flax ``Conv`` kernel and the
class token ``embeddings.class_embedding`` is copied. :func:`convert_clip` converts a whole
``CLIPModel`` (``text_model.*`` and ``vision_model.*`` into the scopes of those names, the
bias-free ``visual_projection`` and ``text_projection``, and ``logit_scale``).

This module does not import :mod:`mmh_jax.models` (which imports the converters): it reads
the attributes the module has and asks the module itself for its parameter shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    conv_kernel,
    convert_state_dict,
    identity,
    linear_kernel,
    require_attributes,
)

__all__ = [
    "PREFIX",
    "VISION_PREFIX",
    "clip_abstract_params",
    "clip_rename_table",
    "clip_text_abstract_params",
    "clip_text_rename_table",
    "clip_vision_abstract_params",
    "clip_vision_rename_table",
    "convert_clip",
    "convert_clip_text",
    "convert_clip_vision",
]

PREFIX = "text_model."
"""The key prefix of the text tower in transformers 4's files; transformers 5 writes the keys
without it."""
VISION_PREFIX = "vision_model."
"""The vision tower's key prefix (CLIPModel, CLIPVisionModelWithProjection, transformers 4's
CLIPVisionModel); transformers 5's CLIPVisionModel writes its keys without it."""
_POSITION_IDS = "embeddings.position_ids"  # after the prefix, if any
# Parameters of CLIPModel / CLIPTextModelWithProjection outside the text transformer.
_PROJECTION_KEYS = ("text_projection.weight", "text_projection.bias")
_CLIP_MODEL_KEYS = ("visual_projection.weight", "logit_scale")


class _TextEncoder(Protocol):
    """What the converter reads of a ``mmh_jax.models.clip.CLIPTextModel``."""

    num_hidden_layers: int
    max_position_embeddings: int
    param_dtype: Any

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any: ...


def _require_text_encoder(module: Any) -> None:
    require_attributes(
        module,
        ("num_hidden_layers", "max_position_embeddings", "param_dtype", "init"),
        "CLIPTextModel",
    )


def _adder(table: dict[str, Rename], prefix: str, scope: tuple[str, ...] = ()):
    """``add(torch module, flax scope, weight name, transform)``: the ``.weight`` entry and,
    unless the weight is an embedding or ``bias=False``, the ``.bias`` entry of one module."""

    def add(
        torch_module: str, flax_scope: tuple[str, ...], weight: str, transform, *, bias: bool = True
    ) -> None:
        path = scope + flax_scope
        table[f"{prefix}{torch_module}.weight"] = Rename(path + (weight,), transform)
        if bias and weight != "embedding":
            table[f"{prefix}{torch_module}.bias"] = Rename(path + ("bias",), identity)

    return add


def _add_encoder(add, num_layers: int) -> None:
    """The entries of transformers' ``CLIPEncoder`` (shared by the text and vision towers)."""
    for i in range(num_layers):
        torch_layer, layer = f"encoder.layers.{i}", ("encoder", f"layers_{i}")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(
                f"{torch_layer}.self_attn.{name}",
                layer + ("self_attn", name),
                "kernel",
                linear_kernel,
            )
        for name in ("fc1", "fc2"):
            add(f"{torch_layer}.mlp.{name}", layer + ("mlp", name), "kernel", linear_kernel)
        for name in ("layer_norm1", "layer_norm2"):
            add(f"{torch_layer}.{name}", layer + (name,), "scale", identity)


def clip_text_rename_table(module: _TextEncoder, *, prefix: str = PREFIX) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a ``CLIPTextModel``.

    Args:
        module: the Flax ``CLIPTextModel`` whose config the checkpoint was trained with (only
            its ``num_hidden_layers`` is read).
        prefix: what every key starts with: ``"text_model."`` in files written by
            transformers 4, ``""`` in transformers 5's.

    Returns:
        One entry per parameter of ``transformers.CLIPTextModel`` with that config (the buffer
        ``position_ids`` is not a parameter and has no entry).
    """
    _require_text_encoder(module)
    if prefix not in (PREFIX, ""):
        raise ValueError(f"prefix must be {PREFIX!r} or '', got {prefix!r}")
    table: dict[str, Rename] = {}
    add = _adder(table, prefix)
    for name in ("token_embedding", "position_embedding"):
        add(f"embeddings.{name}", ("embeddings", name), "embedding", identity)
    _add_encoder(add, module.num_hidden_layers)
    add("final_layer_norm", ("final_layer_norm",), "scale", identity)
    return table


def clip_text_abstract_params(module: _TextEncoder) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them.

    Args:
        module: the Flax ``CLIPTextModel``.

    Returns:
        The params tree with ``jax.ShapeDtypeStruct`` leaves.
    """
    _require_text_encoder(module)
    ids = jnp.zeros((1, 1), jnp.int32)
    return abstract_params(lambda key: module.init(key, ids)["params"])


def _checkpoint_kind(keys: set[str]) -> str | None:
    """A description of the checkpoint if it is a known relative of ``CLIPTextModel``."""
    if any(k.startswith("vision_model.") for k in keys) or keys & set(_CLIP_MODEL_KEYS):
        return (
            "a CLIPModel (text and vision towers) checkpoint; convert only its text tower, "
            "the 'text_model.*' keys (and load a CLIPTextModel config, the CLIPModel "
            "config's text_config)"
        )
    if keys & set(_PROJECTION_KEYS):
        return (
            "a CLIPTextModelWithProjection checkpoint (it has 'text_projection.weight'); "
            "this port is CLIPTextModel, without the projection"
        )
    return None


def _key_prefix(keys: set[str]) -> str:
    """The layout of a checkpoint: ``PREFIX`` if any key has it (transformers 4), else ``""``."""
    return PREFIX if not keys or any(k.startswith(PREFIX) for k in keys) else ""


def _drop_position_ids(
    state_dict: Mapping[str, Any], key: str, n: int, what: str, source: str
) -> Mapping[str, Any]:
    """``state_dict`` without the ``position_ids`` buffer ``key``, after checking it is
    ``arange(n)`` of shape ``[1, n]`` (``what`` names ``n`` in the error)."""
    if key not in state_dict:
        return state_dict
    value = np.asarray(state_dict[key])
    expected = np.arange(n)[None]
    if value.shape != expected.shape or not np.array_equal(value, expected):
        shown = np.array2string(value.ravel()[:8], separator=", ")
        raise ConversionError(
            f"{source}: the buffer {key} must be 0 .. {n - 1} ({what}) with shape "
            f"{expected.shape}; got shape {value.shape} and values {shown}"
            f"{' ...' if value.size > 8 else ''} (transformers ignores the stored buffer; "
            f"remove the key to use positions 0 .. n-1 as it does)"
        )
    return {k: v for k, v in state_dict.items() if k != key}


def convert_clip_text(
    state_dict: Mapping[str, Any], module: _TextEncoder, *, source: str = "state dict"
) -> dict:
    """Convert a transformers ``CLIPTextModel`` state dict into ``module``'s parameters, strictly.

    Args:
        state_dict: ``{torch key: array}``, e.g. from :func:`mmh_jax.convert.read_state_dict`
            of a ``text_encoder/`` folder's weights: all keys prefixed ``text_model.``
            (transformers 4's files) if any is, else none (transformers 5's). The buffer
            ``(text_model.)embeddings.position_ids`` may be present if it is
            ``arange(max_position_embeddings)`` of shape ``[1, max_position_embeddings]``.
        module: the Flax ``CLIPTextModel`` built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key; for the
            ``position_ids`` buffer if it is not ``0 .. max_position_embeddings - 1``; saying
            what the checkpoint looks like if it is a ``CLIPModel``'s or a
            ``CLIPTextModelWithProjection``'s.
    """
    _require_text_encoder(module)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of torch keys to arrays, got {type(state_dict).__name__}"
        )
    prefix = _key_prefix(set(state_dict))
    table = clip_text_rename_table(module, prefix=prefix)
    expected = clip_text_abstract_params(module)
    try:
        state_dict = _drop_position_ids(
            state_dict,
            prefix + _POSITION_IDS,
            module.max_position_embeddings,
            "max_position_embeddings",
            source,
        )
        return convert_state_dict(
            state_dict, table, expected, source=source, dtype=module.param_dtype
        )
    except ConversionError as err:
        kind = _checkpoint_kind(set(state_dict))
        if kind is None:
            raise
        raise ConversionError(f"{source} looks like {kind}.\n{err}") from err


# --- the vision tower and the two-tower CLIPModel ---------------------------------------------


class _VisionEncoder(Protocol):
    """What the converter reads of a ``mmh_jax.models.clip.CLIPVisionModel``."""

    num_hidden_layers: int
    num_channels: int
    image_size: int
    patch_size: int
    param_dtype: Any

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any: ...


class _TwoTowers(Protocol):
    """What the converter reads of a ``mmh_jax.models.clip.CLIPModel``."""

    text_model: _TextEncoder
    vision_model: _VisionEncoder
    param_dtype: Any

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any: ...


_VISION_ATTRIBUTES = (
    "num_hidden_layers",
    "num_channels",
    "image_size",
    "patch_size",
    "param_dtype",
    "init",
)
_VISION_HEAD_KEYS = ("visual_projection.weight", "logit_scale")


def _require_vision_encoder(module: Any) -> None:
    require_attributes(module, _VISION_ATTRIBUTES, "CLIPVisionModel")


def _require_clip_model(module: Any) -> None:
    require_attributes(module, ("text_model", "vision_model", "param_dtype", "init"), "CLIPModel")
    _require_text_encoder(module.text_model)
    _require_vision_encoder(module.vision_model)


def _num_positions(module: _VisionEncoder) -> int:
    return (module.image_size // module.patch_size) ** 2 + 1


def _add_vision(add, num_layers: int) -> None:
    add(
        "embeddings.patch_embedding",
        ("embeddings", "patch_embedding"),
        "kernel",
        conv_kernel,
        bias=False,
    )
    add(
        "embeddings.position_embedding", ("embeddings", "position_embedding"), "embedding", identity
    )
    add("pre_layrnorm", ("pre_layrnorm",), "scale", identity)
    _add_encoder(add, num_layers)
    add("post_layernorm", ("post_layernorm",), "scale", identity)


def clip_vision_rename_table(
    module: _VisionEncoder, *, prefix: str = VISION_PREFIX
) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a ``CLIPVisionModel``.

    Args:
        module: the Flax ``CLIPVisionModel`` (its ``num_hidden_layers`` is read).
        prefix: ``"vision_model."`` (``CLIPModel``, transformers 4's ``CLIPVisionModel``) or
            ``""`` (transformers 5's ``CLIPVisionModel``).

    Returns:
        One entry per parameter of transformers' ``CLIPVisionModel`` (the class token is
        ``embeddings.class_embedding``; the patch convolution has no bias; the buffer
        ``position_ids`` has no entry).
    """
    _require_vision_encoder(module)
    if prefix not in (VISION_PREFIX, ""):
        raise ValueError(f"prefix must be {VISION_PREFIX!r} or '', got {prefix!r}")
    table = {
        f"{prefix}embeddings.class_embedding": Rename(("embeddings", "class_embedding"), identity)
    }
    _add_vision(_adder(table, prefix), module.num_hidden_layers)
    return table


def _vision_pixels(module: _VisionEncoder):
    return jnp.zeros((1, module.num_channels, module.image_size, module.image_size), jnp.float32)


def clip_vision_abstract_params(module: _VisionEncoder) -> PyTree:
    """Shapes and dtypes of a ``CLIPVisionModel``'s parameters, without computing them."""
    _require_vision_encoder(module)
    pixels = _vision_pixels(module)
    return abstract_params(lambda key: module.init(key, pixels)["params"])


def _check_mapping(state_dict: Any) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of torch keys to arrays, got {type(state_dict).__name__}"
        )


def convert_clip_vision(
    state_dict: Mapping[str, Any], module: _VisionEncoder, *, source: str = "state dict"
) -> dict:
    """Convert a transformers ``CLIPVisionModel`` state dict into ``module``'s parameters.

    Args:
        state_dict: ``{torch key: array}``, all keys prefixed ``vision_model.`` if any is
            (transformers 4), else none (transformers 5). The buffer
            ``(vision_model.)embeddings.position_ids`` may be present if it is
            ``arange(1 + patches)``.
        module: the Flax ``CLIPVisionModel`` built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key; saying so when
            the checkpoint is a ``CLIPModel``'s or a ``CLIPVisionModelWithProjection``'s (use
            :func:`convert_clip` for a ``CLIPModel``).
    """
    _require_vision_encoder(module)
    _check_mapping(state_dict)
    keys = set(state_dict)
    prefix = VISION_PREFIX if not keys or any(k.startswith(VISION_PREFIX) for k in keys) else ""
    try:
        state_dict = _drop_position_ids(
            state_dict, prefix + _POSITION_IDS, _num_positions(module), "1 + patches", source
        )
        return convert_state_dict(
            state_dict,
            clip_vision_rename_table(module, prefix=prefix),
            clip_vision_abstract_params(module),
            source=source,
            dtype=module.param_dtype,
        )
    except ConversionError as err:
        if any(k.startswith(PREFIX) for k in keys):
            kind = "a CLIPModel (text and vision towers) checkpoint; use convert_clip"
        elif keys & set(_VISION_HEAD_KEYS):
            kind = (
                "a CLIPVisionModelWithProjection checkpoint (it has "
                "'visual_projection.weight'); this port is CLIPVisionModel"
            )
        else:
            raise
        raise ConversionError(f"{source} looks like {kind}.\n{err}") from err


def clip_rename_table(module: _TwoTowers) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a ``CLIPModel``.

    Args:
        module: the Flax ``CLIPModel`` (its towers' ``num_hidden_layers`` are read).

    Returns:
        One entry per parameter of transformers' ``CLIPModel``: ``text_model.*`` into scope
        ``text_model``, ``vision_model.*`` into ``vision_model``, the bias-free
        ``visual_projection`` and ``text_projection``, and the scalar ``logit_scale``.
    """
    _require_clip_model(module)
    table: dict[str, Rename] = {
        f"{PREFIX}{k}": Rename(("text_model",) + rule.path, rule.transform)
        for k, rule in clip_text_rename_table(module.text_model, prefix="").items()
    }
    table.update(
        {
            f"{VISION_PREFIX}{k}": Rename(("vision_model",) + rule.path, rule.transform)
            for k, rule in clip_vision_rename_table(module.vision_model, prefix="").items()
        }
    )
    add = _adder(table, "")
    for name in ("visual_projection", "text_projection"):
        add(name, (name,), "kernel", linear_kernel, bias=False)
    table["logit_scale"] = Rename(("logit_scale",), identity)
    return table


def clip_abstract_params(module: _TwoTowers) -> PyTree:
    """Shapes and dtypes of a ``CLIPModel``'s parameters, without computing them."""
    _require_clip_model(module)
    pixels, ids = _vision_pixels(module.vision_model), jnp.zeros((1, 1), jnp.int32)
    return abstract_params(lambda key: module.init(key, pixels, ids)["params"])


def convert_clip(
    state_dict: Mapping[str, Any], module: _TwoTowers, *, source: str = "state dict"
) -> dict:
    """Convert a transformers ``CLIPModel`` state dict into ``module``'s parameters, strictly.

    Args:
        state_dict: ``{torch key: array}`` with the keys ``text_model.*``,
            ``vision_model.*``, ``visual_projection.weight``, ``text_projection.weight`` and
            ``logit_scale`` (e.g. from :func:`mmh_jax.convert.read_state_dict` of a
            ``CLIPModel`` folder's weights). The towers' ``embeddings.position_ids`` buffers
            (older files) are accepted, and dropped, when they are ``0 .. n - 1``.
        module: the Flax ``CLIPModel`` built from the checkpoint's config.
        source: the file name, used in error messages.

    Returns:
        The params tree (numpy leaves of ``module.param_dtype``).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key, saying what
            the checkpoint looks like when one tower is absent altogether.
    """
    _require_clip_model(module)
    _check_mapping(state_dict)
    keys = set(state_dict)
    try:
        state_dict = _drop_position_ids(
            state_dict,
            PREFIX + _POSITION_IDS,
            module.text_model.max_position_embeddings,
            "text max_position_embeddings",
            source,
        )
        state_dict = _drop_position_ids(
            state_dict,
            VISION_PREFIX + _POSITION_IDS,
            _num_positions(module.vision_model),
            "1 + vision patches",
            source,
        )
        return convert_state_dict(
            state_dict,
            clip_rename_table(module),
            clip_abstract_params(module),
            source=source,
            dtype=module.param_dtype,
        )
    except ConversionError as err:
        if not any(k.startswith(VISION_PREFIX) for k in keys):
            kind = "a text-only checkpoint (no 'vision_model.*' keys), not a CLIPModel's"
        elif not any(k.startswith(PREFIX) for k in keys):
            kind = "a vision-only checkpoint (no 'text_model.*' keys), not a CLIPModel's"
        else:
            raise
        raise ConversionError(f"{source} looks like {kind}.\n{err}") from err
