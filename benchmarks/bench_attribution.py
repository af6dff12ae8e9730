"""Benchmark: token attribution for one prompt at Stable Diffusion v1.5 shapes (time and memory).

``mmh_jax.memorization.token_attributions`` takes one UNet backward (of the conditional branch,
batch 1) per point inside a ``lax.scan``; the public code's setting is 4 images x 50 DDIM steps
(200 points) for the CFG metrics and 1 image x steps 10-49 (40 points) for FLIPD. On CPU a
whole prompt takes hours, so this script times a scan over ``--points`` points (compiled ahead of
time) and reports the time per point, the implied time for the public code's settings,
and the memory XLA plans for the compiled program (``Compiled.memory_analysis()``: the
parameters and inputs, and the temporaries, whose peak bounds what one prompt needs beyond the
weights), and the process's peak resident memory.

The UNet is ``UNet2DCondition(**SD15_UNET_CONFIG)`` (859.5M parameters) with random weights
(N(0, 0.02^2) biases and kernels; the values do not change the cost); latents 4 x 64 x 64, context
77 x 768, float32.

Example: python -m benchmarks.bench_attribution --points 2 --metrics cfg flipd
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from benchmarks._common import cpu_model


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--points", type=int, default=2, help="points per timed scan")
    p.add_argument(
        "--metrics", nargs="+", default=["cfg", "flipd"], choices=["cfg", "cfg_score", "flipd"]
    )
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--memory-only", action="store_true", help="compile and report memory only")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.tree_util import Partial

    from mmh_jax.convert.unet2d_condition import unet2d_condition_abstract_params
    from mmh_jax.memorization.prompt import MetricPoints, _Inputs, _token_attributions
    from mmh_jax.models import SD15_UNET_CONFIG, EpsModel, UNet2DCondition
    from mmh_jax.schedules import DDPM

    print(
        f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
        f"backend={jax.default_backend()} device='{jax.devices()[0].device_kind}' "
        f"load={os.getloadavg()[0]:.2f}"
    )
    module = UNet2DCondition(**SD15_UNET_CONFIG)
    abstract = unet2d_condition_abstract_params(module)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
    )
    n_params = sum(int(np.prod(a.shape)) for a in leaves)
    schedule = DDPM.scaled_linear()
    eps_fn = Partial(EpsModel(module).eps, params, schedule)
    rng = np.random.default_rng(0)
    n = args.points
    points = MetricPoints(
        jnp.asarray(rng.standard_normal((n, 4, args.size, args.size)), jnp.float32),
        jnp.asarray(np.linspace(0.9, 0.1, n), jnp.float32),
    )
    cond = jnp.asarray(rng.standard_normal((1, 77, 768)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((1, 77, 768)), jnp.float32)
    point_keys = jax.random.split(jax.random.key(1), n)
    guidance = jnp.asarray(7.5, jnp.float32)
    print(
        f"model: UNet2DCondition, SD v1.5 config, {n_params:,} parameters; latents "
        f"{n} x 4 x {args.size} x {args.size} (one point per scan step), context 77 x 768, fp32"
    )
    gib = 2.0**30
    public_points = {"cfg": 200, "cfg_score": 200, "flipd": 40}
    for metric in args.metrics:
        start = time.perf_counter()
        inputs = _Inputs(eps_fn, points, uncond, point_keys, guidance, schedule)
        compiled = _token_attributions.lower(cond, inputs, metric=metric, num_probes=1).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        print(
            f"[{metric}] compile {compile_s:.1f} s; XLA memory plan: arguments "
            f"{mem.argument_size_in_bytes / gib:.2f} GiB, temporaries "
            f"{mem.temp_size_in_bytes / gib:.2f} GiB, output "
            f"{mem.output_size_in_bytes / gib:.4f} GiB"
        )
        if args.memory_only:
            continue
        start = time.perf_counter()
        jax.block_until_ready(compiled(cond, inputs))
        per_point = (time.perf_counter() - start) / n
        total = per_point * public_points[metric]
        print(
            f"[{metric}] {per_point:.1f} s per point; the public code's "
            f"{public_points[metric]} points: {total / 60:.0f} min (implied)"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of the process: {peak:.1f} GiB (weights included)")


if __name__ == "__main__":
    main()
