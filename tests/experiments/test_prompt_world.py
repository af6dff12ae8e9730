"""``mmh-jax demo prompts``: settings are refused before any work. (The whole recipe runs in
``mmh-jax demo prompts``; its figures of record are in benchmarks/RESULTS.md.)"""

from mmh_jax.cli import main


def test_bad_settings_are_refused(tmp_path, capsys):
    assert main(["demo", "prompts", "--out", str(tmp_path), "--target-fpr", "0.01",
                 "--num-calibration", "10"]) == 2
    assert "--num-calibration must be at least 99" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_help_describes_the_demo(capsys):
    try:
        main(["demo", "prompts", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "usage: mmh-jax demo prompts" in out and "--target-fpr" in out
