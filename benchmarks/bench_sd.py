"""Benchmark: FLIPD through Stable Diffusion's CFG score at full SD v1.5 shapes, against one CFG
evaluation and against PyTorch, on the same random weights.

Run it through the runner: ``python -m benchmarks run sd [--set sd.width=64 --set sd.size=32]``.

The UNet is diffusers' ``UNet2DConditionModel`` with SD v1.5's config (``SD15_UNET_CONFIG``,
859.5M parameters at the default ``width`` 320, ``levels`` 4, ``layers_per_block`` 2,
``norm_groups`` 32; smaller values give the same layout, narrower), random weights (seeded), converted with
``mmh_jax.convert.unet2d_condition``; latents 4 x ``size`` x ``size`` (64 for SD v1.5), text
embeddings 77 x 768 (random: the text encoder does not enter these timings). One latent, so one
CFG evaluation is one UNet call on a batch of 2 (unconditional and conditional). Sides,
interleaved round by round after one warm-up call each:

* ``jax_cfg_eval``: one CFG evaluation (``StableDiffusion.cfg_eps``'s computation:
  ``guidance.cfg_eps``); ``jax_flipd``: FLIPD with one Hutchinson probe of the CFG-adjusted
  score (``mmh_jax.lid.flipd`` on ``guidance.cfg_score_fn``);
* with ``torch``: ``torch_cfg_eval``, the same CFG evaluation with diffusers (plain attention
  processor), and ``torch_flipd``, the reference FLIPD (``mmh_jax.reference.torch_lid.flipd_torch``
  on ``cfg_score_fn_torch``, reverse mode, the same probe).

Ratios: FLIPD / CFG evaluation in each framework (target for JAX <= 2.2x), and the JAX / PyTorch
images-per-second ratios of FLIPD (target: JAX no slower) and of the CFG evaluation. Notes: the
two FLIPD values and their relative difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._common import case_record, interleaved, sd_unet_config


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the sd benchmark (defaults: SD v1.5's full shapes, RESULTS.md's record)."""

    width: int = 320
    levels: int = 4
    layers_per_block: int = 2
    norm_groups: int = 32
    size: int = 64
    t0: float = 0.05
    guidance: float = 7.5
    torch: bool = True


TINY = Config(width=8, levels=2, layers_per_block=1, norm_groups=8, size=8)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure FLIPD through the CFG score against one CFG evaluation and PyTorch; one case."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from jax.tree_util import Partial

    from mmh_jax.convert.unet2d_condition import convert_unet2d_condition
    from mmh_jax.guidance import cfg_eps, cfg_score_fn
    from mmh_jax.lid import flipd
    from mmh_jax.models import EpsModel, UNet2DCondition
    from mmh_jax.reference.torch_lid import cfg_score_fn_torch, flipd_torch
    from mmh_jax.schedules import DDPM

    c = config
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        **sd_unet_config(c.width, c.levels, c.layers_per_block, c.norm_groups)
    ).eval()
    model.set_attn_processor(AttnProcessor())  # forward-mode-friendly, like the public code
    n_params = sum(q.numel() for q in model.parameters())
    module = UNet2DCondition.from_config(model.config)
    params = jax.tree.map(
        jnp.asarray,
        convert_unet2d_condition(
            {k: v.detach().numpy() for k, v in model.state_dict().items()}, module
        ),
    )
    schedule = DDPM.scaled_linear()
    eps_fn = Partial(EpsModel(module).eps, params, schedule)
    rng = np.random.default_rng(0)
    z_np = rng.standard_normal((1, 4, c.size, c.size)).astype(np.float32)
    cond_np = rng.standard_normal((1, 77, 768)).astype(np.float32)
    uncond_np = rng.standard_normal((1, 77, 768)).astype(np.float32)
    z, cond, uncond = jnp.asarray(z_np), jnp.asarray(cond_np), jnp.asarray(uncond_np)
    t = jnp.full((1,), c.t0, jnp.float32)

    guided = jax.jit(lambda f, z, t: cfg_eps(f, z, t, cond, uncond, guidance=c.guidance))
    score = cfg_score_fn(eps_fn, cond, uncond, schedule=schedule, guidance=c.guidance)
    key = jax.random.key(1)
    sides = {
        "jax_cfg_eval": lambda: guided(eps_fn, z, t),
        "jax_flipd": lambda: flipd(score, z, t0=c.t0, schedule=schedule, key=key),
    }
    ratios = {"JAX FLIPD / CFG evaluation": ("jax_flipd", "jax_cfg_eval")}
    notes: dict[str, Any] = {"parameters": n_params, "d": 4 * c.size**2}
    if c.torch:
        probe = np.asarray(
            jax.random.rademacher(
                jax.random.fold_in(jax.random.split(key, 1)[0], 0),
                (4, c.size, c.size),
                jnp.float32,
            )
        )
        ac = torch.as_tensor(np.array(schedule.alphas_cumprod), dtype=torch.float64)
        unet = lambda x, s, e: model(x, s, encoder_hidden_states=e).sample  # noqa: E731
        tscore = cfg_score_fn_torch(
            unet, ac, torch.as_tensor(cond_np), torch.as_tensor(uncond_np), c.guidance
        )
        zt, tt = torch.as_tensor(z_np), torch.full((1,), c.t0)
        psi = torch.as_tensor(np.array(schedule.psi(t)))
        sigma = torch.as_tensor(np.array(schedule.sigma(t)))
        probes = torch.as_tensor(probe)[None, None]
        step = torch.full((2,), c.t0 * 1000 - 1)
        both = torch.cat([torch.as_tensor(uncond_np), torch.as_tensor(cond_np)])

        def torch_cfg_eval():
            with torch.no_grad():
                e = unet(torch.cat([zt, zt]), step, both)
                return e[:1] + c.guidance * (e[1:] - e[:1])

        def torch_flipd():
            return flipd_torch(tscore, zt, tt, psi=psi, sigma=sigma, probes=probes)

        sides.update(torch_cfg_eval=torch_cfg_eval, torch_flipd=torch_flipd)
        ratios.update(
            {
                "PyTorch FLIPD / CFG evaluation": ("torch_flipd", "torch_cfg_eval"),
                "JAX / PyTorch images/s, FLIPD": ("torch_flipd", "jax_flipd"),
                "JAX / PyTorch images/s, CFG evaluation": ("torch_cfg_eval", "jax_cfg_eval"),
            }
        )
        notes["torch_threads"] = torch.get_num_threads()

    def sync(out):
        return jax.block_until_ready(out) if isinstance(out, jax.Array) else out

    timings = interleaved(sides, repeats, sync)
    notes["flipd_jax"] = float(np.asarray(sides["jax_flipd"]())[0])
    if c.torch:
        notes["flipd_torch"] = float(sides["torch_flipd"]()[0])
        notes["flipd_relative_difference"] = abs(notes["flipd_jax"] - notes["flipd_torch"]) / abs(
            notes["flipd_torch"]
        )
    return [
        case_record(
            f"UNet width {c.width}, {c.levels} levels x "
            f"{c.layers_per_block} layers, {n_params / 1e6:.1f}M parameters, latent "
            f"4x{c.size}x{c.size}",
            timings,
            ratios=ratios,
            notes=notes,
        )
    ]
