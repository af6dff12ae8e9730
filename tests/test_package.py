"""The wheel is a working package on its own: built from a copy of the project, installed into a
bare folder and run from outside the source tree, it has every module, its package data (the
rephraser's synonym table, ``py.typed``) and a working ``mmh-jax`` command."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmh_jax.memorization.rephrase import SynonymRephraser

ROOT = Path(__file__).resolve().parents[1]

# Run by the installed package: every module imports, and the synonym table is read from the
# installed files (mmh_jax.memorization.rephrase reads it with importlib.resources).
_CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys
    from importlib import resources
    from pathlib import Path

    import mmh_jax
    assert Path(mmh_jax.__file__).parent == Path(sys.argv[1]) / "mmh_jax", mmh_jax.__file__
    names = [m.name for m in pkgutil.walk_packages(mmh_jax.__path__, "mmh_jax.")]
    for name in names:
        importlib.import_module(name)
    assert resources.files("mmh_jax").joinpath("py.typed").is_file(), "py.typed missing"
    from mmh_jax.memorization.rephrase import SynonymRephraser, load_synonyms
    assert load_synonyms()["dog"], "synonym table empty"
    print(len(names), "modules;", SynonymRephraser()("A painting of a dog", ["painting", "dog"]))
""")


def _run(args, *, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_tree(tmp_path):
    # build from a copy, so the work tree gets no build/ or egg-info of this run
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "mmh_jax", src / "mmh_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("mmh_jax-*.whl")

    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
    )

    # the dependencies come from this environment; mmh_jax only from the wheel's files
    env["PYTHONPATH"] = str(target)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    help_text = _run([sys.executable, "-m", "mmh_jax.cli", "demo", "--help"], cwd=outside, env=env)
    assert "digits" in help_text
    script = target / "bin" / "mmh-jax"
    assert script.is_file()
    assert "demo" in _run([sys.executable, str(script), "--help"], cwd=outside, env=env)

    report = _run([sys.executable, "-c", _CHECK, str(target)], cwd=outside, env=env)
    n_modules, rephrased = report.strip().split(" modules; ")
    in_tree = [p for p in (ROOT / "mmh_jax").rglob("*.py") if p.name != "__init__.py"]
    in_tree += [p for p in (ROOT / "mmh_jax").rglob("*/__init__.py")]  # subpackages
    assert int(n_modules) == len(in_tree)
    # as the source tree's table gives it ("An artwork of a puppy")
    assert rephrased == SynonymRephraser()("A painting of a dog", ["painting", "dog"])
