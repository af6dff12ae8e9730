"""Cost of the scoring engine over the bare jitted estimator, on the same work and mesh.

Both sides compute FLIPD (t0 = 0.05, one Rademacher probe, per-item keys) of the same items with
the same score network on the same 1-D ``data`` mesh (8 simulated CPU devices by default; every
device of a GPU/TPU host where there is one):

* engine: ``mmh_jax.scoring.score`` over a folder of PNG images (decoded by the Grain pipeline's
  threads, checked, converted), writing Parquet parts, manifests and all (a fresh folder per
  round; the compiled step is reused);
* bare: the jitted, ``shard_map``-ped ``flipd`` over the same images already decoded and on the
  devices, batch after batch, waiting for each result.

Rounds alternate the two (``_common.interleaved``); reported: the engine / bare wall-time ratio
per round (target <= 1.10), the ratio of the CPU time the process spent (all threads; steadier
than wall time on a shared machine) and the engine's own measures (items/s after compilation, the
fraction of time the device had no step to run).

The score network is the CIFAR-shaped stand-in of ``bench_flipd.py`` (3 x 32 x 32; 4 residual
blocks x 64 channels) unless ``--unet`` asks for diffusers' DDPM CIFAR-10 UNet (35.7M parameters,
random weights, converted: needs torch and diffusers).

Usage: python benchmarks/bench_scoring.py [--items 1024] [--batch 64] [--repeats 3] [--devices 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
    p.add_argument("--threads", type=int, default=4, help="decoding threads")
    p.add_argument("--unet", action="store_true", help="diffusers' DDPM CIFAR-10 UNet")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import functools
    import shutil
    import statistics
    from pathlib import Path

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.tree_util import Partial
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import cpu_model, interleaved, ratio_summary
    from bench_flipd import init_net

    from mmh_jax.lid import flipd
    from mmh_jax.schedules import DDPM
    from mmh_jax.scoring import Flipd, ImageFolder, Model, data_mesh, score
    from mmh_jax.scoring.columns import column_keys

    if args.unet:
        model = _ddpm_unet()
    else:
        schedule = DDPM.linear()
        params = init_net(jax.random.key(0), 3, 64, 4)
        model = Model.from_score_fn(Partial(_stand_in_score, params, schedule), schedule, (3, 32, 32),
                                    description="stand-in eps-net")
    mesh = data_mesh()
    print(f"machine: {cpu_model()}; {jax.device_count()} {jax.devices()[0].platform} devices; "
          f"jax {jax.__version__}; {args.items} items, global batch {args.batch}, {args.threads} "
          f"decoding threads; model: {model.description}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.items, 32, 32, 3), dtype=np.uint8)
    (tmp / "images").mkdir()
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp / "images" / f"{i:06d}.png")
    source = ImageFolder(tmp / "images")
    column = Flipd(t0=0.05)
    summaries = []

    def engine():
        out = tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        summaries.append(score(model, [column], source, str(out), batch_size=args.batch,
                               chunk_size=512, threads=args.threads, mesh=mesh))
        return summaries[-1]

    sharding = NamedSharding(mesh, P("data"))
    x_all = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                       out_specs=P("data"))
    def bare_step(score_fn, x, index):
        base = jax.random.key(0)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, 0), i))(index)
        return flipd(score_fn, x, t0=0.05, schedule=model.schedule, key=column_keys(keys, column))

    batches = [(jax.device_put(x_all[s:s + args.batch], sharding),
                jax.device_put(np.arange(s, s + args.batch, dtype=np.uint32), sharding))
               for s in range(0, args.items - args.batch + 1, args.batch)]
    score_fn = jax.device_put(model.score_fn, NamedSharding(mesh, P()))

    def bare():
        for x, index in batches:
            np.asarray(bare_step(score_fn, x, index))

    cpu: dict[str, list[float]] = {"engine": [], "bare": []}

    def with_cpu_time(name, fn):  # the process's CPU time (all threads): robust to other load
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    times = interleaved({name: with_cpu_time(name, fn)
                         for name, fn in (("engine", engine), ("bare", bare))}, args.repeats)
    cpu = {name: values[1:] for name, values in cpu.items()}  # drop the warm-up calls
    measured = summaries[1:]  # the first was the warm-up (compilation)
    print(f"engine / bare wall time, per round: {ratio_summary(times['engine'], times['bare'])} "
          f"(target <= 1.10)")
    print(f"engine / bare CPU time (all threads), per round: "
          f"{ratio_summary(cpu['engine'], cpu['bare'])}")
    print(f"engine: {statistics.median(times['engine']):.2f} s, bare: "
          f"{statistics.median(times['bare']):.2f} s per {len(batches) * args.batch} items")
    print(f"engine items/s after its first step: "
          f"{statistics.median(s.items_per_second for s in measured):.1f}; device idle "
          f"{', '.join(f'{100 * s.device_idle:.1f}%' for s in measured)}")
    shutil.rmtree(tmp)


def _stand_in_score(params, schedule, x, t):
    from bench_flipd import eps_net

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
    params = convert_unet2d({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                            module)
    schedule = DDPM.linear()
    pretrained = Pretrained(module, params, schedule, eps_score_fn(module, params, schedule))
    return Model.from_pretrained(pretrained, description="DDPM CIFAR-10 UNet (random weights)")


if __name__ == "__main__":
    main()
