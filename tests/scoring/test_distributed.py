"""Runs in fresh subprocesses: two processes joined by jax.distributed on 127.0.0.1, and runs
killed with SIGKILL at chosen and random moments, then resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import toy_model

from mmh_jax.scoring import ArrayFile, Flipd, NormalBundle, merge, score

HERE = Path(__file__).parent


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env.update(
        XLA_FLAGS=flags.strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """\
[model]
kind = "factory"
factory = "toy_model:make"
[input]
path = "x.npy"
[output]
dir = "{out}"
chunk_size = 6
[run]
batch_size = 8
seed = 11
[columns.flipd]
t0 = [0.02, 0.2]
[columns.normal_bundle]
t0 = 0.02
num_scores = 16
"""


@pytest.mark.slow
def test_two_processes_score_one_input_together(tmp_path):
    x = toy_model.points(40, seed=2)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "two.toml").write_text(CONFIG.format(out="two"))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmh_jax.cli",
                "score",
                "--config",
                str(tmp_path / "two.toml"),
                "--quiet",
                "--process-id",
                str(i),
                "--num-processes",
                "2",
                "--coordinator-address",
                f"127.0.0.1:{port}",
            ],
            env=_env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output
    assert "4 / 2" in outputs[0]  # devices / processes in the summary

    two = merge(tmp_path / "two").scores.to_pandas()
    # Each process wrote its own chunks (c mod 2), and process 0 merged them.
    assert (tmp_path / "two" / "scores.parquet").is_file()
    writers = {
        json.loads(p.read_text())["process"] for p in (tmp_path / "two" / "manifest").iterdir()
    }
    assert writers == {0, 1}

    # One process with 8 devices, same seed: the same table.
    one = tmp_path / "one"
    columns = [Flipd(t0=(0.02, 0.2)), NormalBundle(t0=0.02, num_scores=16)]
    score(
        toy_model.make(),
        columns,
        ArrayFile(tmp_path / "x.npy"),
        str(one),
        seed=11,
        batch_size=8,
        chunk_size=6,
    )
    single = merge(one).scores.to_pandas()
    np.testing.assert_array_equal(two["index"], np.arange(40))
    np.testing.assert_array_equal(two["id"], single["id"])
    np.testing.assert_array_equal(two["normal_bundle_0.02"], single["normal_bundle_0.02"])
    for t0 in (0.02, 0.2):
        np.testing.assert_allclose(two[f"flipd_{t0:g}"], single[f"flipd_{t0:g}"], rtol=1e-5)
        np.testing.assert_allclose(
            two[f"flipd_{t0:g}"], toy_model.flipd_closed_form(x, t0), rtol=1e-4, atol=1e-4
        )


RUNNER = """\
import os, signal, sys
kill_on, at = sys.argv[1], int(sys.argv[2])
if kill_on != "none":  # SIGKILL this process on the at-th call of os.replace / os.fsync
    real = getattr(os, kill_on)
    calls = [0]
    def wrapped(*args):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    setattr(os, kill_on, wrapped)
import toy_model
from mmh_jax.scoring import ArrayFile, Flipd, score
print("ready", flush=True)
score(toy_model.make(), [Flipd(t0=0.05)], ArrayFile("x.npy"), "out", seed=4, batch_size=8,
      chunk_size=4)
"""


def _check_consistent(out: Path) -> None:
    """Every chunk with a manifest has its part whole (merge verifies the checksum)."""
    if (out / "run.json").exists():
        merge(out, allow_partial=True)


@pytest.mark.slow
def test_killed_runs_resume_to_exactly_one_row_per_item(tmp_path):
    x = toy_model.points(36, seed=3)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "runner.py").write_text(RUNNER)
    run = [sys.executable, str(tmp_path / "runner.py")]
    # os.replace calls: run.json, then per chunk its part and its manifest; os.fsync: two per
    # file (the file, then its folder). Kill during the first part's commit, after a part but
    # before its manifest, and in the middle of a later chunk's writes.
    for kill_on, at in (("replace", 2), ("replace", 5), ("fsync", 9)):
        proc = subprocess.run(
            run + [kill_on, str(at)],
            cwd=tmp_path,
            env=_env(devices=8),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        _check_consistent(tmp_path / "out")
    rng = random.Random(0)
    for _ in range(2):  # and at random moments of the scoring itself
        proc = subprocess.Popen(
            run + ["none", "0"],
            cwd=tmp_path,
            env=_env(devices=8),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _check_consistent(tmp_path / "out")
    final = subprocess.run(
        run + ["none", "0"],
        cwd=tmp_path,
        env=_env(devices=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr

    merged = merge(tmp_path / "out")
    table = merged.scores.to_pandas()
    assert len(table) == 36 and merged.errors.num_rows == 0
    np.testing.assert_array_equal(table["index"], np.arange(36))
    assert table["id"].is_unique
    np.testing.assert_allclose(
        table["flipd_0.05"], toy_model.flipd_closed_form(x, 0.05), rtol=1e-4, atol=1e-4
    )
    assert not [p for p in (tmp_path / "out").rglob(".*.part")]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[columns.flipd]\nt0 = [0.05]\nnum_probe = 2\n",
            "unknown key",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[run]\nbatch_size = '8'\n[columns.flipd]\n",
            "batch_size must be an integer",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'nope.npy'\n"
            "[output]\ndir = 'o'\n[columns.flipd]\n",
            "does not exist",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[columns.flipd]\nt0 = [0.05, 2.0]\n",
            "t0",
        ),
        (
            "[model]\nkind = 'unet2d'\n[input]\npath = 'x.npy'\n[output]\ndir = 'o'\n[columns.flipd]\n",
            "needs a path",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[columns.lpips]\n",
            "unknown column",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[inputs]\npath = 'x.npy'\n",
            "unknown section",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "options = {colour = 'RGB'}\n[output]\ndir = 'o'\n[columns.flipd]\n",
            "options: unknown key",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "options = {metadata = ['label']}\n[output]\ndir = 'o'\n[columns.flipd]\n",
            "options: unknown key.*metadata",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[generate]\nguidance = nan\n[columns.flipd]\n",
            r"bad\.toml: \[generate\] guidance must be a finite number, got nan",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[columns.flipd]\nt0 = [0.05, -inf]\n",
            r"bad\.toml: \[columns\.flipd\] t0 must be a finite number, got -inf",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\noptions = {scale = {a = inf}}\n"
            "[input]\npath = 'x.npy'\n[output]\ndir = 'o'\n[columns.flipd]\n",
            r"bad\.toml: \[model\] options\.scale\.a must be a finite number, got inf",
        ),
        (
            "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n[input]\npath = 'x.npy'\n"
            "[output]\ndir = 'o'\n[columns.flipd]\nnum_probes = 0\n",
            r"bad\.toml: \[columns\]: flipd num_probes must be an integer >= 1, got 0",
        ),
    ],
    ids=[
        "unknown key",
        "wrong type",
        "missing input",
        "t0 out of range",
        "model without path",
        "unknown column",
        "unknown section",
        "unknown reader option",
        "metadata as an option",
        "nan",
        "inf in a list",
        "inf in a table",
        "no probes",
    ],
)
def test_a_bad_config_fails_before_any_work(tmp_path, body, message):
    from mmh_jax.cli import main

    np.save(tmp_path / "x.npy", toy_model.points(4))
    (tmp_path / "bad.toml").write_text(body)
    assert main(["score", "--config", str(tmp_path / "bad.toml")]) == 2
    assert not (tmp_path / "o").exists()
    from mmh_jax.scoring.config import ConfigError, read_config

    with pytest.raises(ConfigError, match=message):
        read_config(tmp_path / "bad.toml")


def test_template_lists_every_key_and_dry_run_writes_nothing(tmp_path, capsys):
    import tomllib

    from mmh_jax.cli import main
    from mmh_jax.scoring.config import COLUMNS, SECTIONS, template

    text = template()
    assert tomllib.loads(text) == {
        "model": {"kind": "unet2d"},
        "input": {"path": "samples/"},
        "output": {"dir": "scores/"},
        "run": {},
        "generate": {},
        "distributed": {},
    }
    for keys in SECTIONS.values():
        for key in keys:
            assert f"{key} = " in text
    for name in COLUMNS:
        assert f"[columns.{name}]" in text
    np.save(tmp_path / "x.npy", toy_model.points(16))
    (tmp_path / "run.toml").write_text(CONFIG.format(out="dry"))
    assert main(["score", "--config", str(tmp_path / "run.toml"), "--dry-run", "--quiet"]) == 0
    shown = capsys.readouterr().err
    assert "dry run: the plan" in shown and "estimated time" in shown
    assert not (tmp_path / "dry").exists()
    # --template with --config: refused, not silently ignored; neither: refused
    for argv in (["score", "--template", "--config", str(tmp_path / "run.toml")], ["score"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "reads no --config" in err and "score needs --config" in err


DEVICES_RUNNER = """\
import sys

import jax
import numpy as np
from jax.tree_util import Partial

import toy_model
from mmh_jax.scoring import (ArrayFile, Flipd, JacobianRank, Model, NearestNeighbour,
                             NormalBundle, PngSize, score)

out = sys.argv[1]
# dimension 192: where normal_bundle's batched eigh hung on 4 devices (LAPACK's batch tasks
# waiting on the thread pool that runs the devices)
shape = (3, 8, 8)
model = toy_model.make(shape, rank=10, images=True)
columns = [Flipd(t0=0.05), NormalBundle(t0=0.05, num_scores=64),
           NearestNeighbour(reference=np.load("reference.npy")), PngSize()]
score(model, columns, ArrayFile("x.npy"), out + "/diffusion", batch_size=8, chunk_size=16)
weight = np.load("weight.npy")
generator = Model.from_generator(Partial(lambda w, z: jax.numpy.tanh(z @ w.T), weight), (48,))
score(generator, [JacobianRank(threshold=1e-4)], ArrayFile("z.npy"), out + "/generator",
      batch_size=8, chunk_size=16)
print(len(jax.devices()), "devices")
"""


@pytest.mark.slow
def test_every_column_gives_the_values_of_one_device_on_four(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(32, 8, 8, 3), dtype=np.uint8)  # [n, h, w, c]
    np.save(tmp_path / "x.npy", images)
    chw = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.save(tmp_path / "reference.npy", chw[::4])  # 8 of the items: their nearest is themselves
    weight = rng.normal(size=(192, 5)) @ rng.normal(size=(5, 48))  # a rank-5 linear generator
    np.save(tmp_path / "weight.npy", weight.astype(np.float32))
    np.save(tmp_path / "z.npy", rng.normal(size=(32, 48)).astype(np.float32))
    (tmp_path / "runner.py").write_text(DEVICES_RUNNER)
    tables = {}
    for devices in (1, 4):
        try:  # a deadlock fails the test instead of blocking the suite
            proc = subprocess.run(
                [sys.executable, "runner.py", f"out{devices}"],
                cwd=tmp_path,
                env=_env(devices=devices),
                capture_output=True,
                text=True,
                timeout=240,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"scoring on {devices} CPU devices did not finish in 240 s")
        assert proc.returncode == 0 and f"{devices} devices" in proc.stdout, proc.stderr
        tables[devices] = {
            kind: merge(tmp_path / f"out{devices}" / kind).scores.to_pandas()
            for kind in ("diffusion", "generator")
        }
    for kind in ("diffusion", "generator"):
        one, four = tables[1][kind], tables[4][kind]
        assert list(one.columns) == list(four.columns) and len(one) == 32
        for name in one.columns:
            if one[name].dtype.kind == "f":
                np.testing.assert_allclose(
                    four[name], one[name], rtol=1e-4, atol=1e-4, err_msg=name
                )
            else:
                np.testing.assert_array_equal(four[name], one[name], err_msg=name)
    assert set(tables[1]["generator"]["jacobian_rank"]) == {5}
    np.testing.assert_array_equal(tables[1]["diffusion"]["nn_l2"].to_numpy()[::4], 0)
    assert {"flipd_0.05", "normal_bundle_0.05", "png_bytes"} <= set(tables[1]["diffusion"].columns)
