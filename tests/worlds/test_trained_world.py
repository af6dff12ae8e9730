"""The shapes world's model of record really memorizes, and the library's CFG norms see it.

``fixtures/trained`` is the diffusers folder of ``mmh-jax demo prompts`` (recipe 3: the default
world, 8,000 UNet steps; ``world.json`` holds its settings), committed because training it takes
about 40 minutes on 2 cores and a model trained for a minute does not learn text conditioning.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmh_jax.memorization import generation_cfg_norms, image_cfg_norms
from mmh_jax.models import load_stable_diffusion
from mmh_jax.worlds import ShapesWorld, WorldSpec, render

FIXTURE = Path(__file__).parent / "fixtures" / "trained"
MIN_COUNT = 16  # verbatim prompts duplicated at least this often (the run of record copies them)
NUM_HELDOUT = 12


@pytest.fixture(scope="module")
def trained():
    recorded = json.loads((FIXTURE / "world.json").read_text())["world"]
    spec = WorldSpec()
    # the fixture belongs to the default world: a change of the world's defaults invalidates it
    assert recorded == json.loads(json.dumps(dataclasses.asdict(spec)))
    world = ShapesWorld(spec)
    sd = load_stable_diffusion(FIXTURE / "pipeline")
    verbatim = [p for p in world.memorized_prompts("verbatim") if p.count >= MIN_COUNT]
    prompts = [p.caption for p in verbatim] + world.heldout_prompts(NUM_HELDOUT, split=1)
    images = np.stack(
        [world.images[p.image_id] for p in verbatim]
        + [render(s, spec.image_size) for s in world.heldout_scenes(NUM_HELDOUT, split=1)]
    )
    labels = np.r_[np.ones(len(verbatim)), np.zeros(NUM_HELDOUT)]
    return sd, prompts, images, labels


@pytest.mark.slow
def test_cfg_norm_at_the_training_image_separates_verbatim_prompts(trained):
    sd, prompts, images, labels = trained
    cond = sd.encode_prompt(prompts)
    uncond = jnp.broadcast_to(sd.uncond_embedding, cond.shape)
    norms = image_cfg_norms(
        sd.eps, sd.encode_image(images), cond, uncond, schedule=sd.schedule, guidance=7.5
    )
    values = np.asarray(norms.cfg_vector)
    assert np.all(np.isfinite(values))
    # the run of record: mean 6.4-6.8 for these counts against 3.2 for held-out prompts
    assert values[labels == 1].mean() > 1.5 * values[labels == 0].mean()
    assert roc_auc_score(labels, values) >= 0.9


@pytest.mark.slow
def test_cfg_norm_of_generations_is_larger_for_verbatim_prompts(trained):
    sd, prompts, _, labels = trained
    result = sd.sample(
        sd.encode_prompt(prompts),
        key=jax.random.key(0),
        images_per_prompt=2,
        guidance=7.5,
        num_steps=20,
        return_trajectory=True,
    )
    norms = generation_cfg_norms(result, schedule=sd.schedule, guidance=7.5)
    per_prompt = np.asarray(norms.cfg_vector).reshape(len(prompts), 2).mean(axis=1)
    assert per_prompt[labels == 1].mean() > per_prompt[labels == 0].mean()
