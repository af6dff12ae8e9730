"""Fast versions of the demos: files written, qualitative result, bad input, atomic output."""

import csv
import dataclasses
import math

import numpy as np
import pytest

from mmh_jax.cli import main
from mmh_jax.experiments import von_mises
from mmh_jax.experiments.common import atomic_path

# Small but still memorizing: with 30 training points the isolated one is 1/30 of the
# data, which a 64-wide MLP fits within a few thousand steps.
FAST_VM = dict(num_train=30, steps=4000, num_samples=400, sample_steps=200, progress=False)


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vm")
    cfg = von_mises.VonMisesConfig(seed=0, out=out, **FAST_VM)
    return cfg, von_mises.run(cfg)


def test_training_set_has_isolated_point_by_construction():
    for seed in range(5):
        ts = von_mises.make_training_set(seed=seed, num_train=100)
        assert ts.points.shape == (100, 2)
        np.testing.assert_allclose(ts.points[ts.isolated_index], [-1.0, 0.0])
        assert len(ts.origin_indices) == 20 and np.all(ts.points[ts.origin_indices] == 0)
        others = np.delete(ts.points, np.r_[ts.isolated_index, ts.origin_indices], axis=0)
        angle_from_pi = np.abs(np.angle(-(others[:, 0] + 1j * others[:, 1])))
        assert angle_from_pi.min() >= 0.8 - 1e-6
        np.testing.assert_allclose(np.linalg.norm(others, axis=1), 1.0, atol=1e-6)
    a = von_mises.make_training_set(seed=3)
    b = von_mises.make_training_set(seed=3)
    np.testing.assert_array_equal(a.points, b.points)


@pytest.mark.slow
def test_von_mises_files(vm_run):
    cfg, res = vm_run
    names = {p.name for p in res.files}
    assert names == {"samples.csv", "samples.parquet", "training_set.csv", "figure4.png"}
    with open(cfg.out / "samples.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == cfg.num_samples
    assert {"x", "y", "flipd", "normal_bundle_lid", "lid_star_lpca", "label", "od_margin"} <= set(
        rows[0]
    )
    flipd_csv = np.array([float(r["flipd"]) for r in rows])
    np.testing.assert_allclose(flipd_csv, res.table["flipd"], rtol=1e-12)
    import pyarrow.parquet as pq

    tab = pq.read_table(cfg.out / "samples.parquet")
    assert tab.num_rows == cfg.num_samples and tab.column_names == list(res.table)
    np.testing.assert_allclose(tab.column("flipd").to_numpy(), res.table["flipd"])
    assert (cfg.out / "figure4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(cfg.out.glob(".*part"))


@pytest.mark.slow
def test_von_mises_qualitative_result(vm_run):
    _, res = vm_run
    t = res.table
    origin, iso, circle = (t["region"] == r for r in ("origin", "isolated", "circle"))
    assert origin.sum() >= 20 and iso.sum() >= 2 and circle.sum() >= 100
    # DD-Mem at the origin: FLIPD ~ 0 = LID_*.
    assert abs(np.median(t["flipd"][origin])) < 0.3
    assert np.mean(t["label"][origin] == "dd-mem") >= 0.9
    # OD-Mem at the isolated point: FLIPD ~ 0 < LID_* = 1.
    assert np.median(t["flipd"][iso]) < 0.5
    assert np.mean(t["label"][iso] == "od-mem") >= 0.5
    # The well-covered arc around the von Mises mode is one-dimensional and not memorized.
    dense = circle & (np.abs(np.arctan2(t["y"], t["x"])) < 1.0)
    assert dense.sum() >= 100
    assert abs(np.median(t["flipd"][dense]) - 1.0) < 0.3
    assert np.mean(t["label"][dense] == "not-memorized") >= 0.8


@pytest.mark.slow
def test_von_mises_same_seed_same_result(tmp_path):
    cfg = von_mises.VonMisesConfig(
        seed=5,
        num_train=20,
        steps=200,
        num_samples=40,
        sample_steps=50,
        progress=False,
        figure=False,
    )
    a = von_mises.run(dataclasses.replace(cfg, out=tmp_path / "a"))
    b = von_mises.run(dataclasses.replace(cfg, out=tmp_path / "b"))
    for k in a.table:
        np.testing.assert_array_equal(a.table[k], b.table[k])
    assert (tmp_path / "a" / "samples.csv").read_bytes() == (
        tmp_path / "b" / "samples.csv"
    ).read_bytes()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--t0", "0"], "--t0"),
        (["--t0", "1.5"], "--t0"),
        (["--num-train", "-5"], "--num-train"),
        (["--steps", "0"], "--steps"),
        (["--num-samples", "-1"], "--num-samples"),
        (["--steps", "many"], "--steps"),
    ],
)
def test_cli_bad_flags_one_line(flags, fragment, capsys, tmp_path):
    code = main(["demo", *flags, "--out", str(tmp_path)]) if flags[1] != "many" else None
    if code is None:
        with pytest.raises(SystemExit) as exc:
            main(["demo", *flags, "--out", str(tmp_path)])
        code = exc.value.code
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["demo", "--out", str(blocker / "sub"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not writable" in err


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_cli_help(capsys):
    out = _help(["demo", "von-mises", "--help"], capsys)
    assert "--t0" in out and "--seed" in out and "--num-train" in out and "--out" in out
    assert "--steps" in _help(["demo", "digits", "--help"], capsys)


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_cli_help_lists_every_demo(argv, capsys):
    out = _help(argv, capsys)
    for name in ("von-mises", "digits", "prompts"):
        assert name in out, (argv, name)


def test_cli_unknown_demo_lists_the_demos(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "vonmises"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "'vonmises'" in err and all(name in err for name in ("von-mises", "digits", "prompts"))


def test_atomic_path_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half a tab")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("complete")
    assert target.read_text() == "complete" and [p.name for p in tmp_path.iterdir()] == [
        "table.csv"
    ]


def test_isolation_constant_is_in_range():
    assert 0 < von_mises.VonMisesConfig().isolation < math.pi


# ---------------------------------------------------------------- digits demo

from mmh_jax.experiments import digits  # noqa: E402

FAST_DIGITS = dict(
    steps=40,
    batch_size=32,
    channels=4,
    mlp_width=16,
    num_samples=16,
    sample_steps=10,
    num_duplicated=2,
    copies=5,
    common_per_class=10,
    progress=False,
)


def test_digits_training_set_by_construction():
    d = digits.make_digits_training_set(
        seed=1, num_duplicated=3, copies=7, rare_classes=(8, 9), rare_per_class=2
    )
    kinds = dict(zip(*np.unique(d.unique_kind, return_counts=True)))
    assert kinds["duplicated"] == 3 and kinds["rare"] == 4
    assert set(d.unique_label[d.unique_kind == "rare"]) == {8, 9}
    assert not np.isin(d.unique_label[d.unique_kind != "rare"], [8, 9]).any()
    assert len(d.images) == len(d.unique_images) + 3 * 6
    assert d.images.shape[1:] == (8, 8) and d.images.min() >= -1 and d.images.max() <= 1


def test_digits_training_set_common_per_class():
    d = digits.make_digits_training_set(seed=0, num_duplicated=8, copies=40, common_per_class=40)
    labels, counts = np.unique(d.unique_label, return_counts=True)
    assert dict(zip(labels.tolist(), counts.tolist())) == {**{c: 40 for c in range(8)}, 8: 1, 9: 1}
    assert len(d.images) == 322 + 8 * 39
    again = digits.make_digits_training_set(
        seed=0, num_duplicated=8, copies=40, common_per_class=40
    )
    np.testing.assert_array_equal(d.images, again.images)
    # default: every image of the common classes is kept (unchanged behaviour)
    full = digits.make_digits_training_set(seed=0, num_duplicated=0, copies=1)
    assert (full.unique_kind == "common").sum() > 1400


@pytest.mark.slow
def test_digits_fast_run_files(tmp_path):
    cfg = digits.DigitsConfig(seed=0, out=tmp_path, **FAST_DIGITS)
    table, summary, files = digits.run(cfg)
    assert {p.name for p in files} == {
        "digits_samples.csv",
        "digits_samples.parquet",
        "digits_lowest_highest_flipd.png",
        "digits_flipd_histograms.png",
    }
    with open(tmp_path / "digits_samples.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == cfg.num_samples and set(rows[0]) == set(table)
    fl = np.array([float(r["flipd"]) for r in rows])
    assert np.all(np.isfinite(fl))
    np.testing.assert_allclose(fl, table["flipd"], rtol=1e-12)
    mem = np.array([r["memorized"] == "True" for r in rows])
    np.testing.assert_array_equal(mem, table["calibrated_l2"] < cfg.mem_threshold)
    import pyarrow.parquet as pq

    tab = pq.read_table(tmp_path / "digits_samples.parquet")
    assert tab.num_rows == cfg.num_samples and tab.column_names == list(table)
    for name in ("digits_lowest_highest_flipd.png", "digits_flipd_histograms.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*part"))
    assert summary["num_samples"] == cfg.num_samples and summary["num_memorized"] == int(mem.sum())


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--t0", "0"], "--t0"),
        (["--steps", "-3"], "--steps"),
        (["--copies", "0"], "--copies"),
        (["--mem-threshold", "-1"], "--mem-threshold"),
        (["--num-samples", "1"], "--num-samples"),
        (["--common-per-class", "0"], "--common-per-class"),
        (["--mlp-width", "-1"], "--mlp-width"),
        (["--calibration-k", "100000"], "--calibration-k must be at most the number of distinct"),
    ],
)
def test_cli_digits_bad_flags_one_line(flags, fragment, capsys, tmp_path):
    code = main(["demo", "digits", *flags, "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_digits_non_number_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "digits", "--steps", "lots", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--steps" in err


def test_tables_print_in_full_when_piped(capsys, monkeypatch):
    from rich.table import Table

    from mmh_jax.experiments.common import output_console

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    for name in (
        "region",
        "samples",
        "FLIPD median",
        "NB median",
        "LID_* (lpca)",
        "od-mem",
        "dd-mem",
        "not-memorized",
    ):
        table.add_column(name)
    table.add_row("isolated", "12", "0.05 [0.01, 0.09]", "0", "1", "11", "0", "1")
    output_console().print(table)
    out = capsys.readouterr().out
    assert "…" not in out and "isolated" in out and "not-memorized" in out
    assert max(map(len, out.splitlines())) > 80  # wider than rich's default for a pipe


def test_every_command_prints_on_the_output_console():
    from pathlib import Path

    import mmh_jax.experiments

    folder = Path(mmh_jax.experiments.__file__).parent
    plain = [
        p.name
        for p in folder.glob("*.py")
        if p.name != "common.py" and "Console()" in p.read_text()
    ]
    assert plain == []  # a bare Console() squeezes tables to 80 columns when piped


def test_failed_write_names_the_output_not_the_temporary_file(tmp_path):
    import errno

    from mmh_jax._src.files import atomic_folder
    from mmh_jax.experiments.common import write_csv

    with pytest.raises(FileNotFoundError) as err:  # the folder is missing
        write_csv({"a": [1]}, tmp_path / "nowhere" / "table.csv")
    assert err.value.filename == str(tmp_path / "nowhere" / "table.csv")
    target = tmp_path / "table.csv"
    with pytest.raises(OSError) as err:
        with atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    with pytest.raises(OSError) as err:
        with atomic_folder(tmp_path / "figures") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "a.png"))
    assert err.value.filename == str(tmp_path / "figures" / "a.png")
    with pytest.raises(FileNotFoundError) as err:  # about another file: unchanged
        with atomic_path(target):
            open(tmp_path / "input.csv")
    assert err.value.filename == str(tmp_path / "input.csv")
    assert list(tmp_path.iterdir()) == []
