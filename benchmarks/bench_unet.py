"""Benchmark: FLIPD and the normal bundle through the Flax DDPM-CIFAR10 UNet, against PyTorch.

The model is diffusers' ``UNet2DModel`` with the google/ddpm-cifar10-32 config (35.7M
parameters), random weights (seeded), converted with ``mmh_jax.convert.convert_unet2d``; both
frameworks get the same weights, inputs and Rademacher probes. All timings come from this one
run: the median of ``--repeats`` calls after one warm-up call (compilation excluded).

Reported:

* forward pass (eps network on the batch) in JAX and PyTorch;
* FLIPD with one Hutchinson probe: JAX (``mmh_jax.lid.flipd``, forward-mode ``jax.jvp``) and the
  PyTorch reference (``mmh_jax.reference.torch_lid.flipd_torch``, reverse mode and, where it
  works, forward mode), with diffusers' plain attention processor (no fused kernels);
  ratios FLIPD / forward in each framework and the JAX / PyTorch images-per-second ratio;
  the relative difference of the two FLIPD values;
* normal bundle on one image at K = 4 d = 12,288 scores: the bare score evaluations (timed
  in batches of ``--nb-chunk``) against everything else ``normal_bundle`` does (noise, Gram
  accumulation, the d x d eigvalsh), timed by running it with a trivial score at the same K;
  the split is checked against a full run with the network at a small K.

Example: python benchmarks/bench_unet.py --batch 64
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _common import cpu_model, timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--t0", type=float, default=0.05, help="a multiple of 1/1000")
    p.add_argument("--nb-scores", type=int, default=64,
                   help="K of the full normal-bundle run that checks the time split")
    p.add_argument("--nb-chunk", type=int, default=32)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-nb", action="store_true")
    p.add_argument("--bf16", action="store_true", help="also time JAX FLIPD in bfloat16 compute")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from mmh_jax.convert.unet2d import convert_unet2d
    from mmh_jax.lid import flipd, normal_bundle
    from mmh_jax.models.pretrained import eps_score_fn
    from mmh_jax.models.unet2d import DDPM_CIFAR10_CONFIG, UNet2D
    from mmh_jax.reference.torch_lid import eps_score_fn_torch, flipd_torch
    from mmh_jax.schedules import DDPM

    dev = jax.devices()[0]
    print(f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' jax={jax.__version__} "
          f"backend={jax.default_backend()} device='{dev.device_kind}' torch={torch.__version__} "
          f"torch_threads={torch.get_num_threads()}")
    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10_CONFIG).eval()
    for m in model.modules():  # UNet2DModel has no set_attn_processor; set it per layer
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    n_params = sum(q.numel() for q in model.parameters())
    module = UNet2D.from_config(model.config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert_unet2d(state, module))
    schedule = DDPM.linear(T=1000)
    score_fn = eps_score_fn(module, params, schedule)
    b = args.batch
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
    x = jnp.asarray(x_np)
    t = jnp.full((b,), args.t0, jnp.float32)
    steps = schedule.timestep(t)
    print(f"model: DDPM-CIFAR10 UNet2D, {n_params / 1e6:.1f}M parameters; batch {b}, fp32, "
          f"t0={args.t0} (timestep {float(steps[0]):.0f})")

    sync_jax = jax.block_until_ready
    apply = jax.jit(module.apply)
    t_fwd = timed(lambda: apply({"params": params}, x, steps), args.repeats, sync_jax)
    key = jax.random.key(1)
    t_flipd = timed(lambda: flipd(score_fn, x, t0=args.t0, schedule=schedule, key=key),
                    args.repeats, sync_jax)
    lid_jax = np.asarray(flipd(score_fn, x, t0=args.t0, schedule=schedule, key=key))
    print(f"jax: forward {t_fwd:.3f} s ({b / t_fwd:.1f} img/s); FLIPD 1 probe {t_flipd:.3f} s "
          f"({b / t_flipd:.1f} img/s); FLIPD / forward = {t_flipd / t_fwd:.2f}x")
    if args.bf16:
        mod16 = UNet2D.from_config(model.config, dtype=jnp.bfloat16)
        score16 = eps_score_fn(mod16, params, schedule)
        apply16 = jax.jit(mod16.apply)
        t_fwd16 = timed(lambda: apply16({"params": params}, x, steps), args.repeats, sync_jax)
        t_flipd16 = timed(lambda: flipd(score16, x, t0=args.t0, schedule=schedule, key=key),
                          args.repeats, sync_jax)
        print(f"jax bf16: forward {t_fwd16:.3f} s; FLIPD {t_flipd16:.3f} s "
              f"({b / t_flipd16:.1f} img/s; {t_flipd / t_flipd16:.2f}x the fp32 rate)")

    if not args.skip_torch:
        # The same probes as flipd draws: Rademacher from fold_in(per-sample key, probe index).
        keys = jax.random.split(key, b)
        probes = np.asarray(jax.vmap(lambda k: jax.random.rademacher(
            jax.random.fold_in(k, 0), (3, 32, 32), jnp.float32))(keys))[None]
        ac = torch.as_tensor(np.asarray(schedule.alphas_cumprod), dtype=torch.float64)
        tscore = eps_score_fn_torch(lambda z, s: model(z, s).sample, ac)
        xt, tt = torch.as_tensor(x_np), torch.full((b,), args.t0)
        psi = torch.as_tensor(np.asarray(schedule.psi(t)))
        sigma = torch.as_tensor(np.asarray(schedule.sigma(t)))
        pt = torch.as_tensor(probes)
        with torch.no_grad():
            t_tfwd = timed(lambda: model(xt, tt * 1000 - 1).sample, args.repeats)
        results = {}
        for mode in ("reverse", "forward"):
            def run(mode=mode):
                return flipd_torch(tscore, xt, tt, psi=psi, sigma=sigma, probes=pt, mode=mode)
            try:
                results[mode] = (timed(run, args.repeats), run().numpy())
            except Exception as err:  # forward-mode AD is missing for some CPU kernels
                print(f"torch {mode} mode: fails ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        print(f"torch: forward {t_tfwd:.3f} s ({b / t_tfwd:.1f} img/s)")
        for mode, (tm, lid_t) in results.items():
            rel = np.max(np.abs(lid_jax - lid_t) / np.abs(lid_t))
            print(f"torch FLIPD ({mode} mode) {tm:.3f} s ({b / tm:.1f} img/s); FLIPD / forward = "
                  f"{tm / t_tfwd:.2f}x; JAX / torch images/s = {tm / t_flipd:.2f}x; "
                  f"max relative difference of FLIPD values {rel:.1e}")
        print(f"forward JAX / torch images/s = {t_tfwd / t_fwd:.2f}x")

    if not args.skip_nb:
        # Time outside score evaluations (noise draws, Gram accumulation, the d x d eigvalsh)
        # is measured by running normal_bundle at the full K = 4d with a trivial score (-x);
        # the score evaluations are timed bare, in the same batches of `chunk` copies.
        d = 3 * 32 * 32
        K = 4 * d
        chunk = args.nb_chunk
        x1 = x[:1]
        xs = jnp.repeat(x1, chunk, axis=0)
        ts = jnp.full((chunk,), args.t0, jnp.float32)
        score_jit = jax.jit(lambda f, z, s: f(z, s))
        t_score = timed(lambda: score_jit(score_fn, xs, ts), args.repeats, sync_jax) / chunk

        def trivial(z, s):
            return -z

        t_rest = timed(lambda: normal_bundle(trivial, x1, t0=args.t0, schedule=schedule, key=key,
                                             chunk_size=chunk).lid, 1, sync_jax)
        k_small = args.nb_scores
        t_small = timed(lambda: normal_bundle(score_fn, x1, t0=args.t0, schedule=schedule, key=key,
                                              num_scores=k_small, chunk_size=chunk).lid,
                        1, sync_jax)
        t_rest_small = timed(lambda: normal_bundle(trivial, x1, t0=args.t0, schedule=schedule,
                                                   key=key, num_scores=k_small,
                                                   chunk_size=chunk).lid, 1, sync_jax)
        print(f"normal bundle, 1 image, K = 4d = {K}: score evaluations {t_score * 1e3:.1f} ms each "
              f"(batches of {chunk}) -> {t_score * K:.0f} s; everything else (noise, Gram "
              f"accumulation, eigvalsh of {d}x{d}), timed with a trivial score: {t_rest:.1f} s; "
              f"time in score evaluations {t_score * K / (t_score * K + t_rest) * 100:.1f}%; "
              f"Gram matrix {d * d * 4 / 2**20:.0f} MiB per image")
        print(f"check of that split at K = {k_small}: measured {t_small:.1f} s, predicted "
              f"{t_score * k_small + t_rest_small:.1f} s")


if __name__ == "__main__":
    main()
