"""Strict conversion of a PyTorch state dict into a Flax parameter pytree.

Every architecture supplies an explicit rename table, ``torch key -> Rename(flax path,
transform)``, built from its config (one entry per parameter; no substring guessing). The
transforms here are the only layout rules: PyTorch ``Linear`` weights ``[out, in]`` become Flax
``Dense`` kernels ``[in, out]``, ``Conv2d`` weights ``[out, in, kh, kw]`` become ``Conv`` kernels
``[kh, kw, in, out]`` (NHWC), 1-D convolutions with kernel size 1 become ``Dense`` kernels, and
everything else (biases, norm scales) is copied. :func:`convert_state_dict` checks the result
against the shapes the Flax module expects and raises :class:`ConversionError` listing every
missing, unexpected and mis-shaped key at once.

Every transform carries the one that undoes it as its ``inverse`` attribute (set with
:func:`with_inverse` where the transform is defined), and :func:`export_state_dict` applies
them to write a Flax params tree back as the PyTorch state dict the same table reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
from jaxtyping import PyTree

__all__ = [
    "ConversionError",
    "Rename",
    "identity",
    "linear_kernel",
    "conv_kernel",
    "conv1x1_kernel",
    "with_inverse",
    "convert_state_dict",
    "export_state_dict",
    "flatten_params",
    "unflatten_params",
    "abstract_params",
    "check_params",
    "require_attributes",
]


class ConversionError(ValueError):
    """A checkpoint does not match the architecture it is converted to."""


_Transform = TypeVar("_Transform", bound=Callable[[np.ndarray], np.ndarray])


def with_inverse(inverse: Callable[[np.ndarray], np.ndarray]) -> Callable[[_Transform], _Transform]:
    """Decorator: record ``inverse`` as the decorated transform's ``inverse`` attribute.

    Args:
        inverse: the layout transform that takes a converted (Flax) array back to the PyTorch
            layout; :func:`export_state_dict` applies it.

    Returns:
        The decorator, which returns the transform itself.
    """

    def attach(transform: _Transform) -> _Transform:
        transform.inverse = inverse  # type: ignore[attr-defined]
        return transform

    return attach


def _self_inverse(transform: _Transform) -> _Transform:
    return with_inverse(transform)(transform)


@_self_inverse
def identity(w: np.ndarray) -> np.ndarray:
    """Biases, norm scales and offsets, embeddings: copied as they are."""
    return w


@_self_inverse
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """``torch.nn.Linear.weight [out, in]`` -> ``flax.linen.Dense`` kernel ``[in, out]``
    (and back: the transpose is its own inverse)."""
    return np.ascontiguousarray(w.T)


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
    """A Flax ``Conv`` kernel ``[kh, kw, in, out]`` -> ``Conv2d.weight [out, in, kh, kw]``."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


@with_inverse(_conv_weight)
def conv_kernel(w: np.ndarray) -> np.ndarray:
    """``torch.nn.Conv2d.weight [out, in, kh, kw]`` -> ``flax.linen.Conv`` kernel ``[kh, kw, in, out]``."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _conv1x1_weight(kernel: np.ndarray) -> np.ndarray:
    """A Dense kernel ``[in, out]`` -> a 1x1 ``Conv2d.weight [out, in, 1, 1]``."""
    if kernel.ndim != 2:
        raise ValueError(f"expected a Dense kernel [in, out], got shape {kernel.shape}")
    return np.ascontiguousarray(kernel.T[:, :, None, None])


@with_inverse(_conv1x1_weight)
def conv1x1_kernel(w: np.ndarray) -> np.ndarray:
    """A kernel-size-1 ``Conv1d``/``Conv2d`` weight ``[out, in, 1(, 1)]`` -> Dense kernel
    ``[in, out]``.

    Its inverse writes the ``Conv2d`` layout ``[out, in, 1, 1]`` (a ``Conv1d`` weight would be
    ``[out, in, 1]``).
    """
    if any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"expected a kernel-size-1 convolution weight, got shape {w.shape}")
    return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T)


class Rename(NamedTuple):
    """Where a PyTorch tensor goes in the Flax tree, and how its layout changes."""

    path: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = identity


def flatten_params(params: PyTree) -> dict[tuple[str, ...], Any]:
    """Nested dicts -> ``{path tuple: leaf}``."""
    flat: dict[tuple[str, ...], Any] = {}

    def visit(node, prefix):
        if isinstance(node, Mapping):
            for name, child in node.items():
                visit(child, prefix + (str(name),))
        else:
            flat[prefix] = node

    visit(params, ())
    return flat


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """``{path tuple: leaf}`` -> nested dicts."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _raise_problems(what: str, problems: dict[str, list[str]]) -> None:
    """Raise a :class:`ConversionError` ``"{what}:"`` listing every non-empty ``{title: items}``."""
    listed = [_listing(title, items) for title, items in problems.items() if items]
    if listed:
        raise ConversionError(f"{what}:\n" + "\n".join(listed))


def convert_state_dict(
    state_dict: Mapping[str, Any],
    table: Mapping[str, Rename],
    expected: PyTree,
    *,
    source: str = "state dict",
    dtype: Any = np.float32,
) -> dict:
    """Rename and re-lay-out a PyTorch state dict into a Flax ``params`` tree, strictly.

    Args:
        state_dict: ``{torch key: array}`` (numpy arrays or anything ``np.asarray`` takes).
        table: ``{torch key: Rename(flax path, transform)}``, one entry per parameter.
        expected: the Flax params tree the module expects (e.g. from ``jax.eval_shape`` of its
            ``init``); leaves need only ``.shape``.
        source: the file name or description, used in error messages.
        dtype: dtype of the returned parameters.

    Returns:
        The nested-dict params tree, with numpy leaves of ``dtype``.

    Raises:
        ConversionError: listing every torch key without a rule (unexpected), every expected
            Flax parameter that no torch key fills (missing), and every shape mismatch.
    """
    expected_flat = {p: tuple(leaf.shape) for p, leaf in flatten_params(expected).items()}
    targets = {rule.path for rule in table.values()}
    unexpected = sorted(k for k in state_dict if k not in table)
    not_in_checkpoint = sorted(k for k in table if k not in state_dict)
    bad_target = sorted(
        f"{k} -> {'/'.join(r.path)}" for k, r in table.items() if r.path not in expected_flat
    )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    wrong_shape = []
    for key, rule in table.items():
        if key not in state_dict or rule.path not in expected_flat:
            continue
        value = np.asarray(state_dict[key])
        try:
            value = rule.transform(value)
        except ValueError as err:
            wrong_shape.append(f"{key}: {err}")
            continue
        want = expected_flat[rule.path]
        if tuple(value.shape) != want:
            wrong_shape.append(
                f"{key} {tuple(np.shape(state_dict[key]))} -> {'/'.join(rule.path)}: "
                f"converted shape {tuple(value.shape)}, the model expects {want}"
            )
            continue
        flat[rule.path] = value.astype(dtype)
    missing = sorted("/".join(p) for p in expected_flat if p not in targets)
    _raise_problems(
        f"{source} does not match the model architecture",
        {
            "missing from the checkpoint": not_in_checkpoint,
            "model parameters with no rule": missing,
            "unexpected keys in the checkpoint": unexpected,
            "wrong shapes": wrong_shape,
            "rules naming no model parameter": bad_target,
        },
    )
    return unflatten_params(flat)


def export_state_dict(
    params: PyTree,
    table: Mapping[str, Rename],
    *,
    source: str = "params tree",
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Write a Flax ``params`` tree back as the PyTorch state dict ``table`` converts, strictly.

    The inverse of :func:`convert_state_dict`: every entry ``torch key -> Rename(flax path,
    transform)`` takes the leaf at ``flax path`` and applies ``transform.inverse``.

    Args:
        params: nested dicts of arrays (numpy or JAX), e.g. what a converter returned.
        table: ``{torch key: Rename(flax path, transform)}``, e.g. a ``*_rename_table(module)``;
            every transform must have an ``inverse`` (see :func:`with_inverse`).
        source: what ``params`` are, used in error messages.
        dtype: dtype of the returned arrays.

    Returns:
        ``{torch key: array}`` in PyTorch's layouts, C-contiguous numpy arrays of ``dtype``, in
        the table's order.

    Raises:
        ConversionError: listing every table entry whose Flax parameter ``params`` lacks, every
            parameter of ``params`` that no entry names, every transform without an inverse and
            every parameter its inverse cannot take (a wrong number of dimensions).
    """
    flat = flatten_params(params)
    used = {rule.path for rule in table.values()}
    no_parameter = sorted(
        f"{k} <- {'/'.join(r.path)}" for k, r in table.items() if r.path not in flat
    )
    not_exported = sorted("/".join(p) for p in flat if p not in used)
    no_inverse, failed = [], []
    state_dict: dict[str, np.ndarray] = {}
    for key, rule in table.items():
        if rule.path not in flat:
            continue
        inverse = getattr(rule.transform, "inverse", None)
        if inverse is None:
            name = getattr(rule.transform, "__qualname__", repr(rule.transform))
            no_inverse.append(f"{key} <- {'/'.join(rule.path)}: {name}")
            continue
        leaf = np.asarray(flat[rule.path])
        try:
            state_dict[key] = np.ascontiguousarray(inverse(leaf), dtype=dtype)
        except ValueError as err:
            failed.append(f"{key} <- {'/'.join(rule.path)} {tuple(leaf.shape)}: {err}")
    _raise_problems(
        f"{source} does not match the rename table",
        {
            "table entries whose parameter is missing": no_parameter,
            "parameters no table entry names": not_exported,
            "transforms without an inverse": no_inverse,
            "wrong shapes": failed,
        },
    )
    return state_dict


def require_attributes(module: Any, names: tuple[str, ...], expected: str) -> None:
    """Check that ``module`` has every attribute a rename table reads (the converters read a
    Flax module's configuration through its attributes and never import :mod:`mmh_jax.models`).

    Raises:
        TypeError: naming ``expected`` (the module class the converter is for) and the
            missing attributes.
    """
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"module must be a {expected}; {type(module).__name__} lacks {', '.join(missing)}"
        )


def abstract_params(init: Callable[[jax.Array], PyTree]) -> PyTree:
    """Shapes of the params a Flax ``init(key)`` would create, without allocating them."""
    return jax.eval_shape(init, jax.random.key(0))


def check_params(params: PyTree, expected: PyTree, *, source: str, dtype: Any = np.float32) -> dict:
    """A stored Flax params tree (e.g. from :func:`mmh_jax.convert.load_params`) checked as
    strictly as a conversion: every expected parameter present with its shape, nothing else.

    Args:
        params: nested dicts of arrays.
        expected: the tree the module expects (``.shape`` leaves).
        source: the file name, used in error messages.
        dtype: dtype of the returned parameters.

    Returns:
        The params tree, numpy leaves of ``dtype``.

    Raises:
        ConversionError: listing every missing, unexpected and mis-shaped parameter.
    """
    flat = {"/".join(p): v for p, v in flatten_params(params).items()}
    table = {key: Rename(tuple(key.split("/"))) for key in flat}
    return convert_state_dict(flat, table, expected, source=source, dtype=dtype)
