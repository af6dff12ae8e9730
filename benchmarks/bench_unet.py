"""Benchmark: FLIPD and the normal bundle through the Flax DDPM-CIFAR10 UNet, against PyTorch.

Run it through the runner: ``python -m benchmarks run unet [--set unet.batch=16]``.

The model is diffusers' ``UNet2DModel`` with the google/ddpm-cifar10-32 config (35.7M
parameters; ``width`` and ``layers_per_block`` shrink it), random weights (seeded), converted
with ``mmh_jax.convert.convert_unet2d``; both frameworks get the same weights, inputs and
Rademacher probes, diffusers with its plain attention processor (no fused kernels).

Case "FLIPD": sides interleaved round by round after one warm-up call each:

* ``jax_forward`` and ``torch_forward``: the eps network on the batch;
* ``jax_flipd``: ``mmh_jax.lid.flipd`` with one Hutchinson probe (forward-mode ``jax.jvp``);
* ``torch_flipd``: the PyTorch reference ``mmh_jax.reference.torch_lid.flipd_torch`` in reverse
  mode (its forward mode is tried once and noted: it fails on CPU inside diffusers' UNet);
* with ``bf16``, ``jax_forward_bf16`` and ``jax_flipd_bf16`` (bfloat16 compute).

Ratios: FLIPD / forward in each framework, and ``torch_flipd / jax_flipd`` (the JAX / PyTorch
images-per-second ratio of FLIPD; target >= 1 on CPU). Notes: the largest relative difference
of the two frameworks' FLIPD values.

Case "normal bundle" (``normal_bundle``): one image at K = 4 d scores. The bare score
evaluations (batches of ``nb_chunk``) against everything else ``normal_bundle`` does (noise,
Gram accumulation, the d x d eigvalsh), timed by running it with a trivial score at the same K;
the split is checked against a full run with the network at a small K (``nb_scores``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the UNet benchmark (defaults: RESULTS.md's record, the full CIFAR-10 UNet)."""

    batch: int = 64
    width: int = 128
    layers_per_block: int = 2
    size: int = 32
    t0: float = 0.05
    normal_bundle: bool = True
    nb_scores: int = 64
    nb_chunk: int = 32
    bf16: bool = False


TINY = Config(batch=2, width=32, layers_per_block=1, size=8, normal_bundle=False)


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure FLIPD (and the normal bundle) in JAX against PyTorch; one or two cases."""
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

    c = config
    w = c.width
    torch.manual_seed(0)
    model = UNet2DModel(
        **dict(
            DDPM_CIFAR10_CONFIG,
            sample_size=c.size,
            block_out_channels=(w, 2 * w, 2 * w, 2 * w),
            layers_per_block=c.layers_per_block,
        )
    ).eval()
    for m in model.modules():  # UNet2DModel has no set_attn_processor; set it per layer
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    n_params = sum(q.numel() for q in model.parameters())
    module = UNet2D.from_config(model.config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert_unet2d(state, module))
    schedule = DDPM.linear(T=1000)
    score_fn = eps_score_fn(module, params, schedule)
    b, s = c.batch, c.size
    x_np = np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32)
    x = jnp.asarray(x_np)
    t = jnp.full((b,), c.t0, jnp.float32)
    steps = schedule.timestep(t)
    key = jax.random.key(1)
    apply = jax.jit(module.apply)

    # The same probes as flipd draws: Rademacher from fold_in(per-sample key, probe index).
    keys = jax.random.split(key, b)
    probes = torch.as_tensor(
        np.array(
            jax.vmap(
                lambda k: jax.random.rademacher(jax.random.fold_in(k, 0), (3, s, s), jnp.float32)
            )(keys)
        )[None]
    )
    ac = torch.as_tensor(np.asarray(schedule.alphas_cumprod), dtype=torch.float64)
    tscore = eps_score_fn_torch(lambda z, u: model(z, u).sample, ac)
    xt, tt = torch.as_tensor(x_np), torch.full((b,), c.t0)
    psi = torch.as_tensor(np.asarray(schedule.psi(t)))
    sigma = torch.as_tensor(np.asarray(schedule.sigma(t)))

    def torch_forward():
        with torch.no_grad():
            return model(xt, tt * 1000 - 1).sample

    def torch_flipd(mode="reverse"):
        return flipd_torch(tscore, xt, tt, psi=psi, sigma=sigma, probes=probes, mode=mode)

    notes: dict[str, Any] = {
        "parameters": n_params,
        "torch_threads": torch.get_num_threads(),
        "timestep": float(steps[0]),
    }
    try:
        torch_flipd("forward")
        notes["torch_forward_mode"] = "works (not timed)"
    except Exception as err:  # forward-mode AD is missing for some CPU kernels
        notes["torch_forward_mode"] = (
            f"fails: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        )

    sides = {
        "jax_forward": lambda: apply({"params": params}, x, steps),
        "jax_flipd": lambda: flipd(score_fn, x, t0=c.t0, schedule=schedule, key=key),
        "torch_forward": torch_forward,
        "torch_flipd": torch_flipd,
    }
    ratios = {
        "JAX FLIPD / forward": ("jax_flipd", "jax_forward"),
        "PyTorch FLIPD / forward": ("torch_flipd", "torch_forward"),
        "JAX / PyTorch images/s, FLIPD": ("torch_flipd", "jax_flipd"),
        "JAX / PyTorch images/s, forward": ("torch_forward", "jax_forward"),
    }
    if c.bf16:
        mod16 = UNet2D.from_config(model.config, dtype=jnp.bfloat16)
        score16 = eps_score_fn(mod16, params, schedule)
        apply16 = jax.jit(mod16.apply)
        sides["jax_forward_bf16"] = lambda: apply16({"params": params}, x, steps)
        sides["jax_flipd_bf16"] = lambda: flipd(score16, x, t0=c.t0, schedule=schedule, key=key)
        ratios["JAX FLIPD, bf16 / fp32 images/s"] = ("jax_flipd", "jax_flipd_bf16")

    def sync(out):
        return jax.block_until_ready(out) if isinstance(out, jax.Array) else out

    timings = interleaved(sides, repeats, sync)
    lid_jax = np.asarray(sides["jax_flipd"]())
    lid_torch = torch_flipd().numpy()
    notes["flipd_max_relative_difference"] = float(
        np.max(np.abs(lid_jax - lid_torch) / np.abs(lid_torch))
    )
    cases = [
        case_record(
            f"FLIPD, batch {b}, 3x{s}x{s}, {n_params / 1e6:.1f}M parameters",
            timings,
            ratios=ratios,
            notes=notes,
        )
    ]
    if c.normal_bundle:
        cases.append(_normal_bundle(c, score_fn, x[:1], schedule, key, repeats, normal_bundle))
    return cases


def _normal_bundle(c: Config, score_fn, x1, schedule, key, repeats, normal_bundle):
    import jax
    import jax.numpy as jnp

    d = x1[0].size
    K = 4 * d
    xs = jnp.repeat(x1, c.nb_chunk, axis=0)
    ts = jnp.full((c.nb_chunk,), c.t0, jnp.float32)
    score_jit = jax.jit(lambda f, z, u: f(z, u))

    def trivial(z, u):
        return -z

    def nb(f, num_scores):
        return lambda: (
            normal_bundle(
                f,
                x1,
                t0=c.t0,
                schedule=schedule,
                key=key,
                num_scores=num_scores,
                chunk_size=c.nb_chunk,
            ).lid
        )

    timings = interleaved(
        {
            "score_chunk": lambda: score_jit(score_fn, xs, ts),
            "rest_full_k": nb(trivial, K),
            "nb_small_k": nb(score_fn, c.nb_scores),
            "rest_small_k": nb(trivial, c.nb_scores),
        },
        repeats,
        jax.block_until_ready,
    )
    per_score = [v / c.nb_chunk for v in timings.times["score_chunk"]]
    scores_full = [p * K for p in per_score]
    derived = {
        "scores_full_k": scores_full,
        "nb_full_k_estimated": [a + r for a, r in zip(scores_full, timings.times["rest_full_k"])],
        "nb_small_k_predicted": [
            p * c.nb_scores + r for p, r in zip(per_score, timings.times["rest_small_k"])
        ],
    }
    return case_record(
        f"normal bundle, 1 image, K = 4d = {K}",
        timings,
        ratios={
            "share in score evaluations": ("scores_full_k", "nb_full_k_estimated"),
            "measured / predicted at small K": ("nb_small_k", "nb_small_k_predicted"),
        },
        derived=derived,
        notes={"gram_mib": d * d * 4 / 2**20, "K": K},
    )
