"""FLIPD against closed forms: Gaussians on k-dimensional affine subspaces have LID k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.distributions import SubspaceGaussianMixture
from mmh_jax.lid import flipd, flipd_curve, flipd_knee
from mmh_jax.schedules import DDPM, EDM, VE, VP

SCHEDULES = {"vp": VP, "ddpm": DDPM.linear, "ve": VE, "edm": EDM}  # built inside the x64 fixture
SMALL_T0 = 1e-3  # sigma(t0) about 0.01 (EDM: 0.002, its sigma_min)


def single_gaussian_flipd(mix, x, t0, schedule):
    """Eq. 6 worked out by hand for one Gaussian N(mu, U diag(lam) U^T)."""
    psi, s2 = float(schedule.psi(t0)), float(schedule.sigma(t0)) ** 2
    lam = np.asarray(mix.scales[0]) ** 2
    z = (np.asarray(x) - np.asarray(mix.means[0])) @ np.asarray(mix.bases[0])
    k = int((lam > 0).sum())
    denom = psi**2 * lam + s2
    return k - np.sum((s2 / denom)[lam > 0]) + s2 * psi**2 * np.sum(z**2 / denom**2, axis=1)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("d,dims", [(2, [0, 1]), (5, [2]), (10, [0, 3, 7, 10])])
def test_exact_flipd_recovers_subspace_dimension(x64, name, d, dims):
    schedule = SCHEDULES[name]()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(d), ambient_dim=d, dims=dims)
    x, comp = mix.sample(16, key=jax.random.key(1))
    est = flipd(mix.score(schedule=schedule), x, t0=SMALL_T0, schedule=schedule, trace="exact")
    np.testing.assert_allclose(est, mix.dims[comp], atol=0.05)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.slow
def test_exact_flipd_equals_hand_computed_formula(x64, name):
    schedule = SCHEDULES[name]()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(3), ambient_dim=6, dims=[4])
    x, _ = mix.sample(8, key=jax.random.key(4))
    t0 = 0.3
    est = flipd(
        mix.score(schedule=schedule), x, t0=t0, schedule=schedule, trace="exact", chunk_size=4
    )
    np.testing.assert_allclose(
        est, single_gaussian_flipd(mix, x, t0, schedule), rtol=1e-9, atol=1e-9
    )


@pytest.mark.slow
def test_hutchinson_is_unbiased_with_known_variance_and_converges(x64):
    # For symmetric J, a Rademacher probe has Var(v^T J v) = 2 (||J||_F^2 - sum_i J_ii^2).
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(5), ambient_dim=6, dims=[3])
    x, _ = mix.sample(1, key=jax.random.key(6))
    t0 = 0.2
    score = mix.score(schedule=schedule)
    exact = float(flipd(score, x, t0=t0, schedule=schedule, trace="exact")[0])
    jac = jax.jacfwd(lambda y: score(y[None], jnp.array([t0]))[0])(float(schedule.psi(t0)) * x[0])
    s4 = float(schedule.sigma(t0)) ** 4
    var1 = 2 * s4 * (float(jnp.sum(jac**2)) - float(jnp.sum(jnp.diag(jac) ** 2)))

    reps = 400
    xs = jnp.repeat(x, reps, axis=0)  # one key per row: independent estimates
    keys = jax.random.split(jax.random.key(7), reps)
    errors = {}
    for n in (1, 16, 256):
        est = np.asarray(
            flipd(score, xs, t0=t0, schedule=schedule, key=keys, num_probes=n, chunk_size=64)
        )
        assert abs(est.mean() - exact) < 4 * np.sqrt(var1 / n / reps)
        np.testing.assert_allclose(est.var(), var1 / n, rtol=0.25)
        errors[n] = np.sqrt(np.mean((est - exact) ** 2))
    # 1/sqrt(num_probes) rate: 16x the probes, 4x smaller error.
    assert 3.0 < errors[1] / errors[16] < 5.3
    assert 3.0 < errors[16] / errors[256] < 5.3


@pytest.mark.slow
def test_gaussian_probes_are_unbiased(x64):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(8), ambient_dim=4, dims=[2])
    x, _ = mix.sample(1, key=jax.random.key(9))
    score = mix.score(schedule=schedule)
    exact = flipd(score, x, t0=0.1, schedule=schedule, trace="exact")
    est = flipd(
        score,
        x,
        t0=0.1,
        schedule=schedule,
        key=jax.random.key(0),
        num_probes=20000,
        probe="gaussian",
    )
    np.testing.assert_allclose(est, exact, atol=0.1)


@pytest.mark.slow
def test_estimate_of_a_point_does_not_depend_on_batch_or_chunking(x64):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(1), ambient_dim=5, dims=[2, 0])
    x, _ = mix.sample(6, key=jax.random.key(2))
    keys = jax.random.split(jax.random.key(3), 6)
    kw = dict(schedule=schedule, num_probes=10)
    full = flipd(mix.score(schedule=schedule), x, t0=0.05, key=keys, chunk_size=3, **kw)
    alone = flipd(mix.score(schedule=schedule), x[4:5], t0=0.05, key=keys[4:5], chunk_size=10, **kw)
    np.testing.assert_allclose(full[4], alone[0], rtol=1e-12)


@pytest.mark.slow
def test_image_shaped_events(x64):
    # A Gaussian on a subspace of R^(2x3x3), scored through reshapes, as a UNet would see it.
    schedule = DDPM.linear()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(4), ambient_dim=18, dims=[5])
    flat_score = mix.score(schedule=schedule)
    score = lambda x, t: flat_score(x.reshape(x.shape[0], -1), t).reshape(x.shape)  # noqa: E731
    x, _ = mix.sample(3, key=jax.random.key(5))
    est = flipd(
        score, x.reshape(3, 2, 3, 3), t0=1e-3, schedule=schedule, trace="exact", chunk_size=7
    )
    np.testing.assert_allclose(est, 5.0, atol=0.05)


@pytest.mark.slow
def test_jit_vmap_and_new_shapes(dtype):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(
        key=jax.random.key(0), ambient_dim=4, dims=[1], dtype=jnp.dtype(dtype)
    )
    score = mix.score(schedule=schedule)

    @jax.jit
    def run(x, key):
        return flipd(score, x, t0=1e-3, schedule=schedule, key=key, num_probes=64)

    for n in (3, 5):
        x, _ = mix.sample(n, key=jax.random.key(n))
        out = run(x, jax.random.key(0))
        assert out.shape == (n,) and out.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(out, 1.0, atol=0.3)
    x, _ = mix.sample(6, key=jax.random.key(1))
    batched = jax.vmap(lambda xb: flipd(score, xb, t0=1e-3, schedule=schedule, trace="exact"))(
        x.reshape(2, 3, 4)
    )
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched, 1.0, atol=0.05)


@pytest.mark.slow
def test_curve_and_knee(x64):
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(2), ambient_dim=8, dims=[0, 2, 5])
    x, comp = mix.sample(9, key=jax.random.key(3))
    ts = jnp.geomspace(1e-4, 0.5, 25)
    curve = flipd_curve(mix.score(schedule=schedule), x, ts=ts, schedule=schedule, trace="exact")
    assert curve.shape == (9, 25)
    np.testing.assert_allclose(
        curve[:, 7],
        flipd(mix.score(schedule=schedule), x, t0=ts[7], schedule=schedule, trace="exact"),
        rtol=1e-10,
    )
    knee = flipd_knee(ts, curve)
    np.testing.assert_allclose(knee.lid, mix.dims[comp], atol=0.05)
    # The flattest stretch of a curve that settles after a swing at small t0.
    ts2 = jnp.geomspace(1e-4, 0.5, 12)
    fake = jnp.array([[30.0, 18.0, 9.0, 4.0, 3.1, 3.0, 3.0, 3.02, 3.4, 4.0, 2.0, 0.5]])
    k = flipd_knee(ts2, fake)
    assert int(k.index[0]) == 4 and abs(float(k.lid[0]) - 3.0) < 0.1


def _score(x, t):
    return -x


def test_bad_input_raises_clear_errors():
    s = VP()
    x = jnp.ones((4, 3))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"x must have shape \[batch"):
        flipd(_score, jnp.ones(3), t0=0.1, schedule=s, key=key)
    with pytest.raises(ValueError, match="score_fn.*shape"):
        flipd(lambda x, t: x[:, :2], x, t0=0.1, schedule=s, key=key)
    for bad in (0.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="t0 must lie in"):
            flipd(_score, x, t0=bad, schedule=s, key=key)
    with pytest.raises(ValueError, match="t0 must be a scalar or have shape"):
        flipd(_score, x, t0=jnp.full((3,), 0.1), schedule=s, key=key)
    with pytest.raises(ValueError, match="non-finite"):
        flipd(_score, x.at[0, 0].set(jnp.nan), t0=0.1, schedule=s, key=key)
    with pytest.raises(ValueError, match="key is required"):
        flipd(_score, x, t0=0.1, schedule=s)
    with pytest.raises(ValueError, match="trace must be one of"):
        flipd(_score, x, t0=0.1, schedule=s, key=key, trace="exactly")
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        flipd(_score, x, t0=0.1, schedule=s, key=key, num_probes=0)
    with pytest.raises(TypeError, match="floating-point"):
        flipd(_score, jnp.ones((4, 3), jnp.int32), t0=0.1, schedule=s, key=key)
    with pytest.raises(ValueError, match="ts must be strictly increasing"):
        flipd_knee(jnp.array([0.1, 0.05, 0.2, 0.3]), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="ts must lie in"):
        flipd_curve(_score, x, ts=jnp.array([0.1, 2.0]), schedule=s, trace="exact")
    for trace in ("exact", "hutchinson"):
        with pytest.raises(TypeError, match="schedule must be a mmh_jax.schedules.Schedule"):
            flipd(_score, x, t0=1e-3, schedule=None, key=key, trace=trace)
    with pytest.raises(TypeError, match="schedule must be"):
        flipd_curve(_score, x, ts=jnp.array([0.1, 0.2]), schedule="vp", trace="exact")


@pytest.mark.slow
def test_sharded_batch_gives_the_same_estimates(x64):
    # Per-sample keys make a point's estimate independent of how the batch is laid out.
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (see conftest.py)"
    schedule = VP()
    mix = SubspaceGaussianMixture.random(key=jax.random.key(11), ambient_dim=4, dims=[2, 0])
    x, _ = mix.sample(16, key=jax.random.key(12))
    keys = jax.random.split(jax.random.key(13), 16)
    score = mix.score(schedule=schedule)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    run = jax.jit(lambda x, k: flipd(score, x, t0=0.01, schedule=schedule, key=k, num_probes=4))
    sharded = run(jax.device_put(x, sharding), jax.device_put(keys, sharding))
    np.testing.assert_allclose(sharded, run(x, keys), rtol=1e-10)
    assert len(sharded.sharding.device_set) == 8
