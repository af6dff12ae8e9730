"""Benchmark: the guarded sampler (``mmh_jax.memorization.guard.guarded_ddim_sample``) against
plain DDIM with classifier-free guidance (``mmh_jax.sampling.ddim_sample``): DDIM-``steps``
(SD v1.5's grid), guidance 7.5, batch 1, 4 x ``size`` x ``size`` latents, 77 x 768 random text
embeddings, fp32.

Run it through the runner: ``python -m benchmarks run guarded [--set guarded.width=32
--set guarded.size=32]``.

Targets (issue 14): the CFG-norm signal costs at most 2% over plain sampling (it reads the two
noise predictions every step makes anyway); FLIPD at the last 5 of 50 steps at most 1.25x (those
steps run one ``jax.jvp`` of the guided noise instead of one forward pass).

The UNet has Stable Diffusion's layout: ``SD15_UNET_CONFIG`` with ``block_out_channels = (w, 2w,
4w, 4w)`` (``width``; SD v1.5 is w = 320; the first ``levels`` of them), ``layers_per_block``
and ``norm_groups``, random
weights (N(0, 1/fan_in) kernels, seeded; built without compiling Flax's init). Cases, each timed
in interleaved rounds after one warm-up call per side, ratios round by round:

* ``end to end`` (with ``end_to_end``): sides ``plain``, ``cfg_norm`` and ``flipd`` (the signal at
  the last ``flipd_steps`` steps); notes: the largest difference of each guarded sample from the
  plain one, relative to the plain sample's largest value;
* ``per step`` (with ``per_step``): on the same UNet, one CFG step (``step_forward``: one UNet call
  on the batch of 2), the same with the CFG norm (``step_forward_norm``) and the ``jvp`` step
  (``step_jvp``); the derived per-round series ``implied_*`` are the ``steps``-step totals these
  imply, ``(n - k) F + k J`` for FLIPD at the last k, and their ratios are labelled implied;
* ``full shapes`` (with ``full``): the per-step case at SD v1.5's full shapes (859.5M parameters),
  whatever ``width`` says. Needs about 10 GB of free memory; skipped (and noted) otherwise.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from benchmarks._common import case_record, interleaved, sd_unet_config


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the guarded benchmark (defaults: the script's, a reduced-width UNet)."""

    width: int = 64
    levels: int = 4
    layers_per_block: int = 2
    norm_groups: int = 32
    size: int = 64
    steps: int = 50
    flipd_steps: int = 5
    guidance: float = 7.5
    end_to_end: bool = True
    per_step: bool = True
    full: bool = False


TINY = Config(width=8, levels=2, layers_per_block=1, norm_groups=8, size=8, steps=3, flipd_steps=1)


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


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
    notes = {"parameters": n, "build_s": time.perf_counter() - start}
    return Partial(EpsModel(module).eps, params, schedule), schedule, notes


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


def _per_step(name, fns, repeats, n, k, notes):
    """The per-step case: the three steps interleaved, and the n-step totals they imply."""
    import jax

    timings = interleaved(fns, repeats, jax.block_until_ready)
    f, g, j = (timings.times[s] for s in ("step_forward", "step_forward_norm", "step_jvp"))
    return case_record(
        name,
        timings,
        ratios={
            "jvp step / forward step": ("step_jvp", "step_forward"),
            "(forward + norm) / forward step": ("step_forward_norm", "step_forward"),
            f"implied {n}-step cfg_norm / plain": ("implied_cfg_norm", "implied_plain"),
            f"implied {n}-step flipd (last {k}) / plain": ("implied_flipd", "implied_plain"),
        },
        derived={
            "implied_plain": [n * a for a in f],
            "implied_cfg_norm": [n * b for b in g],
            "implied_flipd": [(n - k) * a + k * b for a, b in zip(f, j)],
        },
        notes=notes,
    )


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure the guarded sampler against plain DDIM (end to end, per step, full shapes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmh_jax.memorization.guard import guarded_ddim_sample
    from mmh_jax.models import SD15_UNET_CONFIG
    from mmh_jax.sampling import DDIMGrid, ddim_sample

    c = config
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 4, c.size, c.size)).astype(np.float32))
    cond = jnp.asarray(rng.standard_normal((1, 77, 768)).astype(np.float32))
    uncond = jnp.asarray(rng.standard_normal((1, 77, 768)).astype(np.float32))
    n, k = c.steps, c.flipd_steps
    sampler = dict(guidance=c.guidance, num_steps=n, grid=DDIMGrid())  # SD v1.5's grid
    unet = f"UNet width {c.width}, {c.levels} levels x {c.layers_per_block} layers"
    cases = []
    if c.end_to_end or c.per_step:
        eps_fn, schedule, notes = _unet(
            sd_unet_config(c.width, c.levels, c.layers_per_block, c.norm_groups), c.size, seed=0
        )
    if c.end_to_end:
        key = jax.random.key(1)
        outs = {}

        def keep(name, fn):  # the last output of each side, compared below
            def call():
                outs[name] = fn()
                return outs[name]

            return call

        def guarded(**signal):
            return guarded_ddim_sample(
                eps_fn, z, cond, uncond, schedule=schedule, **signal, **sampler
            ).sample

        timings = interleaved(
            {
                "plain": keep(
                    "plain",
                    lambda: (
                        ddim_sample(eps_fn, z, cond, uncond, schedule=schedule, **sampler).sample
                    ),
                ),
                "cfg_norm": keep("cfg_norm", lambda: guarded(signal="cfg_norm")),
                "flipd": keep("flipd", lambda: guarded(signal="flipd", signal_steps=k, key=key)),
            },
            repeats,
            jax.block_until_ready,
        )
        plain = np.asarray(outs["plain"])
        scale = float(np.abs(plain).max())
        cases.append(
            case_record(
                f"end to end, DDIM-{n}, {unet}, latent 4x{c.size}x{c.size}",
                timings,
                ratios={
                    "cfg_norm / plain": ("cfg_norm", "plain"),
                    f"flipd (last {k} of {n}) / plain": ("flipd", "plain"),
                },
                notes=dict(
                    notes,
                    **{
                        f"max_difference_{s}": float(np.abs(np.asarray(outs[s]) - plain).max())
                        / scale
                        for s in ("cfg_norm", "flipd")
                    },
                ),
            )
        )
        del outs
    if c.per_step:
        fns = _step_fns(eps_fn, schedule, cond, uncond, z, c.guidance)
        cases.append(
            _per_step(f"per step, {unet}, latent 4x{c.size}x{c.size}", fns, repeats, n, k, notes)
        )
    if c.end_to_end or c.per_step:
        del eps_fn
    if c.full:
        free = _mem_available_gb()
        if not free >= 10:
            print(f"[guarded] full shapes skipped: {free:.1f} GB of memory available, ~10 needed")
        else:
            eps_fn, schedule, notes = _unet(SD15_UNET_CONFIG, c.size, seed=0)
            fns = _step_fns(eps_fn, schedule, cond, uncond, z, c.guidance)
            cases.append(
                _per_step(
                    f"per step, SD v1.5 UNet (full shapes), latent 4x{c.size}x{c.size}",
                    fns,
                    repeats,
                    n,
                    k,
                    dict(notes, mem_available_gb=free),
                )
            )
    return cases
