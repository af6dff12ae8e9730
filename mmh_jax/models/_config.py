"""Strict reading of a framework's config file into a Flax port's attributes, shared by the ports.

A port's attributes are the config keys it supports (same names, same defaults). Reading a
parsed ``config.json`` skips the keys that describe the file rather than the model, checks the
keys that must keep one value in the port (a feature it does not have), refuses unknown keys,
and turns JSON lists into tuples so that the module stays hashable. :class:`ConfigPort` gives a
port ``from_config`` and ``to_config`` from a few class attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "ConfigPort",
    "DIFFUSERS_BOOKKEEPING",
    "config_kwargs",
    "module_config",
    "unsupported",
    "NOT_CONFIG",
]

#: Flax module fields that are not config keys.
NOT_CONFIG = ("parent", "name", "dtype", "param_dtype")
#: Keys diffusers keeps about the file rather than the model (``_use_default_values`` is in a
#: loaded model's ``config`` but not in ``config.json``).
DIFFUSERS_BOOKKEEPING = ("_diffusers_version", "_name_or_path", "_use_default_values")


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
        raise TypeError(
            f"config must be a mapping (a parsed config.json), got {type(config).__name__}"
        )
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
                raise ValueError(
                    f"{what} config: {name}={value!r} is not supported{why}; expected {allowed}"
                )
            continue
        if name not in fields:
            raise ValueError(f"{what} config: unknown key {name!r}")
        kwargs[name] = _freeze(value)
    return kwargs


def module_config(module: Any) -> dict[str, Any]:
    """A module's config keys and values, JSON-serialisable (tuples as lists)."""
    return {
        f.name: _thaw(getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.name not in NOT_CONFIG
    }


def unsupported(owner: str, module: Any, key: str, expected: str) -> ValueError:
    """The error for a config value ``module.<key>`` that the port ``owner`` does not support
    (bind ``owner`` and ``module`` with ``functools.partial`` for a port's checks)."""
    return ValueError(
        f"{owner}: {key}={getattr(module, key)!r} is not supported; expected {expected}"
    )


class ConfigPort(nn.Module):
    """A Flax port whose attributes are the keys of its framework's config file (same names,
    same defaults), plus ``dtype`` and ``param_dtype``: reads and writes that config.

    A port sets :attr:`KIND` (the key naming the class in the file and its value, e.g.
    ``("_class_name", "UNet2DModel")``), :attr:`SKIP_KEYS` (read and ignored: file bookkeeping,
    settings that do not change the inference forward pass), :attr:`FIXED_KEYS` (keys of
    features the port does not have, with the values it accepts) and :attr:`KEY_HINTS` (why
    such a key is refused).
    """

    KIND: ClassVar[tuple[str, str]]
    SKIP_KEYS: ClassVar[tuple[str, ...]] = ()
    FIXED_KEYS: ClassVar[Mapping[str, tuple]] = {}
    KEY_HINTS: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
    ) -> Self:
        """The module a config file describes, read strictly (see :func:`config_kwargs`).

        Args:
            config: the parsed ``config.json`` (or the framework's config as a dict). Absent
                keys take the framework's defaults; the key ``KIND[0]`` must be ``KIND[1]`` if
                present; the :attr:`SKIP_KEYS` are skipped; the :attr:`FIXED_KEYS` must keep a
                value the port accepts.
            dtype: compute dtype.
            param_dtype: parameter dtype.

        Returns:
            The (unbound) module.

        Raises:
            TypeError: if ``config`` is not a mapping.
            ValueError: naming the first key this port does not know or whose value it does not
                support, with the value expected.
        """
        kwargs = config_kwargs(
            cls,
            config,
            what=cls.__name__,
            kind=cls.KIND,
            skip=cls.SKIP_KEYS,
            fixed=cls.FIXED_KEYS,
            hints=cls.KEY_HINTS,
        )
        return cls(**kwargs, dtype=dtype, param_dtype=param_dtype)

    def to_config(self) -> dict[str, Any]:
        """The config (JSON-serialisable) that :meth:`from_config` reads back and the
        framework's class takes as keyword arguments."""
        return module_config(self)
