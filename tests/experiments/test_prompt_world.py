"""``mmh-jax demo prompts``: settings are refused before any work. (The whole recipe runs in
``mmh-jax demo prompts``; its figures of record are in benchmarks/RESULTS.md.)"""

import pytest

from mmh_jax.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--target-fpr", "0.01", "--num-calibration", "10"],
            "--num-calibration must be at least 99",
        ),
        (["--train-steps", "0"], "--train-steps must be at least 1"),
    ],
)
def test_bad_settings_are_refused(tmp_path, capsys, flags, message):
    assert main(["demo", "prompts", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_help_describes_the_demo(capsys):
    try:
        main(["demo", "prompts", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "usage: mmh-jax demo prompts" in out and "--target-fpr" in out
