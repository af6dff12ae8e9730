"""Strict conversion of StyleGAN2-ADA generator state dicts (NVlabs/stylegan2-ada-pytorch,
``G_ema.state_dict()`` of a network pickle) into the parameters of
:class:`mmh_jax.models.stylegan2.StyleGAN2Generator`.

One rename-table entry per tensor of the original ``Generator`` built with the module's config:
``FullyConnectedLayer`` weights ``[out, in]`` become Dense kernels ``[in, out]``, convolution
weights ``[out, in, kh, kw]`` (also those stored channels-last: the layout in memory does not
change the array) become ``[kh, kw, in, out]``, the first block's ``const [C, 4, 4]`` becomes
``[4, 4, C]`` (channels-last), and biases, ``noise_strength`` and the buffers ``w_avg`` and
``noise_const`` are copied (the port keeps those two buffers as parameters). The
``resample_filter`` buffers (``synthesis.b<res>.resample_filter`` and those of the blocks'
layers) are not parameters of the port: each is checked to equal the module's filter and
dropped.

This module reads the Flax module only through its attributes (it does not import
:mod:`mmh_jax.models`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    "stylegan2_rename_table",
    "stylegan2_abstract_params",
    "convert_stylegan2",
    "const_layout",
]

_CONFIG_ATTRIBUTES = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "num_layers",
    "embed_features",
    "layer_features",
    "channel_base",
    "channel_max",
    "architecture",
    "use_noise",
    "resample_filter",
    "init",
)
_FILTER = "resample_filter"


def const_layout(w: np.ndarray) -> np.ndarray:
    """The first block's ``const [C, h, w]`` -> channels-last ``[h, w, C]``."""
    if w.ndim != 3:
        raise ValueError(f"expected a [C, h, w] constant, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(np.transpose(w, (1, 2, 0)))


def _require_config(module: Any) -> None:
    require_attributes(module, _CONFIG_ATTRIBUTES, "StyleGAN2Generator")


def _block_resolutions(module: Any) -> list[int]:
    return [2**i for i in range(2, int(np.log2(module.img_resolution)) + 1)]


def _fc(table: dict[str, Rename], key: str, path: tuple[str, ...]) -> None:
    table[f"{key}.weight"] = Rename(path + ("kernel",), linear_kernel)
    table[f"{key}.bias"] = Rename(path + ("bias",), identity)


def stylegan2_rename_table(module: Any) -> dict[str, Rename]:
    """The explicit ``torch key -> Rename(flax path, transform)`` table of a generator.

    Args:
        module: the Flax ``StyleGAN2Generator`` (read through its attributes only).

    Returns:
        One entry per parameter and per ``w_avg``/``noise_const`` buffer of the original
        ``Generator`` with that config (the ``resample_filter`` buffers have none).
    """
    _require_config(module)
    table: dict[str, Rename] = {}
    if module.c_dim > 0:
        _fc(table, "mapping.embed", ("mapping", "embed"))
    for i in range(module.num_layers):
        _fc(table, f"mapping.fc{i}", ("mapping", f"fc{i}"))
    table["mapping.w_avg"] = Rename(("mapping", "w_avg"), identity)

    def layer(key: str, path: tuple[str, ...], noise: bool) -> None:
        _fc(table, f"{key}.affine", path + ("affine",))
        table[f"{key}.weight"] = Rename(path + ("kernel",), conv_kernel)
        table[f"{key}.bias"] = Rename(path + ("bias",), identity)
        if noise:
            table[f"{key}.noise_const"] = Rename(path + ("noise_const",), identity)
            table[f"{key}.noise_strength"] = Rename(path + ("noise_strength",), identity)

    for res in _block_resolutions(module):
        key, path = f"synthesis.b{res}", ("synthesis", f"b{res}")
        if res == 4:
            table[f"{key}.const"] = Rename(path + ("const",), const_layout)
        else:
            layer(f"{key}.conv0", path + ("conv0",), module.use_noise)
        layer(f"{key}.conv1", path + ("conv1",), module.use_noise)
        if res == module.img_resolution or module.architecture == "skip":
            layer(f"{key}.torgb", path + ("torgb",), False)
        if res > 4 and module.architecture == "resnet":
            table[f"{key}.skip.weight"] = Rename(path + ("skip", "kernel"), conv_kernel)
    return table


def stylegan2_abstract_params(module: Any) -> PyTree:
    """Shapes and dtypes of the parameters ``module`` has, without computing them."""
    _require_config(module)
    z = jnp.zeros((1, module.z_dim), jnp.float32)
    c = jnp.zeros((1, module.c_dim), jnp.float32) if module.c_dim > 0 else None
    return abstract_params(lambda key: module.init(key, z, c)["params"])


def _check_filters(state_dict: Mapping[str, Any], module: Any, source: str) -> dict[str, Any]:
    """``state_dict`` without its ``resample_filter`` buffers, each checked against the
    module's filter (the 2-D normalised outer product, or the normalised taps for filters the
    original keeps separable)."""
    taps = np.asarray(module.resample_filter, np.float64)
    taps = (taps / taps.sum()).astype(np.float32)
    expected = {1: taps, 2: np.outer(taps, taps).astype(np.float32)}
    rest, wrong = {}, []
    for key, value in state_dict.items():
        if key.split(".")[-1] != _FILTER or not key.startswith("synthesis."):
            rest[key] = value
            continue
        value = np.asarray(value, np.float32)
        want = expected.get(value.ndim)
        if (
            want is None
            or value.shape != want.shape
            or not np.allclose(value, want, rtol=1e-6, atol=1e-7)
        ):
            wrong.append(key)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise ConversionError(
            f"{source}: the resampling filter {shown} differs from the "
            f"module's resample_filter={tuple(module.resample_filter)} "
            f"(normalised outer product {expected[2].tolist()})"
        )
    return rest


def convert_stylegan2(
    state_dict: Mapping[str, Any], module: Any, *, source: str = "state dict"
) -> dict:
    """Convert an original StyleGAN2-ADA generator state dict into ``module``'s parameters.

    Args:
        state_dict: ``{torch key: array}``: ``G_ema.state_dict()`` (or ``G``'s) as numpy
            arrays, e.g. from a network pickle.
        module: the Flax ``StyleGAN2Generator`` built from the same init kwargs.
        source: the file name, used in error messages.

    Returns:
        The params tree (float32 numpy leaves).

    Raises:
        ConversionError: a ``resample_filter`` buffer differs from the module's filter, or
            listing every missing, unexpected and mis-shaped key.
    """
    _require_config(module)
    rest = _check_filters(state_dict, module, source)
    return convert_state_dict(
        rest, stylegan2_rename_table(module), stylegan2_abstract_params(module), source=source
    )
