"""The benchmark runner (``python -m benchmarks``) on tiny configurations: the run file's
schema, the interleaved order of the sides, the table regeneration touching only its block, every
benchmark's TINY run and table, and RESULTS.md's blocks being those of the run files."""

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from benchmarks.__main__ import NAMES, main

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    main(
        [
            "run",
            "retrieval",
            "--tiny",
            "--repeats",
            "3",
            "--set",
            "retrieval.ks=2",
            "--out",
            str(out),
        ]
    )
    return out


def test_run_file_schema_and_interleaving(run_file):
    run = json.loads(run_file.read_text())
    assert run["schema"] == "mmh_jax.benchmarks/1" and run["repeats"] == 3 and run["tiny"]
    assert run["machine"]["cores"] >= 1 and run["machine"]["cpu_model"]
    assert run["machine"]["versions"]["jax"] and run["machine"]["versions"]["numpy"]
    assert len(run["load_before"]) == 3 and len(run["load_after"]) == 3
    entry = run["benchmarks"]["retrieval"]
    assert entry["config"]["ks"] == [2] and entry["config"]["n_refs"] == 300
    (case,) = entry["cases"]
    assert case["order"] == ["ours", "sklearn"] * 3  # A B A B A B, not A A A B B B
    for side in case["sides"].values():
        assert len(side["times_s"]) == 3 and side["warmup_s"] > 0 and not side["derived"]
        assert side["min_s"] == min(side["times_s"]) <= side["median_s"] <= max(side["times_s"])
    ratio = case["ratios"]["sklearn / ours"]
    ours, sk = case["sides"]["ours"]["times_s"], case["sides"]["sklearn"]["times_s"]
    assert ratio["rounds"] == pytest.approx([b / a for a, b in zip(ours, sk)])
    assert case["notes"]["same_neighbour_sets"] == 1.0  # exact search: sklearn's neighbours


def test_tables_rewrite_only_the_marked_block(run_file, tmp_path):
    before = "# Results\n\nprose *kept*\n<!-- bench:retrieval -->\nold table\n<!-- /bench:retrieval -->\n"
    other = "between\n<!-- bench:lpca -->\nlpca's own table\n<!-- /bench:lpca -->\nend\n"
    results = tmp_path / "RESULTS.md"
    results.write_text(before + other)
    main(["tables", "--json", str(run_file), "--results", str(results)])
    text = results.read_text()
    head, rest = text.split("<!-- bench:retrieval -->\n")
    block, tail = rest.split("<!-- /bench:retrieval -->\n")
    assert head == "# Results\n\nprose *kept*\n" and tail == other
    assert "old table" not in block and "| sklearn / ours |" in block and "load average" in block
    assert json.loads(run_file.read_text())["benchmarks"]["retrieval"]["cases"][0]["name"] in block
    main(["tables", "--json", str(run_file), "--results", str(results)])
    assert results.read_text() == text  # regenerating is idempotent


def test_tables_refuse_a_benchmark_without_block(run_file, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:NAME"):
        main(["tables", "--json", str(run_file), "--results", str(results)])
    assert results.read_text() == "no markers\n"


ROOT = Path(__file__).resolve().parents[1]
#: TINY runs that take more than ~10 s on 2 cores (SD-layout UNets, ResNet-50, converted ports).
SLOW = {"unet", "sd", "sscd", "guarded", "attribution"}
#: What each benchmark's notes must say against a reference (the answers of the compared sides;
#: unet's TINY FLIPD values are small enough that their relative difference reads 7e-3: the
#: port's parity is tested in tests/models).
AGREEMENT = {
    "sd": lambda n: n["flipd_relative_difference"] < 1e-3,
    "sscd": lambda n: n["max_abs_descriptor_difference"] < 1e-4,
    "linalg": lambda n: n["max_difference_relative"] < 1e-3,
    "guarded": lambda n: n["max_difference_cfg_norm"] == 0.0,  # the plain sample
}


def _tiny_params():
    for name in NAMES:
        if name == "retrieval":  # the module fixture above
            continue
        yield pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


@pytest.mark.parametrize("name", list(_tiny_params()))
@pytest.mark.slow
def test_every_benchmark_runs_tiny_and_renders_its_block(name, tmp_path):
    module = importlib.import_module(f"benchmarks.bench_{name}")
    if name == "lpca":
        pytest.importorskip("skdim")
    if name in ("unet", "sd", "sscd"):
        pytest.importorskip("torch")
        pytest.importorskip("diffusers")
    out = tmp_path / "run.json"
    main(["run", name, "--tiny", "--repeats", "2", "--out", str(out)])
    run = json.loads(out.read_text())
    entry = run["benchmarks"][name]
    assert entry["config"] == json.loads(json.dumps(dataclasses.asdict(module.TINY)))
    assert len(entry["load_before"]) == 3 and entry["wall_s"] > 0 and entry["cases"]
    for case in entry["cases"]:
        measured = [s for s, v in case["sides"].items() if not v["derived"]]
        assert case["order"] == measured * 2  # interleaved: A B A B
        for side in case["sides"].values():
            assert len(side["times_s"]) == 2 and side["min_s"] <= side["median_s"]
        for r in case["ratios"].values():
            num = case["sides"][r["numerator"]]["times_s"]
            den = case["sides"][r["denominator"]]["times_s"]
            assert r["rounds"] == pytest.approx([a / b for a, b in zip(num, den)])
        if name in AGREEMENT and case is entry["cases"][0]:
            assert AGREEMENT[name](case["notes"]), case["notes"]
    results = tmp_path / "RESULTS.md"
    results.write_text(f"prose\n<!-- bench:{name} -->\nold\n<!-- /bench:{name} -->\ntail\n")
    assert main(["tables", "--json", str(out), "--results", str(results)]) is None
    text = results.read_text()
    assert text.startswith(f"prose\n<!-- bench:{name} -->\nFrom `") and text.endswith("tail\n")
    assert "\nold\n" not in text and "(TINY sizes)" in text
    for case in entry["cases"]:
        assert case["name"] in text


def test_results_md_is_generated_from_the_run_files(tmp_path, monkeypatch):
    """Every benchmark has a block in RESULTS.md and a run file in benchmarks/results/, and the
    blocks are what ``tables`` makes of the run files (nobody edited them by hand)."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    runs = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json")
    )
    held = {n for p in runs for n in json.loads((ROOT / p).read_text())["benchmarks"]}
    for name in NAMES:
        assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text, name
        assert name in held, f"no run file in benchmarks/results/ holds {name}"
    copy = tmp_path / "RESULTS.md"
    copy.write_text(text)
    main(["tables", "--json", *runs, "--results", str(copy)])
    assert copy.read_text() == text
