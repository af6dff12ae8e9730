"""UNet2DCondition against PyTorch diffusers' ``UNet2DConditionModel`` (random weights, built
offline): tiny SD v1- and v2-like configs, bfloat16, and the full SD v1.5 architecture."""

import gc
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from mmh_jax.convert import ConversionError, flatten_params
from mmh_jax.convert.unet2d_condition import (
    convert_unet2d_condition,
    unet2d_condition_rename_table,
)
from mmh_jax.models.unet2d import UNet2D
from mmh_jax.models.unet2d_condition import SD15_UNET_CONFIG, UNet2DCondition

SD15_PARAMETERS = 859_520_964

TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=16,
)

CONFIGS = {
    # SD v1: 1x1-convolution projections, one head count everywhere
    "sd1-like": TINY,
    # SD v2: linear projections, per-block head counts, upcast attention
    "sd2-like": dict(
        TINY,
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        upcast_attention=True,
        cross_attention_dim=24,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # three levels, two transformer layers, no mid block, DDPM-style embedding and padding
    "three-levels-no-mid": dict(
        TINY,
        block_out_channels=(16, 32, 32),
        transformer_layers_per_block=2,
        mid_block_type=None,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
        attention_head_dim=(1, 2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # per-block layer counts, scale-shift resnets, mid block scaling, head counts that do not
    # divide the width (inner width < channels), other kernel sizes and channel counts
    "per-block-and-odd-options": dict(
        TINY,
        layers_per_block=(2, 1),
        transformer_layers_per_block=(1, 2),
        resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.414,
        center_input_sample=True,
        time_embedding_dim=48,
        conv_in_kernel=5,
        conv_out_kernel=1,
        in_channels=3,
        out_channels=2,
        attention_head_dim=3,
        norm_eps=1e-6,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    ),
}
TIMESTEPS = np.array([0.0, 3.7, 999.0], np.float32)


def torch_unet(config: dict, seed: int = 0, sharpen: bool = True) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel with random weights; biases and norm scales are perturbed
    too (their default init, 0 and 1, would hide a mix-up between them). The attention queries
    and keys and the GEGLU projections are scaled up (``sharpen``): at PyTorch's default init
    the softmax is almost uniform and the gate almost linear, which would hide a wrong head
    split or the tanh approximation of the gelu."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif not sharpen:
                continue
            elif name.endswith((".to_q.weight", ".to_k.weight")):
                p.mul_(3.0)
            elif name.endswith(".ff.net.0.proj.weight"):
                p.mul_(4.0)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def inputs(config: dict, batch: int, h: int, w: int, tokens: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config.get("in_channels", 4), h, w)).astype(np.float32)
    context = rng.standard_normal((batch, tokens, config["cross_attention_dim"]))
    return x, context.astype(np.float32)


def torch_forward(model: UNet2DConditionModel, x, t, context) -> np.ndarray:
    with torch.inference_mode():
        return model(
            torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)
        ).sample.numpy()


def flax_forward(module: UNet2DCondition, params, x, t, context) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)({"params": params}, x, t, context))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    model = torch_unet(config)
    module = UNet2DCondition.from_config(model.config)
    params = convert_unet2d_condition(numpy_state_dict(model), module)
    width = 24 if name in ("sd1-like", "three-levels-no-mid") else 16  # non-square inputs
    x, context = inputs(config, 3, 16, width)
    ref = torch_forward(model, x, TIMESTEPS, context)
    err = np.abs(flax_forward(module, params, x, TIMESTEPS, context) - ref).max()
    assert err <= 1e-4, err


@pytest.mark.slow
def test_bfloat16_close_to_float32_torch():
    # one level: XLA:CPU compiles bfloat16 programs slowly
    config = dict(
        TINY,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )
    # default-init attention (measured: 1.5% of max |ref|; with the sharpened softmaxes and
    # gates of the float32 tests the bfloat16 output is 4.2% off)
    model = torch_unet(config, sharpen=False)
    module = UNet2DCondition.from_config(model.config, dtype=jnp.bfloat16)
    params = convert_unet2d_condition(numpy_state_dict(model), module)
    x, context = inputs(config, 2, 16, 16)
    t = np.float32(700.5)  # a scalar timestep is the whole batch's, in both
    out = flax_forward(module, params, x, t, context)
    ref = torch_forward(model, x, np.array(t), context)
    assert out.dtype == jnp.bfloat16
    assert np.abs(out.astype(np.float32) - ref).max() <= 0.05 * np.abs(ref).max()


def random_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD v1.5's UNet with random weights, filled faster than diffusers' own initialisation:
    built on the meta device, then every weight drawn uniformly with PyTorch's default bound
    ``1/sqrt(fan_in)``, norm scales ``1 + U(-0.1, 0.1)`` and biases ``U(-0.1, 0.1)``."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15_UNET_CONFIG)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            bound = 0.1 if p.ndim == 1 else p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=generator)
            if p.ndim == 1 and name.endswith(".weight"):  # every 1-D weight is a norm scale
                p.add_(1.0)
    return model


@pytest.mark.slow
def test_matches_diffusers_sd15_full_size():
    """The full SD v1.5 UNet at batch 1, 64x64x4 latents and a 77x768 context, in float32.

    Memory: the PyTorch model, the converted numpy tree and the JAX copy are ~3.4 GB each;
    each is dropped as soon as the next exists.
    """
    start = time.perf_counter()
    model = random_sd15_unet()
    assert sum(p.numel() for p in model.parameters()) == SD15_PARAMETERS
    assert not list(model.buffers())
    x, context = inputs(SD15_UNET_CONFIG, 1, 64, 64, tokens=77, seed=1)
    t = np.array([421.5], np.float32)
    ref = torch_forward(model, x, t, context)
    module = UNet2DCondition.from_config(model.config)
    params = convert_unet2d_condition(numpy_state_dict(model), module)
    del model
    gc.collect()
    assert sum(v.size for v in flatten_params(params).values()) == SD15_PARAMETERS
    params = jax.device_put(params)
    gc.collect()
    out = flax_forward(module, params, x, t, context)
    del params
    err = np.abs(out - ref).max()
    print(
        f"SD v1.5 UNet: max abs error {err:.3g} (max |ref| {np.abs(ref).max():.3g}), "
        f"{time.perf_counter() - start:.0f} s"
    )
    assert err <= 1e-4, err


# --- config -------------------------------------------------------------------------------


def diffusers_defaults() -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if k != "self"
    }


def test_defaults_and_config_keys_are_diffusers():
    defaults = diffusers_defaults()
    for key, value in UNet2DCondition().to_config().items():
        expected = defaults[key]
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    # every diffusers key is read (or checked and skipped) at its default value
    assert UNet2DCondition.from_config(defaults) == UNet2DCondition()
    assert UNet2DCondition.from_config({}) == UNet2DCondition()
    assert UNet2DCondition.from_config(SD15_UNET_CONFIG).attention_head_dim == 8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip_and_table_is_the_state_dict(name):
    model = torch_unet(CONFIGS[name])
    module = UNet2DCondition.from_config(model.config)
    rebuilt = UNet2DConditionModel(**module.to_config())
    assert UNet2DCondition.from_config(rebuilt.config) == module
    assert UNet2DCondition.from_config(dict(rebuilt.config)) == module
    assert set(unet2d_condition_rename_table(module)) == set(model.state_dict())


def test_sd15_table_is_the_state_dict():
    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15_UNET_CONFIG)
    module = UNet2DCondition.from_config(model.config)
    assert module == UNet2DCondition.from_config(SD15_UNET_CONFIG)
    assert set(unet2d_condition_rename_table(module)) == set(model.state_dict())


@pytest.mark.parametrize(
    "key, value",
    [
        ("addition_embed_type", "text_time"),
        ("addition_time_embed_dim", 256),
        ("projection_class_embeddings_input_dim", 2816),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("class_embeddings_concat", True),
        ("only_cross_attention", True),
        ("only_cross_attention", [True, False]),
        ("mid_block_only_cross_attention", True),
        ("num_attention_heads", 8),
        ("dual_cross_attention", True),
        ("encoder_hid_dim", 32),
        ("encoder_hid_dim_type", "text_proj"),
        ("time_cond_proj_dim", 256),
        ("time_embedding_act_fn", "silu"),
        ("timestep_post_act", "silu"),
        ("attention_type", "gated"),
        ("cross_attention_norm", "group_norm"),
        ("resnet_skip_time_act", True),
        ("resnet_out_scale_factor", 2.0),
        ("reverse_transformer_layers_per_block", [[1], [1]]),
        ("time_embedding_type", "fourier"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("resnet_time_scale_shift", "spatial"),
        ("act_fn", "mish"),
        ("cross_attention_dim", [16, 16]),
        ("attention_head_dim", [2]),
        ("transformer_layers_per_block", [[1, 2], [1, 2]]),
        ("layers_per_block", 0),
        ("norm_num_groups", 7),
        ("conv_in_kernel", 4),
        ("flux_capacitor", 1),
        ("_class_name", "UNet2DModel"),
    ],
)
def test_from_config_names_unsupported_key(key, value):
    with pytest.raises(ValueError, match=key) as err:
        UNet2DCondition.from_config(dict(TINY, **{key: value}))
    if key != "flux_capacitor":
        assert "expected" in str(err.value)
    if value == "text_time":
        assert "SDXL is not supported" in str(err.value)


# --- strictness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = torch_unet(TINY)
    return UNet2DCondition.from_config(model.config), numpy_state_dict(model)


def test_missing_extra_and_misshaped_keys_are_all_named(tiny):
    module, sd = tiny
    sd = dict(sd)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    del sd[f"{attn}.to_k.weight"]
    sd[f"{attn}.to_k.bias"] = np.zeros(32, np.float32)
    sd["up_blocks.1.attentions.0.proj_in.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_unet2d_condition(sd, module, source="unet.safetensors")
    message = str(err.value)
    for name in (
        "unet.safetensors",
        f"{attn}.to_k.weight",
        f"{attn}.to_k.bias",
        "up_blocks.1.attentions.0.proj_in.weight",
    ):
        assert name in message


def test_checkpoint_of_another_config_is_refused(tiny):
    module, _ = tiny
    other = numpy_state_dict(torch_unet(dict(TINY, transformer_layers_per_block=2)))
    with pytest.raises(ConversionError, match=r"attentions\.0\.transformer_blocks\.1\.norm1"):
        convert_unet2d_condition(other, module)
    # same keys, other layouts: 1x1-convolution weights into linear projections
    with pytest.raises(ConversionError, match=r"attentions\.0\.proj_in\.weight"):
        convert_unet2d_condition(
            tiny[1], UNet2DCondition.from_config(dict(TINY, use_linear_projection=True))
        )


def test_converter_wants_a_unet2d_condition():
    with pytest.raises(TypeError, match="UNet2DCondition"):
        unet2d_condition_rename_table(UNet2D())


def test_bad_call_arguments_are_named(tiny):
    module, sd = tiny
    params = {"params": convert_unet2d_condition(sd, module)}
    x, context = inputs(TINY, 2, 16, 16)
    t = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="sample"):
        module.apply(params, x[:, :3], t, context)
    with pytest.raises(ValueError, match="divisible by 2"):
        module.apply(params, x[:, :, :15], t, context)
    with pytest.raises(ValueError, match="timesteps"):
        module.apply(params, x, np.zeros(3), context)
    with pytest.raises(ValueError, match="encoder_hidden_states.*cross_attention_dim"):
        module.apply(params, x, t, context[..., :8])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        module.apply(params, x, t, context[:1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        module.apply(params, x, t, context[0])
