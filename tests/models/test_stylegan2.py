"""StyleGAN2Generator against NVlabs/stylegan2-ada-pytorch (outputs stored in fixtures).

The fixtures in ``fixtures/stylegan2`` were made once with the original code (see their
README): three tiny generators in network pickles, read here with
:func:`mmh_jax.convert.safe_pickle.read_network_pickle`, and the original's outputs for them.
"""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.convert import ConversionError, flatten_params
from mmh_jax.convert.safe_pickle import read_network_pickle
from mmh_jax.convert.stylegan2 import (
    convert_stylegan2,
    stylegan2_abstract_params,
    stylegan2_rename_table,
)
from mmh_jax.models import StyleGAN2Generator

FIXTURES = Path(__file__).parent / "fixtures" / "stylegan2"
PICKLES = {
    "skip_cond": "skip_cond.pkl",
    "resnet_uncond": "resnet_uncond_p2.pkl",
    "orig": "orig.pkl",
}
# fixture image -> call kwargs
IMAGES = {
    "img_const": {},
    "img_const_psi07": dict(truncation_psi=0.7),
    "img_const_psi07_cutoff2": dict(truncation_psi=0.7, truncation_cutoff=2),
    "img_none": dict(noise_mode="none"),
}
TOLERANCE = 1e-4  # max abs error in float32 (measured: <= 1e-5 on every output)
BF16_TOLERANCE = 0.05  # bfloat16: max abs error / max abs value (measured: about 0.01)

CIFAR10_KWARGS = dict(
    z_dim=512,
    c_dim=10,
    w_dim=512,
    img_resolution=32,
    img_channels=3,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
)
FFHQ256_KWARGS = dict(
    z_dim=512,
    c_dim=0,
    w_dim=512,
    img_resolution=256,
    img_channels=3,
    mapping_kwargs=dict(num_layers=8),
    synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=4, conv_clamp=256),
)

_apply = jax.jit(
    StyleGAN2Generator.apply, static_argnames=("self", "truncation_cutoff", "noise_mode", "method")
)


def apply(module, params, *args, **kwargs):
    return np.asarray(_apply(module, {"params": params}, *args, **kwargs))


@functools.cache
def network_pickle(name: str) -> dict:
    return read_network_pickle(FIXTURES / PICKLES[name])


@functools.cache
def converted(name: str, net: str = "G_ema"):
    record = network_pickle(name)[net]
    module = StyleGAN2Generator.from_init_kwargs(record.init_kwargs)
    return module, convert_stylegan2(record.state_dict(), module, source=f"{name}:{net}")


@functools.cache
def outputs(name: str) -> dict:
    return dict(np.load(FIXTURES / f"{name}.npz"))


def labels(module, ref):
    return ref["c"] if module.c_dim else None


@pytest.mark.parametrize("name", list(PICKLES))
def test_mapping_matches_original(name):
    module, params = converted(name)
    ref = outputs(name)
    z, c = ref["z"], labels(module, ref)
    assert module.num_ws == ref["ws"].shape[1]
    for key, psi in (("ws", 1.0), ("ws_psi07", 0.7)):
        ws = apply(module, params, z, c, truncation_psi=psi, method="mapping")
        err = np.abs(ws - ref[key]).max()
        print(f"{name} {key}: max abs error {err:.2e}")
        assert ws.shape == ref[key].shape and err <= TOLERANCE, err


@pytest.mark.parametrize(
    "name",
    [n if n == "resnet_uncond" else pytest.param(n, marks=pytest.mark.slow) for n in PICKLES],
)
def test_images_match_original(name):
    module, params = converted(name)
    ref = outputs(name)
    z, c = ref["z"], labels(module, ref)
    for key, kwargs in IMAGES.items():
        img = apply(module, params, z, c, **kwargs)
        err = np.abs(img - ref[key]).max()
        print(f"{name} {key}: max abs error {err:.2e} (max |img| {np.abs(ref[key]).max():.2f})")
        assert img.dtype == np.float32 and img.shape == ref[key].shape
        assert err <= TOLERANCE, (key, err)


def test_orig_fixture_clamps():
    """The orig generator's conv_clamp=2 is active: its images touch the bound."""
    module, params = converted("orig")
    ref = outputs("orig")
    img = apply(module, params, ref["z"], ref["c"])
    assert module.conv_clamp == 2 and np.isclose(np.abs(img).max(), 2.0)


def test_snapshot_G_matches_original():
    """The snapshot's training generator ``G`` (not only ``G_ema``) converts too."""
    module, params = converted("skip_cond", "G")
    ref = outputs("skip_cond")
    for key, kwargs in IMAGES.items():
        if "G_" + key not in ref:
            continue
        err = np.abs(apply(module, params, ref["z"], ref["c"], **kwargs) - ref["G_" + key]).max()
        print(f"skip_cond G {key}: max abs error {err:.2e}")
        assert err <= TOLERANCE, (key, err)


def test_synthesis_of_mapping_is_call():
    module, params = converted("skip_cond")
    ref = outputs("skip_cond")
    ws = apply(module, params, ref["z"], ref["c"], truncation_psi=0.7, method="mapping")
    img = apply(module, params, ws, noise_mode="none", method="synthesis")
    full = apply(module, params, ref["z"], ref["c"], truncation_psi=0.7, noise_mode="none")
    np.testing.assert_allclose(img, full, atol=1e-6)


def test_bfloat16_close_to_float32():
    record = network_pickle("skip_cond")["G_ema"]
    module = StyleGAN2Generator.from_init_kwargs(record.init_kwargs, dtype=jnp.bfloat16)
    params = convert_stylegan2(record.state_dict(), module)
    ref = outputs("skip_cond")
    img = np.asarray(jax.jit(module.apply)({"params": params}, ref["z"], ref["c"]))
    assert img.dtype == np.float32
    rel = np.abs(img - ref["img_const"]).max() / np.abs(ref["img_const"]).max()
    print(f"bfloat16: max abs error / max abs value {rel:.3f}")
    assert rel <= BF16_TOLERANCE, rel


def test_jit_and_jvp_through_call():
    module, params = converted("skip_cond")
    ref = outputs("skip_cond")
    z, c = ref["z"][:2], ref["c"][:2]

    def g(z):
        return module.apply({"params": params}, z, c, truncation_psi=0.7)

    tangents = np.random.default_rng(0).standard_normal((3,) + z.shape).astype(np.float32)
    jvp = jax.jit(jax.vmap(lambda t: jax.jvp(g, (z,), (t,))[1]))
    out = np.asarray(jvp(tangents))
    assert out.shape == (3, 2, 3, 16, 16) and np.isfinite(out).all()
    eps = 1e-2  # central differences, in float64 would be exact up to O(eps^2)
    fd = (
        np.asarray(jax.jit(g)(z + eps * tangents[0]))
        - np.asarray(jax.jit(g)(z - eps * tangents[0]))
    ) / (2 * eps)
    assert np.abs(out[0] - fd).max() <= 2e-2 * np.abs(fd).max()
    np.testing.assert_allclose(np.asarray(jax.jit(g)(z)), ref["img_const_psi07"][:2], atol=1e-4)


def test_traced_truncation_psi():
    module, params = converted("resnet_uncond")
    ref = outputs("resnet_uncond")
    f = jax.jit(
        lambda psi: module.apply(
            {"params": params}, ref["z"], truncation_psi=psi, truncation_cutoff=2
        )
    )
    np.testing.assert_allclose(np.asarray(f(0.7)), ref["img_const_psi07_cutoff2"], atol=1e-4)


def test_random_noise():
    module, params = converted("resnet_uncond")
    ref = outputs("resnet_uncond")
    key = jax.random.key(3)
    a = apply(module, params, ref["z"], noise_mode="random", key=key)
    b = apply(module, params, ref["z"], noise_mode="random", key=key)
    other = apply(module, params, ref["z"], noise_mode="random", key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref["img_const"]).max() > 1e-2
    assert np.abs(a - other).max() > 1e-2
    with pytest.raises(ValueError, match="key"):
        module.apply({"params": params}, ref["z"], noise_mode="random")


def test_integer_labels_are_one_hot():
    module, params = converted("skip_cond")
    ref = outputs("skip_cond")
    classes = ref["c"].argmax(axis=1).astype(np.int32)
    ws = apply(module, params, ref["z"], classes, method="mapping")
    np.testing.assert_allclose(ws, ref["ws"], atol=1e-4)


def test_bad_inputs():
    module, params = converted("skip_cond")
    ref = outputs("skip_cond")
    v = {"params": params}
    z, c = ref["z"], ref["c"]
    with pytest.raises(ValueError, match=r"z must have shape \[b, 16\]"):
        module.apply(v, z[:, :8], c, method="mapping")
    with pytest.raises(ValueError, match=r"c is required.*c_dim=3"):
        module.apply(v, z, method="mapping")
    with pytest.raises(ValueError, match=r"c: class labels must be in \[0, 3\)"):
        module.apply(v, z, np.array([0, 1, 3, 2]), method="mapping")
    with pytest.raises(ValueError, match=r"c must have shape \[4, 3\]"):
        module.apply(v, z, c[:, :2], method="mapping")
    with pytest.raises(ValueError, match="noise_mode"):
        module.apply(v, z, c, noise_mode="fixed")
    with pytest.raises(ValueError, match="ws must have shape"):
        module.apply(v, np.zeros((1, 5, 16), np.float32), method="synthesis")
    uncond, uparams = converted("resnet_uncond")
    with pytest.raises(ValueError, match="c must be None"):
        uncond.apply({"params": uparams}, z, c, method="mapping")
    uref = outputs("resnet_uncond")
    ws = apply(uncond, uparams, uref["z"], np.zeros((4, 0), np.float32), method="mapping")
    np.testing.assert_allclose(ws, uref["ws"], atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, official, convs", [(CIFAR10_KWARGS, 20_215_315, 8), (FFHQ256_KWARGS, 24_767_458, 14)]
)
def test_official_configs(kwargs, official, convs):
    module = StyleGAN2Generator.from_init_kwargs(kwargs)
    assert module.num_ws == convs
    # the port also stores the buffers w_avg [w_dim] and each synthesis layer's noise_const
    # [r, r] (one layer at 4x4, two at every higher resolution) as parameters
    resolutions = [2**i for i in range(2, int(np.log2(kwargs["img_resolution"])) + 1)]
    noise = sum(r * r * (1 if r == 4 else 2) for r in resolutions)
    shapes = flatten_params(stylegan2_abstract_params(module))
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == official + 512 + noise
    assert len(stylegan2_rename_table(module)) == len(shapes)


@pytest.mark.parametrize("name", list(PICKLES))
def test_init_kwargs_round_trip(name):
    module, _ = converted(name)
    kwargs = json.loads(json.dumps(module.init_kwargs()))
    assert StyleGAN2Generator.from_init_kwargs(kwargs) == module
    original = network_pickle(name)["G_ema"].init_kwargs
    assert {k: v for k, v in kwargs.items() if not k.endswith("_kwargs")} == {
        k: v for k, v in original.items() if not k.endswith("_kwargs")
    }


def test_from_init_kwargs_is_strict():
    base = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3)
    with pytest.raises(ValueError, match="'truncation'"):
        StyleGAN2Generator.from_init_kwargs(dict(base, truncation=0.7))
    with pytest.raises(ValueError, match="mapping_kwargs.'depth'"):
        StyleGAN2Generator.from_init_kwargs(dict(base, mapping_kwargs=dict(depth=2)))
    with pytest.raises(ValueError, match="'img_channels'"):
        StyleGAN2Generator.from_init_kwargs({k: v for k, v in base.items() if k != "img_channels"})
    with pytest.raises(ValueError, match="w_avg_beta"):
        StyleGAN2Generator.from_init_kwargs(dict(base, mapping_kwargs=dict(w_avg_beta=None)))
    with pytest.raises(ValueError, match="kernel_size"):
        StyleGAN2Generator.from_init_kwargs(dict(base, synthesis_kwargs=dict(kernel_size=5)))
    with pytest.raises(ValueError, match="architecture"):
        StyleGAN2Generator.from_init_kwargs(dict(base, synthesis_kwargs=dict(architecture="x")))
    with pytest.raises(ValueError, match="img_resolution"):
        StyleGAN2Generator.from_init_kwargs(dict(base, img_resolution=12))
    module = StyleGAN2Generator.from_init_kwargs(
        dict(
            base,
            mapping_kwargs=dict(w_avg_beta=0.998, num_layers=4),
            synthesis_kwargs=dict(
                kernel_size=3, fp16_channels_last=True, resample_filter=[1, 2, 1]
            ),
        )
    )
    assert module.num_layers == 4 and module.resample_filter == (1, 2, 1)


def test_conversion_is_strict():
    record = network_pickle("orig")["G_ema"]
    module = StyleGAN2Generator.from_init_kwargs(record.init_kwargs)
    state = record.state_dict()
    bad = dict(state)
    del bad["synthesis.b8.conv1.noise_strength"]
    bad["synthesis.b8.extra.weight"] = np.zeros(3, np.float32)
    bad["mapping.fc1.weight"] = np.zeros((16, 15), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_stylegan2(bad, module, source="bad.pkl")
    message = str(err.value)
    for key in (
        "synthesis.b8.conv1.noise_strength",
        "synthesis.b8.extra.weight",
        "mapping.fc1.weight",
        "bad.pkl",
    ):
        assert key in message, key
    bad = dict(state, **{"synthesis.b8.conv0.resample_filter": np.eye(4, dtype=np.float32)})
    with pytest.raises(ConversionError, match="synthesis.b8.conv0.resample_filter"):
        convert_stylegan2(bad, module)
    other = StyleGAN2Generator.from_init_kwargs(
        dict(
            record.init_kwargs,
            synthesis_kwargs=dict(
                record.init_kwargs["synthesis_kwargs"], resample_filter=[1, 2, 1]
            ),
        )
    )
    with pytest.raises(ConversionError, match="resampling filter"):
        convert_stylegan2(state, other)
    with pytest.raises(TypeError, match="StyleGAN2Generator"):
        stylegan2_rename_table(object())


# ---------------------------------------------------------------- load_stylegan2 / save_stylegan2


def test_load_save_round_trip_and_shared_programs(tmp_path):
    from mmh_jax.models import PretrainedGenerator, load_stylegan2, save_stylegan2

    model = load_stylegan2(FIXTURES / "resnet_uncond_p2.pkl")
    assert isinstance(model, PretrainedGenerator)
    ref = np.load(FIXTURES / "resnet_uncond.npz")
    out = save_stylegan2(tmp_path / "g.safetensors", model)
    again = load_stylegan2(out)
    assert again.module == model.module
    assert again.generate.func is model.generate.func  # equal modules share compiled code
    got = jax.jit(lambda g, z: g(z, truncation_psi=0.7))(again.generate, ref["z"])
    assert np.max(np.abs(np.asarray(got) - ref["img_const_psi07"])) <= TOLERANCE


def _record(**changes):
    record = read_network_pickle(FIXTURES / "orig.pkl")["G_ema"]
    import dataclasses

    return dataclasses.replace(record, **changes)


@pytest.mark.parametrize(
    "top, fragment",
    [
        ({"G": None}, "holds no 'G_ema' network (found ['G'])"),
        ([1, 2], "holds no 'G_ema' network (found list)"),
        ({"G_ema": {"a": 1}}, "is a dict, not a StyleGAN2-ADA Generator"),
        ({"G_ema": "discriminator"}, "is a str"),
        ({"G_ema": _record(class_name="Discriminator")}, "a 'Discriminator' network"),
        ({"G_ema": _record(init_args=(512,))}, "positional arguments"),
    ],
)
def test_pickles_of_other_networks_are_refused(monkeypatch, tmp_path, top, fragment):
    from mmh_jax.convert import safe_pickle
    from mmh_jax.models import load_stylegan2

    monkeypatch.setattr(safe_pickle, "read_network_pickle", lambda path: top)
    (tmp_path / "x.pkl").write_bytes(b"")
    with pytest.raises(
        ConversionError,
        match=fragment.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        load_stylegan2(tmp_path / "x.pkl")


def test_a_stylegan3_pickle_is_named(monkeypatch, tmp_path):
    """A StyleGAN3 generator is also a 'Generator', with layers input, L0_36_512, ..."""
    import dataclasses

    from mmh_jax.convert import safe_pickle
    from mmh_jax.models import load_stylegan2

    record = _record()
    synthesis = record.modules["synthesis"]
    layers = {"input": None, "L0_36_512": None, "L1_36_512": None}
    record = dataclasses.replace(
        record,
        modules={**record.modules, "synthesis": dataclasses.replace(synthesis, modules=layers)},
    )
    monkeypatch.setattr(safe_pickle, "read_network_pickle", lambda path: {"G_ema": record})
    (tmp_path / "x.pkl").write_bytes(b"")
    with pytest.raises(ConversionError, match="StyleGAN3"):
        load_stylegan2(tmp_path / "x.pkl")


def test_loader_bad_input(tmp_path):
    from safetensors.numpy import save_file

    from mmh_jax.models import load_stylegan2

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stylegan2(tmp_path / "none.pkl")
    with pytest.raises(ValueError, match="network must be 'G' or 'G_ema'"):
        load_stylegan2(FIXTURES / "orig.pkl", network="D")
    with pytest.raises(ConversionError, match=r"holds no 'G' network \(found \['G_ema'\]\)"):
        load_stylegan2(FIXTURES / "orig.pkl", network="G")
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes((FIXTURES / "orig.pkl").read_bytes()[:20000])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_stylegan2(truncated)
    with pytest.raises(ValueError, match="carries its own"):
        load_stylegan2(FIXTURES / "orig.pkl", init_kwargs={"z_dim": 16})
    plain = tmp_path / "G.safetensors"
    state = read_network_pickle(FIXTURES / "orig.pkl")["G_ema"].state_dict()
    save_file({k: np.asarray(v, order="C") for k, v in state.items()}, str(plain))
    with pytest.raises(ValueError, match="plain state dict: pass the generator's init_kwargs"):
        load_stylegan2(plain)
    with pytest.raises(ValueError, match="unknown key 'depth'"):
        load_stylegan2(plain, init_kwargs={"depth": 3})
    other = tmp_path / "other.safetensors"
    from mmh_jax.convert import save_params

    save_params(other, {"w": np.zeros(2, np.float32)}, metadata={"architecture": "iddpm"})
    with pytest.raises(ConversionError, match="holds a 'iddpm' model"):
        load_stylegan2(other)
    kwargs = read_network_pickle(FIXTURES / "skip_cond.pkl")["G_ema"].init_kwargs
    with pytest.raises(ConversionError, match="does not match the model architecture"):
        load_stylegan2(plain, init_kwargs=kwargs)  # orig.pkl's weights, skip_cond's config
