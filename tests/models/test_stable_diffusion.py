"""Stable Diffusion in Flax against diffusers' PyTorch pipeline on a tiny random pipeline folder
(tests/conftest.py's ``sd_folder``): prompt encoding, the UNet's noise in the right CFG slots,
DDIM sampling, the VAE, loading and conversion, and bad input."""

import json
import shutil
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from jax.tree_util import Partial

from mmh_jax.convert import ConversionError
from mmh_jax.models import load_stable_diffusion, save_stable_diffusion
from mmh_jax.models.pretrained import EpsModel

PROMPTS = ["a cat, the cat", "the quick brown fox"]


def _torch_embedding(pipe, prompts):
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return ids.numpy(), pipe.text_encoder(ids)[0].numpy()


def _torch_eps(pipe, z, timesteps, context):
    with torch.no_grad():
        return pipe.unet(
            torch.as_tensor(np.asarray(z)),
            torch.as_tensor(np.asarray(timesteps)),
            encoder_hidden_states=torch.as_tensor(np.asarray(context)),
        ).sample.numpy()


def _latents(b, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 4, 8, 8)).astype(np.float32)


def test_schedule_and_prompt_encoding_match_the_pipeline(sd, sd_folder):
    _, pipe = sd_folder
    np.testing.assert_allclose(
        sd.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-6
    )
    ids, expected = _torch_embedding(pipe, PROMPTS + [""])
    np.testing.assert_array_equal(sd.tokenize(PROMPTS + [""]), ids)
    got = sd.encode_prompt(PROMPTS + [""])
    assert got.dtype == jnp.float32 and got.shape == (3, 77, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(sd.uncond_embedding[0], expected[2], atol=1e-4)
    np.testing.assert_allclose(sd.encode_prompt(ids), got, atol=1e-6)  # token ids work too


@pytest.mark.slow
def test_eps_and_cfg_slots_match_torch(sd, sd_folder, jit_call):
    _, pipe = sd_folder
    _, emb = _torch_embedding(pipe, PROMPTS + [""])
    cond, uncond = emb[:2], emb[2:]
    z = _latents(2)
    steps = np.array([980.0, 40.0], np.float32)
    t = (steps + 1) / 1000
    eps_c = _torch_eps(pipe, z, steps, cond)
    eps_u = _torch_eps(pipe, z, steps, np.repeat(uncond, 2, 0))
    np.testing.assert_allclose(jit_call(sd.eps, z, t, cond), eps_c, atol=2e-4)
    for guidance in (0.0, 1.0, 7.5):
        expected = eps_u + guidance * (eps_c - eps_u)
        got = sd.cfg_eps(z, t, cond, uncond, guidance)
        np.testing.assert_allclose(got, expected, atol=2e-3 if guidance == 7.5 else 2e-4)
    # the embeddings cannot trade places: swapping them changes the guided noise
    swapped = sd.cfg_eps(z, t, uncond, cond, 7.5)
    assert np.abs(np.asarray(swapped) - (eps_u + 7.5 * (eps_c - eps_u))).max() > 0.1


@pytest.mark.slow
def test_scores_are_minus_eps_over_sigma(sd, sd_folder, jit_call):
    _, pipe = sd_folder
    _, emb = _torch_embedding(pipe, PROMPTS[:1] + [""])
    z, steps = _latents(1, seed=1), np.array([499.0], np.float32)
    t = (steps + 1) / 1000
    sigma = np.sqrt(1 - pipe.scheduler.alphas_cumprod.numpy()[499])
    eps_c = _torch_eps(pipe, z, steps, emb[:1])
    eps_u = _torch_eps(pipe, z, steps, emb[1:])
    np.testing.assert_allclose(
        jit_call(sd.score(emb[:1]), z, t), -eps_c / sigma, rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(
        jit_call(sd.unet.score_fn, z, t), -eps_u / sigma, rtol=1e-3, atol=1e-3
    )
    cfg = -(eps_u + 3.0 * (eps_c - eps_u)) / sigma
    np.testing.assert_allclose(
        jit_call(sd.cfg_score(emb[:1], guidance=3.0), z, t), cfg, rtol=1e-3, atol=2e-3
    )


@pytest.mark.slow
def test_ddim_sampling_matches_diffusers_pipeline(sd, sd_folder):
    _, pipe = sd_folder
    images = 2
    result = sd.sample(
        sd.encode_prompt(PROMPTS),
        key=jax.random.key(0),
        images_per_prompt=images,
        num_steps=5,
        return_trajectory=True,
    )
    noise = np.asarray(result.latents[0])  # the starting latents, prompt-major
    np.testing.assert_array_equal(
        noise[0], noise[images]
    )  # image j shares its noise across prompts
    assert not np.array_equal(noise[0], noise[1])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        expected = pipe(
            PROMPTS,
            num_images_per_prompt=images,
            num_inference_steps=5,
            guidance_scale=7.5,
            latents=torch.as_tensor(noise),
            output_type="latent",
        ).images.numpy()
    np.testing.assert_array_equal(result.timesteps, pipe.scheduler.timesteps.numpy())
    np.testing.assert_allclose(result.sample, expected, atol=2e-3 * np.abs(expected).max())
    # the trajectory's predictions are the network's at the latents it records
    _, emb = _torch_embedding(pipe, PROMPTS + [""])
    step = 3
    steps = np.full(4, float(result.timesteps[step]), np.float32)
    z = np.asarray(result.latents[step])
    np.testing.assert_allclose(
        result.eps_cond[step], _torch_eps(pipe, z, steps, np.repeat(emb[:2], images, 0)), atol=2e-4
    )
    np.testing.assert_allclose(
        result.eps_uncond[step], _torch_eps(pipe, z, steps, np.repeat(emb[2:], 4, 0)), atol=2e-4
    )


@pytest.mark.slow
def test_vae_encode_decode_match_torch(sd, sd_folder):
    _, pipe = sd_folder
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        posterior = pipe.vae.encode(torch.as_tensor(images)).latent_dist
        expected_z = posterior.mean.numpy() * pipe.vae.config.scaling_factor
        expected_x = pipe.vae.decode(
            torch.as_tensor(expected_z) / pipe.vae.config.scaling_factor
        ).sample.numpy()
    z = sd.encode_image(images)
    np.testing.assert_allclose(z, expected_z, atol=1e-4)
    np.testing.assert_allclose(sd.decode(z), expected_x, atol=1e-4)
    sampled = sd.encode_image(images, key=jax.random.key(1))
    std = posterior.std.numpy() * pipe.vae.config.scaling_factor
    assert 0 < np.abs(np.asarray(sampled) - expected_z).max() < 6 * std.max()


@pytest.mark.slow
def test_bfloat16_pipeline_keeps_float32_interfaces(sd, sd16, jit_call):
    z, t = _latents(2), np.array([0.3, 0.9], np.float32)
    emb = sd.encode_prompt(PROMPTS)
    emb16 = sd16.encode_prompt(PROMPTS)
    assert emb16.dtype == jnp.float32
    np.testing.assert_allclose(emb16, emb, atol=0.05 * np.abs(emb).max())
    # unguided: CFG multiplies the difference of the branches' rounding errors by the guidance
    # (the guided score's float32 output is tested through FLIPD, test_conditional.py)
    score16, score = jit_call(sd16.score(emb16), z, t), jit_call(sd.score(emb), z, t)
    assert score16.dtype == jnp.float32
    assert np.abs(np.asarray(score16 - score)).max() <= 0.05 * np.abs(np.asarray(score)).max()


@pytest.mark.slow
def test_converted_file_round_trip(sd, sd_folder, tmp_path, jit_call):
    file = save_stable_diffusion(tmp_path / "sd.safetensors", sd)
    again = load_stable_diffusion(file)
    for name in ("text_encoder_params", "vae_params"):
        chex.assert_trees_all_equal(getattr(again, name), getattr(sd, name))
    np.testing.assert_array_equal(again.tokenize(PROMPTS), sd.tokenize(PROMPTS))
    z, t = _latents(1), np.array([0.5], np.float32)
    emb = sd.encode_prompt(PROMPTS[:1])
    # equal models give equal Partials, so they share compiled programs (one compilation here)
    assert jax.tree.structure(again.eps) == jax.tree.structure(sd.eps)
    np.testing.assert_array_equal(jit_call(again.eps, z, t, emb), jit_call(sd.eps, z, t, emb))
    assert again.scheduler_config == sd.scheduler_config
    file.write_bytes(file.read_bytes()[:4096])
    with pytest.raises(ConversionError, match="sd.safetensors"):
        load_stable_diffusion(file)


@pytest.mark.slow
def test_v_prediction_is_turned_into_noise(sd, jit_call):
    # eps = psi v + sigma x for a v-predicting network (Salimans & Ho): with the same network read
    # as a v-predictor, the noise is psi * (its output) + sigma * x
    z, t = _latents(2, seed=4), np.array([0.2, 0.7], np.float32)
    emb = sd.encode_prompt(PROMPTS)
    v_model = EpsModel(sd.unet.module, prediction_type="v_prediction")
    got = jit_call(Partial(v_model.eps), sd.unet.params, sd.schedule, z, t, emb)
    out = np.asarray(jit_call(sd.eps, z, t, emb))
    abar = np.exp(
        np.interp(
            t * 1000,
            np.arange(1001),
            np.concatenate([[0.0], np.log(np.asarray(sd.schedule.alphas_cumprod, np.float64))]),
        )
    )
    expected = np.sqrt(abar)[:, None, None, None] * out + np.sqrt(1 - abar)[:, None, None, None] * z
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_missing_component_and_foreign_classes_are_named(sd_folder, tmp_path):
    folder, _ = sd_folder
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_stable_diffusion(tmp_path)
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        load_stable_diffusion(copy)
    shutil.rmtree(copy)
    copy = _copy(folder, tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        load_stable_diffusion(copy)


@pytest.mark.parametrize(
    "component, key, value, message",
    [
        ("text_encoder", "hidden_size", 48, "cross_attention_dim"),  # a wider text encoder
        ("vae", "latent_channels", 8, "latent channels"),  # a VAE with 8-channel latents
    ],
)
def test_components_of_another_family_are_refused(
    sd_folder, tmp_path, component, key, value, message
):
    folder, _ = sd_folder
    copy = _copy(folder, tmp_path)
    config = json.loads((copy / component / "config.json").read_text())
    config[key] = value  # checked before the weights are read (they would not fit either)
    (copy / component / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_stable_diffusion(copy)


def test_unsupported_unet_config_names_file_and_key(sd_folder, tmp_path):
    folder, _ = sd_folder
    copy = _copy(folder, tmp_path)
    config = json.loads((copy / "unet/config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (copy / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unet.*config\.json.*addition_embed_type"):
        load_stable_diffusion(copy)


def test_prompts_errors_and_truncation_warning(sd):
    with pytest.raises(ValueError, match="empty"):
        sd.encode_prompt([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        sd.tokenize(["a cat", 3])
    with pytest.raises(ValueError, match="token ids"):
        sd.encode_prompt(np.zeros((2, 77), np.float32))
    long = " ".join(["cat"] * 80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = sd.tokenize(["a cat", long])
    assert ids.shape == (2, 77)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "prompt 1" in messages[0] and "last 5 were dropped" in messages[0]


def test_wrong_latents_are_named(sd):
    emb = sd.encode_prompt(PROMPTS[:1])
    with pytest.raises(ValueError, match="sample"):
        sd.eps(np.zeros((1, 3, 8, 8), np.float32), np.array([0.5], np.float32), emb)
    with pytest.raises(ValueError, match="cond"):
        sd.cfg_eps(
            _latents(2),
            np.array([0.5, 0.5], np.float32),
            sd.encode_prompt(PROMPTS * 2),
            sd.uncond_embedding,
            7.5,
        )
    with pytest.raises(ValueError, match="cond"):
        sd.sample(emb[0], key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps"):
        sd.sample(emb, key=jax.random.key(0), num_steps=0)


def test_scheduler_must_be_ddpm_like(sd_folder, tmp_path):
    folder, _ = sd_folder
    copy = _copy(folder, tmp_path)
    config = json.loads((copy / "scheduler/scheduler_config.json").read_text())
    config["prediction_type"] = "sample"
    (copy / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="prediction_type"):
        load_stable_diffusion(copy)


@pytest.mark.parametrize("offset", [0, 2, None])
@pytest.mark.slow
def test_a_steps_offset_other_than_1_walks_the_pipelines_timesteps(sd_folder, tmp_path, offset):
    """diffusers' StableDiffusionPipeline rewrites steps_offset to 1 (an outdated config);
    the loader does the same, with a warning, so both sample on one grid."""
    from diffusers import StableDiffusionPipeline

    folder, _ = sd_folder
    copy = _copy(folder, tmp_path)
    path = copy / "scheduler/scheduler_config.json"
    config = json.loads(path.read_text())
    config.pop("steps_offset")
    if offset is not None:
        config["steps_offset"] = offset
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="steps_offset"):
        sd = load_stable_diffusion(copy)
    pipe = StableDiffusionPipeline.from_pretrained(copy, local_files_only=True, safety_checker=None)
    pipe.scheduler.set_timesteps(10)
    grid = sd.ddim_grid
    assert grid.steps_offset == 1
    ours = grid.timesteps(sd.schedule.num_timesteps, 10)
    np.testing.assert_array_equal(ours, pipe.scheduler.timesteps.numpy())


def test_only_our_truncation_warning_is_shown(capfd):
    from conftest import _tiny_tokenizer_files

    from mmh_jax.models.stable_diffusion import _tokenizer, tokenize

    tokenizer = _tokenizer(_tiny_tokenizer_files(), "tiny")  # fresh: transformers warns once each
    with pytest.warns(UserWarning, match="last 5 were dropped"):
        tokenize(tokenizer, [" ".join(["cat"] * 80)], 77)
    captured = capfd.readouterr()
    assert "sequence length" not in captured.err + captured.out  # transformers' own warning


def test_tokenize_is_safe_from_many_threads(sd):
    # the engine decodes items in threads; transformers' tokenizer keeps its padding and
    # truncation settings between the calls, so unguarded concurrent calls lose their padding
    # (ragged ids); the serial results are diffusers' (test above)
    import sys
    from concurrent.futures import ThreadPoolExecutor

    words = ("cat", "the", "a", "quick")
    prompts = [
        [" ".join(words[j % 4] for j in range(i % 11 + 1))] + ["a cat"] * (i % 3) for i in range(64)
    ]
    serial = [sd.tokenize(p) for p in prompts]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as 8 busy decoding threads do
    try:
        with ThreadPoolExecutor(16) as pool:
            for _ in range(10):
                for want, got in zip(serial, pool.map(sd.tokenize, prompts)):
                    np.testing.assert_array_equal(got, want)
    finally:
        sys.setswitchinterval(interval)
