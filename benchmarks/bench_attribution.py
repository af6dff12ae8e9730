"""Benchmark: token attribution for one prompt at Stable Diffusion v1.5 shapes (time and memory).

Run it through the runner: ``python -m benchmarks run attribution [--set attribution.points=2]``.

``mmh_jax.memorization.token_attributions`` takes one UNet backward (of the conditional branch,
batch 1) per point inside a ``lax.scan``; the public code's setting is 4 images x 50 DDIM steps
(200 points) for the CFG metrics and 1 image x steps 10-49 (40 points) for FLIPD. On CPU a whole
prompt takes hours, so this benchmark times a scan over ``points`` points per metric in
``metrics`` (compiled ahead of time; the compile time is noted), the metrics' scans interleaved
round by round after one warm-up call each. Derived per round: the time per point
(``METRIC_per_point``) and the implied time of the public code's points for one prompt
(``METRIC_prompt_implied``). Ratio: FLIPD / CFG per point (when both run). Notes: the memory XLA
plans for each compiled program (``Compiled.memory_analysis()``: parameters and inputs, and the
temporaries, whose peak bounds what one prompt needs beyond the weights) and the process's peak
resident memory.

The UNet is ``UNet2DCondition`` with SD v1.5's config (859.5M parameters at the default
``width`` 320, ``levels`` 4, ``layers_per_block`` 2, ``norm_groups`` 32; smaller values narrow
it) with random weights (N(0, 0.02^2) biases and kernels; the values do not change the cost);
latents 4 x ``size`` x ``size`` (64 for SD v1.5), context 77 x 768, float32.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any, Literal

from benchmarks._common import case_record, interleaved, sd_unet_config

Metric = Literal["cfg", "cfg_score", "flipd"]
#: Points per prompt in the public code's setting, per metric.
PUBLIC_POINTS = {"cfg": 200, "cfg_score": 200, "flipd": 40}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the attribution benchmark (defaults: SD v1.5's full shapes, RESULTS.md's record)."""

    points: int = 2
    metrics: tuple[Metric, ...] = ("cfg", "flipd")
    width: int = 320
    levels: int = 4
    layers_per_block: int = 2
    norm_groups: int = 32
    size: int = 64


TINY = Config(width=8, levels=2, layers_per_block=1, norm_groups=8, size=8)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Time and size token attribution per metric; one case."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.tree_util import Partial

    from mmh_jax.convert.unet2d_condition import unet2d_condition_abstract_params
    from mmh_jax.memorization.prompt import MetricPoints, _Inputs, _token_attributions
    from mmh_jax.models import EpsModel, UNet2DCondition
    from mmh_jax.schedules import DDPM

    c = config
    unknown = sorted(set(c.metrics) - set(PUBLIC_POINTS))
    if unknown:
        raise ValueError(f"attribution.metrics: unknown {unknown}; known {sorted(PUBLIC_POINTS)}")
    module = UNet2DCondition(**sd_unet_config(c.width, c.levels, c.layers_per_block, c.norm_groups))
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
    n = c.points
    points = MetricPoints(
        jnp.asarray(rng.standard_normal((n, 4, c.size, c.size)), jnp.float32),
        jnp.asarray(np.linspace(0.9, 0.1, n), jnp.float32),
    )
    cond = jnp.asarray(rng.standard_normal((1, 77, 768)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((1, 77, 768)), jnp.float32)
    point_keys = jax.random.split(jax.random.key(1), n)
    guidance = jnp.asarray(7.5, jnp.float32)
    inputs = _Inputs(eps_fn, points, uncond, point_keys, guidance, schedule)
    gib = 2.0**30
    notes: dict[str, Any] = {"parameters": n_params, "points": n}
    sides = {}
    for metric in dict.fromkeys(c.metrics):
        start = time.perf_counter()
        compiled = _token_attributions.lower(cond, inputs, metric=metric, num_probes=1).compile()
        notes[f"{metric}_compile_s"] = time.perf_counter() - start
        mem = compiled.memory_analysis()
        notes[f"{metric}_memory_plan_gib"] = {
            "arguments": mem.argument_size_in_bytes / gib,
            "temporaries": mem.temp_size_in_bytes / gib,
            "output": mem.output_size_in_bytes / gib,
        }
        sides[metric] = lambda compiled=compiled: compiled(cond, inputs)
    timings = interleaved(sides, repeats, jax.block_until_ready)
    derived = {}
    for metric, times in timings.times.items():
        derived[f"{metric}_per_point"] = [t / n for t in times]
        derived[f"{metric}_prompt_implied"] = [t / n * PUBLIC_POINTS[metric] for t in times]
        notes[f"{metric}_public_points"] = PUBLIC_POINTS[metric]
    notes["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ratios = {}
    if "cfg" in sides and "flipd" in sides:
        ratios["FLIPD / CFG per point"] = ("flipd_per_point", "cfg_per_point")
    return [
        case_record(
            f"UNet width {c.width}, {c.levels} levels x "
            f"{c.layers_per_block} layers, {n_params / 1e6:.1f}M parameters, {n} points of "
            f"4x{c.size}x{c.size}",
            timings,
            ratios=ratios,
            derived=derived,
            notes=notes,
        )
    ]
