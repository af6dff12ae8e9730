"""The shapes world's model: a diffusers folder both loaders read alike, training that resumes
exactly, and a cache that is reused only for identical settings (the trained model of record is
checked in ``test_trained_world.py``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.models import load_stable_diffusion
from mmh_jax.worlds import ShapesWorld, TrainSpec, WorldSpec, train_world_model

TINY_WORLD = WorldSpec(
    seed=5, num_normal=24, verbatim_counts=(4, 8), num_template=1, template_captions=3, num_rare=2
)
TINY_TRAIN = TrainSpec(
    vae_steps=4,
    vae_batch=4,
    steps=6,
    batch_size=8,
    unet_channels=(16, 32),
    text_width=16,
    text_layers=1,
    chunk=2,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "model"
    calls = []
    pipeline = train_world_model(root, TINY_WORLD, TINY_TRAIN, progress=lambda *a: calls.append(a))
    return root, pipeline, calls


@pytest.mark.slow
def test_folder_loads_alike_in_jax_and_diffusers(tiny_model):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    _, folder, _ = tiny_model
    sd = load_stable_diffusion(folder)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None
    )
    world = ShapesWorld(TINY_WORLD)
    prompts = [world.pairs[0].caption, ""]
    ids = sd.tokenize(prompts)
    torch_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=ids.shape[1], return_tensors="np"
    )["input_ids"]
    np.testing.assert_array_equal(ids, torch_ids)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2,) + sd.latent_shape).astype(np.float32)
    timestep = 400
    with torch.no_grad():
        context = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0]
        eps_torch = pipe.unet(
            torch.from_numpy(z), timestep, encoder_hidden_states=context
        ).sample.numpy()
    t = jnp.full((2,), (timestep + 1) / sd.schedule.num_timesteps)
    context_jax = sd.encode_prompt(ids)
    np.testing.assert_allclose(np.asarray(context_jax), context.numpy(), atol=2e-5)
    eps = np.asarray(sd.eps(jnp.asarray(z), t, context_jax))
    np.testing.assert_allclose(eps, eps_torch, atol=2e-5, rtol=1e-4)
    # the CFG norm ||eps_c - eps_u|| of the caption, from either side
    np.testing.assert_allclose(
        np.linalg.norm(eps[0] - eps[1]), np.linalg.norm(eps_torch[0] - eps_torch[1]), rtol=1e-4
    )
    # the empty prompt's embedding is the pipeline's unconditional one
    np.testing.assert_allclose(np.asarray(sd.uncond_embedding)[0], context.numpy()[1], atol=2e-5)
    with torch.no_grad():
        image_torch = pipe.vae.decode(
            torch.from_numpy(z[:1]) / pipe.vae.config.scaling_factor
        ).sample.numpy()
    np.testing.assert_allclose(np.asarray(sd.decode(z[:1])), image_torch, atol=2e-5)


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tiny_model, tmp_path):
    root, folder, calls = tiny_model
    stages = [c[0] for c in calls if c[1] == c[2]]
    assert stages == ["autoencoder", "diffusion model"]

    class Stop(Exception):
        pass

    def stop_after_first_unet_chunk(stage, done, total, loss):
        if stage == "diffusion model" and done == TINY_TRAIN.chunk:
            raise Stop

    other = tmp_path / "model"
    with pytest.raises(Stop):
        train_world_model(other, TINY_WORLD, TINY_TRAIN, progress=stop_after_first_unet_chunk)
    assert not (other / "pipeline").exists()
    seen = []
    train_world_model(other, TINY_WORLD, TINY_TRAIN, progress=lambda *a: seen.append(a))
    firsts = {stage: done for stage, done, _, loss in seen if loss is None}
    assert firsts == {"autoencoder": TINY_TRAIN.vae_steps, "diffusion model": TINY_TRAIN.chunk}
    a = load_stable_diffusion(folder)
    b = load_stable_diffusion(other / "pipeline")
    for x, y in (
        (a.unet.params, b.unet.params),
        (a.vae_params, b.vae_params),
        (a.text_encoder_params, b.text_encoder_params),
    ):
        jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.mark.slow
def test_cache_is_reused_only_for_the_same_settings(tiny_model, tmp_path):
    root, folder, _ = tiny_model
    calls = []
    assert (
        train_world_model(root, TINY_WORLD, TINY_TRAIN, progress=lambda *a: calls.append(a))
        == folder
    )
    assert calls == []  # reused: nothing trained
    stored = json.loads((root / "world.json").read_text())
    with pytest.raises(ValueError, match="another world or training settings.*world"):
        train_world_model(root, WorldSpec(seed=6, num_normal=24), TINY_TRAIN)
    with pytest.raises(ValueError, match="train"):
        train_world_model(root, TINY_WORLD, TrainSpec(steps=7))
    assert json.loads((root / "world.json").read_text()) == stored
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a world-model folder"):
        train_world_model(stranger, TINY_WORLD, TINY_TRAIN)


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainSpec(steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainSpec(caption_dropout=0.0)
    with pytest.raises(ValueError, match="unet_channels"):
        TrainSpec(unet_channels=(24, 48))
