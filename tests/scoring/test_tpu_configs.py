"""The shipped launch configs in tpu_configs/: every config is valid, matches the README's
table, and every launch script parses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mmh_jax.scoring.config import read_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "tpu_configs"
README = CONFIGS_DIR / "README.md"
CONFIGS = sorted(CONFIGS_DIR.glob("*.toml"))
SCRIPTS = sorted([*CONFIGS_DIR.glob("*.sh"), *CONFIGS_DIR.glob("*.sbatch")])


def _readme_table() -> dict[str, dict[str, str]]:
    """The README's table of configs: file name -> {column header: cell}."""
    rows = [
        line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("|")
    ]
    header = [cell.strip().strip("`") for cell in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.search(r"[\w.-]+\.toml", cells[0])
        if name:
            table[name.group(0)] = dict(zip(header, cells))
    return table


def test_there_are_configs_and_scripts():
    assert len(CONFIGS) >= 4
    assert {p.suffix for p in SCRIPTS} == {".sh", ".sbatch"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_and_matches_the_readme(path):
    config = read_config(path, check_files=False)  # unknown keys, types, column settings
    assert config.columns, "a config must name at least one column"
    row = _readme_table().get(path.name)
    assert row is not None, f"README.md's table has no row for {path.name}"
    assert config.distributed["initialize"] == (row["initialize"].strip("`") == "true")
    devices, processes = int(row["devices"]), int(row["processes"])
    assert config.run["batch_size"] % devices == 0, "batch_size must be a multiple of the devices"
    assert (processes > 1) == config.distributed["initialize"]
    ids = config.distributed["local_device_ids"]
    assert all(isinstance(i, int) and 0 <= i < devices // processes for i in ids)


def test_every_config_is_referenced_in_the_readme():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in CONFIGS if p.name not in text]
    assert not missing, f"README.md does not mention {missing}"
    assert set(_readme_table()) == {p.name for p in CONFIGS}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
