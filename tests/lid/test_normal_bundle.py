"""Normal bundle against closed forms: rank of the score matrix is d - k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.distributions import SubspaceGaussianMixture
from mmh_jax.lid import lid_from_singular_values, normal_bundle, percentile_threshold
from mmh_jax.schedules import DDPM, EDM, VE, VP

SCHEDULES = {"vp": VP, "ddpm": DDPM.linear, "ve": VE, "edm": EDM}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("d,dims", [(3, [0, 1, 2, 3]), (10, [0, 4, 9, 10])])
def test_returns_exactly_k(x64, name, d, dims):
    schedule = SCHEDULES[name]()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(d), ambient_dim=d, dims=dims)
    x, comp = mix.sample(12, key=jax.random.key(1))
    result = normal_bundle(
        mix.score(schedule=schedule), x, t0=1e-3, schedule=schedule, key=jax.random.key(2)
    )
    np.testing.assert_array_equal(result.lid, mix.dims[comp])
    assert result.singular_values.shape == (12, d)
    assert bool(jnp.all(jnp.diff(result.singular_values, axis=1) <= 0))


@pytest.mark.slow
def test_singular_values_are_on_the_noise_scale(x64):
    # Normal directions read ~1 (sigma * score is unit noise); a tangent direction with
    # variance lam reads ~sigma^2 / (psi^2 lam + sigma^2).
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(0), ambient_dim=6, dims=[2])
    x, _ = mix.sample(1, key=jax.random.key(1))
    t0 = 0.05
    res = normal_bundle(
        mix.score(schedule=schedule),
        x,
        t0=t0,
        schedule=schedule,
        key=jax.random.key(3),
        num_scores=20000,
    )
    psi, s2 = schedule.psi(t0), schedule.sigma(t0) ** 2
    tangent = np.sort(s2 / (psi**2 * np.asarray(mix.scales[0]) ** 2 + s2))[::-1]
    np.testing.assert_allclose(res.singular_values[0, :4], 1.0, atol=0.03)
    np.testing.assert_allclose(res.singular_values[0, 4:], tangent, rtol=0.03)


@pytest.mark.slow
def test_centering_keeps_the_dimension_an_uncentred_matrix_loses(x64):
    # Far from the component's mean the score has a shared component along the manifold:
    # uncentred it adds one singular value and the gap rule loses one dimension.
    schedule = VP()
    mix = SubspaceGaussianMixture.random(
        key=jax.random.key(1), ambient_dim=5, dims=[2], scale_range=(1.0, 1.0)
    )
    x = mix.means[0] + 2.5 * mix.bases[0][:, :1].T  # on the plane, 2.5 std from the mean
    kw = dict(schedule=schedule, key=jax.random.key(4), num_scores=200)
    assert (
        int(normal_bundle(mix.score(schedule=schedule), x, t0=1e-3, center=False, **kw).lid[0]) == 1
    )
    assert (
        int(normal_bundle(mix.score(schedule=schedule), x, t0=1e-3, center=True, **kw).lid[0]) == 2
    )


@pytest.mark.slow
def test_global_percentile_threshold(x64):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(5), ambient_dim=8, dims=[1, 6])
    x, comp = mix.sample(20, key=jax.random.key(6))
    res = normal_bundle(
        mix.score(schedule=schedule),
        x,
        t0=1e-3,
        schedule=schedule,
        key=jax.random.key(7),
        threshold=0.1,
    )
    np.testing.assert_array_equal(res.lid, mix.dims[comp])
    # The n_t tangent singular values are the smallest of all N: the percentile half-way
    # between order statistics n_t - 1 and n_t separates them from the normal ones.
    n_t, n = int(jnp.sum(mix.dims[comp])), res.singular_values.size
    q = 100 * (n_t - 0.5) / (n - 1)
    tau = percentile_threshold(res.singular_values, q=q)
    np.testing.assert_allclose(tau, np.percentile(np.asarray(res.singular_values), q))
    np.testing.assert_array_equal(
        lid_from_singular_values(res.singular_values, threshold=tau, space="normal"), mix.dims[comp]
    )


@pytest.mark.slow
def test_chunking_and_batch_do_not_change_a_point(x64):
    schedule = DDPM.linear()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(8), ambient_dim=4, dims=[2])
    x, _ = mix.sample(5, key=jax.random.key(9))
    keys = jax.random.split(jax.random.key(10), 5)
    full = normal_bundle(
        mix.score(schedule=schedule), x, t0=0.01, schedule=schedule, key=keys, chunk_size=5
    )
    alone = normal_bundle(
        mix.score(schedule=schedule),
        x[2:3],
        t0=0.01,
        schedule=schedule,
        key=keys[2:3],
        chunk_size=16,
    )
    # equal up to the float64 rounding of Gram sums taken in another order (chunks of 5 vs 16),
    # which is relative to the largest singular value
    s_max = float(alone.singular_values[0, 0])
    np.testing.assert_allclose(
        full.singular_values[2], alone.singular_values[0], rtol=1e-10, atol=1e-10 * s_max
    )


@pytest.mark.slow
def test_float32_and_jit(dtype):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(
        key=jax.random.key(0), ambient_dim=6, dims=[0, 3], dtype=jnp.dtype(dtype)
    )
    x, comp = mix.sample(8, key=jax.random.key(1))
    run = jax.jit(
        lambda x, key: normal_bundle(
            mix.score(schedule=schedule), x, t0=1e-3, schedule=schedule, key=key
        )
    )
    res = run(x, jax.random.key(2))
    assert res.singular_values.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(res.lid, mix.dims[comp])


def test_bad_input():
    s = VP()
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="key is required"):
        normal_bundle(lambda x, t: -x, x, t0=0.1, schedule=s, key=None)
    with pytest.raises(ValueError, match="threshold must be 'gap' or a float"):
        normal_bundle(
            lambda x, t: -x, x, t0=0.1, schedule=s, key=jax.random.key(0), threshold="median"
        )
    with pytest.raises(ValueError, match="score_fn"):
        normal_bundle(lambda x, t: x.sum(1), x, t0=0.1, schedule=s, key=jax.random.key(0))
    with pytest.raises(ValueError, match="t0 must lie in"):
        normal_bundle(lambda x, t: -x, x, t0=0.0, schedule=s, key=jax.random.key(0))
    with pytest.raises(TypeError, match="schedule must be a mmh_jax.schedules.Schedule"):
        normal_bundle(lambda x, t: -x, x, t0=0.1, schedule=None, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_scores must be >= 2"):
        normal_bundle(lambda x, t: -x, x, t0=0.1, schedule=s, key=jax.random.key(0), num_scores=1)
    with pytest.raises(ValueError, match="space must be one of"):
        lid_from_singular_values(jnp.ones((2, 3)), threshold=0.5, space="both")
    with pytest.raises(ValueError, match="non-negative"):
        percentile_threshold(jnp.array([1.0, -1.0]))
