"""Reading PyTorch checkpoints and saving/loading converted Flax parameters (safetensors).

PyTorch files are read as plain numpy arrays: ``.safetensors`` with the ``safetensors``
package (no torch needed), ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``,
which refuses pickles that would run arbitrary code. Converted parameters are stored as one
safetensors file whose keys are the ``/``-joined Flax paths, plus string metadata (the
architecture and its config as JSON), so a converted model loads without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import PyTree

from mmh_jax._src.files import atomic_path, require_file
from mmh_jax.convert.core import ConversionError, flatten_params, unflatten_params

__all__ = ["read_state_dict", "save_params", "load_params"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConversionError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    return tensors, metadata


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict from a local file, as ``{key: numpy array}``.

    Args:
        path: a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin``/``.ckpt`` file saved with
            ``torch.save`` (read with ``weights_only=True``; needs torch). A checkpoint that
            nests the weights under ``"state_dict"`` or ``"model"`` is unwrapped.

    Returns:
        The tensors as float32/float16/... numpy arrays (bfloat16 is widened to float32).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: truncated or corrupt file, or a pickle that needs arbitrary code.
    """
    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    if path.suffix not in _TORCH_SUFFIXES:
        raise ConversionError(
            f"checkpoint {str(path)!r}: expected a .safetensors file or a torch.save file "
            f"({', '.join(_TORCH_SUFFIXES)}), got suffix {path.suffix!r}"
        )
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {str(path)!r} needs PyTorch: pip install torch, or convert it to "
            ".safetensors elsewhere"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ConversionError(
            f"could not read {str(path)!r} as a weights-only PyTorch checkpoint "
            f"(truncated, corrupt, or a pickle that needs arbitrary code, which is refused): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{str(path)!r} does not hold a state dict of tensors")
    out = {}
    for key, tensor in obj.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[key] = tensor.numpy()
    return out


def save_params(
    path: str | os.PathLike, params: PyTree, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a Flax params tree (nested dicts of arrays) to a safetensors file, atomically.

    Args:
        path: target file; must end in ``.safetensors``.
        params: nested dicts of arrays; keys are joined with ``/``.
        metadata: JSON-serialisable values stored in the file header (e.g. the architecture
            name and its config).

    Returns:
        The path written.

    Raises:
        ValueError: if ``path`` does not end in ``.safetensors``.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    flat = {"/".join(p): np.asarray(v, order="C") for p, v in flatten_params(params).items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return path


def load_params(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """Read what :func:`save_params` wrote: ``(params, metadata)``."""
    path = require_file(path, "parameter file")
    tensors, meta = _read_safetensors(path)
    params = unflatten_params({tuple(k.split("/")): v for k, v in tensors.items()})
    try:
        metadata = {k: json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError:
        raise ConversionError(
            f"{str(path)!r}: its metadata is not JSON, so it was not "
            "written by mmh-jax convert (or save_params)"
        ) from None
    return params, metadata
