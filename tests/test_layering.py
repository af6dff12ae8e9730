"""The package's dependencies point one way: every import of every module (at the top, inside
functions, under ``TYPE_CHECKING``) is read from the source and checked against the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmh_jax

ROOT = Path(mmh_jax.__file__).parent

#: package -> the mmh_jax packages it must never import (directly or lazily).
FORBIDDEN = {
    "convert": (
        "models",
        "lid",
        "memorization",
        "retrieval",
        "evaluation",
        "scoring",
        "experiments",
        "cli",
    ),
    "lid": (
        "models",
        "convert",
        "memorization",
        "retrieval",
        "evaluation",
        "scoring",
        "experiments",
        "cli",
    ),
    "models": ("lid", "memorization", "retrieval", "evaluation", "scoring", "experiments", "cli"),
    "memorization": ("scoring", "experiments", "cli"),
    "retrieval": ("memorization", "evaluation", "scoring", "experiments", "cli"),
    "evaluation": ("scoring", "experiments", "cli"),
    "scoring": ("experiments", "cli"),
    "worlds": ("lid", "memorization", "scoring", "experiments", "cli"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``mmh_jax.*`` module named by an import statement in the file, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("mmh_jax.")]


def _layer_violations(root: Path, package: str, forbidden: tuple[str, ...]) -> dict[str, str]:
    """``{"file:line": module}`` of every import of a forbidden package."""
    bad = {}
    for path in sorted((root / package).rglob("*.py")):
        for line, name in _imports(path):
            if name.split(".")[1] in forbidden:
                bad.setdefault(f"{path.relative_to(root.parent)}:{line}", name)
    return bad


def _private_imports(root: Path) -> dict[str, str]:
    """``{"file:line": module.name}`` of every import of a private module or name
    (``_x``) that belongs to another package; ``mmh_jax._src`` is the shared internals'
    home and the one exception."""
    bad = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        own = parts[0] if len(parts) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("mmh_jax.")
            ):
                continue
            modules = node.module.split(".")[1:]
            if modules[0] in ("_src", own):
                continue
            names = [alias.name for alias in node.names]
            if any(m.startswith("_") for m in modules) or any(n.startswith("_") for n in names):
                bad[f"{path.relative_to(root.parent)}:{node.lineno}"] = node.module
    return bad


def test_no_module_imports_another_packages_private_names():
    assert _private_imports(ROOT) == {}


def test_the_private_check_sees_a_private_name_and_a_private_module(tmp_path):
    fake = tmp_path / "mmh_jax"
    (fake / "scoring").mkdir(parents=True)
    (fake / "scoring" / "bad.py").write_text(
        "from mmh_jax.lid.flipd import _flipd\n"
        "from mmh_jax.lid._knn import knn\n"
        "from mmh_jax._src.knn import knn\n"
        "from mmh_jax.scoring._own import thing\n"
    )
    assert sorted(_private_imports(fake)) == [
        "mmh_jax/scoring/bad.py:1",
        "mmh_jax/scoring/bad.py:2",
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    if not (ROOT / package).is_dir():
        pytest.fail(f"mmh_jax/{package} is gone: update FORBIDDEN")
    assert _layer_violations(ROOT, package, FORBIDDEN[package]) == {}


def test_the_check_sees_lazy_and_type_checking_imports(tmp_path):
    """A function-local import and one under TYPE_CHECKING both count."""
    fake = tmp_path / "mmh_jax"
    (fake / "convert").mkdir(parents=True)
    (fake / "convert" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mmh_jax.models.unet2d import UNet2D\n"
        "def f():\n    import mmh_jax.models.iddpm\n"
        "from mmh_jax import models\n"
    )
    found = _layer_violations(fake, "convert", ("models",))
    assert sorted(found) == [f"mmh_jax/convert/bad.py:{line}" for line in (3, 5, 6)]


@pytest.mark.parametrize("module", ["mmh_jax", "mmh_jax.lid"])
def test_importing_the_estimators_loads_no_model_plotting_or_data_code(module):
    """``import mmh_jax.lid`` stays lean: no Flax model code, matplotlib, Grain, OpenCV or
    scikit-learn (checked in a fresh interpreter, where nothing else loaded them first)."""
    import subprocess
    import sys

    heavy = ("flax", "matplotlib", "grain", "cv2", "sklearn", "torch", "mmh_jax.models")
    code = (
        f"import sys, {module}; "
        f"print(sorted({{m for m in sys.modules if m.startswith({heavy!r})}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
