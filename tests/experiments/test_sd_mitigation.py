"""Token attributions and sample-time mitigation on the tiny random Stable Diffusion pipeline
(tests/conftest.py's ``sd`` and ``sd_folder``): attribute_prompt, mitigate end to end with every
method and simple scorers, bad input, the figures, and ``mmh-jax sd attribute`` / ``mmh-jax sd
mitigate`` end to end. Few DDIM steps and one image per prompt throughout, so the compiled
programs are shared between tests (compilation dominates; the planted-token check lives in
tests/memorization/test_prompt.py, at the experiment level it would compile the sampler and the
attribution a second time)."""

import jax
import numpy as np
import pandas as pd
import pytest

from mmh_jax.cli import main
from mmh_jax.experiments.sd_mitigation import (
    EmbeddingSettings,
    attribute_prompt,
    attribute_prompts,
    default_attribution_images,
    default_attribution_steps,
    embedding_defaults,
    expected_rows,
    mitigate,
    plot_attributions,
    plot_mitigation_grid,
    plot_tradeoff,
    summarise_mitigation,
)

STEPS = 4
PROMPTS = ["a cat, the cat", "the cat"]
SMALL = dict(num_images=1, num_steps=STEPS)


def test_defaults_follow_the_public_code():
    assert default_attribution_images("cfg") == default_attribution_images("cfg_score") == 4
    assert default_attribution_images("flipd") == 1
    assert default_attribution_steps("flipd", 50) == list(range(10, 50))
    assert default_attribution_steps("cfg", 50) == list(range(50))
    assert default_attribution_steps("flipd", 5) == [1, 2, 3, 4]
    assert embedding_defaults("flipd") == EmbeddingSettings(40, 0.05, 20, None)
    assert embedding_defaults("cfg") == EmbeddingSettings(0, 0.05, 10, 9.0)  # ||.||^2 <= 3^2
    assert embedding_defaults("flipd", 5).step == 4
    with pytest.raises(ValueError, match="metric"):
        default_attribution_images("lid")


def test_attribute_prompt_scores_each_prompt_token(sd):
    prompt = PROMPTS[0]
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


@pytest.fixture(scope="module")
def mitigated(sd):
    # one prompt: the embedding method compiles its optimiser once per prompt
    sims, clips = [], []
    reference = np.full((20, 24, 3), 200, np.uint8)  # a "training image" of another size
    result = mitigate(sd, PROMPTS[:1], methods=("attribution", "uniform", "rta", "embedding"),
                      ks=(1, 2), repeats=2, metric="cfg", attribution_images=1,
                      key=jax.random.key(2), similarity=_similarity(sims),
                      clip_scorer=_clip(clips), reference_images=[reference],
                      embedding=EmbeddingSettings(STEPS - 1, 0.05, 2, None), grid_k=2, **SMALL)
    return result, sims, clips


def test_mitigate_gives_one_row_per_prompt_method_k_and_repeat(mitigated):
    result, sims, clips = mitigated
    rows = pd.DataFrame(result.rows)
    # attribution, uniform, rta x 2 ks x 2 repeats; embedding once (k = 0)
    assert len(rows) == 3 * 2 * 2 + 1 == expected_rows(
        1, methods=("attribution", "uniform", "rta", "embedding"), ks=(1, 2), repeats=2,
        metrics=("cfg",))
    counts = rows.groupby(["method", "k"]).size()
    assert counts.loc[("attribution", 1)] == 2 and counts.loc[("embedding", 0)] == 1
    assert list(rows["metric"].unique()) == ["cfg", ""]
    assert np.all(np.isfinite(rows["similarity"])) and np.all(np.isfinite(rows["clip_score"]))
    assert set(rows["reference"]) == {"training"} and result.originals[0]["similarity"] < 1
    # RTA inserts k words; the offline rephraser changes the chosen words only
    rta = rows[rows["method"] == "rta"]
    assert all(len(n.split()) == len(p.split()) + k
               for p, n, k in zip(rta["prompt"], rta["new_prompt"], rta["k"]))
    assert (rows["error"] == "").all() and (rows["prompt"] == PROMPTS[0]).all()
    emb = rows[rows["method"] == "embedding"]
    assert (emb["updates"] == 2).all() and np.all(np.isfinite(emb["metric_after"]))
    # the scorers see uint8 NHWC batches of one shape, and the ORIGINAL prompt
    assert {c[:2] for c in sims} == {((1, 16, 16, 3), np.dtype(np.uint8))}
    assert {c[2] for c in sims} == {(1, 20, 24, 3)}
    assert all(p == [PROMPTS[0]] for p in clips)
    assert [a.metric for a in result.attributions] == ["cfg"]
    assert list(result.images) == ["original", "attribution (A^CFG)", "uniform", "rta",
                                   "embedding (A^CFG)"]
    assert all(len(v) == 1 and v[0].shape == (16, 16, 3) for v in result.images.values())
    picked = rows[(rows["method"] == "rta") & (rows["k"] == 2) & (rows["repeat"] == 0)]
    assert result.new_prompts["rta"] == list(picked["new_prompt"])


def test_figures_are_written(mitigated, tmp_path):
    result, _, _ = mitigated
    summary = summarise_mitigation(result.rows)
    assert {(s["label"], s["k"]) for s in summary} >= {("rta", 1), ("embedding (A^CFG)", 0)}
    files = [plot_attributions(result.attributions, tmp_path / "attr.png"),
             plot_mitigation_grid(result.images, result.new_prompts, tmp_path / "grid.png"),
             plot_tradeoff(result.rows, tmp_path / "curve.png", originals=result.originals)]
    assert all(f.stat().st_size > 2000 for f in files)
    assert not list(tmp_path.glob(".*part"))
    with pytest.raises(ValueError, match="similarity and a CLIP"):
        plot_tradeoff([dict(r, similarity=np.nan) for r in result.rows], tmp_path / "x.png")


def test_bad_input_and_a_failing_rephraser(sd):
    key = jax.random.key(3)
    with pytest.raises(ValueError, match="k=3"):
        mitigate(sd, ["the cat"], methods=["uniform"], ks=(1, 3), metric="cfg", key=key,
                 **SMALL)
    with pytest.raises(ValueError, match="no tokens"):
        mitigate(sd, ["the cat", "  "], methods=["rta"], ks=(1,), metric="cfg", key=key,
                 **SMALL)
    with pytest.raises(ValueError, match="methods"):
        mitigate(sd, ["the cat"], methods=["gpt"], metric="cfg", key=key, **SMALL)

    calls = []

    def flaky(prompt, words):
        calls.append(words)
        if len(calls) == 1:
            raise RuntimeError("service down")
        return prompt.replace("cat", "kitty")

    result = mitigate(sd, ["the cat"], methods=["uniform"], ks=(1,), repeats=2, metric="cfg",
                      key=key, rephraser=flaky, similarity=_similarity([]), **SMALL)
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


def _clip_folder(root):
    import transformers

    from conftest import _tiny_tokenizer_files

    torch_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=66, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    transformers.CLIPModel(torch_config).eval().save_pretrained(root)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(root)
    for name, text in _tiny_tokenizer_files().items():
        (root / name).write_text(text)
    return root


def test_cli_attribute_writes_tables_and_figure(sd_folder, tmp_path):
    folder, _ = sd_folder
    out = tmp_path / "attr"
    assert main(["sd", "attribute", str(folder), "--prompt", PROMPTS[0], "--metric", "cfg",
                 "--num-images", "1", "--num-steps", str(STEPS), "-o", str(out),
                 "--quiet"]) == 0
    table = pd.read_parquet(out / "attributions.parquet")
    assert len(table) == 5 and set(table["metric"]) == {"cfg"}
    assert list(table["word"]) == ["a", "cat", ",", "the", "cat"]
    assert table["normalized"].max() == 1.0 and (table["id"] == "prompt").all()
    assert (out / "attributions.csv").is_file()
    assert (out / "attributions.png").stat().st_size > 2000


def test_cli_mitigate_end_to_end(sd_folder, tmp_path, monkeypatch, capsys):
    folder, _ = sd_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    clip = _clip_folder(tmp_path / "clip")
    common = [str(folder), "--prompts", str(prompts), "--num-steps", str(STEPS), "--quiet"]
    out = tmp_path / "mit"
    assert main(["sd", "mitigate", *common, "--methods", "attribution", "rta", "--metric", "cfg",
                 "--attribution-images", "1", "--ks", "1", "2", "--repeats", "1",
                 "--clip", str(clip), "-o", str(out)]) == 0
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
    assert main(["sd", "mitigate", *common, "--rephraser", "chat", "--chat-url",
                 "http://127.0.0.1:9", "-o", str(tmp_path / "chat")]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert main(["sd", "mitigate", *common, "--methods", "uniform", "--ks", "9",
                 "-o", str(tmp_path / "big")]) == 2
    assert "k=9" in capsys.readouterr().err
