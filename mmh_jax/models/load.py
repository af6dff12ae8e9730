"""One entry point for every pretrained model the library reads: :func:`load_model`."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import jax.numpy as jnp

from mmh_jax.models.iddpm import load_iddpm
from mmh_jax.models.loaders import load_unet2d
from mmh_jax.models.pretrained import Pretrained, PretrainedGenerator
from mmh_jax.models.stable_diffusion import StableDiffusion, load_stable_diffusion
from mmh_jax.models.stylegan2 import load_stylegan2

__all__ = ["ModelKind", "load_model"]

ModelKind = Literal["unet2d", "iddpm", "stable-diffusion", "stylegan2"]
"""The architectures :func:`load_model` reads."""


def load_model(
    path: str | os.PathLike, *, kind: ModelKind, dtype: Any = jnp.float32, **options: Any
) -> Pretrained | PretrainedGenerator | StableDiffusion:
    """Load a local model of architecture ``kind`` (no download, no code from the file run).

    Args:
        path: what the kind's loader reads: a file written by ``mmh-jax convert`` or, for
            ``"unet2d"`` and ``"stable-diffusion"``, a diffusers folder; for ``"stylegan2"``
            also an official network pickle.
        kind: the architecture.
        dtype: the parameters' dtype.
        **options: the loader's own options: improved-diffusion's flags for ``"iddpm"``
            (:func:`~mmh_jax.models.load_iddpm`), ``network`` / ``init_kwargs`` for
            ``"stylegan2"`` (:func:`~mmh_jax.models.load_stylegan2`); none for the others.

    Returns:
        :class:`~mmh_jax.models.Pretrained` (``"unet2d"``, ``"iddpm"``),
        :class:`~mmh_jax.models.PretrainedGenerator` (``"stylegan2"``) or
        :class:`~mmh_jax.models.StableDiffusion`.

    Raises:
        ValueError: an unknown ``kind``, or options the kind does not take.
    """
    if kind not in get_args(ModelKind):
        raise ValueError(f"kind must be one of {', '.join(get_args(ModelKind))}; got {kind!r}")
    if kind == "iddpm":
        return load_iddpm(path, dtype=dtype, **options)
    if kind == "stylegan2":
        return load_stylegan2(path, dtype=dtype, **options)
    if options:
        raise ValueError(f"kind {kind!r} takes no options, got {', '.join(sorted(options))}")
    if kind == "unet2d":
        return load_unet2d(path, dtype=dtype)
    return load_stable_diffusion(path, dtype=dtype)
