"""The code passes ruff's lint rules and is in ruff's format (configured in pyproject.toml; ruff
comes with the test extra)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["mmh_jax", "tests", "benchmarks", "experiments"]


def _ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_ruff_check():
    out = _ruff("check", "--output-format", "concise")
    assert out.returncode == 0, (
        f"`ruff check --fix {' '.join(PATHS)}` fixes most of these:\n{out.stdout}{out.stderr}"
    )


def test_ruff_format():
    out = _ruff("format", "--check")
    assert out.returncode == 0, f"run `ruff format {' '.join(PATHS)}`:\n{out.stdout}{out.stderr}"
