"""Strict conversion of transformers ``CLIPTextModel`` state dicts into Flax parameters.

The rename table is built from the module's config: one entry per PyTorch parameter of
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

This module does not import :mod:`mmh_jax.models` (which imports the converters): it reads
the attributes the module has and asks the module itself for its parameter shapes.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    convert_state_dict,
    identity,
    linear_kernel,
    require_attributes,
)

__all__ = ["PREFIX", "clip_text_rename_table", "clip_text_abstract_params", "convert_clip_text"]

#: The key prefix of transformers 4's files; transformers 5 writes the keys without it.
PREFIX = "text_model."
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
    require_attributes(module, ("num_hidden_layers", "max_position_embeddings", "param_dtype",
                                "init"), "CLIPTextModel")


def clip_text_rename_table(module: _TextEncoder, *, prefix: str = PREFIX
                           ) -> dict[str, Rename]:
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

    def add(torch_module: str, flax_scope: tuple[str, ...], weight: str, transform) -> None:
        table[f"{prefix}{torch_module}.weight"] = Rename(flax_scope + (weight,), transform)
        if weight != "embedding":
            table[f"{prefix}{torch_module}.bias"] = Rename(flax_scope + ("bias",), identity)

    for name in ("token_embedding", "position_embedding"):
        add(f"embeddings.{name}", ("embeddings", name), "embedding", identity)
    for i in range(module.num_hidden_layers):
        torch_layer, layer = f"encoder.layers.{i}", ("encoder", f"layers_{i}")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"{torch_layer}.self_attn.{name}", layer + ("self_attn", name), "kernel",
                linear_kernel)
        for name in ("fc1", "fc2"):
            add(f"{torch_layer}.mlp.{name}", layer + ("mlp", name), "kernel", linear_kernel)
        for name in ("layer_norm1", "layer_norm2"):
            add(f"{torch_layer}.{name}", layer + (name,), "scale", identity)
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
        return ("a CLIPModel (text and vision towers) checkpoint; convert only its text tower, "
                "the 'text_model.*' keys (and load a CLIPTextModel config, the CLIPModel "
                "config's text_config)")
    if keys & set(_PROJECTION_KEYS):
        return ("a CLIPTextModelWithProjection checkpoint (it has 'text_projection.weight'); "
                "this port is CLIPTextModel, without the projection")
    return None


def _key_prefix(keys: set[str]) -> str:
    """The layout of a checkpoint: ``PREFIX`` if any key has it (transformers 4), else ``""``."""
    return PREFIX if not keys or any(k.startswith(PREFIX) for k in keys) else ""


def _drop_position_ids(state_dict: Mapping[str, Any], module: _TextEncoder, prefix: str,
                       source: str) -> Mapping[str, Any]:
    """``state_dict`` without the ``position_ids`` buffer, after checking it is arange."""
    key = prefix + _POSITION_IDS
    if key not in state_dict:
        return state_dict
    value = np.asarray(state_dict[key])
    expected = np.arange(module.max_position_embeddings)[None]
    if value.shape != expected.shape or not np.array_equal(value, expected):
        shown = np.array2string(value.ravel()[:8], separator=", ")
        raise ConversionError(
            f"{source}: the buffer {key} must be 0 .. "
            f"{module.max_position_embeddings - 1} with shape {expected.shape}; got shape "
            f"{value.shape} and values {shown}{' ...' if value.size > 8 else ''} (transformers "
            f"ignores the stored buffer; remove the key to use positions 0 .. n-1 as it does)")
    return {k: v for k, v in state_dict.items() if k != key}


def convert_clip_text(state_dict: Mapping[str, Any], module: _TextEncoder, *,
                      source: str = "state dict") -> dict:
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
        raise TypeError(f"state_dict must be a mapping of torch keys to arrays, got "
                        f"{type(state_dict).__name__}")
    prefix = _key_prefix(set(state_dict))
    table = clip_text_rename_table(module, prefix=prefix)
    expected = clip_text_abstract_params(module)
    try:
        state_dict = _drop_position_ids(state_dict, module, prefix, source)
        return convert_state_dict(state_dict, table, expected, source=source,
                                  dtype=module.param_dtype)
    except ConversionError as err:
        kind = _checkpoint_kind(set(state_dict))
        if kind is None:
            raise
        raise ConversionError(f"{source} looks like {kind}.\n{err}") from err
