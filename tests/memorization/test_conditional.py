"""Memorization metrics of text-conditional models: against PyTorch references on the tiny random
Stable Diffusion pipeline (tests/conftest.py's ``sd_folder``) and against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.tree_util import Partial

from mmh_jax.lid import flipd
from mmh_jax.memorization import conditional_flipd, generation_cfg_norms, image_cfg_norms
from mmh_jax.reference.torch_lid import cfg_score_fn_torch, flipd_torch
from mmh_jax.schedules import DDPM

T0 = 0.05  # on the grid i / T: both sides read the same alphas_cumprod entry
EVENT = (4, 8, 8)


def _probes(key, b, num_probes):
    """flipd's probes: Rademacher draws from fold_in(per-sample key, probe index)."""
    keys = jax.random.split(key, b)
    return np.stack(
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


@pytest.mark.slow
def test_cfg_flipd_traces_both_branches_like_pytorch(sd, sd_folder):
    _, pipe = sd_folder
    b, num_probes, guidance = 2, 3, 7.5
    z = np.random.default_rng(0).standard_normal((b,) + EVENT).astype(np.float32)
    cond = sd.encode_prompt(["a cat, the cat", "the fox"])
    key = jax.random.key(5)
    ours = conditional_flipd(
        sd.eps,
        z,
        cond,
        sd.uncond_embedding,
        schedule=sd.schedule,
        key=key,
        guidance=guidance,
        t0=T0,
        num_probes=num_probes,
    )
    abar = torch.as_tensor(np.exp(np.asarray(sd.schedule.log_alphas_cumprod, np.float64)))
    t = jnp.full((b,), T0)
    psi = torch.tensor(np.asarray(sd.schedule.psi(t)))
    sigma = torch.tensor(np.asarray(sd.schedule.sigma(t)))
    probes = torch.as_tensor(_probes(key, b, num_probes))
    unet = lambda x, s, c: pipe.unet(x, s, encoder_hidden_states=c).sample  # noqa: E731
    args = (torch.as_tensor(z), torch.full((b,), T0))

    def reference(c, u, g, **kw):
        score = cfg_score_fn_torch(
            unet, abar, torch.as_tensor(np.asarray(c)), torch.as_tensor(np.asarray(u)), g, **kw
        )
        return flipd_torch(score, *args, psi=psi, sigma=sigma, probes=probes).numpy()

    full = reference(cond, sd.uncond_embedding, guidance)
    np.testing.assert_allclose(ours.conditional, full, rtol=2e-3)
    # the public code's mistake (a constant unconditional branch) gives another number
    partial = reference(cond, sd.uncond_embedding, guidance, detach_uncond=True)
    assert np.abs(partial - full).min() > 50 * np.abs(np.asarray(ours.conditional) - full).max()
    # the unconditional model: guidance 0 of the same reference
    np.testing.assert_allclose(
        ours.unconditional, reference(cond, sd.uncond_embedding, 0.0), rtol=2e-3
    )


@pytest.mark.slow
def test_cfg_flipd_of_a_bfloat16_network_is_accumulated_in_float32(sd, sd16):
    # The network computes in bfloat16; the guided score and its jvp leave it in float32, so the
    # probe products and the trace sum are float32 (the public code ran all of it under fp16).
    z = np.random.default_rng(1).standard_normal((2,) + EVENT).astype(np.float32)
    t = jnp.full((2,), T0)
    score16 = sd16.cfg_score(sd16.encode_prompt(["a cat", "the fox"]))
    primal, tangent = jax.eval_shape(
        lambda y, v: jax.jvp(lambda y: score16(y, t), (y,), (v,)), z, z
    )
    assert primal.dtype == tangent.dtype == jnp.float32
    assert sd16.unet.module.dtype == jnp.bfloat16
    # 3 probes, as test_cfg_flipd_traces_both_branches_like_pytorch: the float32 FLIPD below is
    # then the program conditional_flipd compiled there
    kwargs = dict(schedule=sd.schedule, key=jax.random.key(0), num_probes=3)
    ours16 = flipd(score16, z, t0=T0, **kwargs)
    ours32 = flipd(sd.cfg_score(sd.encode_prompt(["a cat", "the fox"])), z, t0=T0, **kwargs)
    assert ours16.dtype == jnp.float32
    # FLIPD = d + sigma^2 (trace + |s|^2): the bfloat16 network's own rounding (about 1% of its
    # outputs) moves it by a few percent of d
    np.testing.assert_allclose(ours16, ours32, atol=0.05 * np.prod(EVENT))


@pytest.mark.slow
def test_generation_norms_are_the_trajectory_formulas(sd):
    cond = sd.encode_prompt(["a cat", "the fox"])
    result = sd.sample(cond, key=jax.random.key(0), num_steps=4, return_trajectory=True)
    eps_u, eps_c = np.asarray(result.eps_uncond), np.asarray(result.eps_cond)
    t = (np.asarray(result.timesteps) + 1) / 1000
    sigma = np.sqrt(1 - np.asarray(sd.schedule.alphas_cumprod, np.float64)[result.timesteps])
    vector = np.linalg.norm((eps_c - eps_u).reshape(4, 2, -1), axis=-1)
    score = np.linalg.norm((eps_u + 7.5 * (eps_c - eps_u)).reshape(4, 2, -1), axis=-1)
    score = score / sigma[:, None]
    norms = generation_cfg_norms(result, schedule=sd.schedule, guidance=7.5)
    np.testing.assert_allclose(norms.cfg_vector, vector.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norms.cfg_score, score.mean(0), rtol=1e-4)
    late = generation_cfg_norms(result, schedule=sd.schedule, guidance=7.5, steps=[2, 3])
    np.testing.assert_allclose(late.cfg_vector, vector[2:].mean(0), rtol=1e-5)
    assert np.all(t > 0)
    with pytest.raises(ValueError, match="steps"):
        generation_cfg_norms(result, schedule=sd.schedule, guidance=7.5, steps=[4])
    with pytest.raises(ValueError, match="return_trajectory"):
        generation_cfg_norms(
            sd.sample(cond, key=jax.random.key(0), num_steps=2), schedule=sd.schedule, guidance=7.5
        )


def _scaled_gaussian_eps(x, t, context):
    """The noise predictor of N(0, I) data under a VP-type DDPM schedule, whose score is -x, with
    the conditional score ``-(1 + m) x`` for an embedding of mean ``m``."""
    m = jnp.mean(context, axis=(1, 2)).reshape(-1, 1, 1, 1)
    return SCHEDULE.sigma(t).reshape(-1, 1, 1, 1) * (1 + m) * x


SCHEDULE = DDPM.scaled_linear()


def test_image_cfg_norms_follow_the_closed_form_ode(x64):
    # With s(x; t, c) = -(1 + m_c) x and psi^2 + sigma^2 = 1, the conditional PF-ODE is
    # dz/dt = f z + (g^2 / 2)(1 + m_c) z = -f m_c z (g^2 = -2 f), so z(t) = z0 (psi(t)/psi(t1))^-m_c.
    z0 = np.random.default_rng(0).standard_normal((3, 4, 2, 2))
    m_c, m_u, guidance, t0 = 0.3, 0.0, 7.5, 0.01
    cond = np.full((1, 2, 3), m_c)
    uncond = np.full((1, 2, 3), m_u)
    eps_fn = Partial(_scaled_gaussian_eps)
    norms = image_cfg_norms(
        eps_fn, z0, cond, uncond, schedule=SCHEDULE, guidance=guidance, t0=t0, num_steps=400
    )
    psi = np.asarray(SCHEDULE.psi(jnp.asarray([1 / 1000, t0])))
    z = z0 * (psi[1] / psi[0]) ** (-m_c)
    sigma = float(SCHEDULE.sigma(t0))
    size = np.linalg.norm(z.reshape(3, -1), axis=1)
    np.testing.assert_allclose(norms.cfg_vector, sigma * (m_c - m_u) * size, rtol=1e-4)
    cfg = (1 + m_u) + guidance * (m_c - m_u)  # eps^CFG = sigma * cfg * z, score = -cfg z
    np.testing.assert_allclose(norms.cfg_score, cfg * size, rtol=1e-4)
    assert not np.allclose(z, z0, rtol=1e-4)  # the ODE moved the points: the check has teeth
    with pytest.raises(ValueError, match="t0"):
        image_cfg_norms(eps_fn, z0, cond, uncond, schedule=SCHEDULE, t0=0.0005)


@pytest.mark.slow
def test_image_cfg_norms_on_the_pipeline_use_real_steps(sd, jit_call):
    images = np.random.default_rng(3).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z0 = sd.encode_image(images)
    cond = sd.encode_prompt(["a cat", "the fox"])
    norms = image_cfg_norms(sd.eps, z0, cond, sd.uncond_embedding, schedule=sd.schedule)
    # the same value by hand: 3 Euler steps of the conditional PF-ODE from 1/T to 0.01, then eps
    score_c = sd.score(cond)
    ts = np.linspace(1e-3, 0.01, 4).astype(np.float32)
    z = z0
    for i in range(3):
        t = jnp.full((2,), ts[i])
        drift = sd.schedule.f(ts[i]) * z - 0.5 * sd.schedule.g2(ts[i]) * jit_call(score_c, z, t)
        z = z + (ts[i + 1] - ts[i]) * drift
    t = jnp.full((2,), 0.01, jnp.float32)
    eps_c, eps_u = jit_call(sd.eps, z, t, cond), jit_call(sd.eps, z, t, sd.uncond_embedding)
    expected = np.linalg.norm(np.asarray(eps_c - eps_u).reshape(2, -1), axis=1)
    np.testing.assert_allclose(norms.cfg_vector, expected, rtol=1e-3)
