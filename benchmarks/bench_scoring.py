"""Cost of the scoring engine over the bare jitted estimator, on the same work and mesh.

Run it through the runner: ``python -m benchmarks run scoring [--set scoring.items=1024]``
(in a process of its own: it asks XLA for ``devices`` simulated CPU devices before JAX starts).

Both sides compute FLIPD (t0 = 0.05, one Rademacher probe, per-item keys) of the same items with
the same score network on the same 1-D ``data`` mesh (8 simulated CPU devices by default; every
device of a GPU/TPU host where there is one):

* ``engine``: ``mmh_jax.scoring.score`` over a folder of PNG images (decoded by the Grain
  pipeline's threads, checked, converted), writing Parquet parts, manifests and all (a fresh
  folder per round; the compiled step is reused);
* ``bare``: the jitted, ``shard_map``-ped ``flipd`` over the same images already decoded and on
  the devices, batch after batch, waiting for each result.

Rounds alternate the two (``_common.interleaved``). Ratios of record: ``engine / bare`` wall
time per round (target <= 1.10) and the same for the CPU time the process spent (all threads;
steadier than wall time on a shared machine: derived series ``engine_cpu``, ``bare_cpu``).
Notes: the engine's own measures (items/s after compilation, the fraction of time the device
had no step to run).

The score network is the CIFAR-shaped stand-in of ``bench_flipd.py`` (3 x 32 x 32; 4 residual
blocks x 64 channels) unless ``unet`` asks for diffusers' DDPM CIFAR-10 UNet (35.7M parameters,
random weights, converted: needs torch and diffusers).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the scoring benchmark (defaults: RESULTS.md's record)."""

    items: int = 1024
    batch: int = 64
    devices: int = 8
    threads: int = 4
    channels: int = 64
    blocks: int = 4
    unet: bool = False


TINY = Config(items=32, batch=16, devices=2, threads=2, channels=8, blocks=1)


def request_devices(config: Config) -> None:
    """Ask XLA for ``config.devices`` simulated CPU devices (before JAX is first imported)."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={config.devices}")


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure the engine against the bare jitted FLIPD (see the module docstring); one case."""
    import functools
    import shutil
    import tempfile
    from pathlib import Path

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from jax.tree_util import Partial
    from PIL import Image

    from benchmarks.bench_flipd import init_net
    from mmh_jax.lid import flipd
    from mmh_jax.schedules import DDPM
    from mmh_jax.scoring import Flipd, ImageFolder, Model, data_mesh, score
    from mmh_jax.scoring.columns import column_keys

    c = config
    if c.unet:
        model = _ddpm_unet()
    else:
        schedule = DDPM.linear()
        params = init_net(jax.random.key(0), 3, c.channels, c.blocks)
        model = Model.from_score_fn(
            Partial(_stand_in_score, params, schedule),
            schedule,
            (3, 32, 32),
            description="stand-in eps-net",
        )
    mesh = data_mesh()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    try:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (c.items, 32, 32, 3), dtype=np.uint8)
        (tmp / "images").mkdir()
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(tmp / "images" / f"{i:06d}.png")
        source = ImageFolder(tmp / "images")
        column = Flipd(t0=0.05)
        summaries = []

        def engine():
            out = tmp / "out"
            shutil.rmtree(out, ignore_errors=True)
            summaries.append(
                score(
                    model,
                    [column],
                    source,
                    str(out),
                    batch_size=c.batch,
                    chunk_size=512,
                    threads=c.threads,
                    mesh=mesh,
                )
            )

        sharding = NamedSharding(mesh, P("data"))
        x_all = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0

        @jax.jit
        @functools.partial(
            jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data")
        )
        def bare_step(score_fn, x, index):
            base = jax.random.key(0)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, 0), i))(index)
            return flipd(
                score_fn, x, t0=0.05, schedule=model.schedule, key=column_keys(keys, column)
            )

        batches = [
            (
                jax.device_put(x_all[s : s + c.batch], sharding),
                jax.device_put(np.arange(s, s + c.batch, dtype=np.uint32), sharding),
            )
            for s in range(0, c.items - c.batch + 1, c.batch)
        ]
        score_fn = jax.device_put(model.score_fn, NamedSharding(mesh, P()))

        def bare():
            for x, index in batches:
                np.asarray(bare_step(score_fn, x, index))

        cpu: dict[str, list[float]] = {"engine": [], "bare": []}

        def with_cpu_time(name, fn):  # the process's CPU time (all threads): robust to other load
            def timed_fn():
                start = time.process_time()
                fn()
                cpu[name].append(time.process_time() - start)

            return timed_fn

        timings = interleaved(
            {name: with_cpu_time(name, fn) for name, fn in (("engine", engine), ("bare", bare))},
            repeats,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    measured = summaries[1:]  # the first was the warm-up (compilation)
    notes = {
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "model": model.description,
        "items_per_round": len(batches) * c.batch,
        "engine_items_per_s": statistics.median(s.items_per_second for s in measured),
        "device_idle": [s.device_idle for s in measured],
    }
    return [
        case_record(
            f"{c.items} items, global batch {c.batch}, {jax.device_count()} "
            f"{jax.devices()[0].platform} devices",
            timings,
            ratios={
                "engine / bare, wall": ("engine", "bare"),
                "engine / bare, CPU time": ("engine_cpu", "bare_cpu"),
            },
            derived={"engine_cpu": cpu["engine"][1:], "bare_cpu": cpu["bare"][1:]},
            notes=notes,
        )
    ]


def _stand_in_score(params, schedule, x, t):
    from benchmarks.bench_flipd import eps_net
    from mmh_jax.schedules import score_from_eps

    return score_from_eps(lambda y, s: eps_net(params, y, s), schedule=schedule)(x, t)


def _ddpm_unet():
    import torch
    from diffusers import UNet2DModel

    from mmh_jax.convert import convert_unet2d
    from mmh_jax.models import DDPM_CIFAR10_CONFIG, UNet2D
    from mmh_jax.models.pretrained import Pretrained, eps_score_fn
    from mmh_jax.schedules import DDPM
    from mmh_jax.scoring import Model

    torch.manual_seed(0)
    torch_model = UNet2DModel(**DDPM_CIFAR10_CONFIG).eval()
    module = UNet2D.from_config(torch_model.config)
    params = convert_unet2d(
        {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, module
    )
    schedule = DDPM.linear()
    pretrained = Pretrained(module, params, schedule, eps_score_fn(module, params, schedule))
    return Model.from_pretrained(pretrained, description="DDPM CIFAR-10 UNet (random weights)")
