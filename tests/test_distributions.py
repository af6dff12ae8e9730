import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmh_jax.distributions import SubspaceGaussianMixture
from mmh_jax.schedules import VP


@pytest.mark.slow
def test_log_prob_matches_scipy_mixture(x64):
    mix = SubspaceGaussianMixture.random(
        key=jax.random.key(0), ambient_dim=4, dims=[2, 4, 0], separation=3.0
    )
    s, t = VP(), 0.3
    psi, sigma = float(s.psi(t)), float(s.sigma(t))
    y = np.asarray(jax.random.normal(jax.random.key(1), (5, 4)))
    dens = 0.0
    for j in range(3):
        u, sc = np.asarray(mix.bases[j]), np.asarray(mix.scales[j])
        cov = psi**2 * (u * sc**2) @ u.T + sigma**2 * np.eye(4)
        dens = dens + np.asarray(mix.weights[j]) * stats.multivariate_normal(
            psi * np.asarray(mix.means[j]), cov
        ).pdf(y)
    ours = jax.vmap(lambda v: mix.log_prob_t(v, t, schedule=s))(jnp.asarray(y))
    np.testing.assert_allclose(ours, np.log(dens), rtol=1e-10)


@pytest.mark.slow
def test_samples_lie_on_their_subspaces(x64):
    mix = SubspaceGaussianMixture.random(key=jax.random.key(0), ambient_dim=6, dims=[1, 3])
    x, comp = mix.sample(200, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(mix.dims), [1, 3])
    for j in range(2):
        pts = np.asarray(x[comp == j] - mix.means[j])
        assert np.linalg.matrix_rank(pts, tol=1e-8) == [1, 3][j]
