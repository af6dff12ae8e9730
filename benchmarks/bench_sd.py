"""Benchmark: FLIPD through Stable Diffusion's CFG score at full SD v1.5 shapes, against one CFG
evaluation and against PyTorch, on the same random weights.

The UNet is diffusers' ``UNet2DConditionModel(**SD15_UNET_CONFIG)`` (859.5M parameters), random
weights (seeded), converted with ``mmh_jax.convert.unet2d_condition``; latents 4 x 64 x 64, text
embeddings 77 x 768 (random: the text encoder does not enter these timings). One latent, so one
CFG evaluation is one UNet call on a batch of 2 (unconditional and conditional). Every timed
function runs once per round, rounds interleaved (``benchmarks._common.interleaved``); ratios are taken
round by round and reported as median (min-max).

Reported:

* JAX: one CFG evaluation (``StableDiffusion.cfg_eps``'s computation: ``guidance.cfg_eps``),
  FLIPD with one Hutchinson probe of the CFG-adjusted score (``mmh_jax.lid.flipd`` on
  ``guidance.cfg_score_fn``), and their ratio (target <= 2.2x);
* PyTorch: the same CFG evaluation with diffusers (plain attention processor), and the reference
  FLIPD (``mmh_jax.reference.torch_lid.flipd_torch`` on ``cfg_score_fn_torch``, reverse mode,
  the same probe); the JAX / PyTorch images-per-second ratios of FLIPD (target: JAX no slower)
  and of the forward pass; the relative difference of the two FLIPD values.

Example: python -m benchmarks.bench_sd --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from benchmarks._common import cpu_model, interleaved, ratio_summary


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--t0", type=float, default=0.05, help="a multiple of 1/1000")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from jax.tree_util import Partial

    from mmh_jax.convert.unet2d_condition import convert_unet2d_condition
    from mmh_jax.guidance import cfg_eps, cfg_score_fn
    from mmh_jax.lid import flipd
    from mmh_jax.models import SD15_UNET_CONFIG, EpsModel, UNet2DCondition
    from mmh_jax.reference.torch_lid import cfg_score_fn_torch, flipd_torch
    from mmh_jax.schedules import DDPM

    print(
        f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
        f"backend={jax.default_backend()} device='{jax.devices()[0].device_kind}' "
        f"torch={torch.__version__} torch_threads={torch.get_num_threads()} "
        f"load={os.getloadavg()[0]:.2f}"
    )
    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
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
    z_np = rng.standard_normal((1, 4, args.size, args.size)).astype(np.float32)
    cond_np = rng.standard_normal((1, 77, 768)).astype(np.float32)
    uncond_np = rng.standard_normal((1, 77, 768)).astype(np.float32)
    z, cond, uncond = jnp.asarray(z_np), jnp.asarray(cond_np), jnp.asarray(uncond_np)
    t = jnp.full((1,), args.t0, jnp.float32)
    print(
        f"model: UNet2DConditionModel, SD v1.5 config, {n_params:,} parameters; latents "
        f"1 x 4 x {args.size} x {args.size}, context 77 x 768, fp32, t0={args.t0}, "
        f"guidance {args.guidance}"
    )

    sync = jax.block_until_ready
    guided = jax.jit(lambda f, z, t: cfg_eps(f, z, t, cond, uncond, guidance=args.guidance))
    score = cfg_score_fn(eps_fn, cond, uncond, schedule=schedule, guidance=args.guidance)
    key = jax.random.key(1)
    fns = {
        "jax_cfg_eval": lambda: guided(eps_fn, z, t),
        "jax_flipd": lambda: flipd(score, z, t0=args.t0, schedule=schedule, key=key),
    }
    lid_jax = float(np.asarray(fns["jax_flipd"]())[0])

    if not args.skip_torch:
        probe = np.asarray(
            jax.random.rademacher(
                jax.random.fold_in(jax.random.split(key, 1)[0], 0),
                (4, args.size, args.size),
                jnp.float32,
            )
        )
        ac = torch.as_tensor(np.asarray(schedule.alphas_cumprod), dtype=torch.float64)
        unet = lambda x, s, c: model(x, s, encoder_hidden_states=c).sample  # noqa: E731
        tscore = cfg_score_fn_torch(
            unet, ac, torch.as_tensor(cond_np), torch.as_tensor(uncond_np), args.guidance
        )
        zt, tt = torch.as_tensor(z_np), torch.full((1,), args.t0)
        psi = torch.as_tensor(np.asarray(schedule.psi(t)))
        sigma = torch.as_tensor(np.asarray(schedule.sigma(t)))
        probes = torch.as_tensor(probe)[None, None]
        step = torch.full((2,), args.t0 * 1000 - 1)
        both = torch.cat([torch.as_tensor(uncond_np), torch.as_tensor(cond_np)])

        def torch_cfg_eval():
            with torch.no_grad():
                e = unet(torch.cat([zt, zt]), step, both)
                return e[:1] + args.guidance * (e[1:] - e[:1])

        def torch_flipd():
            return flipd_torch(tscore, zt, tt, psi=psi, sigma=sigma, probes=probes)

        fns["torch_cfg_eval"] = torch_cfg_eval
        fns["torch_flipd"] = torch_flipd
        lid_torch = float(torch_flipd()[0])
        print(
            f"FLIPD values: JAX {lid_jax:.2f}, PyTorch {lid_torch:.2f}, relative difference "
            f"{abs(lid_jax - lid_torch) / abs(lid_torch):.1e} (d = {4 * args.size**2})"
        )

    times = interleaved(fns, args.repeats, sync).times
    for name, values in times.items():
        print(
            f"{name}: median {statistics.median(values):.2f} s "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )
    print(
        f"JAX FLIPD / JAX CFG evaluation = "
        f"{ratio_summary(times['jax_flipd'], times['jax_cfg_eval'])} (target <= 2.2x)"
    )
    if not args.skip_torch:
        print(
            f"PyTorch FLIPD / PyTorch CFG evaluation = "
            f"{ratio_summary(times['torch_flipd'], times['torch_cfg_eval'])}"
        )
        print(
            f"JAX / PyTorch images/s, FLIPD = "
            f"{ratio_summary(times['torch_flipd'], times['jax_flipd'])} (target >= 1)"
        )
        print(
            f"JAX / PyTorch images/s, CFG evaluation = "
            f"{ratio_summary(times['torch_cfg_eval'], times['jax_cfg_eval'])}"
        )


if __name__ == "__main__":
    main()
