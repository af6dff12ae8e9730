"""The improved-diffusion UNet port against numbers computed with the original code.

The fixtures hold the outputs of tiny ``improved_diffusion.unet.UNetModel``s (two levels of
32 and 64 channels, attention at 4x4) on fixed inputs, their random weights, and the flags in
the metadata. To keep the files small each weight tensor is stored under its PyTorch key as
int8 codes ``k`` with a per-tensor exponent ``e`` in the metadata; the original was run with
exactly the weights ``k * 2**-e``. ``iddpm_tiny`` uses scale-shift norm and learned sigmas (6
output channels, 2 heads); ``iddpm_tiny_plain`` adds the timestep embedding before the norm,
predicts 3 channels and uses 4 heads in the middle block and 1 in the output blocks; it shares
every equally shaped tensor with ``iddpm_tiny`` and stores only the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mmh_jax.convert import ConversionError, save_params
from mmh_jax.convert.iddpm import (
    convert_iddpm,
    iddpm_expected_params,
    iddpm_rename_table,
)
from mmh_jax.models.iddpm import IDDPMUNet, iddpm_schedule, load_iddpm

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FLAGS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "learn_sigma",
    "attention_resolutions",
    "channel_mult",
    "num_heads",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
)


# one compiled program per architecture: score functions are pytrees over (params, schedule)
_score = jax.jit(lambda score_fn, x, t: score_fn(x, t))
_apply = jax.jit(
    lambda module, params, x, t: module.apply({"params": params}, x, t), static_argnums=0
)


def _read_fixture(name):
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    io = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("fixture/")}
    state_dict = {
        k: v.astype(np.float32) * np.float32(2.0 ** -meta["exponents"][k])
        for k, v in tensors.items()
        if not k.startswith("fixture/")
    }
    if "base" in meta:
        state_dict = {**_read_fixture(meta["base"])[0], **state_dict}
    return state_dict, io, meta["flags"]


@pytest.fixture(scope="module", params=["iddpm_tiny", "iddpm_tiny_plain"])
def fixture(request):
    return _read_fixture(request.param)


@pytest.fixture(scope="module")
def tiny():
    return _read_fixture("iddpm_tiny")


def _module(flags, **overrides):
    return IDDPMUNet.from_flags(**{**{k: flags[k] for k in MODEL_FLAGS}, **overrides})


def _save_pt(path, state_dict):
    import torch

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
    return path


# --- numerics against the original ---------------------------------------------------------


@pytest.mark.slow
def test_matches_original_float32(fixture):
    state_dict, io, flags = fixture
    module = _module(flags)
    params = convert_iddpm(state_dict, module)
    out = _apply(module, params, io["x"], io["timesteps"])
    assert out.shape == io["out"].shape and out.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(out) - io["out"])) <= 1e-4


def test_bfloat16_close_to_float32(tiny):
    state_dict, io, flags = tiny
    module = _module(flags, dtype=jnp.bfloat16)
    params = convert_iddpm(state_dict, module)
    out = np.asarray(_apply(module, params, io["x"], io["timesteps"]))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.max(np.abs(out - io["out"])) <= 0.05 * np.max(np.abs(io["out"]))


def test_cifar10_config_has_the_originals_parameters():
    # improved-diffusion's create_model with the CIFAR-10 flags of its README has 52,546,438
    # parameters in 446 state-dict tensors
    module = IDDPMUNet.from_flags(
        image_size=32,
        num_channels=128,
        num_res_blocks=3,
        learn_sigma=True,
        dropout=0.3,
        attention_resolutions="16,8",
        num_heads=4,
        use_scale_shift_norm=True,
    )
    assert module.channel_mult == (1, 2, 2, 2) and module.attention_resolutions == (2, 4)
    sizes = [math.prod(leaf.shape) for leaf in jax.tree.leaves(iddpm_expected_params(module))]
    assert sum(sizes) == 52_546_438
    assert len(iddpm_rename_table(module)) == 446


# --- strict conversion ---------------------------------------------------------------------


def test_missing_key(tiny):
    state_dict, _, flags = tiny
    state_dict = dict(state_dict)
    del state_dict["middle_block.1.qkv.weight"]
    with pytest.raises(
        ConversionError,
        match=r"missing from the checkpoint[\s\S]*"
        r"middle_block\.1\.qkv\.weight",
    ):
        convert_iddpm(state_dict, _module(flags), source="ckpt.pt")


def test_extra_key(tiny):
    state_dict, _, flags = tiny
    state_dict = {**state_dict, "label_emb.weight": np.zeros((10, 128), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*label_emb\.weight"):
        convert_iddpm(state_dict, _module(flags))


def test_wrong_shape(tiny):
    state_dict, _, flags = tiny
    state_dict = {**state_dict, "out.2.weight": state_dict["out.2.weight"][:3]}
    with pytest.raises(ConversionError, match=r"wrong shapes[\s\S]*out\.2\.weight"):
        convert_iddpm(state_dict, _module(flags))


def test_flags_not_matching_the_weights(tiny, tmp_path):
    state_dict, _, flags = tiny
    path = _save_pt(tmp_path / "tiny.pt", state_dict)
    with pytest.raises(ConversionError) as err:
        load_iddpm(path, **{**flags, "num_res_blocks": 2})
    message = str(err.value)
    assert "tiny.pt" in message
    # two res blocks per level move the downsample from input block 2 to input block 3
    assert "input_blocks.3.0.op.weight" in message.split("unexpected keys")[0]
    assert "input_blocks.2.0.op.weight" in message.split("unexpected keys")[1]
    with pytest.raises(ConversionError, match=r"wrong shapes[\s\S]*out\.2\.weight"):
        load_iddpm(path, **{**flags, "learn_sigma": False})


@pytest.mark.parametrize(
    "flag, value",
    [
        ("num_res_blocks", 0),
        ("num_channels", 48),  # not divisible by the 32 normalisation groups
        ("num_heads", 3),
        ("attention_resolutions", "3"),
        ("attention_resolutions", "1"),  # 8x downsampling: the tiny UNet has two levels
        ("attention_resolutions", "four"),
        ("learn_sigma", "yes"),
        ("class_cond", True),
        ("channel_mult", [2, 2]),
        ("dropout", 1.0),
        ("diffusion_steps", 1),
        ("noise_schedule", "quadratic"),
        ("rescale_timesteps", 1),
        ("predict_xstart", True),
    ],
)
def test_bad_flag_values(tiny, tmp_path, flag, value):
    state_dict, _, flags = tiny
    path = _save_pt(tmp_path / "tiny.pt", state_dict)
    with pytest.raises(ValueError, match=flag):
        load_iddpm(path, **{**flags, flag: value})


def test_image_size_without_channel_mult():
    with pytest.raises(ValueError, match="image_size=48"):
        IDDPMUNet.from_flags(image_size=48)


def test_unknown_flag(tiny, tmp_path):
    state_dict, _, flags = tiny
    path = _save_pt(tmp_path / "tiny.pt", state_dict)
    with pytest.raises(TypeError, match="num_chanels"):
        load_iddpm(path, **flags, num_chanels=32)


class _NotATensor:
    """Unpickling this needs the test module's code: weights_only loading must refuse it."""

    def __init__(self):
        self.value = 1


def test_pickle_needing_code_is_refused(tmp_path):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": _NotATensor()}, path)
    with pytest.raises(ConversionError, match="evil.pt"):
        load_iddpm(path, image_size=32)


def test_truncated_files(tiny, tmp_path):
    state_dict, _, flags = tiny
    pt = _save_pt(tmp_path / "cut.pt", state_dict)
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(ConversionError, match="cut.pt"):
        load_iddpm(pt, **flags)
    st = tmp_path / "cut.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(st))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ConversionError, match="cut.safetensors"):
        load_iddpm(st, **flags)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_iddpm(tmp_path / "nowhere.pt")


def test_fixture_file_itself_has_unexpected_keys(tiny):
    # a state dict in safetensors form is read as such; the fixture's extra tensors are refused
    _, _, flags = tiny
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*fixture/x"):
        load_iddpm(FIXTURES / "iddpm_tiny.safetensors", **flags)


# --- loader: schedule, score function, round trip ------------------------------------------


def _cosine_abar(T, s=0.008):
    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    return np.cumprod(1 - betas)


def _linear_abar(T):
    return np.cumprod(1 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))


@pytest.mark.parametrize("T", [1000, 4000])
def test_schedules_are_improved_diffusions(T):
    np.testing.assert_allclose(
        iddpm_schedule(T, "cosine").alphas_cumprod, _cosine_abar(T), rtol=2e-6, atol=1e-12
    )
    np.testing.assert_allclose(
        iddpm_schedule(T, "linear").alphas_cumprod, _linear_abar(T), rtol=2e-6, atol=1e-12
    )


@pytest.mark.slow
def test_loader_schedule_and_score(fixture, tmp_path):
    state_dict, io, flags = fixture
    pre = load_iddpm(_save_pt(tmp_path / "model.pt", state_dict), **flags)
    T = flags["diffusion_steps"]
    abar = (_cosine_abar if flags["noise_schedule"] == "cosine" else _linear_abar)(T)
    np.testing.assert_allclose(pre.schedule.alphas_cumprod, abar, rtol=2e-6, atol=1e-12)
    assert jax.tree.leaves(pre.params)[0].dtype == jnp.float32

    # the fixture's network timesteps are s = i * 1000 / T (rescale_timesteps) or s = i for
    # 0-based steps i; step i is continuous time t = (i + 1) / T
    steps = io["timesteps"] * (T / 1000 if flags["rescale_timesteps"] else 1.0)
    assert np.all(steps == np.round(steps))
    t = (steps + 1) / T
    one_minus_abar = 1 - abar[steps.astype(int)]
    score = np.asarray(_score(pre.score_fn, io["x"], t))
    # score * sigma = -eps, the first three output channels; sigma comes from log abar, which
    # float32 holds to full relative precision even at the first of 4000 cosine steps
    eps = io["out"][:, :3]
    err = np.abs(score * np.sqrt(one_minus_abar)[:, None, None, None] + eps)
    assert err.max() <= 1e-4, err.max()


def test_safetensors_round_trip(tiny, tmp_path):
    state_dict, io, flags = tiny
    pre = load_iddpm(_save_pt(tmp_path / "model.pt", state_dict), **flags)
    path = save_params(
        tmp_path / "model.safetensors",
        pre.params,
        metadata={"architecture": "iddpm", "flags": flags},
    )
    again = load_iddpm(path)
    assert again.module == pre.module
    x, t = io["x"], jnp.asarray([0.3, 0.5, 0.9, 1.0])
    np.testing.assert_array_equal(_score(again.score_fn, x, t), _score(pre.score_fn, x, t))
    np.testing.assert_array_equal(again.schedule.alphas_cumprod, pre.schedule.alphas_cumprod)
    with pytest.raises(ValueError, match="num_res_blocks"):
        load_iddpm(path, num_res_blocks=2)


def test_pytorch_state_dict_as_safetensors(tiny, tmp_path):
    state_dict, io, flags = tiny
    path = tmp_path / "model.safetensors"
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state_dict.items()},
        str(path),
        metadata={"format": "pt"},
    )
    pre = load_iddpm(path, **flags)
    out = _apply(pre.module, pre.params, io["x"], io["timesteps"])
    assert np.max(np.abs(np.asarray(out) - io["out"])) <= 1e-4
