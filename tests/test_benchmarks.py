"""The benchmark runner (``python -m benchmarks``) on a tiny configuration: the run file's
schema, the interleaved order of the sides, and the table regeneration touching only its block."""

import json

import pytest

from benchmarks.__main__ import main

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
