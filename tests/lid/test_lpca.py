"""Tests of mmh_jax.lid.lpca against scikit-dimension and closed-form truths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skdim

from mmh_jax.lid.lpca import local_spectra, lpca


def _ball_with_noise(n=500, dim=4, extra=2, noise=0.05, seed=0):
    x = skdim.datasets.hyperBall(n=n, d=dim, radius=1.0, random_state=seed)
    rng = np.random.default_rng(seed + 1)
    return np.hstack([x, noise * rng.standard_normal((n, extra))])


def _plane_with_duplicates(n=600, ambient=5, n_copies=20, seed=0):
    """Uniform square (2-D) rotated into R^ambient, plus n_copies exact copies of one point
    placed off the plane (3 units away along a normal direction)."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((ambient, ambient)))
    plane = np.hstack([rng.uniform(-1, 1, (n, 2)), np.zeros((n, ambient - 2))]) @ rot.T
    off = np.zeros(ambient)
    off[2] = 3.0
    copies = np.repeat((off @ rot.T)[None], n_copies, axis=0)
    return np.vstack([plane, copies])


@pytest.mark.parametrize(
    "ver, skdim_kw, ours_kw, k",
    [
        ("FO", dict(alphaFO=0.05), dict(method="fo", alpha=0.05), 15),
        ("FO", dict(alphaFO=0.05), dict(method="fo", alpha=0.05), 40),
        ("FO", dict(alphaFO=0.2), dict(method="fo", alpha=0.2), 15),
        ("maxgap", {}, dict(method="maxgap"), 15),
        ("maxgap", {}, dict(method="maxgap"), 40),
        ("ratio", dict(alphaRatio=0.5), dict(method="ratio", ratio=0.5), 15),
        ("ratio", dict(alphaRatio=0.05), dict(method="ratio", ratio=0.05), 40),
    ],
)
@pytest.mark.slow
def test_matches_skdim_pointwise(x64, ver, skdim_kw, ours_kw, k):
    x = _ball_with_noise()
    ref = skdim.id.lPCA(ver=ver, **skdim_kw).fit_pw(x, n_neighbors=k).dimension_pw_
    got = np.asarray(lpca(x, k=k, **ours_kw))
    assert got.shape == (x.shape[0],)
    assert np.issubdtype(got.dtype, np.integer)
    np.testing.assert_array_equal(got, ref)


def test_matches_skdim_high_dim_gram_path(x64):
    """k < d: the k x k Gram path, on skdim's 3-D twin-peaks manifold (in R^4), linearly
    embedded in R^40 with a little noise."""
    x = skdim.datasets.hyperTwinPeaks(n=400, d=3, random_state=0)
    rng = np.random.default_rng(0)
    x = x @ rng.standard_normal((x.shape[1], 40)) + 0.01 * rng.standard_normal((400, 40))
    for ver, kw in [("FO", dict(method="fo")), ("ratio", dict(method="ratio", ratio=0.05))]:
        ref = skdim.id.lPCA(ver=ver).fit_pw(x, n_neighbors=25).dimension_pw_
        got = np.asarray(lpca(x, k=25, **kw))
        np.testing.assert_array_equal(got, ref)


def test_float32_matches_skdim_mostly():
    x = _ball_with_noise().astype(np.float32)
    got = lpca(x, k=40)
    assert got.dtype == jnp.int32
    ref = skdim.id.lPCA(ver="FO").fit_pw(x.astype(np.float64), n_neighbors=40).dimension_pw_
    assert np.mean(np.asarray(got) == ref) > 0.98


@pytest.mark.slow
def test_linear_subspace_exact_dimension(x64):
    """Uniform points of a 3-D cube in a linear subspace of R^8: every method reads 3
    (numerical zeros floored; uniform so that "paper"'s restricted neighbourhoods are all big)."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (300, 3)) @ rng.standard_normal((3, 8))
    for kw in (dict(method="fo", alpha=1e-6), dict(method="maxgap"), dict(method="paper")):
        np.testing.assert_array_equal(np.asarray(lpca(x, k=30, **kw)), 3)


def test_queries_and_self_exclusion(x64):
    x = _ball_with_noise(n=300)
    # explicit queries = the data: each point is then its own nearest neighbour, so the
    # neighbourhood is itself + its k-1 nearest others, i.e. the same as fit_pw with k - 1 plus
    # the point; check against a direct numpy PCA of that neighbourhood.
    got = np.asarray(lpca(x, x[:20], k=30))
    for i in range(20):
        d2 = np.sum((x - x[i]) ** 2, axis=1)
        nb = x[np.argsort(d2)[:30]]
        ev = np.linalg.eigvalsh(np.cov(nb.T))[::-1]
        assert got[i] == np.sum(ev > 0.05 * ev[0])
    # spectra: variance scaling as sklearn PCA (n - 1 denominator)
    ev, m = local_spectra(x, x[:3], k=30)
    nb = x[np.argsort(np.sum((x - x[0]) ** 2, axis=1))[:30]]
    np.testing.assert_allclose(
        np.asarray(ev[0]), np.linalg.eigvalsh(np.cov(nb.T))[::-1], rtol=1e-10
    )
    np.testing.assert_array_equal(np.asarray(m), 30)


def test_paper_duplicates_read_zero_and_manifold_dimension_elsewhere(x64):
    x = _plane_with_duplicates()
    got = np.asarray(lpca(x, k=100, method="paper"))
    np.testing.assert_array_equal(got[-20:], 0)
    np.testing.assert_array_equal(got[:-20], 2)


def test_paper_float32_and_sampled_distance_percentile():
    x = _plane_with_duplicates().astype(np.float32)
    got = np.asarray(lpca(x, k=100, method="paper", distance_max_points=300, key=jax.random.key(0)))
    np.testing.assert_array_equal(got[-20:], 0)
    np.testing.assert_array_equal(got[:-20], 2)
    with pytest.raises(ValueError, match="key is required"):
        lpca(x, k=100, method="paper", distance_max_points=300)


@pytest.mark.slow
def test_paper_single_copy_and_external_queries(x64):
    x = _plane_with_duplicates(n_copies=2)
    got = np.asarray(lpca(x, k=50, method="paper"))
    np.testing.assert_array_equal(got[-2:], 0)  # a pair of copies is a point mass too
    q = np.vstack([x[-1], x[0]])  # a copy of the duplicated point, a plane point
    np.testing.assert_array_equal(np.asarray(lpca(x, q, k=50, method="paper")), [0, 2])
    # a single isolated data point: as a data point it has no neighbour within rho and uses its
    # whole kNN; as an explicit query it finds itself in the data, a copy, and reads 0
    z = np.full((1, x.shape[1]), 10.0)
    xz = np.vstack([x, z])
    assert np.asarray(lpca(xz, k=50, method="paper"))[-1] > 0
    np.testing.assert_array_equal(np.asarray(lpca(xz, z, k=50, method="paper")), [0])


def test_paper_without_restriction_is_a_percentile_count(x64):
    """distance_q = 0 means radius ~ 0: no neighbour within it for distinct points, so the full
    k-neighbourhood (plus the point) is used and the count is #{lambda > tau} with tau the q-th
    percentile of the pooled variances -- checked against a direct numpy computation."""
    x = _ball_with_noise(n=200, dim=3, extra=1, noise=0.1)
    k, qq = 20, 30.0
    got = np.asarray(lpca(x, k=k, method="paper", q=qq, distance_q=0.0))
    evs = []
    for i in range(len(x)):
        d2 = np.sum((x - x[i]) ** 2, axis=1)
        order = np.argsort(d2)
        nb = x[order[: k + 1]]  # the point itself + its k nearest
        evs.append(np.linalg.eigvalsh(np.cov(nb.T))[::-1])
    evs = np.array(evs)
    tau = np.percentile(evs, qq)
    np.testing.assert_array_equal(got, np.sum(evs > tau, axis=1))


def test_all_duplicates_read_zero(x64):
    x = np.ones((30, 4))
    for method in ("fo", "maxgap", "ratio", "paper"):
        np.testing.assert_array_equal(np.asarray(lpca(x, k=5, method=method)), 0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(k=600), ValueError, "k"),
        (dict(k=500), ValueError, "k"),  # k must be < n when queries is None
        (dict(k=0), ValueError, "k"),
        (dict(k=2.5), TypeError, "k"),
        (dict(method="pca"), ValueError, "method"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(ratio=0.0), ValueError, "ratio"),
        (dict(q=101.0), ValueError, "q"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    x = np.random.default_rng(0).standard_normal((500, 3))
    with pytest.raises(exc, match=match):
        lpca(x, **kwargs)


def test_bad_data():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="data"):
        lpca(rng.standard_normal(10), k=2)
    bad = rng.standard_normal((10, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        lpca(bad, k=2)
    x = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="queries"):
        lpca(x, rng.standard_normal((4, 2)), k=2)
    with pytest.raises(ValueError, match="queries"):
        lpca(x, rng.standard_normal(3), k=2)
    with pytest.raises(TypeError, match="data"):
        lpca(np.array([["a", "b"], ["c", "d"]]), k=1)


_BENCHMARK = skdim.datasets.BenchmarkManifolds(random_state=0).generate(n=300)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # skdim maxgap
@pytest.mark.parametrize("name", sorted(_BENCHMARK))
@pytest.mark.slow
def test_matches_skdim_on_its_benchmark_manifolds(x64, name):
    """scikit-dimension's 24 benchmark manifolds (ambient dimension 3 to 96, so both the
    covariance path (k > d) and the Gram path (k <= d)): "fo" and "ratio" agree pointwise with
    ``lPCA.fit_pw``; "maxgap" too where no eigenvalue is structurally zero (k - 1 >= d, see the
    docstring for the other case)."""
    x, k = _BENCHMARK[name], 30
    cases = [
        ("FO", {}, dict(method="fo")),
        ("ratio", dict(alphaRatio=0.05), dict(method="ratio", ratio=0.05)),
    ]
    if k - 1 >= x.shape[1]:
        cases.append(("maxgap", {}, dict(method="maxgap")))
    for ver, skdim_kw, ours_kw in cases:
        ref = skdim.id.lPCA(ver=ver, **skdim_kw).fit_pw(x, n_neighbors=k).dimension_pw_
        np.testing.assert_array_equal(np.asarray(lpca(x, k=k, **ours_kw)), ref, err_msg=ver)
