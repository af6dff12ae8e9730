"""A reader of NVIDIA's StyleGAN2-ADA network pickles that runs no code named in the file.

NVlabs/stylegan2-ada-pytorch saves networks with plain ``pickle``, and its loader rebuilds each
network class by ``exec``-ing the Python source stored in the file (``torch_utils.persistence``),
so loading a pickle from an untrusted source runs arbitrary code (NVlabs/stylegan2-ada issue 102,
"Don't use pickle to share weights"). :func:`read_network_pickle` reads the same files as plain
data instead: every global the pickle names is looked up in an explicit allow-list of stand-ins
defined here (the persistent-class hook, which returns a :class:`TorchModuleRecord` and never
touches the stored ``module_src``; torch's tensor and parameter rebuilders, which return numpy
arrays; ``torch.storage._load_from_bytes``, whose embedded legacy ``torch.save`` stream is parsed
here under the same rules, the storage classes being its only allowed globals; ``dnnlib``'s
``EasyDict``, ``OrderedDict``, ``set``, protocol 2's ``_codecs.encode`` for bytes, and numpy
dtypes and scalars of bool, integer, float and complex kinds). Anything else is refused with
:class:`UnsafePickleError` before it is imported: any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``, torch's own functions, ...), persistent ids outside
the storage record of an embedded stream, numpy dtypes and scalars of object or other
non-numeric kinds, and ``BUILD`` applied to an allowed global. torch is not imported.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from mmh_jax._src.files import require_file
from mmh_jax.convert.core import ConversionError

__all__ = ["TorchModuleRecord", "UnsafePickleError", "read_network_pickle"]


class UnsafePickleError(ConversionError):
    """A pickle names a global or uses a feature outside the allow-list; nothing was run."""


@dataclasses.dataclass(frozen=True)
class TorchModuleRecord:
    """A persistent ``torch.nn.Module`` of a StyleGAN2-ADA pickle, as plain data.

    Attributes:
        class_name: the class name in the pickled source (e.g. ``"Generator"``).
        init_args: the positional constructor arguments (``_init_args``).
        init_kwargs: the keyword constructor arguments (``_init_kwargs``), nested ``EasyDict``s
            turned into plain dicts.
        parameters: ``_parameters``, tensors as contiguous numpy arrays (``None`` kept).
        buffers: ``_buffers``, persistent and non-persistent ones.
        non_persistent_buffers: names of the buffers that ``state_dict()`` leaves out.
        modules: the child modules (``_modules``).
        attributes: the rest of the module's ``__dict__`` (e.g. ``num_ws``, ``weight_gain``),
            without the training flag, hook dictionaries and the fields above.
    """

    class_name: str
    init_args: tuple
    init_kwargs: dict[str, Any]
    parameters: dict[str, np.ndarray | None]
    buffers: dict[str, np.ndarray | None]
    non_persistent_buffers: frozenset[str]
    modules: dict[str, TorchModuleRecord | None]
    attributes: dict[str, Any]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The module's tensors keyed as ``torch.nn.Module.state_dict()`` keys them.

        Returns:
            Own parameters, then persistent buffers, then each child's entries under
            ``"<child>."``, depth first; ``None`` entries are skipped.
        """
        out: dict[str, np.ndarray] = {}
        for name, value in self.parameters.items():
            if value is not None:
                out[name] = value
        for name, value in self.buffers.items():
            if value is not None and name not in self.non_persistent_buffers:
                out[name] = value
        for child_name, child in self.modules.items():
            if child is not None:
                for key, value in child.state_dict().items():
                    out[f"{child_name}.{key}"] = value
        return out


# --- Stand-ins for the globals a network pickle names ------------------------------------------


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` as data: a dict (its attributes are its items)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ConversionError(
                f"EasyDict: unexpected BUILD state of type {type(state).__name__}"
            )
        self.update(state)


_PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of stylegan2-ada-pytorch
_META_KEYS = {"type", "version", "module_src", "class_name", "state"}
_MODULE_BOOKKEEPING = {
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_init_args",
    "_init_kwargs",
    "training",
}


def _is_hook_field(name: str) -> bool:
    """torch's hook dictionaries and flags (``_forward_hooks``, ``_is_full_backward_hook``, ...)."""
    return name.startswith("_") and "hook" in name


class _PendingModule(NamedTuple):
    """A checked persistent module while the pickle is read. Immutable (a ``BUILD`` later in the
    stream cannot change it after the checks); its own dicts are copies the pickle cannot reach.
    :func:`_finish` turns it into a :class:`TorchModuleRecord`."""

    class_name: str
    init_args: tuple
    init_kwargs: dict
    parameters: dict[str, np.ndarray | None]
    buffers: dict[str, np.ndarray | None]
    non_persistent_buffers: frozenset[str]
    modules: dict[str, _PendingModule | None]
    attributes: dict[str, Any]


def _reconstruct_persistent_obj(meta: Any) -> _PendingModule:
    """``torch_utils.persistence._reconstruct_persistent_obj``: the module (source dropped)."""
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ConversionError(
            f"persistent object: expected meta keys {sorted(_META_KEYS)}, got {keys}"
        )
    if meta["type"] != "class":
        raise ConversionError(
            f"persistent object of type {meta['type']!r}: only 'class' is supported"
        )
    if meta["version"] != _PERSISTENCE_VERSION:
        raise ConversionError(
            f"persistent object version {meta['version']!r}: only version "
            f"{_PERSISTENCE_VERSION} (stylegan2-ada-pytorch) is supported"
        )
    class_name, state = meta["class_name"], meta["state"]
    if not isinstance(class_name, str):
        raise ConversionError(f"persistent object: class_name is a {type(class_name).__name__}")
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules")
    ):
        raise ConversionError(
            f"persistent class {class_name!r}: its state does not have the "
            "torch.nn.Module layout (_parameters, _buffers, _modules dicts)"
        )

    def entries(field: str, kind: type) -> dict[str, Any]:
        items = state[field]
        for name, value in items.items():
            if not isinstance(name, str) or not (value is None or isinstance(value, kind)):
                raise ConversionError(
                    f"persistent class {class_name!r}: {field}[{name!r}] is a "
                    f"{type(value).__name__}"
                )
        return dict(items)

    non_persistent = state.get("_non_persistent_buffers_set", set())
    if not isinstance(non_persistent, set | frozenset) or not all(
        isinstance(n, str) for n in non_persistent
    ):
        raise ConversionError(
            f"persistent class {class_name!r}: _non_persistent_buffers_set is not a set of names"
        )
    init_args = state.get("_init_args", ())
    init_kwargs = state.get("_init_kwargs", {})
    if not isinstance(init_args, tuple) or not isinstance(init_kwargs, dict):
        raise ConversionError(
            f"persistent class {class_name!r}: _init_args/_init_kwargs are not a tuple and a dict"
        )
    return _PendingModule(
        class_name=class_name,
        init_args=init_args,
        init_kwargs=init_kwargs,
        parameters=entries("_parameters", np.ndarray),
        buffers=entries("_buffers", np.ndarray),
        non_persistent_buffers=frozenset(non_persistent),
        modules=entries("_modules", _PendingModule),
        attributes={
            k: v for k, v in state.items() if k not in _MODULE_BOOKKEEPING and not _is_hook_field(k)
        },
    )


def _finish(obj: Any, done: dict[int, Any]) -> Any:
    """``obj`` as returned to the caller: modules as :class:`TorchModuleRecord`, ``EasyDict``s as
    plain dicts, dicts and lists copied (``done`` maps ``id`` of what is converted to its result,
    so shared and self-referencing objects stay so)."""
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, _PendingModule):
        done[id(obj)] = TorchModuleRecord(
            class_name=obj.class_name,
            init_args=_finish(obj.init_args, done),
            init_kwargs=_finish(obj.init_kwargs, done),
            parameters=obj.parameters,
            buffers=obj.buffers,
            non_persistent_buffers=obj.non_persistent_buffers,
            modules={name: _finish(child, done) for name, child in obj.modules.items()},
            attributes=_finish(obj.attributes, done),
        )
    elif isinstance(obj, dict):
        done[id(obj)] = out = {}
        out.update((key, _finish(value, done)) for key, value in obj.items())
    elif isinstance(obj, list):
        done[id(obj)] = out = []
        out.extend(_finish(item, done) for item in obj)
    elif isinstance(obj, tuple):
        done[id(obj)] = tuple(_finish(item, done) for item in obj)
    else:
        return obj
    return done[id(obj)]


class _Storage(NamedTuple):
    """A storage read from an embedded legacy ``torch.save`` stream: flat, read-only data."""

    data: np.ndarray


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the strided view of a storage, as a contiguous copy."""
    if not isinstance(storage, _Storage):
        raise ConversionError(f"tensor: expected a storage, got a {type(storage).__name__}")
    if metadata:
        raise ConversionError(
            f"tensor: metadata {metadata!r} (conjugate/negative bits) is not supported"
        )
    dims = (storage_offset, *size, *stride)
    if (
        not isinstance(size, tuple)
        or not isinstance(stride, tuple)
        or len(size) != len(stride)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
    ):
        raise ConversionError(
            f"tensor: invalid offset {storage_offset!r}, size {size!r}, stride {stride!r}"
        )
    flat = storage.data
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise ConversionError(
            f"tensor of size {size} and stride {stride} at offset "
            f"{storage_offset} reaches past its storage of {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=[s * flat.itemsize for s in stride],
        writeable=False,
    )
    return np.array(view, order="C")


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: the tensor."""
    if not isinstance(data, np.ndarray):
        raise ConversionError(f"parameter: expected a tensor, got a {type(data).__name__}")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> np.ndarray:
    """``torch._utils._rebuild_parameter_with_state``: the tensor (Python attributes dropped)."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _codecs_encode(text: Any, encoding: Any) -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocol 2 writes ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ConversionError(
            f"_codecs.encode: only (str, 'latin1') is supported, got "
            f"({type(text).__name__}, {encoding!r})"
        )
    return text.encode("latin1")


_NUMERIC_KINDS = "biufc"


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype(str, align, copy)``: a fresh bool, integer, float or complex dtype.

    Always a copy whatever ``copy`` says, so that a ``BUILD`` on it cannot reach numpy's shared
    dtype instances.
    """
    if not isinstance(spec, str):
        raise ConversionError(f"numpy.dtype: expected a type string, got a {type(spec).__name__}")
    dtype = np.dtype(spec, align=bool(align), copy=True)
    if dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(
            f"numpy.dtype {spec!r} refused: only bool, integer, float and complex dtypes are read"
        )
    return dtype


def _numpy_scalar(dtype: Any, data: Any) -> np.generic:
    """``numpy.core.multiarray.scalar``: a bool, integer, float or complex scalar from its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject:
        raise UnsafePickleError(
            f"numpy scalar of dtype {dtype!r} refused: only bool, integer, "
            "float and complex scalars are read"
        )
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ConversionError(f"numpy scalar of dtype {dtype}: expected {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


# --- Embedded legacy torch.save streams (torch.storage._load_from_bytes) ----------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's legacy-format magic number
_LEGACY_VERSION = 1001
_STORAGE_DTYPES = {  # torch.<name> storage class -> element dtype
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType(NamedTuple):
    """``torch.<name>`` named in a storage record."""

    name: str
    dtype: np.dtype


class _StorageRecord(NamedTuple):
    """The persistent id ``('storage', torch.<Type>Storage, key, location, numel, None)``."""

    key: str
    dtype: np.dtype
    numel: int


def _storage_pid(pid: Any, length: int, where: str) -> tuple[str, np.dtype, int]:
    """``(key, dtype, numel)`` of a storage record's persistent id, the tuple
    ``('storage', torch.<Type>Storage, key, location, numel, ...)`` of ``length`` entries;
    anything else is an :class:`UnsafePickleError` (``where`` prefixes its message)."""
    if (
        not isinstance(pid, tuple)
        or len(pid) != length
        or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)
        or not isinstance(pid[2], str)
        or not isinstance(pid[4], int)
        or pid[4] < 0
    ):
        raise UnsafePickleError(f"{where}persistent id {pid!r} is not a storage record")
    return pid[2], pid[1].dtype, pid[4]


def _load_from_bytes(data: Any) -> _Storage:
    """``torch.storage._load_from_bytes``: parse the legacy ``torch.save`` stream of one storage.

    Layout: pickles of the magic number, the format version and a sys-info dict; a pickle of the
    storage as a persistent id ``('storage', torch.<Type>Storage, key, location, numel, None)``;
    a pickle of the list of keys; then per key an int64 element count and the raw elements. The
    pickles are read with the same restrictions (storage classes are the only globals, the
    storage record the only persistent id); the data stays a read-only view of ``data`` until
    a tensor copies its part out.
    """
    where = "embedded storage stream"
    if not isinstance(data, bytes):
        raise ConversionError(f"{where}: expected bytes, got a {type(data).__name__}")
    stream = io.BytesIO(data)
    if _load_part(stream, where, {}) != _LEGACY_MAGIC:
        raise ConversionError(f"{where}: not a legacy torch.save stream (bad magic number)")
    version = _load_part(stream, where, {})
    if version != _LEGACY_VERSION:
        raise ConversionError(f"{where}: format version {version!r}, expected {_LEGACY_VERSION}")
    sys_info = _load_part(stream, where, {})
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ConversionError(
            f"{where}: only little-endian streams are supported (sys info {sys_info!r})"
        )

    records: list[_StorageRecord] = []

    def storage_id(pid: Any) -> _StorageRecord:
        key, dtype, numel = _storage_pid(pid, 6, f"{where}: ")
        if pid[5] is not None:
            raise ConversionError(f"{where}: storage views are not supported")
        records.append(_StorageRecord(key, dtype, numel))
        return records[-1]

    record = _load_part(stream, where, _STORAGE_TYPES, storage_id)
    if len(records) != 1 or record is not records[0]:
        raise ConversionError(f"{where}: expected exactly one storage record")
    keys = _load_part(stream, where, {})
    if keys != [record.key]:
        raise ConversionError(f"{where}: storage keys {keys!r}, expected [{record.key!r}]")
    offset = stream.tell()
    if offset + 8 > len(data):
        raise ConversionError(f"{where}: truncated before the element count")
    (count,) = struct.unpack_from("<q", data, offset)
    if count != record.numel:
        raise ConversionError(f"{where}: corrupt: {count} elements stored, {record.numel} declared")
    offset += 8
    nbytes = count * record.dtype.itemsize
    if offset + nbytes > len(data):
        raise ConversionError(
            f"{where}: truncated: {count} elements ({nbytes} bytes) declared, "
            f"{len(data) - offset} bytes present"
        )
    if offset + nbytes != len(data):
        raise ConversionError(
            f"{where}: corrupt: {len(data) - offset - nbytes} bytes after the storage data"
        )
    return _Storage(np.frombuffer(data, record.dtype, count, offset))


# --- The allow-lists and the restricted unpickler ---------------------------------------------

# What a network pickle may name, mapped to the stand-ins above (never the real functions).
_NETWORK_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 from Python 3 (pickle's fix_imports)
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
}
# What the storage record of an embedded stream may name.
_STORAGE_TYPES = {("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()}


class _Global:
    """An allowed function as the pickle sees it: callable, but ``BUILD`` on it is refused, so a
    pickle cannot rewrite a stand-in's defaults or attributes for later reads."""

    __slots__ = ("qualname", "function")

    def __init__(self, qualname: str, function: Callable[..., Any]):
        self.qualname = qualname
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"BUILD on the global {self.qualname} refused")


_PROTOCOLS = range(2, 6)
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    OverflowError,
    RecursionError,
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Globals only from ``allowed``; no persistent ids unless ``persistent_load`` is given."""

    def __init__(
        self,
        file: Any,
        where: str,
        allowed: dict[tuple[str, str], Any],
        persistent_load: Callable[[Any], Any] | None = None,
    ):
        super().__init__(file)
        self._where = f"{where}: " if where else ""
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is None:
            hint = (
                "; a TensorFlow StyleGAN/StyleGAN2 pickle? Only the PyTorch StyleGAN2-ADA "
                "format is read"
                if module.startswith("dnnlib.tflib")
                else ""
            )
            raise UnsafePickleError(
                f"{self._where}global {module}.{name} is not on the "
                f"allow-list; refused without importing it{hint}"
            )
        if isinstance(target, np.dtype):
            return _StorageType(name, target)
        if isinstance(target, type):  # EasyDict (for NEWOBJ), dict, set
            return target
        return _Global(f"{module}.{name}", target)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise UnsafePickleError(
                f"{self._where}persistent id {pid!r} refused (this stream may not have any)"
            )
        return self._persistent_load(pid)


def _check_protocol(head: bytes, where: str) -> None:
    if len(head) < 2 or head[0] != pickle.PROTO[0] or head[1] not in _PROTOCOLS:
        raise ConversionError(f"{where}: not a pickle of protocol 2-5 (truncated or corrupt?)")


def _load_part(
    stream: io.BytesIO,
    where: str,
    allowed: dict[tuple[str, str], Any],
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """The next pickle of an embedded stream, read with the restrictions."""
    _check_protocol(stream.read(2), where)
    stream.seek(-2, io.SEEK_CUR)
    try:
        return _RestrictedUnpickler(stream, where, allowed, persistent_load).load()
    except ConversionError:
        raise
    except _UNPICKLE_ERRORS as err:
        raise ConversionError(
            f"{where}: truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def read_network_pickle(path: str | os.PathLike) -> Any:
    """Read a StyleGAN2-ADA ``.pkl`` as plain data, importing and running nothing it names.

    Args:
        path: a network pickle of NVlabs/stylegan2-ada-pytorch (a training snapshot or a
            pickle of the same layout), protocol 2-5.

    Returns:
        The top-level object with every persistent network as a :class:`TorchModuleRecord`,
        tensors as contiguous numpy arrays and ``EasyDict``s as dicts; for a snapshot
        ``{"training_set_kwargs": dict, "G": record, "D": record, "G_ema": record,
        "augment_pipe": record}``.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle names a global outside the allow-list (the message names
            it as ``module.name``), has a persistent id outside an embedded storage record, or
            holds a numpy value of a non-numeric dtype.
        ConversionError: not a pickle (e.g. a zip-format ``torch.save`` file or safetensors),
            truncated or corrupt, or a persistent object that is not a torch module in
            stylegan2-ada-pytorch's persistence format.
    """
    path = require_file(path, "network pickle")
    where = f"network pickle {str(path)!r}"
    with open(path, "rb") as f:
        head = f.read(16)
        if head.startswith(b"PK\x03\x04"):
            raise ConversionError(
                f"{where} is a zip archive (e.g. a torch.save file in the zip format), not a pickle"
            )
        if head[:1] != pickle.PROTO and head[8:9] == b"{":
            raise ConversionError(f"{where} looks like a safetensors file, not a pickle")
        _check_protocol(head, where)
        f.seek(0)
        try:
            return _finish(_RestrictedUnpickler(f, "", _NETWORK_GLOBALS).load(), {})
        except ConversionError as err:
            raise type(err)(f"{where}: {err}") from None
        except _UNPICKLE_ERRORS as err:
            raise ConversionError(
                f"{where}: truncated or corrupt pickle ({type(err).__name__}: {err})"
            ) from None
        except MemoryError:  # a corrupt length or memo index asks for an absurd allocation
            raise ConversionError(
                f"{where}: corrupt pickle, or too large for memory (MemoryError while reading)"
            ) from None
