"""A reader of TorchScript archives (``torch.jit.save`` files) that runs none of their code.

A TorchScript archive is a zip with one top folder holding ``data.pkl`` (the module tree),
``constants.pkl`` (tensor constants of the code), ``code/`` (TorchScript source), ``data/<key>``
(raw storages) and ``version``. ``torch.jit.load`` compiles and can run that code;
:func:`read_torchscript_archive` instead reads ``data.pkl`` with the allow-list unpickler of
:mod:`mmh_jax.convert.safe_pickle`: every ``__torch__.<qualname>`` global becomes an inert
record of its attribute dict (nothing is imported), tensors are rebuilt from the storages in
``data/`` by the same numpy stand-in of ``torch._utils._rebuild_tensor_v2``, and any other
global (``os.system``, ``builtins.eval``, ...) is refused with
:class:`~mmh_jax.convert.safe_pickle.UnsafePickleError` before it is imported. ``code/`` and
``constants.pkl`` are never unpickled or executed. torch is not imported.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from mmh_jax._src.files import require_file
from mmh_jax.convert.core import ConversionError
from mmh_jax.convert.safe_pickle import (
    _STORAGE_TYPES,
    _UNPICKLE_ERRORS,
    UnsafePickleError,
    _check_protocol,
    _rebuild_parameter,
    _rebuild_tensor_v2,
    _RestrictedUnpickler,
    _Storage,
    _storage_pid,
)

__all__ = ["ScriptModuleRecord", "is_torchscript_archive", "read_torchscript_archive"]


class ScriptModuleRecord:
    """A ``__torch__.<qualname>`` object of ``data.pkl`` as data: its qualified name and the
    attribute dict that ``BUILD`` gave it (tensors as numpy arrays, submodules as records).

    ``data.pkl`` makes each one by ``NEWOBJ`` on the class its ``GLOBAL`` names; that global
    resolves to a fresh subclass of this one carrying only the name (see
    :meth:`_ScriptUnpickler.find_class`), so nothing named by the file is imported.
    """

    __slots__ = ("attributes",)
    qualname: str = "?"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ConversionError(
                f"{self.qualname}: expected an attribute dict, got a {type(state).__name__}"
            )
        if hasattr(self, "attributes"):
            raise UnsafePickleError(f"{self.qualname}: a second BUILD refused")
        self.attributes = dict(state)

    def __repr__(self) -> str:
        return f"ScriptModuleRecord({self.qualname!r}, {sorted(getattr(self, 'attributes', {}))})"


_SCRIPT_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    **_STORAGE_TYPES,
}


class _ScriptUnpickler(_RestrictedUnpickler):
    """The safe_pickle unpickler, plus ``__torch__.*`` classes as :class:`ScriptModuleRecord`
    subclasses and the archive's storage records as persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(
                "ScriptModule",
                (ScriptModuleRecord,),
                {"__slots__": (), "qualname": f"{module}.{name}"},
            )
        return super().find_class(module, name)


def _archive_root(names: list[str], where: str) -> str:
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or not all("/" in n for n in names):
        raise ConversionError(
            f"{where}: not a TorchScript archive (expected one top folder, "
            f"found {sorted(tops)[:5]})"
        )
    top = tops.pop()
    needed = [f"{top}/data.pkl", f"{top}/constants.pkl", f"{top}/version"]
    missing = [n.split("/", 1)[1] for n in needed if n not in names]
    has_code = any(n.startswith(f"{top}/code/") for n in names)
    if missing or not has_code:
        lack = missing + ([] if has_code else ["code/"])
        hint = (
            " (a torch.save file? those are read with torch.load(weights_only=True))"
            if f"{top}/data.pkl" in names
            else ""
        )
        raise ConversionError(
            f"{where}: not a TorchScript archive: it lacks {', '.join(lack)}{hint}"
        )
    return top


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip laid out as a TorchScript archive (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as z:
            _archive_root(z.namelist(), "")
        return True
    except (zipfile.BadZipFile, OSError, ConversionError):
        return False


def _state_dict(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
    if id(obj) in seen:
        raise ConversionError(f"module tree: {prefix or 'root'} is reached twice")
    seen.add(id(obj))
    for name, value in obj.attributes.items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, ScriptModuleRecord):
            _state_dict(value, f"{prefix}{name}.", out, seen)


def read_torchscript_archive(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a TorchScript archive, read as data: nothing in it is run.

    Args:
        path: a file written by ``torch.jit.save`` (a scripted or traced module).

    Returns:
        ``{key: numpy array}`` keyed as ``torch.nn.Module.state_dict()`` keys the scripted
        module: every tensor attribute of the root module, then of each submodule under
        ``"<child>."`` (depth first, in pickled order). Non-tensor attributes (``training``,
        hook flags, constants) are dropped.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: ``data.pkl`` names a global outside the allow-list (the message names
            it as ``module.name``) or a persistent id that is not a storage record.
        ConversionError: not a zip, a zip that is not a TorchScript archive (e.g. a ``torch.save``
            file, which lacks ``code/`` and ``constants.pkl``), a missing or truncated storage,
            or a corrupt pickle.
    """
    path = require_file(path, "TorchScript archive")
    where = f"TorchScript archive {str(path)!r}"
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ConversionError(f"{where}: not a zip file ({err})") from None
    with z:
        names = z.namelist()
        top = _archive_root(names, where)
        storages: dict[str, _Storage] = {}

        def storage(pid: Any) -> _Storage:
            key, dtype, numel = _storage_pid(pid, 5, "")
            if key not in storages:
                member = f"{top}/data/{key}"
                if member not in names:
                    raise ConversionError(f"storage {key!r}: no data/{key} in the archive")
                raw = z.read(member)
                if len(raw) != numel * dtype.itemsize:
                    raise ConversionError(
                        f"storage {key!r}: {len(raw)} bytes, {numel} {dtype} elements declared"
                    )
                storages[key] = _Storage(np.frombuffer(raw, dtype, numel))
            if storages[key].data.dtype != dtype:
                raise ConversionError(f"storage {key!r} read as two dtypes")
            return storages[key]

        data = z.read(f"{top}/data.pkl")
        _check_protocol(data[:2], where)
        try:
            root = _ScriptUnpickler(io.BytesIO(data), "", _SCRIPT_GLOBALS, storage).load()
        except ConversionError as err:
            raise type(err)(f"{where}: data.pkl: {err}") from None
        except _UNPICKLE_ERRORS as err:
            raise ConversionError(
                f"{where}: data.pkl truncated or corrupt ({type(err).__name__}: {err})"
            ) from None
        except (MemoryError, pickle.PickleError) as err:
            raise ConversionError(f"{where}: corrupt data.pkl ({type(err).__name__})") from None
    if not isinstance(root, ScriptModuleRecord):
        raise ConversionError(
            f"{where}: data.pkl holds a {type(root).__name__}, not a scripted module"
        )
    out: dict[str, np.ndarray] = {}
    _state_dict(root, "", out, set())
    return out
