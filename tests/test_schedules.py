import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from mmh_jax.schedules import DDPM, EDM, VE, VP, eps_from_score, score_from_eps

T_GRID = np.array([1e-4, 0.01, 0.1, 0.37, 0.8, 1.0])


def test_vp_matches_integral_of_beta(x64):
    s = VP(beta_min=0.1, beta_max=20.0)
    for t in T_GRID:
        integral, _ = integrate.quad(lambda u: 0.1 + u * 19.9, 0, t)
        psi = math.exp(-0.5 * integral)
        np.testing.assert_allclose(s.psi(t), psi, rtol=1e-12)
        np.testing.assert_allclose(s.sigma(t), math.sqrt(1 - psi**2), rtol=1e-10)


def test_vp_sde_coefficients(x64):
    s = VP()
    beta = 0.1 + T_GRID * 19.9
    np.testing.assert_allclose(s.f(T_GRID), -beta / 2, rtol=1e-12)
    np.testing.assert_allclose(s.g2(T_GRID), beta, rtol=1e-9)


def test_ve_and_edm(x64):
    ve = VE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(T_GRID), 0.01 * 5000.0**T_GRID, rtol=1e-12)
    np.testing.assert_allclose(ve.psi(T_GRID), 1.0)
    np.testing.assert_allclose(ve.f(T_GRID), 0.0, atol=1e-14)
    np.testing.assert_allclose(
        ve.g2(T_GRID), 2 * ve.sigma(T_GRID) ** 2 * math.log(5000.0), rtol=1e-10
    )

    edm = EDM()
    # EDM's sampler grid: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho.
    n = 18
    karras = (80 ** (1 / 7) + np.arange(n) / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(edm.sigma(1 - np.arange(n) / (n - 1)), karras, rtol=1e-10)
    np.testing.assert_allclose(edm.time(edm.sigma(T_GRID)), T_GRID, rtol=1e-10)


def test_ddpm_matches_ho_et_al(x64):
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    s = DDPM.linear(T=T)
    i = np.array([1, 2, 10, 500, 1000])
    np.testing.assert_allclose(s.psi(i / T) ** 2, abar[i - 1], rtol=1e-12)
    np.testing.assert_allclose(s.sigma(i / T) ** 2, 1 - abar[i - 1], rtol=1e-10)
    np.testing.assert_allclose(s.timestep(i / T), i - 1)
    np.testing.assert_allclose(s.time(s.timestep(T_GRID)), T_GRID, rtol=1e-12)
    # Between grid points log abar is linear, and psi(0) = 1.
    np.testing.assert_allclose(s.psi(0.0), 1.0)
    mid = 0.5 * (np.log(abar[9]) + np.log(abar[10]))
    np.testing.assert_allclose(2 * np.log(s.psi(10.5 / T)), mid, rtol=1e-12)


def test_ddpm_scaled_linear_and_cosine(x64):
    sd = DDPM.scaled_linear()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(sd.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    cos = DDPM.cosine(T=4000)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.array([1, 100, 2000, 3000])
    np.testing.assert_allclose(cos.alphas_cumprod[i - 1], f(i / 4000) / f(0), rtol=1e-9)


def test_schedules_are_pytrees_through_jit_and_vmap(x64):
    for s in [VP(), DDPM.linear(T=10), VE(), EDM()]:
        t = jnp.array([0.2, 0.7])
        out = jax.jit(lambda sched, t: sched.sigma(t) * sched.psi(t))(s, t)
        np.testing.assert_allclose(out, s.sigma(t) * s.psi(t), rtol=1e-12)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), VP(0.1, 20.0), VP(0.2, 10.0))
    sig = jax.vmap(lambda s: s.sigma(0.5))(stacked)
    np.testing.assert_allclose(
        sig, [VP(0.1, 20.0).sigma(0.5), VP(0.2, 10.0).sigma(0.5)], rtol=1e-12
    )


def test_eps_score_round_trip(x64):
    # Data N(0, I) under VP stays N(0, I): score(x) = -x, eps = sigma x.
    s = VP()
    score = lambda x, t: -x  # noqa: E731
    eps = eps_from_score(score, schedule=s)
    x = jax.random.normal(jax.random.key(0), (3, 2, 4))
    t = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(eps(x, t), s.sigma(t)[:, None, None] * x, rtol=1e-12)
    np.testing.assert_allclose(score_from_eps(eps, schedule=s)(x, t), -x, rtol=1e-12)


def test_ddpm_rejects_bad_alphas():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDPM(jnp.array([0.5, 0.9]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDPM(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="betas"):
        DDPM.from_betas([0.1, 1.5])


def test_ddpm_sigma_keeps_relative_precision_near_zero_in_float32():
    # 1 - abar is about 1e-5 at the first of 4000 cosine steps: from a float32 abar it would be
    # off by about 1e-3 relative; from the float32 log abar it is exact to float32 rounding.
    T, s = 4000, 0.008
    f = [math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2 for u in range(3)]
    for i in (1, 2):
        one_minus_abar = 1 - np.prod([1 - min(1 - f[j + 1] / f[j], 0.999) for j in range(i)])
        sigma = float(DDPM.cosine(T=T).sigma(jnp.float32(i / T)))
        assert abs(sigma / math.sqrt(one_minus_abar) - 1) < 1e-6
