"""Token attributions of Stable Diffusion prompts on the tiny random pipeline (tests/conftest.py's
``sd``): the public code's defaults, one attribution per prompt token, the several-metric entry
point equal to the one-metric one, truncated and empty prompts. Few DDIM steps and one image
(the planted-token check lives in tests/memorization/test_prompt.py)."""

import jax
import numpy as np
import pytest

from mmh_jax.memorization import (
    attribute_prompt,
    attribute_prompts,
    default_attribution_images,
    default_attribution_steps,
    metric_label,
)

SMALL = dict(num_images=1, num_steps=4)


def test_defaults_follow_the_public_code():
    assert default_attribution_images("cfg") == default_attribution_images("cfg_score") == 4
    assert default_attribution_images("flipd") == 1
    assert default_attribution_steps("flipd", 50) == list(range(10, 50))
    assert default_attribution_steps("cfg", 50) == list(range(50))
    assert default_attribution_steps("flipd", 5) == [1, 2, 3, 4]
    assert metric_label("cfg_score") == "A^sCFG"
    with pytest.raises(ValueError, match="metric"):
        default_attribution_images("lid")


@pytest.mark.slow
def test_attribute_prompt_scores_each_prompt_token(sd):
    prompt = "a cat, the cat"
    attr = attribute_prompt(sd, prompt, metric="cfg", key=jax.random.key(0), **SMALL)
    assert attr.tokens == sd.tokenizer.tokenize(prompt)  # start, end and padding excluded
    assert attr.words == ["a", "cat", ",", "the", "cat"]
    assert attr.scores.shape == (len(attr.tokens),)
    assert np.all(np.isfinite(attr.scores)) and np.all(attr.scores >= 0)
    assert attr.scores.max() > 0 and np.isfinite(attr.value) and attr.value > 0
    # the several-metric entry point shares the trajectories (one metric here: each metric's
    # attribution is a compilation of its own)
    again = attribute_prompts(sd, prompt, metrics=["cfg"], key=jax.random.key(0), **SMALL)
    np.testing.assert_allclose(again[0].scores, attr.scores, rtol=1e-5)
    with pytest.raises(ValueError, match="twice"):
        attribute_prompts(sd, prompt, metrics=["cfg", "cfg"], key=jax.random.key(0), **SMALL)
    with pytest.warns(UserWarning, match="dropped"):  # truncated to what CLIP reads
        long = attribute_prompt(sd, "cat " * 80, metric="cfg", key=jax.random.key(0), **SMALL)
    assert long.tokens == ["cat</w>"] * 75 and long.scores.shape == (75,)
    with pytest.raises(ValueError, match="no tokens"):
        attribute_prompt(sd, "", metric="cfg", key=jax.random.key(0), **SMALL)
