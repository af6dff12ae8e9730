"""``mmh-jax sd benchmark-detectors`` on the tiny random pipeline (tests/conftest.py's
``sd_folder``): the table against scikit-learn on the written per-prompt signals, the detector
columns against the detector functions, and the refusals."""

import json

import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mmh_jax import scoring
from mmh_jax.cli import main
from mmh_jax.memorization import detectors as D

PROMPTS = [
    ("a cat, the cat", True, "verbatim"),
    ("the fox", False, None),
    ("a tea cat", True, "template"),
    ("the sea", False, None),
    ("cats at the sea", False, None),
]
FAST = [
    "--images-per-prompt",
    "2",
    "--num-steps",
    "3",
    "--batch-size",
    "3",
    "--cluster-size",
    "2",
    "--n-bootstrap",
    "20",
    "--quiet",
]


def _write(path, prompts):
    path.write_text(
        "\n".join(
            json.dumps({"caption": c, "label": m, **({"kind": k} if k else {})})
            for c, m, k in prompts
        )
        + "\n"
    )
    return path


@pytest.mark.slow
def test_benchmark_reports_every_detector_per_kind(sd_folder, tmp_path):
    folder, _ = sd_folder
    prompts = _write(tmp_path / "p.jsonl", PROMPTS)
    assert (
        main(
            [
                "sd",
                "benchmark-detectors",
                str(folder),
                "--prompts",
                str(prompts),
                "-o",
                str(tmp_path / "out"),
                *FAST,
            ]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "out/detectors.csv")
    signals = pd.read_csv(tmp_path / "out/prompts.csv")
    names = [
        "cfg_vector_norm",
        "cfg_score_norm",
        "flipd_cond_0.05",
        "attention_entropy",
        "begin_token_attention",
        "end_token_attention",
        "bright_ending",
        "nemo_max_z",
        "nemo_outliers",
        "sharpness",
        "edge_consistency",
        "generation_clusters",
    ]
    assert sorted(table["subset"].unique()) == ["all", "template", "verbatim"]
    assert list(table[table["subset"] == "all"]["signal"]) == names
    labels = signals["label"].to_numpy() == 1
    for _, row in table[table["subset"] == "all"].iterrows():
        s = signals[row["signal"]].to_numpy()
        expected = roc_auc_score(labels, s if row["memorized_when_high"] else -s)
        assert row["auroc"] == pytest.approx(expected), row["signal"]
        assert row["auroc_lo"] <= row["auroc"] + 1e-12 <= row["auroc_hi"] + 2e-12
    kind = table[(table["subset"] == "verbatim")]
    assert set(kind["n_memorized"]) == {1} and set(kind["n_clean"]) == {3}
    gen = table[table["signal"] == "cfg_vector_norm"].iloc[0]
    assert gen["cost_vs_generation"] == pytest.approx(1.0)
    assert gen["unet_evals_per_prompt"] == 2 * 2 * 3
    assert (tmp_path / "out/roc.png").stat().st_size > 1000
    assert "| all | sharpness |" in (tmp_path / "out/detectors.md").read_text()


@pytest.mark.slow
def test_detector_columns_agree_with_the_detector_functions(sd, sd_folder, tmp_path):
    folder, _ = sd_folder
    prompts = _write(tmp_path / "p.jsonl", PROMPTS[:3])
    columns = [scoring.CrossAttentionStats(early_steps=2), scoring.ValueActivations()]
    scoring.score(
        scoring.Model.from_stable_diffusion(sd),
        columns,
        scoring.PromptFile(prompts),
        str(tmp_path / "s"),
        seed=5,
        batch_size=8,
        generation=scoring.Generation(num_steps=3, num_images=1),
    )
    rows = scoring.merge(tmp_path / "s").scores.to_pandas().sort_values("index")
    captions = [c for c, _, _ in PROMPTS[:3]]
    key = jax.random.key(5)
    ren = D.attention_entropy(sd, captions, key=key, num_steps=3, early_steps=2)
    np.testing.assert_allclose(rows["ren_entropy"], ren.entropy, rtol=1e-5)
    np.testing.assert_allclose(rows["ren_begin"], ren.begin, rtol=1e-4)
    np.testing.assert_allclose(rows["ren_end"], ren.end, rtol=1e-4)
    be = D.bright_ending(sd, captions, key=key, num_steps=3)
    np.testing.assert_allclose(rows["bright_ending"], be.score, rtol=1e-4)
    np.testing.assert_allclose(
        np.stack(rows["value_activations"]), D.value_activations(sd, captions), rtol=1e-5
    )


@pytest.mark.parametrize(
    "labels, message",
    [
        ([True, True, True], "no clean prompt"),
        ([False, False, False], "no memorized prompt"),
        ([True, False, False], "at least 3 clean"),
    ],
)
def test_benchmark_refuses_one_class_prompt_files(sd_folder, tmp_path, capsys, labels, message):
    folder, _ = sd_folder
    prompts = _write(tmp_path / "p.jsonl", [(c, y, None) for (c, _, _), y in zip(PROMPTS, labels)])
    assert (
        main(
            [
                "sd",
                "benchmark-detectors",
                str(folder),
                "--prompts",
                str(prompts),
                "-o",
                str(tmp_path / "out"),
                *FAST,
            ]
        )
        != 0
    )
    assert message in capsys.readouterr().err
