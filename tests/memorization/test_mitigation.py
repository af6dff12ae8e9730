"""Sample-time mitigation of Stable Diffusion prompts on the tiny random pipeline
(tests/conftest.py's ``sd``): the settings' defaults and checks, ``mitigate`` end to end with
every method and simple scorers, its summary, bad input and a failing rephraser. Few DDIM steps
and one image per prompt throughout, so the compiled programs are shared between tests."""

import jax
import numpy as np
import pandas as pd
import pytest

from mmh_jax.memorization import (
    EmbeddingSettings,
    MitigationConfig,
    embedding_defaults,
    expected_rows,
    mitigate,
    summarise_mitigation,
)

STEPS = 4
PROMPT = "a cat, the cat"
SMALL = dict(num_images=1, num_steps=STEPS)


def test_embedding_defaults_follow_the_public_code():
    assert embedding_defaults("flipd") == EmbeddingSettings(40, 0.05, 20, None)
    assert embedding_defaults("cfg") == EmbeddingSettings(0, 0.05, 10, 9.0)  # ||.||^2 <= 3^2
    assert embedding_defaults("flipd", 5).step == 4


def test_config_normalises_and_names_the_bad_field():
    config = MitigationConfig(methods=["rta", "attribution"], metrics="cfg", ks=3)
    assert config.methods == ("attribution", "rta") and config.metrics == ("cfg",)
    assert config.ks == (3,) and config.shown_k == 3
    assert MitigationConfig().shown_k == 4 and MitigationConfig(ks=(1, 6)).shown_k == 6
    assert MitigationConfig(methods=["embedding"], ks=()).shown_k == 0
    assert config.labels() == ["attribution (A^CFG)", "rta"]
    assert MitigationConfig(metrics=("cfg", "flipd"), num_steps=5).embedding_settings(
        "flipd"
    ) == embedding_defaults("flipd", 5)
    per_metric = MitigationConfig(metrics=("cfg",), embedding={"cfg": (1, 0.1, 3, None)})
    assert per_metric.embedding_settings("cfg") == EmbeddingSettings(1, 0.1, 3, None)
    # 5 lines (3 text methods, attribution x 2 metrics) of 2 ks x 3 repeats, 2 embedding rows
    assert expected_rows(
        2, config=MitigationConfig(metrics=("cfg", "flipd"), ks=(1, 2), repeats=3)
    ) == 2 * (4 * 2 * 3 + 2)
    for bad, match in [
        (dict(methods=["gpt"]), "methods"),
        (dict(methods=()), "methods"),
        (dict(metrics=("cfg", "cfg")), "metrics lists a metric twice"),
        (dict(metrics=("lid",)), "metric"),
        (dict(ks=(1, 1)), "ks lists"),
        (dict(ks=()), "ks is empty"),
        (dict(ks=(0,)), "ks"),
        (dict(grid_k=5), "grid_k"),
        (dict(repeats=0), "repeats"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(attribution_images=0), "attribution_images"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(num_steps=4, embedding=EmbeddingSettings(4, 0.1, 1, None)), "embedding step 4"),
        (dict(vocabulary="cat"), "vocabulary"),
    ]:
        with pytest.raises(ValueError, match=match):
            MitigationConfig(**bad)


def _similarity(calls):
    def similarity(a, b):
        calls.append((a.shape, a.dtype, b.shape, b.dtype))
        a = a.astype(np.float64).reshape(len(a), -1)
        b = np.stack([np.resize(x.astype(np.float64), a.shape[1]) for x in b])
        return 1.0 - np.abs(a - b).mean(axis=1) / 255.0

    return similarity


def _clip(calls):
    def clip_scorer(images, prompts):
        calls.append(list(prompts))
        return images.astype(np.float64).mean(axis=(1, 2, 3)) / 2.55

    return clip_scorer


ALL = MitigationConfig(
    methods=("attribution", "uniform", "rta", "embedding"),
    ks=(1, 2),
    repeats=2,
    metrics=("cfg",),
    attribution_images=1,
    embedding=EmbeddingSettings(STEPS - 1, 0.05, 2, None),
    grid_k=2,
    **SMALL,
)


@pytest.fixture(scope="module")
def mitigated(sd):
    # one prompt: the embedding method compiles its optimiser once per prompt
    sims, clips = [], []
    reference = np.full((20, 24, 3), 200, np.uint8)  # a "training image" of another size
    result = mitigate(
        sd,
        [PROMPT],
        key=jax.random.key(2),
        config=ALL,
        similarity=_similarity(sims),
        clip_scorer=_clip(clips),
        reference_images=[reference],
    )
    return result, sims, clips


@pytest.mark.slow
def test_mitigate_gives_one_row_per_prompt_method_k_and_repeat(mitigated):
    result, sims, clips = mitigated
    rows = pd.DataFrame(result.rows)
    # attribution, uniform, rta x 2 ks x 2 repeats; embedding once (k = 0)
    assert len(rows) == 3 * 2 * 2 + 1 == expected_rows(1, config=ALL)
    counts = rows.groupby(["method", "k"]).size()
    assert counts.loc[("attribution", 1)] == 2 and counts.loc[("embedding", 0)] == 1
    assert list(rows["metric"].unique()) == ["cfg", ""]
    assert np.all(np.isfinite(rows["similarity"])) and np.all(np.isfinite(rows["clip_score"]))
    assert set(rows["reference"]) == {"training"} and result.originals[0]["similarity"] < 1
    # RTA inserts k words; the offline rephraser changes the chosen words only
    rta = rows[rows["method"] == "rta"]
    assert all(
        len(n.split()) == len(p.split()) + k
        for p, n, k in zip(rta["prompt"], rta["new_prompt"], rta["k"])
    )
    assert (rows["error"] == "").all() and (rows["prompt"] == PROMPT).all()
    emb = rows[rows["method"] == "embedding"]
    assert (emb["updates"] == 2).all() and np.all(np.isfinite(emb["metric_after"]))
    # the scorers see uint8 NHWC batches of one shape, and the ORIGINAL prompt
    assert {c[:2] for c in sims} == {((1, 16, 16, 3), np.dtype(np.uint8))}
    assert {c[2] for c in sims} == {(1, 20, 24, 3)}
    assert all(p == [PROMPT] for p in clips)
    assert [a.metric for a in result.attributions] == ["cfg"]
    assert list(result.images) == [
        "original",
        "attribution (A^CFG)",
        "uniform",
        "rta",
        "embedding (A^CFG)",
    ]
    assert all(len(v) == 1 and v[0].shape == (16, 16, 3) for v in result.images.values())
    picked = rows[(rows["method"] == "rta") & (rows["k"] == 2) & (rows["repeat"] == 0)]
    assert result.new_prompts["rta"] == list(picked["new_prompt"])


@pytest.mark.slow
def test_summary_means_per_method_metric_and_k(mitigated):
    result, _, _ = mitigated
    summary = summarise_mitigation(result.rows)
    assert {(s["label"], s["k"]) for s in summary} >= {("rta", 1), ("embedding (A^CFG)", 0)}
    rows = pd.DataFrame(result.rows)
    for s in summary:
        group = rows[(rows["method"] == s["method"]) & (rows["k"] == s["k"])]
        assert s["rows"] == len(group)
        np.testing.assert_allclose(s["similarity"], group["similarity"].mean())


@pytest.mark.slow
def test_bad_input_and_a_failing_rephraser(sd):
    key = jax.random.key(3)
    with pytest.raises(ValueError, match="k=3"):
        mitigate(
            sd,
            ["the cat"],
            key=key,
            config=MitigationConfig(methods=["uniform"], ks=(1, 3), metrics="cfg", **SMALL),
        )
    with pytest.raises(ValueError, match="no tokens"):
        mitigate(
            sd,
            ["the cat", "  "],
            key=key,
            config=MitigationConfig(methods=["rta"], ks=(1,), metrics="cfg", **SMALL),
        )
    with pytest.raises(ValueError, match="config"):
        mitigate(sd, ["the cat"], key=key, config=dict(methods=["rta"]))
    with pytest.raises(ValueError, match="reference_images"):
        mitigate(
            sd,
            ["the cat"],
            key=key,
            config=MitigationConfig(methods=["rta"], ks=1),
            reference_images=[np.zeros((4, 4), np.uint8)],
        )

    calls = []

    def flaky(prompt, words):
        calls.append(words)
        if len(calls) == 1:
            raise RuntimeError("service down")
        return prompt.replace("cat", "kitty")

    config = MitigationConfig(methods=["uniform"], ks=(1,), repeats=2, metrics="cfg", **SMALL)
    result = mitigate(
        sd, ["the cat"], key=key, config=config, rephraser=flaky, similarity=_similarity([])
    )
    first, second = result.rows
    assert first["error"] == "RuntimeError: service down"
    assert not first["changed"] and first["new_prompt"] == "the cat"
    assert second["error"] == "" and second["new_prompt"] == "the kitty" and second["changed"]
    # without a training image the reference is the original generation from the same noise:
    # the kept prompt gives that image again
    assert first["reference"] == "generation"
    np.testing.assert_allclose([first["similarity"], result.originals[0]["similarity"]], 1.0)
    assert second["similarity"] < 1.0
    assert np.isnan(first["clip_score"])  # no scorer given
