"""Benchmark: the guarded sampler (``mmh_jax.memorization.guard.guarded_ddim_sample``) against
plain DDIM with classifier-free guidance (``mmh_jax.sampling.ddim_sample``): DDIM-50, guidance
7.5, batch 1, 4 x 64 x 64 latents, 77 x 768 random text embeddings, fp32.

Targets (issue 14): the CFG-norm signal costs at most 2% over plain sampling (it reads the two
noise predictions every step makes anyway); FLIPD at the last 5 of 50 steps at most 1.25x (those
steps run one ``jax.jvp`` of the guided noise instead of one forward pass).

(a) End to end, on a reduced-width UNet of Stable Diffusion's layout: ``SD15_UNET_CONFIG`` with
    ``block_out_channels = (w, 2w, 4w, 4w)`` (``--width``; SD v1.5 is w = 320), random weights
    from Flax's ``init`` (seeded). Plain, cfg_norm and flipd run once per round, rounds
    interleaved (``benchmarks._common.interleaved``), ratios round by round: median (min-max). The same
    network's single CFG step (one UNet call on the batch of 2) and its ``jvp`` step are timed
    too, and the 50-step ratio they imply, ``((n - k) F + k J) / (n F)``, is printed beside the
    measured one.
(b) ``--full``: the per-step costs at the full SD v1.5 shapes (859.5M parameters, Flax ``init``):
    one CFG forward step, the same step with the CFG norm, and the ``jvp`` step, interleaved;
    the implied 50-step ratios (labelled implied: no 50-step run at full size). Needs about
    10 GB of free memory; skipped with a message otherwise.

Example (from the repository root):
    python -m benchmarks.bench_guarded --width 64 --repeats 3 --full --full-repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks._common import cpu_model, interleaved, ratio_summary


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s ({', '.join(f'{v:.3f}' for v in values)})"


def _unet(config: dict, size: int, seed: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.tree_util import Partial

    from mmh_jax.models import EpsModel, UNet2DCondition
    from mmh_jax.schedules import DDPM

    module = UNet2DCondition.from_config(config)
    x = jnp.zeros((1, 4, size, size))
    context = jnp.zeros((1, 77, config["cross_attention_dim"]))
    start = time.perf_counter()
    # Random weights without compiling Flax's init (minutes for this graph on a loaded 2-core
    # CPU): the shapes from eval_shape, kernels N(0, 1 / fan_in), norm scales 1, biases 0.
    shapes = jax.eval_shape(module.init, jax.random.key(seed), x, jnp.zeros((1,)), context)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias" or leaf.ndim < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray((rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32))

    params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    n = sum(p.size for p in jax.tree.leaves(params))
    schedule = DDPM.scaled_linear()
    print(f"  built {n:,} parameters in {time.perf_counter() - start:.1f} s", flush=True)
    return Partial(EpsModel(module).eps, params, schedule), schedule, n


def _step_fns(eps_fn, schedule, cond, uncond, z, guidance, timestep=20):
    """One CFG step (forward), the same with the CFG norm, and the jvp step (FLIPD), jitted."""
    import jax
    import jax.numpy as jnp

    from mmh_jax.guidance import eps_pair

    t = jnp.full((1,), (timestep + 1) / schedule.num_timesteps)
    v = jax.random.rademacher(jax.random.key(5), z.shape, z.dtype)

    @jax.jit
    def forward(f, z):
        eps_u, eps_c = eps_pair(f, z, t, cond, uncond)
        return eps_u + guidance * (eps_c - eps_u)

    @jax.jit
    def forward_norm(f, z):
        eps_u, eps_c = eps_pair(f, z, t, cond, uncond)
        return eps_u + guidance * (eps_c - eps_u), jnp.linalg.norm(eps_c - eps_u)

    @jax.jit
    def jvp(f, z):
        (eps_u, eps_c), (ju, jc) = jax.jvp(lambda y: eps_pair(f, y, t, cond, uncond), (z,), (v,))
        eps = eps_u + guidance * (eps_c - eps_u)
        jv = ju + guidance * (jc - ju)
        return eps, jnp.sum(v * jv)

    return {
        "step_forward": lambda: forward(eps_fn, z),
        "step_forward_norm": lambda: forward_norm(eps_fn, z),
        "step_jvp": lambda: jvp(eps_fn, z),
    }


def _implied(times: dict[str, list[float]], n: int, k: int) -> str:
    f, j = statistics.median(times["step_forward"]), statistics.median(times["step_jvp"])
    g = statistics.median(times["step_forward_norm"])
    return (
        f"jvp step / forward step = {ratio_summary(times['step_jvp'], times['step_forward'])}"
        f"; (forward + norm) / forward = "
        f"{ratio_summary(times['step_forward_norm'], times['step_forward'])}; implied "
        f"{n}-step ratios: cfg_norm {g / f:.3f}x, flipd at the last {k}: "
        f"{((n - k) * f + k * j) / (n * f):.3f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=int, default=64, help="first level's channels (SD: 320)")
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--flipd-steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--step-repeats",
        type=int,
        default=5,
        help="rounds of the per-step timings on the reduced UNet",
    )
    p.add_argument("--full", action="store_true", help="(b): per-step costs at SD v1.5 shapes")
    p.add_argument("--full-repeats", type=int, default=2)
    p.add_argument("--skip-end-to-end", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmh_jax.memorization.guard import guarded_ddim_sample
    from mmh_jax.models import SD15_UNET_CONFIG
    from mmh_jax.sampling import DDIMGrid, ddim_sample

    print(
        f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
        f"backend={jax.default_backend()} device='{jax.devices()[0].device_kind}' "
        f"load={os.getloadavg()} mem_available={_mem_available_gb():.1f} GB",
        flush=True,
    )
    sync = jax.block_until_ready
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 4, args.size, args.size)).astype(np.float32))
    cond = jnp.asarray(rng.standard_normal((1, 77, 768)).astype(np.float32))
    uncond = jnp.asarray(rng.standard_normal((1, 77, 768)).astype(np.float32))
    n, k = args.steps, args.flipd_steps
    sampler = dict(guidance=args.guidance, num_steps=n, grid=DDIMGrid())  # SD v1.5's grid

    if not args.skip_end_to_end or args.step_repeats:
        w = args.width
        config = dict(SD15_UNET_CONFIG, block_out_channels=(w, 2 * w, 4 * w, 4 * w))
        print(
            f"(a) reduced-width SD-layout UNet: block_out_channels {config['block_out_channels']}"
            f", latents 1 x 4 x {args.size} x {args.size}, context 77 x 768, DDIM-{n}, "
            f"guidance {args.guidance}, fp32",
            flush=True,
        )
        eps_fn, schedule, _ = _unet(config, args.size, seed=0)
    if not args.skip_end_to_end:
        key = jax.random.key(1)
        outs = {}

        def keep(name, fn):  # the last output of each side, compared below
            def call():
                outs[name] = fn()
                return outs[name]

            return call

        fns = {
            "plain": keep(
                "plain",
                lambda: ddim_sample(eps_fn, z, cond, uncond, schedule=schedule, **sampler).sample,
            ),
            "cfg_norm": keep(
                "cfg_norm",
                lambda: (
                    guarded_ddim_sample(
                        eps_fn, z, cond, uncond, schedule=schedule, signal="cfg_norm", **sampler
                    ).sample
                ),
            ),
            "flipd": keep(
                "flipd",
                lambda: (
                    guarded_ddim_sample(
                        eps_fn,
                        z,
                        cond,
                        uncond,
                        schedule=schedule,
                        signal="flipd",
                        signal_steps=k,
                        key=key,
                        **sampler,
                    ).sample
                ),
            ),
        }
        timings = interleaved(fns, args.repeats, sync)
        times = timings.times
        print(
            "  compile + first run: "
            + ", ".join(f"{name} {s:.1f} s" for name, s in timings.warmup.items())
        )
        outs = {name: np.asarray(out) for name, out in outs.items()}
        scale = np.abs(outs["plain"]).max()
        print(
            f"  max |guarded - plain| / max |plain|: cfg_norm "
            f"{np.abs(outs['cfg_norm'] - outs['plain']).max() / scale:.1e}, flipd "
            f"{np.abs(outs['flipd'] - outs['plain']).max() / scale:.1e}",
            flush=True,
        )
        for name, values in times.items():
            print(f"  {name}: {_summary(values)}", flush=True)
        print(
            f"  cfg_norm / plain = {ratio_summary(times['cfg_norm'], times['plain'])} "
            f"(target <= 1.02x)",
            flush=True,
        )
        print(
            f"  flipd (last {k} of {n}) / plain = {ratio_summary(times['flipd'], times['plain'])}"
            f" (target <= 1.25x)",
            flush=True,
        )
        del fns, outs
    if args.step_repeats:
        steps = interleaved(
            _step_fns(eps_fn, schedule, cond, uncond, z, args.guidance), args.step_repeats, sync
        ).times
        for name, values in steps.items():
            print(f"  {name}: {_summary(values)}", flush=True)
        print(f"  same UNet, per step: {_implied(steps, n, k)}", flush=True)
        del eps_fn

    if args.full:
        free = _mem_available_gb()
        if not free >= 10:
            print(f"(b) skipped: {free:.1f} GB of memory available, about 10 GB needed")
            return
        print(
            f"(b) SD v1.5 UNet (SD15_UNET_CONFIG), latents 1 x 4 x {args.size} x {args.size}, "
            f"per-step costs, {args.full_repeats} interleaved rounds",
            flush=True,
        )
        eps_fn, schedule, _ = _unet(SD15_UNET_CONFIG, args.size, seed=0)
        fns = _step_fns(eps_fn, schedule, cond, uncond, z, args.guidance)
        start = time.perf_counter()
        for fn in fns.values():
            sync(fn())
        print(
            f"  compile + first run of the three: {time.perf_counter() - start:.1f} s", flush=True
        )
        times = interleaved(fns, args.full_repeats, sync).times
        for name, values in times.items():
            print(f"  {name}: {_summary(values)}", flush=True)
        print(f"  IMPLIED (per-step timings, no 50-step run): {_implied(times, n, k)}", flush=True)
    print(f"end load={os.getloadavg()}")


if __name__ == "__main__":
    main()
