"""Rename table and strict conversion of SSCD copy-detection descriptors (Pizzi et al. 2022).

The torchvision-format release (``sscd_disc_mixup.torchvision.pt``) is torchvision's ResNet-50
state dict with ``avgpool`` replaced by GeM pooling (no tensors) and ``fc`` a
``Linear(2048, embedding_dim)``; ``sscd_disc_large`` is a ResNeXt-101 32x4d trunk with the same
head. The keys map one to one onto :class:`mmh_jax.models.SSCD`:

====================================================  =========================================
PyTorch                                               Flax
====================================================  =========================================
``conv1.weight``                                      ``conv1/kernel``
``bn1.{weight,bias,running_mean,running_var}``        ``bn1/{scale,bias,mean,var}``
``layer{i}.{j}.conv{k}.weight``                       ``layer{i}_{j}/conv{k}/kernel``
``layer{i}.{j}.bn{k}.*``                              ``layer{i}_{j}/bn{k}/*``
``layer{i}.0.downsample.0.weight`` / ``.1.*``         ``layer{i}_0/downsample_conv`` / ``_bn``
``{head}.weight``, ``{head}.bias``                    ``{head}/kernel``, ``{head}/bias``
====================================================  =========================================

``*.num_batches_tracked`` (a training counter) is dropped. The head is named ``fc`` in the
torchvision layout (what ``torchvision.models.resnet50`` calls its last Linear); a checkpoint
that names it ``embeddings`` (as SSCD's own ``Model`` class might; not confirmed from the
release files) is read with ``head="embeddings"``. A GeM exponent stored as a tensor
(``avgpool.p``) is accepted when it equals the module's ``gem_p`` and dropped.

This module does not import :mod:`mmh_jax.models`: it reads the module's ``block_counts``,
``embedding_dim`` and ``gem_p`` attributes and asks the module for its parameter shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmh_jax.convert.core import (
    ConversionError,
    Rename,
    abstract_params,
    conv_kernel,
    convert_state_dict,
    linear_kernel,
    require_attributes,
)

__all__ = ["sscd_rename_table", "sscd_abstract_params", "convert_sscd"]

_ATTRIBUTES = ("arch", "block_counts", "embedding_dim", "gem_p")
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _bn(table: dict[str, Rename], torch: str, flax: tuple[str, ...]) -> None:
    for t, f in _BN:
        table[f"{torch}.{t}"] = Rename(flax + (f,))


def sscd_rename_table(module: Any, *, head: str = "fc") -> dict[str, Rename]:
    """``{torch key: Rename}`` for every parameter of ``module`` (an :class:`~mmh_jax.models.SSCD`).

    Args:
        module: the Flax SSCD module (its ``block_counts`` are read).
        head: the name of the final Linear in the checkpoint (``"fc"`` or ``"embeddings"``).
    """
    require_attributes(module, _ATTRIBUTES, "mmh_jax.models.SSCD")
    table: dict[str, Rename] = {"conv1.weight": Rename(("conv1", "kernel"), conv_kernel)}
    _bn(table, "bn1", ("bn1",))
    for i, count in enumerate(module.block_counts, start=1):
        for j in range(count):
            torch, flax = f"layer{i}.{j}", (f"layer{i}_{j}",)
            for k in (1, 2, 3):
                table[f"{torch}.conv{k}.weight"] = Rename(
                    flax + (f"conv{k}", "kernel"), conv_kernel
                )
                _bn(table, f"{torch}.bn{k}", flax + (f"bn{k}",))
            if j == 0:  # every stage's first bottleneck changes width (and stride): projection
                table[f"{torch}.downsample.0.weight"] = Rename(
                    flax + ("downsample_conv", "kernel"), conv_kernel
                )
                _bn(table, f"{torch}.downsample.1", flax + ("downsample_bn",))
    table[f"{head}.weight"] = Rename(("fc", "kernel"), linear_kernel)
    table[f"{head}.bias"] = Rename(("fc", "bias"))
    return table


_SHAPES: dict[tuple, dict] = {}  # (class, arch, embedding_dim) -> abstract params


def sscd_abstract_params(module: Any) -> dict:
    """Shapes of ``module``'s params (no allocation; cached per class, arch and width)."""
    require_attributes(module, _ATTRIBUTES, "mmh_jax.models.SSCD")
    key = (type(module), module.arch, int(module.embedding_dim))
    if key not in _SHAPES:
        x = jnp.zeros((1, 3, 32, 32), jnp.float32)
        _SHAPES[key] = abstract_params(lambda k: module.init(k, x)["params"])
    return _SHAPES[key]


def convert_sscd(
    state_dict: Mapping[str, Any],
    module: Any,
    *,
    source: str = "state dict",
    head: str | None = None,
) -> dict:
    """Convert a torchvision-layout SSCD state dict into ``module``'s params, strictly.

    Args:
        state_dict: ``{torch key: array}``: a ``.torchvision.pt`` state dict, or what
            :func:`mmh_jax.convert.torchscript.read_torchscript_archive` returns.
        module: the Flax :class:`~mmh_jax.models.SSCD` (its architecture fixes the keys).
        source: the file name, used in error messages.
        head: the name of the final Linear; by default ``"fc"``, or ``"embeddings"`` when the
            checkpoint has ``embeddings.weight`` and no ``fc.weight``.

    Returns:
        The params tree (float32 numpy leaves).

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped key (e.g. a CLIP or
            UNet state dict, or a ResNet-50 checkpoint given to a ResNeXt-101 module), or a
            stored GeM exponent other than ``module.gem_p``.
        TypeError: ``module`` is not an SSCD module.
    """
    require_attributes(module, _ATTRIBUTES, "mmh_jax.models.SSCD")
    if head is None:
        head = (
            "embeddings"
            if ("embeddings.weight" in state_dict and "fc.weight" not in state_dict)
            else "fc"
        )
    sd = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    if "avgpool.p" in sd:
        p = np.asarray(sd.pop("avgpool.p"), np.float64).ravel()
        if p.size != 1 or abs(float(p[0]) - float(module.gem_p)) > 1e-6:
            raise ConversionError(
                f"{source}: GeM exponent avgpool.p = {p.tolist()}, the "
                f"module has gem_p = {module.gem_p}"
            )
    return convert_state_dict(
        sd, sscd_rename_table(module, head=head), sscd_abstract_params(module), source=source
    )
