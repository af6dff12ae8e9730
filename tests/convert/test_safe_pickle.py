"""The restricted reader of StyleGAN2-ADA network pickles: the official fixtures, a round trip of
the persistent-class format written from real torch modules, and pickles that try to run code
(each proves that nothing ran with a marker file that must not appear)."""

from __future__ import annotations

import builtins
import collections
import importlib
import os
import pickle
import re
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mmh_jax.convert import (
    ConversionError,
    TorchModuleRecord,
    UnsafePickleError,
    read_network_pickle,
)

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "stylegan2"
RESAMPLE_FILTER = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32) / 64
SKIP_COND_KWARGS = {
    "z_dim": 16,
    "c_dim": 3,
    "w_dim": 16,
    "img_resolution": 16,
    "img_channels": 3,
    "mapping_kwargs": {"num_layers": 2},
    "synthesis_kwargs": {
        "channel_base": 64,
        "channel_max": 16,
        "num_fp16_res": 2,
        "conv_clamp": 256,
        "architecture": "skip",
        "fp16_channels_last": True,
    },
}


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return read_network_pickle(FIXTURES / "skip_cond.pkl")


def _records(record: TorchModuleRecord):
    yield record
    for child in record.modules.values():
        if child is not None:
            yield from _records(child)


class _Reduce:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _assert_plain(obj) -> None:
    """Only plain dicts (no EasyDict or other dict subclasses) inside ``obj``."""
    if isinstance(obj, dict):
        assert type(obj) is dict, type(obj)
        for value in obj.values():
            _assert_plain(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _assert_plain(value)


def _skip_generator_keys() -> list[str]:
    """``G_ema.state_dict()`` keys of skip_cond.pkl in torch's order (synthesis before mapping,
    as the Generator constructs them)."""
    layer = [
        "weight",
        "noise_strength",
        "bias",
        "resample_filter",
        "noise_const",
        "affine.weight",
        "affine.bias",
    ]
    torgb = ["weight", "bias", "affine.weight", "affine.bias"]
    keys = []
    for res in (4, 8, 16):
        block = f"synthesis.b{res}"
        keys += [f"{block}.const"] if res == 4 else []
        keys.append(f"{block}.resample_filter")
        for conv in ["conv1"] if res == 4 else ["conv0", "conv1"]:
            keys += [f"{block}.{conv}.{name}" for name in layer]
        keys += [f"{block}.torgb.{name}" for name in torgb]
    keys.append("mapping.w_avg")
    for fc in ("embed", "fc0", "fc1"):
        keys += [f"mapping.{fc}.weight", f"mapping.{fc}.bias"]
    return keys


# --- The official fixtures ----------------------------------------------------------------------


def test_snapshot_layout(snapshot):
    assert list(snapshot) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    assert type(snapshot["training_set_kwargs"]) is dict
    assert snapshot["training_set_kwargs"]["resolution"] == 16
    g_ema = snapshot["G_ema"]
    assert isinstance(g_ema, TorchModuleRecord) and g_ema.class_name == "Generator"
    assert g_ema.init_args == ()
    assert g_ema.init_kwargs == SKIP_COND_KWARGS
    _assert_plain(g_ema.init_kwargs)
    assert g_ema.attributes["num_ws"] == 6
    assert g_ema.modules["synthesis"].attributes["block_resolutions"] == [4, 8, 16]
    assert not any(hasattr(r, "module_src") for r in _records(g_ema))
    for record in _records(g_ema):
        assert not any(
            "hook" in name or name in ("training", "_parameters") for name in record.attributes
        )


def test_generator_state_dict(snapshot):
    state = snapshot["G_ema"].state_dict()
    assert list(state) == _skip_generator_keys()
    assert state["synthesis.b4.const"].shape == (16, 4, 4)
    assert state["mapping.w_avg"].shape == (16,)
    assert state["mapping.embed.weight"].shape == (16, 3)
    assert state["synthesis.b4.conv1.noise_strength"].shape == ()
    # Stored channels-last (fp16 layers); read as plain contiguous [out, in, kh, kw] arrays.
    weight = state["synthesis.b8.conv0.weight"]
    assert weight.shape == (8, 16, 3, 3) and weight.dtype == np.float32
    for value in state.values():
        assert value.flags.c_contiguous and value.flags.owndata and value.flags.writeable
    synthesis = snapshot["G_ema"].modules["synthesis"]
    conv = synthesis.modules["b8"].modules["conv0"]
    assert set(conv.parameters) == {"weight", "noise_strength", "bias"}
    assert set(conv.buffers) == {"resample_filter", "noise_const"}
    assert conv.attributes["use_noise"] is True and conv.attributes["up"] == 2
    assert isinstance(conv.modules["affine"].attributes["weight_gain"], float | np.floating)


def test_resample_filters_and_networks(snapshot):
    filters = 0
    for name in ("G", "D", "G_ema"):
        for key, value in snapshot[name].state_dict().items():
            if key.endswith("resample_filter"):
                np.testing.assert_array_equal(value, RESAMPLE_FILTER)
                filters += 1
    assert filters > 20
    g, g_ema = snapshot["G"].state_dict(), snapshot["G_ema"].state_dict()
    assert list(g) == list(g_ema)
    assert any(not np.array_equal(g[k], g_ema[k]) for k in g if "resample_filter" not in k)
    d = snapshot["D"]
    assert d.class_name == "Discriminator" and d.init_kwargs["c_dim"] == 3
    assert "b16.fromrgb.weight" in d.state_dict()
    pipe = snapshot["augment_pipe"]
    assert pipe.class_name == "AugmentPipe" and pipe.init_kwargs["xflip"] == 1
    assert pipe.buffers["p"].shape == ()
    assert list(pipe.state_dict()) == ["p", "Hz_geom", "Hz_fbank"]


@pytest.mark.parametrize(
    ("name", "protocol", "architecture", "c_dim"),
    [("resnet_uncond_p2.pkl", 2, "resnet", 0), ("orig.pkl", 5, "orig", 2)],
)
def test_other_fixtures(name, protocol, architecture, c_dim):
    path = FIXTURES / name
    assert path.read_bytes()[:2] == bytes([0x80, protocol])
    g_ema = read_network_pickle(path)["G_ema"]
    assert g_ema.class_name == "Generator"
    assert g_ema.init_kwargs["c_dim"] == c_dim
    assert g_ema.init_kwargs["synthesis_kwargs"]["architecture"] == architecture
    _assert_plain(g_ema.init_kwargs)
    state = g_ema.state_dict()
    assert state["synthesis.b4.const"].shape == (16, 4, 4)
    assert ("mapping.embed.weight" in state) == (c_dim > 0)
    for key, value in state.items():
        if key.endswith("resample_filter"):
            np.testing.assert_array_equal(value, RESAMPLE_FILTER)


# --- Round trip of the persistent-class format written from real torch modules -----------------


@pytest.fixture
def persistence():
    """Stand-ins for ``torch_utils.persistence`` and ``dnnlib.util`` in ``sys.modules``, so that
    plain ``pickle`` can name ``_reconstruct_persistent_obj`` and ``EasyDict``; removed after."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    assert not any(name in sys.modules for name in names)

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the reader must not call the pickled function")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    modules = {name: types.ModuleType(name) for name in names}
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["dnnlib.util"].EasyDict = EasyDict
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _meta(class_name: str, state: dict, module_src: str = "# source omitted\n") -> dict:
    return {
        "type": "class",
        "version": 6,
        "module_src": module_src,
        "class_name": class_name,
        "state": state,
    }


class _Persistent:
    """Pickles as stylegan2-ada-pytorch's persistent classes do: a call of
    ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module's ``__dict__``."""

    def __reduce__(self):
        reconstruct = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        return reconstruct, (_meta(type(self).__name__, dict(vars(self))),)


def _torch_net(easydict: type):
    import torch

    class Linear(_Persistent, torch.nn.Linear):
        pass

    class Conv(_Persistent, torch.nn.Conv2d):
        pass

    class Net(_Persistent, torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = Linear(3, 4)
            self.conv = Conv(4, 5, 3)
            self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
            self.register_module("empty", None)
            base = torch.randn(5, 6)
            self.view = torch.nn.Parameter(base[1:, ::2])  # offset 6, strides (6, 2)
            self.register_buffer("fp16", torch.randn(2, 3).half())
            self.register_buffer("count", torch.tensor([3, -1, 2**40]))
            self.register_buffer("bf16", torch.randn(4).bfloat16())
            self.register_buffer("mask", torch.tensor([True, False]))
            self.register_buffer("scale", torch.tensor(0.5))
            self.register_buffer("cache", torch.randn(3), persistent=False)
            self.weight_gain = np.float64(0.25)
            self.channels = {4: 16, 8: 8}
            self._init_args = (7,)
            self._init_kwargs = {"mapping_kwargs": easydict(num_layers=2, lr=0.01)}

    net = Net()
    assert not net.conv.weight.is_contiguous() and net.view.storage_offset() == 6
    return net


def _torch_state_numpy(module) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for key, tensor in module.state_dict().items():
        if tensor.dtype == torch.bfloat16:
            out[key] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = tensor.detach().numpy()
    return out


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_of_torch_modules(persistence, tmp_path, protocol):
    net = _torch_net(persistence.EasyDict)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"G_ema": net, "step": 3}, protocol=protocol))
    result = read_network_pickle(path)
    assert result["step"] == 3
    record = result["G_ema"]
    assert record.class_name == "Net"
    assert record.init_args == (7,)
    assert record.init_kwargs == {"mapping_kwargs": {"num_layers": 2, "lr": 0.01}}
    _assert_plain(record.init_kwargs)
    assert record.attributes == {"weight_gain": 0.25, "channels": {4: 16, 8: 8}}
    assert type(record.attributes["weight_gain"]) is np.float64
    assert record.modules["empty"] is None
    assert record.modules["conv"].class_name == "Conv"
    assert record.modules["conv"].attributes["kernel_size"] == (3, 3)

    expected = _torch_state_numpy(net)
    state = record.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
        assert state[key].flags.c_contiguous
    assert "cache" not in state and record.non_persistent_buffers == {"cache"}
    np.testing.assert_array_equal(record.buffers["cache"], net.cache.numpy())


def test_source_in_a_record_is_data(persistence, tmp_path):
    marker = tmp_path / "MARKER"
    state = {"_parameters": {}, "_buffers": {}, "_modules": {}, "training": False}
    meta = _meta("Evil", state, module_src=f"import os\nos.system('touch {marker}')\n")
    path = tmp_path / "src.pkl"
    path.write_bytes(pickle.dumps({"G": _Reduce(persistence.reconstruct, (meta,))}, protocol=3))
    record = read_network_pickle(path)["G"]
    assert record.class_name == "Evil" and record.state_dict() == {}
    assert "module_src" not in repr(record) and "os.system" not in repr(record)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "function"}, "only 'class'"),
        ({"version": 5}, "version 5"),
        ({"state": {"weight": 1.0}}, "torch.nn.Module layout"),
    ],
)
def test_persistent_objects_of_another_shape_are_refused(persistence, tmp_path, change, message):
    meta = _meta("Net", {"_parameters": {}, "_buffers": {}, "_modules": {}}) | change
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(_Reduce(persistence.reconstruct, (meta,)), protocol=3))
    with pytest.raises(ConversionError, match=message):
        read_network_pickle(path)


# --- Pickles that try to run code -------------------------------------------------------------


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "net.pkl"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_os_system_is_refused(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    evil = _Reduce(os.system, (f"touch {marker}",))
    path = _write(tmp_path, pickle.dumps({"G_ema": [1, evil]}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"global (posix|nt|os)\.system") as err:
        read_network_pickle(path)
    assert "net.pkl" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("function", "args", "name"),
    [
        (builtins.eval, ("__import__('os').system('touch {marker}')",), "builtins.eval"),
        (builtins.exec, ("import os; os.system('touch {marker}')",), "builtins.exec"),
        (builtins.__import__, ("os",), "builtins.__import__"),
        (importlib.import_module, ("os",), "importlib.import_module"),
        (subprocess.Popen, (["touch", "{marker}"],), "subprocess.Popen"),
    ],
)
def test_code_running_globals_are_refused(tmp_path, function, args, name):
    marker = tmp_path / "MARKER"
    args = tuple(
        a.format(marker=marker) if isinstance(a, str) else [x.format(marker=marker) for x in a]
        for a in args
    )
    path = _write(tmp_path, pickle.dumps(_Reduce(function, args), protocol=3))
    with pytest.raises(UnsafePickleError, match=f"global {re.escape(name)} "):
        read_network_pickle(path)
    assert not marker.exists()


def test_a_tensorflow_stylegan_pickle_is_named(tmp_path):
    """The TensorFlow releases pickle dnnlib.tflib.network.Network objects (protocol 3 GLOBAL)."""
    data = b"\x80\x03cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01}q\x02b."
    path = _write(tmp_path, data)
    with pytest.raises(
        UnsafePickleError,
        match=r"global dnnlib\.tflib\.network\.Network .*"
        "TensorFlow StyleGAN",
    ):
        read_network_pickle(path)


def test_torch_classes_and_persistent_ids_are_refused(tmp_path):
    import torch

    path = _write(tmp_path, pickle.dumps(torch.nn.Identity(), protocol=3))
    with pytest.raises(UnsafePickleError, match=r"global torch\.nn\.modules\.linear\.Identity"):
        read_network_pickle(path)

    class WithId(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if obj == "tensor" else None

    with open(tmp_path / "net.pkl", "wb") as f:
        WithId(f, protocol=2).dump(["tensor"])
    with pytest.raises(UnsafePickleError, match="persistent id 'storage' refused"):
        read_network_pickle(tmp_path / "net.pkl")


# Hand-written protocol-2 opcodes for the embedded legacy torch.save streams.


def _op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _op_call(module: str, name: str, arg: str) -> bytes:
    return _op_global(module, name) + _op_str(arg) + b"\x85R"  # TUPLE1, REDUCE


def _pickle2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."  # PROTO 2 ... STOP


def _legacy_stream(
    values: np.ndarray,
    *,
    sys_info: bytes | None = None,
    view: bytes = b"N",
    count: int | None = None,
    numel: int | None = None,
) -> bytes:
    """``torch.save(FloatStorage, _use_new_zipfile_serialization=False)`` written by hand."""
    numel = len(values) if numel is None else numel
    storage = _pickle2(
        b"("
        + _op_str("storage")
        + _op_global("torch", "FloatStorage")
        + _op_str("0")
        + _op_str("cpu")
        + pickle.dumps(numel, protocol=2)[2:-1]
        + view
        + b"tQ"
    )  # MARK ... TUPLE, BINPERSID
    info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 8},
    }
    return (
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + (pickle.dumps(info, protocol=2) if sys_info is None else sys_info)
        + storage
        + pickle.dumps(["0"], protocol=2)
        + struct.pack("<q", len(values) if count is None else count)
        + values.astype("<f4").tobytes()
    )


def _tensor_pickle(stream: bytes, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    import torch

    storage = _Reduce(torch.storage._load_from_bytes, (stream,))
    tensor = _Reduce(
        torch._utils._rebuild_tensor_v2,
        (storage, 1, size, stride, False, collections.OrderedDict()),
    )
    return pickle.dumps({"w": tensor}, protocol=2)


def test_hand_written_legacy_stream_reads(tmp_path):
    values = np.arange(7, dtype=np.float32)
    path = _write(tmp_path, _tensor_pickle(_legacy_stream(values), (2, 3), (1, 2)))
    np.testing.assert_array_equal(read_network_pickle(path)["w"], values[1:7].reshape(3, 2).T)


@pytest.mark.parametrize(
    ("module", "name"),
    [("posix", "system"), ("builtins", "exec"), ("types", "CodeType"), ("marshal", "loads")],
)
@pytest.mark.parametrize("where", ["sys_info", "storage"])
def test_globals_inside_an_embedded_stream_are_refused(tmp_path, module, name, where):
    marker = tmp_path / "MARKER"
    call = _op_call(
        module,
        name,
        f"touch {marker}" if name == "system" else f"import os; os.system('touch {marker}')",
    )
    values = np.ones(4, np.float32)
    stream = (
        _legacy_stream(values, sys_info=_pickle2(call))
        if where == "sys_info"
        else _legacy_stream(values, view=call)
    )
    path = _write(tmp_path, _tensor_pickle(stream, (3,), (1,)))
    with pytest.raises(
        UnsafePickleError, match=rf"embedded storage stream: global {module}\.{name} "
    ):
        read_network_pickle(path)
    assert not marker.exists()


def test_element_count_beyond_the_data_is_truncation(tmp_path):
    values = np.ones(4, np.float32)
    stream = _legacy_stream(values, count=1_000_000_000_000, numel=1_000_000_000_000)
    path = _write(tmp_path, _tensor_pickle(stream, (3,), (1,)))
    with pytest.raises(ConversionError, match="truncated: 1000000000000 elements"):
        read_network_pickle(path)
    mismatch = _write(tmp_path, _tensor_pickle(_legacy_stream(values, count=3), (3,), (1,)))
    with pytest.raises(ConversionError, match="3 elements stored, 4 declared"):
        read_network_pickle(mismatch)


def test_tensor_past_its_storage_is_refused(tmp_path):
    path = _write(tmp_path, _tensor_pickle(_legacy_stream(np.ones(4, np.float32)), (2, 2), (2, 1)))
    with pytest.raises(ConversionError, match="reaches past its storage"):
        read_network_pickle(path)


def test_numpy_object_dtype_is_refused(tmp_path):
    dtype = _op_global("numpy", "dtype") + b"(" + _op_str("O") + b"\x89\x88tR"  # NEWFALSE/TRUE
    scalar = _op_global("numpy._core.multiarray", "scalar") + b"(" + dtype + _op_str("x") + b"tR"
    with pytest.raises(UnsafePickleError, match="numpy.dtype 'O' refused"):
        read_network_pickle(_write(tmp_path, _pickle2(scalar)))
    path = _write(tmp_path, pickle.dumps(np.str_("abc"), protocol=3))
    with pytest.raises(UnsafePickleError, match="numpy.dtype 'U3' refused"):
        read_network_pickle(path)


def test_build_on_an_allowed_global_is_refused(tmp_path):
    body = _op_global("torch._utils", "_rebuild_tensor_v2") + b"}" + _op_str("x") + b"Nsb"
    with pytest.raises(UnsafePickleError, match=r"BUILD on the global torch\._utils\."):
        read_network_pickle(_write(tmp_path, _pickle2(body)))


# --- Files that are not network pickles ---------------------------------------------------------


def test_truncated_and_foreign_files(tmp_path):
    data = (FIXTURES / "skip_cond.pkl").read_bytes()
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        read_network_pickle(_write(tmp_path, data[: len(data) // 2]))
    with pytest.raises(ConversionError, match="not a pickle of protocol 2-5"):
        read_network_pickle(_write(tmp_path, b"plain text, not a pickle"))
    with pytest.raises(ConversionError, match="not a pickle of protocol 2-5"):
        read_network_pickle(_write(tmp_path, b""))
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("archive/data.pkl", data)
    with pytest.raises(ConversionError, match="zip archive"):
        read_network_pickle(tmp_path / "archive.pt")
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match="safetensors"):
        read_network_pickle(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        read_network_pickle(tmp_path / "missing.pkl")
