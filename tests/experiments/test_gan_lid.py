"""``mmh-jax gan lid`` end to end on the tiny StyleGAN2-ADA snapshot in the official pickle
layout (tests/models/fixtures/stylegan2/skip_cond.pkl): the table against gan_lid on the same
latents, the paper's threshold, resuming, labels and bad input."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mmh_jax.cli import main
from mmh_jax.experiments.cifar10_gan import sample_latents
from mmh_jax.memorization import gan_lid
from mmh_jax.models import load_stylegan2

PICKLE = Path(__file__).parents[1] / "models" / "fixtures" / "stylegan2" / "skip_cond.pkl"
FAST = ["--batch-size", "4", "--chunk-size", "8", "--quiet", "--num-extremes", "3"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan") / "out"
    assert main(["gan", "lid", str(PICKLE), "-n", "7", "-o", str(out), "--seed", "5", *FAST]) == 0
    return out


@pytest.mark.slow
def test_table_equals_gan_lid_with_the_pooled_percentile(scored):
    table = pd.read_parquet(scored / "results.parquet")
    spectra = np.load(scored / "spectra.npy")
    assert spectra.shape == (7, 16)
    assert list(table["index"]) == list(range(7)) and list(table["seed"]) == list(range(5, 12))
    assert list(table["class"]) == [0, 1, 2, 0, 1, 2, 0]  # class-balanced
    tau = np.percentile(spectra, 10)
    np.testing.assert_array_equal(table["lid"], (spectra > tau).sum(1))
    model = load_stylegan2(PICKLE)
    z, classes = sample_latents(np.arange(7), seed=5, z_dim=16, c_dim=3)
    np.testing.assert_array_equal(z[2], np.random.RandomState(7).randn(16).astype(np.float32))
    direct = gan_lid(model.module, model.params, jnp.asarray(z), jnp.asarray(classes))
    np.testing.assert_allclose(
        spectra, direct.singular_values, rtol=1e-4, atol=1e-5 * spectra.max()
    )
    assert np.all(table["png_bytes"] > 60)
    np.testing.assert_allclose(table["lid_per_png_kb"], table["lid"] / table["png_bytes"] * 1000)
    pd.testing.assert_frame_equal(pd.read_csv(scored / "results.csv"), table, check_dtype=False)
    for figure in ("lid_histogram.png", "lid_extremes.png"):
        assert (scored / figure).stat().st_size > 1000


def _run(out, *extra, seed="5", n="7"):
    return main(["gan", "lid", str(PICKLE), "-n", n, "-o", str(out), "--seed", seed, *FAST, *extra])


def test_rerun_reuses_the_parts_and_refuses_other_settings(scored, capsys):
    """A finished run's rerun rescored nothing (the engine's chunks are reused, untouched) and
    gives the same table; another seed or sample count in the same folder is refused."""
    parts = {p.name: p.stat().st_mtime_ns for p in (scored / "scores" / "parts").iterdir()}
    before = pd.read_parquet(scored / "results.parquet")
    assert _run(scored, "--no-figure") == 0
    assert "samples now / resumed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (scored / "scores" / "parts").iterdir()} == parts
    pd.testing.assert_frame_equal(pd.read_parquet(scored / "results.parquet"), before)
    for extra in (("--seed", "6"), ("-n", "10")):
        argv = ["gan", "lid", str(PICKLE), "-n", "7", "-o", str(scored), "--seed", "5", *FAST]
        argv[argv.index(extra[0]) + 1] = extra[1]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "choose another --out" in err and "Traceback" not in err
    assert (
        main(["gan", "lid", str(PICKLE), "-n", "7", "-o", str(scored), "--seed", "6", *FAST]) == 2
    )
    assert "seed" in capsys.readouterr().err


def test_interrupted_run_resumes_without_losing_or_doubling_a_row(scored, tmp_path):
    """A run killed after some of its chunks (simulated: the manifest of chunks 0 and 2 of
    4 removed, with a leftover temporary part) resumes: only those chunks are scored again and
    the table equals the uninterrupted run's."""
    from mmh_jax.experiments.cifar10_gan import GanLidConfig, run

    config = GanLidConfig(
        model=PICKLE,
        out=tmp_path / "out",
        num_samples=7,
        seed=5,
        batch_size=2,
        chunk_size=8,
        num_extremes=3,
        progress=False,
        figure=False,
        part_size=2,
    )
    run(config)
    scores = tmp_path / "out" / "scores"
    for chunk in (0, 2):
        (scores / "manifest" / f"chunk-{chunk:08d}.json").unlink()
    (scores / "parts" / ".part-00000002.parquet.part").write_bytes(b"half a part")
    kept = {
        p.name: p.stat().st_mtime_ns
        for p in (scores / "parts").iterdir()
        if p.name.endswith(("1.parquet", "3.parquet"))
    }
    table, summary, _ = run(config)
    assert summary["timings"]["scored_now"] == 4  # chunks 0 and 2: samples 0, 1, 4, 5
    assert {
        p.name: p.stat().st_mtime_ns for p in (scores / "parts").iterdir() if p.name in kept
    } == kept
    assert not list((scores / "parts").glob(".*"))
    resumed = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(resumed["index"]) == list(range(7))
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(scored / "results.parquet"))


def test_labels_give_medians_and_auroc(scored, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label\n0,exact\n1,not\n2,not\n3,exact\n4,not\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "gan",
                "lid",
                str(PICKLE),
                "-n",
                "7",
                "-o",
                str(out),
                "--seed",
                "5",
                "--labels",
                str(labels),
                *FAST,
                "--no-figure",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["label"]) == ["exact", "not", "not", "exact", "not", "", ""]
    assert "label 'exact' (2)" in stdout and "AUROC" in stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["nowhere.pkl"], "does not exist"),
        ([str(PICKLE), "-n", "0"], "--num-samples"),
        ([str(PICKLE), "--percentile", "100"], "--percentile"),
        ([str(PICKLE), "--labels", "nowhere.csv"], "--labels"),
        ([str(PICKLE), "--network", "D"], "invalid choice"),
    ],
)
def test_bad_input(argv, fragment, tmp_path, capsys):
    code = None
    try:
        code = main(["gan", "lid", *argv, "-o", str(tmp_path / "out"), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
