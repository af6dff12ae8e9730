"""``mmh-jax sd attribute`` and ``mmh-jax sd mitigate`` end to end on the tiny random Stable
Diffusion pipeline (tests/conftest.py's ``sd_folder``), and the figures of attribution and
mitigation (drawn from made-up results: the library side is tested in
tests/memorization/test_attribution.py and test_mitigation.py)."""

import numpy as np
import pandas as pd
import pytest

from mmh_jax.cli import main
from mmh_jax.experiments.mitigation_figures import (
    plot_attributions,
    plot_mitigation_grid,
    plot_tradeoff,
)
from mmh_jax.memorization import PromptAttribution

STEPS = 4
PROMPTS = ["a cat, the cat", "the cat"]


def _rows():
    """Mitigation rows of two prompts: three methods, two ks, and one embedding row each."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(2):
        for method, metric, ks in (
            ("attribution", "cfg", (1, 2)),
            ("rta", "", (1, 2)),
            ("embedding", "cfg", (0,)),
        ):
            for k in ks:
                rows.append(
                    dict(
                        prompt_index=p,
                        method=method,
                        metric=metric,
                        k=k,
                        similarity=rng.uniform(0.2, 0.9),
                        clip_score=rng.uniform(20, 30),
                        changed=True,
                        error="",
                    )
                )
    return rows


def test_figures_are_written(tmp_path):
    words = ["a", "cat", ",", "the", "cat"]
    tokens = ["a</w>", "cat", ",</w>", "the</w>", "cat</w>"]
    attributions = [
        PromptAttribution(
            PROMPTS[0], m, tokens, words, np.linspace(0.1, 1.0, 5) * (i + 1), 0.5 * (i + 1)
        )
        for i, m in enumerate(("cfg", "flipd"))
    ]
    attributions.append(
        PromptAttribution(PROMPTS[1], "cfg", tokens[3:], words[3:], np.zeros(2), 0.0)
    )
    image = np.zeros((16, 16, 3), np.uint8)
    images = {"original": [image, image], "rta": [image + 9, image + 99]}
    new_prompts = {"original": PROMPTS, "rta": ["a zq cat, the cat", "the cat vv"]}
    originals = [dict(similarity=0.95, clip_score=31.0), dict(similarity=0.9, clip_score=30.0)]
    files = [
        plot_attributions(attributions, tmp_path / "attr.png"),
        plot_mitigation_grid(images, new_prompts, tmp_path / "grid.png"),
        plot_tradeoff(_rows(), tmp_path / "curve.png", originals=originals),
    ]
    assert all(f.stat().st_size > 2000 for f in files)
    assert not list(tmp_path.glob(".*part"))
    with pytest.raises(ValueError, match="similarity and a CLIP"):
        plot_tradeoff([dict(r, similarity=np.nan) for r in _rows()], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no attributions"):
        plot_attributions([], tmp_path / "y.png")
    with pytest.raises(ValueError, match="no images"):
        plot_mitigation_grid({"original": []}, {"original": []}, tmp_path / "z.png")


def _clip_folder(root):
    import transformers
    from conftest import _tiny_tokenizer_files

    torch_config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=66,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    transformers.CLIPModel(torch_config).eval().save_pretrained(root)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root)
    for name, text in _tiny_tokenizer_files().items():
        (root / name).write_text(text)
    return root


@pytest.mark.slow
def test_cli_attribute_writes_tables_and_figure(sd_folder, sd, tmp_path):
    folder, _ = sd_folder
    out = tmp_path / "attr"
    assert (
        main(
            [
                "sd",
                "attribute",
                str(folder),
                "--prompt",
                PROMPTS[0],
                "--metric",
                "cfg",
                "--num-images",
                "1",
                "--num-steps",
                str(STEPS),
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    table = pd.read_parquet(out / "attributions.parquet")
    assert len(table) == 5 and set(table["metric"]) == {"cfg"}
    assert list(table["word"]) == ["a", "cat", ",", "the", "cat"]
    assert table["normalized"].max() == 1.0 and (table["id"] == "prompt").all()
    assert (out / "attributions.csv").is_file()
    assert (out / "attributions.png").stat().st_size > 2000
    # truth: the library's attribution of the prompt from the run's noise (seed 0; A^CFG
    # draws no probes)
    import jax

    from mmh_jax.memorization import attribute_prompts

    (want,) = attribute_prompts(
        _RunNoise(sd, jax.random.key(0)),
        PROMPTS[0],
        metrics=["cfg"],
        key=jax.random.key(0),
        num_images=1,
        num_steps=STEPS,
    )
    np.testing.assert_allclose(table["score"], want.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table["value"], want.value, rtol=1e-4)


@pytest.mark.slow
def test_cli_mitigate_end_to_end(sd_folder, tmp_path, monkeypatch, capsys):
    folder, _ = sd_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    clip = _clip_folder(tmp_path / "clip")
    common = [str(folder), "--prompts", str(prompts), "--num-steps", str(STEPS), "--quiet"]
    out = tmp_path / "mit"
    assert (
        main(
            [
                "sd",
                "mitigate",
                *common,
                "--methods",
                "attribution",
                "rta",
                "--metric",
                "cfg",
                "--attribution-images",
                "1",
                "--ks",
                "1",
                "2",
                "--repeats",
                "1",
                "--clip",
                str(clip),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == 2 * (2 + 2)
    assert np.all(np.isfinite(rows["clip_score"])) and rows["similarity"].isna().all()
    for name in ("results.csv", "summary.csv", "originals.csv", "attributions.csv"):
        assert (out / name).is_file(), name
    assert (out / "grid.png").stat().st_size > 2000
    assert not (out / "tradeoff.png").exists()  # it needs --sscd too
    assert "needs both --sscd and --clip" in capsys.readouterr().out

    # a chat rephraser without a key fails at the start; so does k larger than a prompt
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert (
        main(
            [
                "sd",
                "mitigate",
                *common,
                "--rephraser",
                "chat",
                "--chat-url",
                "http://127.0.0.1:9",
                "-o",
                str(tmp_path / "chat"),
            ]
        )
        == 2
    )
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert (
        main(
            [
                "sd",
                "mitigate",
                *common,
                "--methods",
                "uniform",
                "--ks",
                "9",
                "-o",
                str(tmp_path / "big"),
            ]
        )
        == 2
    )
    assert "k=9" in capsys.readouterr().err


def _simple_scorers(calls):
    """A pixel similarity and a brightness "CLIP score": numpy truths the test recomputes."""

    def similarity(a, b):
        calls.append("similarity")
        return 1.0 - np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=(1, 2, 3)) / 255

    def clip_scorer(images, prompts):
        calls.append(list(prompts))
        return images.astype(np.float64).mean(axis=(1, 2, 3)) / 2.55 + len(prompts[0])

    return similarity, clip_scorer


def _staged(sd_folder, tmp_path, out, calls=None, **changes):
    from mmh_jax.experiments import sd_mitigation

    folder, _ = sd_folder
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("\n".join(PROMPTS) + "\n")
    scorers = sd_mitigation.Scorers(
        *_simple_scorers([] if calls is None else calls), "pixels", "brightness"
    )
    settings = dict(
        model=folder,
        prompts=prompts,
        out=out,
        methods=("uniform", "rta"),
        ks=(1,),
        repeats=2,
        num_steps=STEPS,
        chunk_size=3,
        progress=False,
        figure=False,
        seed=5,
    )
    config = sd_mitigation.MitigateConfig(**{**settings, **changes})
    return sd_mitigation.run_mitigate(config, scorers=scorers)


@pytest.mark.slow
def test_mitigate_resumes_without_losing_or_doubling_rows(sd_folder, tmp_path, monkeypatch):
    from mmh_jax import scoring
    from mmh_jax.experiments.common import DemoInputError

    result, _, _ = _staged(sd_folder, tmp_path, tmp_path / "a")
    whole = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert len(whole) == 2 * 2 * 2  # prompts x (uniform, rta) x repeats
    assert not whole.duplicated(["prompt_index", "method", "k", "repeat"]).any()

    # a run killed in stage 1 and in stage 3 (in both, a chunk whose manifest was not yet
    # written), before the tables: the rerun scores only what is missing
    out = tmp_path / "b"
    _staged(sd_folder, tmp_path, out)
    (out / "originals" / "manifest" / "chunk-00000000.json").unlink()
    (out / "mitigated" / "manifest" / "chunk-00000001.json").unlink()
    for name in ("results.parquet", "results.csv"):
        (out / name).unlink()
    scored = []
    real_score = scoring.score

    def counting(*args, **kwargs):
        summary = real_score(*args, **kwargs)
        scored.append(summary.scored)
        return summary

    monkeypatch.setattr(scoring, "score", counting)
    _staged(sd_folder, tmp_path, out)
    assert scored == [2, 3]  # the originals' one chunk of 2 prompts, one of 3 new prompts
    again = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(again, whole)

    # another setting into the same folder is refused, naming what differs
    with pytest.raises(DemoInputError, match="new prompts of other inputs or settings.*ks"):
        _staged(sd_folder, tmp_path, out, ks=(2,))
    with pytest.raises(DemoInputError, match="other inputs or settings"):
        _staged(sd_folder, tmp_path, out, num_steps=STEPS + 1)


@pytest.mark.slow
def test_mitigated_rows_equal_the_library_on_the_same_prompt(sd_folder, sd, tmp_path):
    """Truth: the new prompt's image from StableDiffusion.sample with the run's seed (image j
    starts from the same noise as the original's), scored by the same numpy functions."""
    import jax

    from mmh_jax.evaluation import to_uint8_nhwc

    calls = []
    result, _, _ = _staged(sd_folder, tmp_path, tmp_path / "c", calls)
    similarity, clip_scorer = _simple_scorers([])

    def image(prompt):
        cond = sd.encode_prompt(sd.tokenize([prompt]))
        out = sd.sample(cond, key=jax.random.key(5), guidance=7.5, num_steps=STEPS)
        return to_uint8_nhwc(np.asarray(sd.decode(out.sample)))

    for row in [r for r in result.rows if r["method"] == "rta"][:2]:
        new, original = image(row["new_prompt"]), image(row["prompt"])
        np.testing.assert_allclose(row["similarity"], similarity(new, original)[0], atol=2e-3)
        np.testing.assert_allclose(
            row["clip_score"], clip_scorer(new, [row["prompt"]])[0], atol=0.2
        )
        assert row["new_prompt"] != row["prompt"] and row["reference"] == "generation"
    first = result.originals[0]
    assert abs(first["similarity"] - 1.0) < 1e-12  # the reference is the original itself
    # the CLIP score is always against the ORIGINAL prompt
    assert all(c == [PROMPTS[0]] or c == [PROMPTS[1]] for c in calls if c != "similarity")


class _RunNoise:
    """``sd`` whose sampler starts every prompt from the run's noise (image ``j`` from
    ``fold_in(key, j)``, the one item-noise rule the staged command follows), where
    :func:`~mmh_jax.memorization.mitigate` folds the prompt index into its key first."""

    def __init__(self, sd, key):
        self._sd, self._key = sd, key

    def sample(self, cond, *, key, **kwargs):
        return self._sd.sample(cond, key=self._key, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sd, name)


@pytest.mark.slow
def test_embedding_rows_equal_the_library(sd_folder, sd, tmp_path):
    """Truth: mitigate() with the embedding method on the same noise (the CFG metrics draw no
    probes, so the optimisation is the same), scored by the same numpy functions."""
    import jax

    from mmh_jax.memorization import MitigationConfig, mitigate

    metrics = ("cfg_score",)
    result, summary, _ = _staged(
        sd_folder, tmp_path, tmp_path / "e", methods=("embedding",), metrics=metrics
    )
    similarity, clip_scorer = _simple_scorers([])
    truth = mitigate(
        _RunNoise(sd, jax.random.key(5)),
        PROMPTS,
        key=jax.random.key(5),
        config=MitigationConfig(methods="embedding", metrics=metrics, num_steps=STEPS),
        similarity=similarity,
        clip_scorer=clip_scorer,
    )
    assert len(result.rows) == len(truth.rows) == 2 * len(metrics)
    assert any(r["updates"] > 0 for r in truth.rows)
    for row, want in zip(result.rows, truth.rows):
        for name in (
            "prompt_index",
            "prompt",
            "method",
            "metric",
            "k",
            "repeat",
            "new_prompt",
            "changed",
            "updates",
            "reference",
        ):
            assert row[name] == want[name], name
        np.testing.assert_allclose(
            [row["metric_before"], row["metric_after"]],
            [want["metric_before"], want["metric_after"]],
            rtol=1e-4,
        )
        np.testing.assert_allclose(row["similarity"], want["similarity"], atol=2e-3)
        np.testing.assert_allclose(row["clip_score"], want["clip_score"], atol=0.2)
    assert [(s["label"], s["k"], s["rows"]) for s in summary] == [("embedding (A^sCFG)", 0, 2)]
    for label, images in truth.images.items():
        assert len(result.images[label]) == len(images)
        for got, want in zip(result.images[label], images):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, label


@pytest.mark.slow
def test_embedding_stage_resumes_and_refuses_other_settings(sd_folder, tmp_path, monkeypatch):
    from mmh_jax import scoring
    from mmh_jax.experiments.common import DemoInputError

    settings = dict(methods=("rta", "embedding"), metrics=("cfg_score",), repeats=1, chunk_size=1)
    _staged(sd_folder, tmp_path, tmp_path / "a", **settings)
    whole = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert len(whole) == 2 * 2 and list(whole["method"]) == ["rta", "embedding"] * 2
    emb = whole[whole["method"] == "embedding"]
    assert (emb["updates"] == 10).all() and (emb["metric_after"] < emb["metric_before"]).all()

    out = tmp_path / "b"
    _staged(sd_folder, tmp_path, out, **settings)
    (out / "embedding" / "cfg_score" / "manifest" / "chunk-00000001.json").unlink()
    (out / "results.parquet").unlink()
    scored = []
    real_score = scoring.score

    def counting(*args, **kwargs):
        summary = real_score(*args, **kwargs)
        scored.append(summary.scored)
        return summary

    monkeypatch.setattr(scoring, "score", counting)
    _staged(sd_folder, tmp_path, out, **settings)
    assert scored == [0, 0, 1]  # originals, mitigated, then the one embedding chunk
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), whole)

    # the embedding stage itself refuses a rerun of other settings (the earlier stages gone)
    import shutil

    shutil.rmtree(out / "originals")
    shutil.rmtree(out / "mitigated")
    (out / "new_prompts.parquet").unlink()
    with pytest.raises(DemoInputError, match="embedding.*other inputs or settings"):
        _staged(sd_folder, tmp_path, out, **dict(settings, num_steps=STEPS + 1))


@pytest.mark.slow
def test_intervention_rows_are_the_intervened_generations(sd_folder, sd, tmp_path):
    """Truth: the pipeline's own sampler with its noise predictor wrapped by the same
    intervention, from the run's noise (key = seed), scored by the same numpy functions."""
    import jax

    from mmh_jax.evaluation import to_uint8_nhwc
    from mmh_jax.experiments.common import DemoInputError
    from mmh_jax.memorization import detectors, nemo_deactivation, rescale_begin_attention

    clean = tmp_path / "clean.txt"
    clean.write_text("the sea\nthe fox\na dog\n")
    settings = dict(
        methods=("rta", "attention-rescale", "nemo"),
        repeats=1,
        rescale_factor=8.0,
        nemo_reference=clean,
        nemo_threshold=1.0,
    )
    result, summary, _ = _staged(sd_folder, tmp_path, tmp_path / "i", **settings)
    assert [(r["prompt_index"], r["method"]) for r in result.rows] == [
        (p, m) for p in range(2) for m in ("rta", "attention-rescale", "nemo")
    ]
    assert [s["label"] for s in summary] == ["rta", "attention-rescale", "nemo"]
    similarity, clip_scorer = _simple_scorers([])
    ref = detectors.nemo_reference(
        detectors.value_activations(sd, clean.read_text().split("\n")[:3])
    )
    cond = sd.encode_prompt(PROMPTS)
    for method, eps in (
        (
            "attention-rescale",
            rescale_begin_attention(sd.eps, uncond=sd.uncond_embedding, factor=8.0),
        ),
        ("nemo", nemo_deactivation(sd.eps, ref, threshold=1.0)),
    ):
        latents = sd._replace(eps=eps).sample(cond, key=jax.random.key(5), num_steps=STEPS).sample
        want = to_uint8_nhwc(np.asarray(sd.decode(latents)))
        rows = [r for r in result.rows if r["method"] == method]
        originals = np.stack(result.images["original"]).astype(int)
        assert np.abs(want.astype(int) - originals).max() > 4, method  # the images change
        for p, row in enumerate(rows):
            got = result.images[method][p]
            assert np.abs(got.astype(int) - want[p].astype(int)).max() <= 2, method
            original = result.images["original"][p]
            np.testing.assert_allclose(
                row["similarity"], similarity(want[p][None], original[None])[0], atol=2e-3
            )
            np.testing.assert_allclose(
                row["clip_score"], clip_scorer(want[p][None], [PROMPTS[p]])[0], atol=0.2
            )
    with pytest.raises(DemoInputError, match="--methods nemo needs --nemo-reference"):
        _staged(sd_folder, tmp_path, tmp_path / "j", methods=("rta", "nemo"))
    with pytest.raises(DemoInputError, match="come with at least one of"):
        _staged(sd_folder, tmp_path, tmp_path / "k", methods=("attention-rescale",))
    one = tmp_path / "one.txt"
    one.write_text("the sea\n")
    with pytest.raises(DemoInputError, match="needs at least 2 prompts"):
        _staged(sd_folder, tmp_path, tmp_path / "m", **dict(settings, nemo_reference=one))
    with pytest.raises(DemoInputError, match="--rescale-factor must be"):
        _staged(sd_folder, tmp_path, tmp_path / "l", **dict(settings, rescale_factor=0.0))


def test_intervention_flags_reach_the_config():
    import argparse

    from mmh_jax.experiments import sd_mitigation

    parser = argparse.ArgumentParser()
    sd_mitigation.add_mitigate_arguments(parser)
    args = parser.parse_args(
        "sd --prompts p.txt --methods rta attention-rescale nemo --rescale-factor 2 "
        "--nemo-reference clean.txt --nemo-threshold 3".split()
    )
    config = sd_mitigation.mitigate_config_from_args(args)
    assert config.methods == ("rta", "attention-rescale", "nemo")
    assert (config.rescale_factor, config.nemo_threshold) == (2.0, 3.0)
    assert str(config.nemo_reference) == "clean.txt"
    default = sd_mitigation.mitigate_config_from_args(parser.parse_args(["sd", "--prompts", "p"]))
    assert (default.rescale_factor, default.nemo_threshold, default.nemo_reference) == (
        1.25,
        5.0,
        None,
    )
