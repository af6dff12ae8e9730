"""FLIPD and the normal bundle through the Flax UNet2D port equal a PyTorch reference on the same
weights, probes and noise (reverse-mode v^T J v in PyTorch, forward-mode jvp in JAX)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from mmh_jax.convert.unet2d import convert_unet2d
from mmh_jax.lid import flipd, normal_bundle
from mmh_jax.models import UNet2D, eps_score_fn
from mmh_jax.reference.torch_lid import (
    eps_score_fn_torch,
    flipd_torch,
    normal_bundle_spectrum_torch,
)
from mmh_jax.schedules import DDPM

CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
T0 = 0.05  # on the grid i / T, where both sides read the same alphas_cumprod entry
EVENT = (1, 8, 8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = UNet2DModel(**CONFIG).eval()
    module = UNet2D.from_config(model.config)
    params = jax.tree.map(
        jnp.asarray, convert_unet2d({k: v.numpy() for k, v in model.state_dict().items()}, module)
    )
    schedule = DDPM.linear(T=1000)
    abar = torch.as_tensor(np.exp(np.asarray(schedule.log_alphas_cumprod, np.float64)))
    torch_score = eps_score_fn_torch(lambda z, s: model(z, s).sample, abar)
    return eps_score_fn(module, params, schedule), torch_score, schedule


def _inputs(b):
    x = np.random.default_rng(1).standard_normal((b,) + EVENT).astype(np.float32)
    return x, torch.as_tensor(x), torch.full((b,), T0)


def _psi_sigma(schedule, b):
    t = jnp.full((b,), T0)
    return torch.tensor(np.asarray(schedule.psi(t))), torch.tensor(np.asarray(schedule.sigma(t)))


@pytest.mark.slow
def test_flipd_hutchinson_matches_pytorch(models):
    score_fn, torch_score, schedule = models
    b, num_probes = 3, 4
    x, xt, tt = _inputs(b)
    key = jax.random.key(7)
    ours = np.asarray(flipd(score_fn, x, t0=T0, schedule=schedule, key=key, num_probes=num_probes))
    # flipd's probes: Rademacher draws from fold_in(per-sample key, probe index)
    keys = jax.random.split(key, b)
    probes = np.stack(
        [
            np.asarray(
                jax.vmap(
                    lambda k, i=i: jax.random.rademacher(
                        jax.random.fold_in(k, i), EVENT, jnp.float32
                    )
                )(keys)
            )
            for i in range(num_probes)
        ]
    )
    psi, sigma = _psi_sigma(schedule, b)
    ref = flipd_torch(
        torch_score, xt, tt, psi=psi, sigma=sigma, probes=torch.as_tensor(probes)
    ).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3)
    assert not np.allclose(ours, ours[0])  # the points differ, so the check is not vacuous


@pytest.mark.slow
def test_flipd_exact_trace_matches_pytorch(models):
    score_fn, torch_score, schedule = models
    b = 2
    d = math.prod(EVENT)
    x, xt, tt = _inputs(b)
    ours = np.asarray(flipd(score_fn, x, t0=T0, schedule=schedule, trace="exact"))
    # the mean of (sqrt(d) e_i)^T J (sqrt(d) e_i) over the d basis vectors is the trace
    basis = np.sqrt(d) * np.eye(d, dtype=np.float32).reshape((d, 1) + EVENT)
    psi, sigma = _psi_sigma(schedule, b)
    ref = flipd_torch(
        torch_score,
        xt,
        tt,
        psi=psi,
        sigma=sigma,
        probes=torch.as_tensor(np.broadcast_to(basis, (d, b) + EVENT).copy()),
    ).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3)


@pytest.mark.slow
def test_normal_bundle_matches_pytorch(models):
    score_fn, torch_score, schedule = models
    b = 2
    d = math.prod(EVENT)
    K = 4 * d
    x, xt, tt = _inputs(b)
    key = jax.random.key(3)
    ours = normal_bundle(score_fn, x, t0=T0, schedule=schedule, key=key)
    # normal_bundle's noise: standard normal draws from fold_in(per-sample key, score index)
    keys = jax.random.split(key, b)
    noise = np.asarray(
        jax.vmap(
            lambda k: jax.vmap(
                lambda i: jax.random.normal(jax.random.fold_in(k, i), EVENT, jnp.float32)
            )(jnp.arange(K))
        )(keys)
    )
    psi, sigma = _psi_sigma(schedule, b)
    ref = normal_bundle_spectrum_torch(
        torch_score, xt, tt, psi=psi, sigma=sigma, noise=torch.as_tensor(noise)
    ).numpy()
    s = np.asarray(ours.singular_values)
    # relative to each spectrum's largest value: the smallest singular values carry the
    # float32 rounding of a d x d Gram eigensolver
    np.testing.assert_allclose(s / s[:, :1], ref / ref[:, :1], atol=1e-3)
    np.testing.assert_allclose(s[:, 0], ref[:, 0], rtol=1e-3)
