"""AutoencoderKL against PyTorch diffusers' ``AutoencoderKL`` (random weights, built offline)."""

import functools
import inspect
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderTiny, UNet2DModel
from diffusers import AutoencoderKL as TorchAutoencoderKL

from mmh_jax.convert import ConversionError, flatten_params, read_state_dict
from mmh_jax.convert.autoencoder_kl import (
    autoencoder_kl_rename_table,
    convert_autoencoder_kl,
)
from mmh_jax.models.autoencoder_kl import (
    AutoencoderKL,
    LatentDistribution,
    scale_latents,
    unscale_latents,
)

TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
)

CONFIGS = {
    "two-levels": (TINY, (16, 16)),
    "three-levels-no-attention-no-quant-conv": (
        dict(
            TINY,
            block_out_channels=(16, 16, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=2,
            mid_block_add_attention=False,
            use_quant_conv=False,
        ),
        (16, 24),
    ),
    "one-level-custom-channels": (
        dict(
            TINY,
            block_out_channels=(24,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            in_channels=1,
            out_channels=2,
            latent_channels=3,
            norm_num_groups=4,
            act_fn="swish",
            use_post_quant_conv=False,
            shift_factor=0.1,
            scaling_factor=1.5,
        ),
        (8, 12),
    ),
}


def torch_vae(config: dict, seed: int = 0) -> TorchAutoencoderKL:
    """A diffusers AutoencoderKL with random weights; biases and norm scales are perturbed too
    (their default init, 0 and 1, would hide a mix-up between them)."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def images(batch: int, channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, h, w)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def flax_forward(module: AutoencoderKL, params, x, z, call: bool = False):
    """``(encode(x), a posterior sample, decode(z), module(x) if call)``, compiled once per
    module and input shapes."""
    variables = {"params": params}
    posterior = module.apply(variables, x, method="encode")
    return (
        posterior,
        posterior.sample(jax.random.key(0)),
        module.apply(variables, z, method="decode"),
        module.apply(variables, x) if call else None,
    )


@functools.partial(jax.jit, static_argnums=0)
def flax_decode(module: AutoencoderKL, params, z):
    return module.apply({"params": params}, z, method="decode")


def torch_encode(model: TorchAutoencoderKL, x: np.ndarray):
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
    return posterior.mean.numpy(), posterior.std.numpy()


def torch_decode(model: TorchAutoencoderKL, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


@pytest.fixture(scope="module")
def tiny():
    model = torch_vae(TINY)
    module = AutoencoderKL.from_config(model.config)
    sd = numpy_state_dict(model)
    return model, module, sd, convert_autoencoder_kl(sd, module)


def torch_call(model: TorchAutoencoderKL, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).sample.numpy()  # decodes the posterior mean


def parity_inputs(module: AutoencoderKL, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Images, and latents of the matching shape (not posterior means)."""
    down = module.downscale
    return (
        images(2, module.in_channels, h, w),
        images(2, module.latent_channels, h // down, w // down, seed=1),
    )


@pytest.mark.parametrize(
    "name",
    [n if n == "two-levels" else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS],
)
def test_matches_diffusers(name):
    config, (h, w) = CONFIGS[name]
    model = torch_vae(config)
    module = AutoencoderKL.from_config(model.config)
    params = convert_autoencoder_kl(numpy_state_dict(model), module)
    n_torch = sum(p.numel() for p in model.parameters())
    assert sum(np.prod(p.shape) for p in flatten_params(params).values()) == n_torch

    x, z = parity_inputs(module, h, w)
    call = name == "one-level-custom-channels"  # __call__ too, on the cheapest model
    posterior, sample, decoded, reconstructed = flax_forward(module, params, x, z, call)
    mean, std = torch_encode(model, x)
    assert isinstance(posterior, LatentDistribution)
    assert posterior.mean.shape == mean.shape == z.shape
    assert np.abs(np.asarray(posterior.mean) - mean).max() <= 1e-4
    assert np.abs(np.asarray(posterior.std) - std).max() <= 1e-4
    eps = (np.asarray(sample) - mean) / std  # standard normal
    assert abs(eps.mean()) < 0.25 and 0.75 < eps.std() < 1.25
    ref = torch_decode(model, z)
    assert decoded.shape == ref.shape == (2, module.out_channels, h, w)
    assert np.abs(np.asarray(decoded) - ref).max() <= 1e-4
    if call:
        assert np.abs(np.asarray(reconstructed) - torch_call(model, x)).max() <= 1e-4


def test_logvar_is_clamped_like_diffusers(tiny):
    model, module, sd, _ = tiny
    bias = sd["quant_conv.bias"].copy()
    bias[4:] += np.array([60.0, -60.0, 25.0, -35.0], np.float32)  # beyond [-30, 20]
    params = convert_autoencoder_kl(dict(sd, **{"quant_conv.bias": bias}), module)
    clamped = torch_vae(TINY)
    with torch.no_grad():
        clamped.quant_conv.bias.copy_(torch.from_numpy(bias))
    x, z = parity_inputs(module, 16, 16)  # the shapes test_matches_diffusers compiled for
    _, std = torch_encode(clamped, x)
    assert np.isclose(std.max(), np.exp(10.0)) and np.isclose(std.min(), np.exp(-15.0))
    np.testing.assert_allclose(flax_forward(module, params, x, z, False)[0].std, std, rtol=1e-5)


def test_bfloat16_decode_close_to_float32_torch():
    config, (h, w) = CONFIGS["one-level-custom-channels"]  # XLA:CPU compiles bfloat16 slowly
    model = torch_vae(config)
    module = AutoencoderKL.from_config(model.config, dtype=jnp.bfloat16)
    params = convert_autoencoder_kl(numpy_state_dict(model), module)
    _, z = parity_inputs(module, h, w)
    out = np.asarray(flax_decode(module, params, z))
    ref = torch_decode(model, z)
    assert out.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: allow 3% of the output's range
    assert np.abs(out.astype(np.float32) - ref).max() <= 0.03 * np.abs(ref).max()


def test_latent_scaling_helpers():
    sd = AutoencoderKL()
    z = jnp.arange(4.0)
    np.testing.assert_allclose(scale_latents(sd, z), z * 0.18215, rtol=1e-6)
    flux_like = AutoencoderKL(scaling_factor=0.3611, shift_factor=0.1159)
    np.testing.assert_allclose(scale_latents(flux_like, z), (z - 0.1159) * 0.3611, rtol=1e-6)
    for module in (sd, flux_like):
        np.testing.assert_allclose(
            unscale_latents(module, scale_latents(module, z)), z, rtol=1e-6, atol=1e-6
        )


# --- config -------------------------------------------------------------------------------


def test_defaults_and_config_keys_are_diffusers():
    defaults = {
        k: p.default
        for k, p in inspect.signature(TorchAutoencoderKL.__init__).parameters.items()
        if k != "self"
    }
    ours = AutoencoderKL().to_config()
    assert set(ours) == set(defaults)
    for key, value in ours.items():
        expected = defaults[key]
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    assert AutoencoderKL.from_config({}) == AutoencoderKL()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    config, _ = CONFIGS[name]
    module = AutoencoderKL.from_config(TorchAutoencoderKL(**config).config)
    assert module == AutoencoderKL(**config)
    rebuilt = TorchAutoencoderKL(**json.loads(json.dumps(module.to_config())))
    assert AutoencoderKL.from_config(rebuilt.config) == module
    assert (
        AutoencoderKL.from_config(
            dict(module.to_config(), _class_name="AutoencoderKL", _diffusers_version="0.30.0")
        )
        == module
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "mish"),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("latents_std", [1.0, 1.0, 1.0, 1.0]),
        ("shift_factor", "0.1"),
        ("scaling_factor", 0),
        ("norm_num_groups", 7),
        ("block_out_channels", [16, 32, 64]),
        ("use_quant_conv", "yes"),
        ("sample_size", [16, 16, 16]),
        ("_class_name", "AutoencoderTiny"),
        ("norm_type", "spatial"),
    ],
)
def test_from_config_names_unsupported_key(key, value):
    with pytest.raises(ValueError, match=key):
        AutoencoderKL.from_config(dict(TINY, **{key: value}))


def test_bad_call_arguments_are_named(tiny):
    _, module, _, params = tiny
    variables = {"params": params}
    with pytest.raises(ValueError, match=r"x must have shape \[b, 3, h, w\]"):
        module.apply(variables, np.zeros((1, 1, 16, 16), np.float32), method="encode")
    with pytest.raises(ValueError, match="x height and width must be divisible by 2"):
        module.apply(variables, np.zeros((1, 3, 16, 15), np.float32), method="encode")
    with pytest.raises(ValueError, match=r"x must have shape"):
        module.apply(variables, np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"z must have shape \[b, 4, h, w\]"):
        module.apply(variables, np.zeros((1, 8, 4, 4), np.float32), method="decode")


# --- conversion ---------------------------------------------------------------------------


def test_rename_table_is_diffusers_state_dict(tiny):
    _, module, sd, _ = tiny
    table = autoencoder_kl_rename_table(module)
    assert set(table) == set(sd)
    for key in (
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "quant_conv.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
    ):
        assert key in table
    assert table["decoder.up_blocks.0.upsamplers.0.conv.weight"].path == (
        "decoder",
        "up_blocks_0",
        "upsamplers_0",
        "conv",
        "kernel",
    )
    legacy = autoencoder_kl_rename_table(module, legacy_attention=True)
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in legacy


def test_saved_checkpoint_converts(tiny, tmp_path):
    model, module, _, params = tiny
    model.save_pretrained(tmp_path)
    sd = read_state_dict(tmp_path / "diffusion_pytorch_model.safetensors")
    chex.assert_trees_all_equal(
        convert_autoencoder_kl(sd, module, source="vae.safetensors"), params
    )


def _legacy(sd: dict, conv: bool, names: bool) -> dict:
    renamed = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in sd.items():
        if ".attentions.0." in key:
            for new, old in renamed.items():
                if f".{new}." in key:
                    if conv and key.endswith(".weight"):
                        value = value[:, :, None, None]
                    if names:
                        key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("conv, names", [(False, True), (True, False), (True, True)])
def test_legacy_attention_layouts_convert_to_the_same_params(tiny, conv, names):
    _, module, sd, params = tiny
    old = _legacy(sd, conv, names)
    assert ("encoder.mid_block.attentions.0.proj_attn.weight" in old) == names
    assert old[
        "decoder.mid_block.attentions.0." + ("key" if names else "to_k") + ".weight"
    ].ndim == (4 if conv else 2)
    chex.assert_trees_all_equal(convert_autoencoder_kl(old, module), params)


def test_missing_extra_and_misshaped_keys_are_all_named(tiny):
    _, module, sd, _ = tiny
    sd = dict(sd)
    del sd["decoder.mid_block.attentions.0.to_v.bias"]
    sd["encoder.mid_block.attentions.0.to_x.weight"] = np.zeros((32, 32), np.float32)
    sd["post_quant_conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    sd["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_autoencoder_kl(sd, module, source="vae.safetensors")
    message = str(err.value)
    for name in (
        "vae.safetensors",
        "decoder.mid_block.attentions.0.to_v.bias",
        "encoder.mid_block.attentions.0.to_x.weight",
        "post_quant_conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
    ):
        assert name in message


def test_checkpoint_of_another_config_is_refused(tiny):
    _, module, _, _ = tiny
    no_quant = numpy_state_dict(torch_vae(dict(TINY, use_quant_conv=False)))
    with pytest.raises(ConversionError, match=r"quant_conv\.weight"):
        convert_autoencoder_kl(no_quant, module)


def test_other_model_families_are_refused(tiny):
    _, module, _, _ = tiny
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
    )
    tiny_ae = AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
    )
    asymmetric = AsymmetricAutoencoderKL(
        down_block_out_channels=(8,), up_block_out_channels=(8,), norm_num_groups=4
    )
    for model in (unet, tiny_ae, asymmetric):
        with pytest.raises(ConversionError, match="unet.bin is not an AutoencoderKL"):
            convert_autoencoder_kl(numpy_state_dict(model), module, source="unet.bin")


def test_converter_needs_an_autoencoder():
    with pytest.raises(TypeError, match="AutoencoderKL"):
        autoencoder_kl_rename_table(UNet2DModel)
