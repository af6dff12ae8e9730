"""UNet2D against PyTorch diffusers' ``UNet2DModel`` (random weights, built offline)."""

import inspect
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding

from mmh_jax.convert import ConversionError, flatten_params
from mmh_jax.convert.unet2d import convert_unet2d
from mmh_jax.models.layers import timestep_embedding
from mmh_jax.models.loaders import ddpm_from_scheduler_config, load_unet2d, save_unet2d
from mmh_jax.models.unet2d import DDPM_CIFAR10_CONFIG, UNet2D
from mmh_jax.schedules import DDPM

TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
)

CONFIGS = {
    "one-head-attention": TINY,
    "no-attention-ddpm-embedding": dict(
        TINY,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
    "multihead-scale-shift": dict(
        TINY,
        in_channels=1,
        out_channels=2,
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.414,
        center_input_sample=True,
        time_embedding_dim=96,
    ),
    "three-levels-attn-groups": dict(
        TINY,
        block_out_channels=(16, 32, 32),
        attn_norm_num_groups=4,
        attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "no-mid-block": dict(TINY, mid_block_type=None, freq_shift=1),
}


def torch_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A diffusers UNet2DModel with random weights; biases and norm scales are perturbed too
    (their default init, 0 and 1, would hide a mix-up between them)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def torch_forward(model: UNet2DModel, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()


def inputs(batch: int, channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, h, w)).astype(np.float32)


def flax_forward(module: UNet2D, params, x, t) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)({"params": params}, x, t))


@pytest.mark.parametrize(
    "dim, flip, shift, scale", [(32, True, 0, 1.0), (33, False, 1, 1.0), (64, False, 1, 2.5)]
)
def test_timestep_embedding_matches_diffusers(dim, flip, shift, scale):
    t = np.array([0.0, 3.7, 500.25, 999.0], np.float32)
    expected = get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale
    ).numpy()
    got = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift, scale=scale)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    model = torch_unet(config)
    module = UNet2D.from_config(model.config)
    params = convert_unet2d(numpy_state_dict(model), module)
    width = 24 if len(config["block_out_channels"]) == 3 else 16  # non-square input once
    x = inputs(4, config.get("in_channels", 3), 16, width)
    t = np.array([0.0, 3.7, 500.25, 999.0], np.float32)
    err = np.abs(flax_forward(module, params, x, t) - torch_forward(model, x, t)).max()
    assert err <= 1e-4, err


@pytest.mark.slow
def test_matches_diffusers_ddpm_cifar10():
    model = torch_unet(DDPM_CIFAR10_CONFIG)
    module = UNet2D.from_config(model.config)
    params = convert_unet2d(numpy_state_dict(model), module)
    n_torch = sum(p.numel() for p in model.parameters())
    assert n_torch == 35_746_307
    assert sum(np.prod(p.shape) for p in flatten_params(params).values()) == n_torch
    apply = jax.jit(module.apply)
    for seed, t in enumerate([[999.0, 12.5], [0.0, 421.3]]):
        x, t = inputs(2, 3, 32, 32, seed), np.array(t, np.float32)
        err = np.abs(np.asarray(apply({"params": params}, x, t)) - torch_forward(model, x, t)).max()
        assert err <= 1e-4, err


@pytest.mark.slow
def test_bfloat16_close_to_float32():
    # one level: XLA:CPU compiles bfloat16 programs slowly
    model = torch_unet(
        dict(
            TINY,
            block_out_channels=(32,),
            down_block_types=("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",),
        )
    )
    module = UNet2D.from_config(model.config, dtype=jnp.bfloat16)
    params = convert_unet2d(numpy_state_dict(model), module)
    x, t = inputs(2, 3, 16, 16), np.array([10.0, 700.5], np.float32)
    out = flax_forward(module, params, x, t)
    ref = torch_forward(model, x, t)
    assert out.dtype == jnp.bfloat16
    assert np.abs(out.astype(np.float32) - ref).max() <= 0.05 * np.abs(ref).max()


def test_defaults_and_config_keys_are_diffusers():
    defaults = {
        k: p.default
        for k, p in inspect.signature(UNet2DModel.__init__).parameters.items()
        if k != "self"
    }
    ours = UNet2D().to_config()
    for key, value in ours.items():
        expected = defaults[key]
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    assert UNet2D.from_config({}) == UNet2D()
    # every key we write is one diffusers accepts, with the same meaning
    module = UNet2D.from_config(CONFIGS["multihead-scale-shift"])
    rebuilt = UNet2DModel(**module.to_config())
    assert UNet2D.from_config(rebuilt.config) == module


# --- strictness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = torch_unet(TINY)
    return UNet2D.from_config(model.config), numpy_state_dict(model)


def test_missing_extra_and_misshaped_keys_are_all_named(tiny):
    module, sd = tiny
    sd = dict(sd)
    del sd["mid_block.attentions.0.to_q.weight"]
    sd["mid_block.attentions.0.to_x.weight"] = np.zeros((64, 64), np.float32)
    sd["conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_unet2d(sd, module, source="ckpt.safetensors")
    message = str(err.value)
    for name in (
        "ckpt.safetensors",
        "mid_block.attentions.0.to_q.weight",
        "mid_block.attentions.0.to_x.weight",
        "conv_in.weight",
    ):
        assert name in message


def test_checkpoint_of_another_config_is_refused(tiny):
    module, _ = tiny
    other = numpy_state_dict(torch_unet(dict(TINY, layers_per_block=2)))
    with pytest.raises(ConversionError, match=r"down_blocks\.0\.resnets\.1\.conv1\.weight"):
        convert_unet2d(other, module)


def test_legacy_attention_names(tiny):
    module, sd = tiny
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in sd.items():
        for new, old in legacy_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    chex.assert_trees_all_equal(convert_unet2d(legacy, module), convert_unet2d(sd, module))


@pytest.mark.parametrize(
    "key, value",
    [
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
        ("up_block_types", ["SkipUpBlock2D", "UpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("downsample_type", "resnet"),
        ("upsample_type", "resnet"),
        ("act_fn", "mish"),
        ("resnet_time_scale_shift", "spatial"),
        ("norm_num_groups", 7),
        ("_class_name", "UNet2DConditionModel"),
        ("cross_attention_dim", 768),
    ],
)
def test_from_config_names_unsupported_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2D.from_config(dict(TINY, **{key: value}))


def test_bad_call_arguments_are_named(tiny):
    module, sd = tiny
    params = convert_unet2d(sd, module)
    with pytest.raises(ValueError, match="sample"):
        module.apply({"params": params}, np.zeros((1, 1, 16, 16), np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        module.apply({"params": params}, np.zeros((1, 3, 15, 16), np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="timesteps"):
        module.apply({"params": params}, np.zeros((2, 3, 16, 16), np.float32), np.zeros(3))


# --- loader -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
def test_schedule_from_scheduler_config(kind):
    if kind == "trained":
        scheduler = DDPMScheduler(trained_betas=np.linspace(1e-3, 0.05, 50).tolist())
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind)
    schedule = ddpm_from_scheduler_config(json.loads(scheduler.to_json_string()))
    np.testing.assert_allclose(
        schedule.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "config, key",
    [
        (dict(prediction_type="sample"), "prediction_type"),
        (dict(beta_schedule="sigmoid"), "beta_schedule"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    ],
)
def test_unsupported_scheduler_config(config, key):
    with pytest.raises(ValueError, match=key):
        ddpm_from_scheduler_config(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A diffusers pipeline folder (unet/ and scheduler/) with a tiny model, and the model."""
    root = tmp_path_factory.mktemp("pipeline")
    model = torch_unet(TINY)
    model.save_pretrained(root / "unet")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.save_pretrained(root / "scheduler")
    return root, model, scheduler


@pytest.mark.slow
def test_load_pipeline_and_score_matches_torch(saved):
    root, model, scheduler = saved
    loaded = load_unet2d(root)
    abar = scheduler.alphas_cumprod.numpy()
    np.testing.assert_allclose(loaded.schedule.alphas_cumprod, abar, rtol=2e-5)
    steps = np.array([0, 249, 999])  # t = (step + 1) / T, on the schedule's grid
    t = ((steps + 1) / 1000).astype(np.float32)
    x = inputs(3, 3, 16, 16, seed=3)
    score = np.asarray(jax.jit(lambda s, x, t: s(x, t))(loaded.score_fn, x, t))
    eps = torch_forward(model, x, steps.astype(np.float32))
    expected = -eps / np.sqrt(1 - abar[steps])[:, None, None, None]
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_load_layouts(saved, tmp_path):
    root, model, _ = saved
    flat = tmp_path / "flat"  # model files and scheduler_config.json in one folder
    model.save_pretrained(flat)
    (flat / "scheduler_config.json").write_text(
        (root / "scheduler/scheduler_config.json").read_text()
    )
    pickled = tmp_path / "pickled" / "unet"  # diffusion_pytorch_model.bin
    model.save_pretrained(pickled, safe_serialization=False)
    (pickled.parent / "scheduler").mkdir()
    (pickled.parent / "scheduler/scheduler_config.json").write_text(
        (root / "scheduler/scheduler_config.json").read_text()
    )
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    reference = load_unet2d(root).params
    for path in (root / "unet", flat, pickled):
        loaded = load_unet2d(path)
        assert loaded.schedule.num_timesteps == 1000
        chex.assert_trees_all_equal(loaded.params, reference)


@pytest.mark.slow
def test_converted_file_round_trip(saved, tmp_path):
    root, _, _ = saved
    loaded = load_unet2d(root)
    file = save_unet2d(tmp_path / "unet.safetensors", loaded)
    again = load_unet2d(file)
    assert again.module == loaded.module
    np.testing.assert_array_equal(again.schedule.alphas_cumprod, loaded.schedule.alphas_cumprod)
    x, t = inputs(2, 3, 16, 16), np.array([0.3, 0.9], np.float32)
    # equal modules give equal Partials: estimators share one compiled program between them
    assert jax.tree.structure(again.score_fn) == jax.tree.structure(loaded.score_fn)
    score = jax.jit(loaded.score_fn.func)  # one compilation; the modules are equal
    np.testing.assert_array_equal(
        score(*again.score_fn.args, x, t), score(*loaded.score_fn.args, x, t)
    )


def test_truncated_files_are_named(saved, tmp_path):
    root, _, _ = saved
    file = save_unet2d(tmp_path / "unet.safetensors", load_unet2d(root))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ConversionError, match="unet.safetensors"):
        load_unet2d(file)
    folder = tmp_path / "model"
    torch_unet(TINY).save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="diffusion_pytorch_model.safetensors"):
        load_unet2d(folder, schedule=DDPM.linear())


@pytest.mark.slow
def test_missing_things_are_named(saved, tmp_path):
    root, _, _ = saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_unet2d(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet2d(tmp_path)
    folder = tmp_path / "model"
    torch_unet(TINY).save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="schedule="):
        load_unet2d(folder)
    assert load_unet2d(folder, schedule=DDPM.cosine(T=100)).schedule.num_timesteps == 100
    with pytest.raises(TypeError, match="schedule"):
        load_unet2d(folder, schedule="linear")
