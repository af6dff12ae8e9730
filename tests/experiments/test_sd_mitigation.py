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
        for method, metric, ks in (("attribution", "cfg", (1, 2)), ("rta", "", (1, 2)),
                                   ("embedding", "cfg", (0,))):
            for k in ks:
                rows.append(dict(prompt_index=p, method=method, metric=metric, k=k,
                                 similarity=rng.uniform(0.2, 0.9),
                                 clip_score=rng.uniform(20, 30), changed=True, error=""))
    return rows


def test_figures_are_written(tmp_path):
    words = ["a", "cat", ",", "the", "cat"]
    tokens = ["a</w>", "cat", ",</w>", "the</w>", "cat</w>"]
    attributions = [PromptAttribution(PROMPTS[0], m, tokens, words,
                                      np.linspace(0.1, 1.0, 5) * (i + 1), 0.5 * (i + 1))
                    for i, m in enumerate(("cfg", "flipd"))]
    attributions.append(PromptAttribution(PROMPTS[1], "cfg", tokens[3:], words[3:],
                                          np.zeros(2), 0.0))
    image = np.zeros((16, 16, 3), np.uint8)
    images = {"original": [image, image], "rta": [image + 9, image + 99]}
    new_prompts = {"original": PROMPTS, "rta": ["a zq cat, the cat", "the cat vv"]}
    originals = [dict(similarity=0.95, clip_score=31.0), dict(similarity=0.9, clip_score=30.0)]
    files = [plot_attributions(attributions, tmp_path / "attr.png"),
             plot_mitigation_grid(images, new_prompts, tmp_path / "grid.png"),
             plot_tradeoff(_rows(), tmp_path / "curve.png", originals=originals)]
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
