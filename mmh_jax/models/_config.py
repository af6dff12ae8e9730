"""Strict reading of a framework's config file into a Flax port's attributes, shared by the ports.

A port's attributes are the config keys it supports (same names, same defaults). Reading a
parsed ``config.json`` skips the keys that describe the file rather than the model, checks the
keys that must keep one value in the port (a feature it does not have), refuses unknown keys,
and turns JSON lists into tuples so that the module stays hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

__all__ = ["config_kwargs", "module_config", "unsupported", "NOT_CONFIG"]

#: Flax module fields that are not config keys.
NOT_CONFIG = ("parent", "name", "dtype", "param_dtype")


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def config_kwargs(
    cls: type,
    config: Mapping[str, Any],
    *,
    what: str,
    kind: tuple[str, str],
    skip: Collection[str] = (),
    fixed: Mapping[str, tuple] = {},  # noqa: B006 (read only)
    hints: Mapping[str, str] = {},  # noqa: B006 (read only)
) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that a parsed config describes.

    Args:
        cls: the Flax module class (a dataclass whose fields are the supported keys).
        config: the parsed config; absent keys keep their defaults.
        what: the port's name in error messages.
        kind: ``(key, expected)``: the key naming the class in the file (``"_class_name"``,
            ``"model_type"``) and the value it must have when present.
        skip: keys read and ignored (bookkeeping, settings that do not change the forward pass).
        fixed: ``{key: allowed values}`` of keys whose feature the port does not have.
        hints: ``{key: why}`` added to the error of a refused ``fixed`` key.

    Returns:
        ``{key: value}`` with lists turned into tuples.

    Raises:
        TypeError: ``config`` is not a mapping.
        ValueError: naming the first key that is unknown or holds an unsupported value.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a parsed config.json), got "
                        f"{type(config).__name__}")
    key, expected = kind
    if config.get(key, expected) != expected:
        raise ValueError(f"{what} config: {key}={config[key]!r}, expected {expected!r}")
    fields = {f.name for f in dataclasses.fields(cls)} - set(NOT_CONFIG)
    kwargs = {}
    for name, value in config.items():
        if name in skip or name == key:
            continue
        if name in fixed:
            if _freeze(value) not in fixed[name]:
                why = f" ({hints[name]})" if name in hints else ""
                allowed = " or ".join(map(repr, fixed[name]))
                raise ValueError(f"{what} config: {name}={value!r} is not supported{why}; "
                                 f"expected {allowed}")
            continue
        if name not in fields:
            raise ValueError(f"{what} config: unknown key {name!r}")
        kwargs[name] = _freeze(value)
    return kwargs


def module_config(module: Any) -> dict[str, Any]:
    """A module's config keys and values, JSON-serialisable (tuples as lists)."""
    return {f.name: _thaw(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in NOT_CONFIG}


def unsupported(owner: str, module: Any, key: str, expected: str) -> ValueError:
    """The error for a config value ``module.<key>`` that the port ``owner`` does not support
    (bind ``owner`` and ``module`` with ``functools.partial`` for a port's checks)."""
    return ValueError(f"{owner}: {key}={getattr(module, key)!r} is not supported; "
                      f"expected {expected}")
