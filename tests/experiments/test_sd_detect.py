"""``mmh-jax sd detect`` and ``mmh-jax convert stable-diffusion`` end to end on the tiny random
pipeline (tests/conftest.py's ``sd_folder``): tables, figures, detection metrics, resuming, the
image-folder input and bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from mmh_jax.cli import main
from mmh_jax.experiments.stable_diffusion import detection_metrics
from mmh_jax.scoring import merge

PROMPTS = [
    ("a cat, the cat", True),
    ("the fox", False),
    ("a tea cat", True),
    ("the sea", False),
    ("cats at the sea", False),
]
FAST = ["--images-per-prompt", "2", "--num-steps", "3", "--batch-size", "2", "--quiet"]


def _write_jsonl(path, prompts):
    path.write_text(
        "\n".join(json.dumps({"caption": c, "label": m, "url": "x"}) for c, m in prompts) + "\n"
    )
    return path


@pytest.fixture(scope="module")
def detected(sd_folder, tmp_path_factory):
    folder, _ = sd_folder
    root = tmp_path_factory.mktemp("detect")
    prompts = _write_jsonl(root / "prompts.jsonl", PROMPTS[:4])
    assert (
        main(
            ["sd", "detect", str(folder), "--prompts", str(prompts), "-o", str(root / "out"), *FAST]
        )
        == 0
    )
    return folder, root, prompts


@pytest.mark.slow
def test_prompt_file_gives_table_figures_and_detection(detected):
    _, root, _ = detected
    table = pd.read_parquet(root / "out/results.parquet")
    assert list(table["caption"]) == [c for c, _ in PROMPTS[:4]]
    assert list(table["label"]) == [1, 0, 1, 0]
    for name in ("cfg_vector_norm", "cfg_score_norm", "flipd_uncond", "flipd_cond"):
        assert np.all(np.isfinite(table[name])), name
    pd.testing.assert_frame_equal(pd.read_csv(root / "out/results.csv"), table, check_dtype=False)
    for figure in ("histograms.png", "cfg_scatter.png"):
        assert (root / "out" / figure).stat().st_size > 1000
    detection = pd.read_csv(root / "out/detection.csv")
    labels = table["label"].to_numpy() == 1
    row = detection.set_index("metric").loc["flipd_cond"]
    assert row["auroc"] == pytest.approx(roc_auc_score(labels, -table["flipd_cond"]))


@pytest.mark.slow
def test_a_rerun_resumes_and_values_do_not_depend_on_batch_or_input_length(
    detected, sd_folder, capsys
):
    folder, root, prompts = detected
    before = pd.read_parquet(root / "out/results.parquet")
    # the same input again: the engine's finished chunks are reused, nothing is scored anew
    assert (
        main(
            [
                "sd",
                "detect",
                str(folder),
                "--prompts",
                str(prompts),
                "-o",
                str(root / "out"),
                *FAST,
                "--no-figure",
            ]
        )
        == 0
    )
    assert "scored 0 now (4 resumed)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(root / "out/results.parquet"), before)
    # one prompt more, three per batch, a fresh folder: the first four prompts' numbers agree
    longer = _write_jsonl(root / "longer.jsonl", PROMPTS)
    fresh = root / "fresh"
    assert (
        main(
            [
                "sd",
                "detect",
                str(folder),
                "--prompts",
                str(longer),
                "-o",
                str(fresh),
                *FAST[:-3],
                "--batch-size",
                "3",
                "--quiet",
                "--no-figure",
            ]
        )
        == 0
    )
    again = pd.read_parquet(fresh / "results.parquet")
    numbers = ["cfg_vector_norm", "cfg_score_norm", "flipd_uncond", "flipd_cond"]
    assert len(again) == 5
    np.testing.assert_allclose(again[numbers].iloc[:4], before[numbers], rtol=1e-3)
    # the engine's per-image rows are the source of the per-prompt means
    images = merge(fresh / "scores").scores.to_pandas()
    assert sorted(set(zip(images["index"], images["image_index"]))) == [
        (i, j) for i in range(5) for j in range(2)
    ]
    np.testing.assert_allclose(
        images.groupby("index")["cfg_vector_norm"].mean(), again["cfg_vector_norm"], rtol=1e-6
    )


@pytest.mark.slow
def test_without_labels_the_summary_has_no_nan_columns(sd_folder, tmp_path, capsys):
    folder, _ = sd_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat, the cat\nthe fox\n")  # no labels
    assert (
        main(
            [
                "sd",
                "detect",
                str(folder),
                "--prompts",
                str(prompts),
                "-o",
                str(tmp_path / "out"),
                *FAST,
                "--no-figure",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "median (all)" in out and "CFG" in out
    assert "nan" not in out and "AUROC" not in out and "median (memorized)" not in out


@pytest.mark.slow
def test_other_inputs_in_the_output_folder_are_refused(detected, tmp_path, capsys):
    folder, root, _ = detected
    other = tmp_path / "other.txt"
    other.write_text("a different prompt\n")
    assert (
        main(["sd", "detect", str(folder), "--prompts", str(other), "-o", str(root / "out"), *FAST])
        == 2
    )
    assert "other inputs" in capsys.readouterr().err


@pytest.mark.slow
def test_image_folder_and_converted_model(sd_folder, tmp_path):
    folder, _ = sd_folder
    converted = tmp_path / "sd.safetensors"
    assert main(["convert", "stable-diffusion", str(folder), "-o", str(converted)]) == 0
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(0)
    for i, (caption, memorized) in enumerate(PROMPTS[:3]):
        size = (20 + 4 * i, 16)  # not square, not the model's size: resized and cropped
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
            pairs / f"{i:05d}.png"
        )
        (pairs / f"{i:05d}.txt").write_text(caption)
        (pairs / f"{i:05d}.json").write_text(json.dumps({"label": memorized}))
    out = tmp_path / "out"
    # 3 probes: the two FLIPD programs of batch 2 are then those test_conditional.py's
    # conditional_flipd compiles (one compilation for both tests in one session)
    assert (
        main(
            [
                "sd",
                "detect",
                str(converted),
                "--images",
                str(pairs),
                "-o",
                str(out),
                "--batch-size",
                "2",
                "--num-probes",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["id"]) == ["00000", "00001", "00002"]
    assert list(table["label"]) == [1, 0, 1]
    assert np.all(np.isfinite(table[["cfg_vector_norm", "flipd_cond"]].to_numpy()))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"caption": "a cat"}\nnot json\n', "prompts.jsonl:2"),
        ('{"caption": 3}\n', "prompts.jsonl:1: needs a string 'caption'"),
        ("[1, 2]\n", "prompts.jsonl:1: needs a string 'caption'"),
        ('{"caption": "a", "label": "yes"}\n', "label"),
        ("\n\n", "holds no prompt"),
    ],
)
def test_bad_prompt_file_lines_are_named(sd_folder, tmp_path, capsys, content, message):
    folder, _ = sd_folder
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    assert (
        main(
            [
                "sd",
                "detect",
                str(folder),
                "--prompts",
                str(prompts),
                "-o",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err


def test_bad_model_and_flags(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert (
        main(
            [
                "sd",
                "detect",
                str(tmp_path),
                "--prompts",
                str(prompts),
                "-o",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sd", "detect", str(tmp_path), "--prompts", str(prompts), "--images", str(tmp_path)])
    assert (
        main(["sd", "detect", str(tmp_path), "--prompts", str(prompts), "--images-per-prompt", "0"])
        == 2
    )


def test_detection_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.standard_normal(200) + 1.5 * labels
    auroc, tpr = detection_metrics(scores, labels, higher_is_memorized=True)
    assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # at 1% FPR at most k = floor(0.01 n_neg) negatives may score above the threshold: the
    # positives counted are those above the (k+1)-th highest negative score
    negatives = np.sort(scores[~labels])[::-1]
    k = int(np.floor(0.01 * len(negatives)))
    assert k >= 1
    assert tpr == pytest.approx(np.mean(scores[labels] > negatives[k]))
    flipped, _ = detection_metrics(-scores, labels, higher_is_memorized=False)
    assert flipped == pytest.approx(auroc)
    assert np.isnan(detection_metrics(scores, np.ones(200, bool), higher_is_memorized=True)[0])
