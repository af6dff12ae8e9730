"""``mmh-jax demo prompts --quick``: the whole recipe on the quick world, its outputs and their
ground truth, the rerun that reuses every stage, and the refusals."""

import json

import numpy as np
import pytest

from mmh_jax.cli import main
from mmh_jax.experiments.prompt_world import PromptWorldConfig, run, specs

pytestmark = pytest.mark.slow

SMALL = dict(quick=True, images_per_prompt=2, num_steps=10, num_heldout=12, num_calibration=9,
             target_fpr=0.1, ks=(1,), repeats=1, mitigation_images=1, batch_size=16,
             progress=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    return out, run(PromptWorldConfig(out=out, **SMALL))


def test_quick_world_outputs_and_ground_truth(quick_run):
    out, summary = quick_run
    for name in ("detection.parquet", "attribution.parquet", "mitigation.parquet",
                 "guard.parquet", "summary.json", "results.md", "roc_verbatim.png",
                 "prompt_world.png"):
        assert (out / name).is_file(), name
    world_spec, _ = specs(True)
    verbatim = summary["detection"]["verbatim"]["CFG norm (generation)"]
    assert verbatim["n_memorized"] == len(world_spec.verbatim_counts)
    assert verbatim["n_heldout"] == SMALL["num_heldout"]
    # the quick model has learned its verbatim captions: their CFG norm is above the held-out
    # prompts' (paper, Figure 3; Wen et al.)
    assert verbatim["auroc"] >= 0.8
    assert summary["guard"]["n_heldout"] == SMALL["num_heldout"]
    assert json.loads((out / "summary.json").read_text()) == summary


def test_rerun_reuses_every_stage(quick_run, capsys):
    out, summary = quick_run
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = run(PromptWorldConfig(out=out, **SMALL))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps
    assert again["detection"] == summary["detection"]
    assert "judges ready" not in capsys.readouterr().out  # nothing left to judge


def test_a_model_folder_of_other_settings_is_refused(quick_run, capsys):
    out, _ = quick_run
    code = main(["demo", "prompts", "--out", str(out / "other"), "--model", str(out / "model"),
                 "--no-progress"])
    assert code == 2
    assert "another world or training settings" in capsys.readouterr().err


def test_bad_settings_are_refused(tmp_path, capsys):
    assert main(["demo", "prompts", "--out", str(tmp_path), "--target-fpr", "0.01",
                 "--num-calibration", "10"]) == 2
    assert "--num-calibration must be at least 99" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
