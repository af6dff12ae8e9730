"""Tests of the exact retrieval of nearest training items (mmh_jax.retrieval) against
scikit-learn's brute-force neighbours and a direct numpy calibrated l2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.neighbors import NearestNeighbors

from mmh_jax._src import knn as _knn
from mmh_jax.retrieval import CalibratedL2, Neighbours, calibrated_l2, nearest_neighbours


def _images(n, seed, rank=6, noise=0.05):
    """``[n, 3, 8, 8]`` low-rank images plus noise (a decaying spectrum, like real images)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((rank, 192))
    x = rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, 192))
    return x.reshape(n, 3, 8, 8)


def _sklearn(queries, references, k, metric="euclidean"):
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric)
    nn.fit(references.reshape(len(references), -1))
    return nn.kneighbors(queries.reshape(len(queries), -1))


def _one_device():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def data():
    return _images(37, seed=1), _images(300, seed=0)


@pytest.mark.parametrize("k", [1, 5])
def test_l2_matches_sklearn_float64(x64, data, k):
    queries, references = data
    ref_d, ref_i = _sklearn(queries, references, k)
    got = nearest_neighbours(queries, references, k=k)
    assert isinstance(got, Neighbours)
    assert got.distances.shape == got.indices.shape == (37, k)
    np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
    np.testing.assert_allclose(np.asarray(got.distances), ref_d, rtol=1e-12)


def test_l2_matches_sklearn_float32(data):
    queries, references = (x.astype(np.float32) for x in data)
    ref_d, ref_i = _sklearn(queries.astype(np.float64), references.astype(np.float64), 5)
    got = nearest_neighbours(queries, references, k=5)
    assert got.distances.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
    np.testing.assert_allclose(np.asarray(got.distances), ref_d, rtol=1e-5)


def test_cosine_matches_sklearn(x64, data):
    queries, references = data
    ref_d, ref_i = _sklearn(queries, references, 5, metric="cosine")
    got = nearest_neighbours(queries, references, k=5, metric="cosine")
    np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
    np.testing.assert_allclose(np.asarray(got.distances), ref_d, rtol=1e-10)


def test_sharded_equals_unsharded_and_tiling_equals_one_batch(data):
    """8 devices (the default here) == one device; 37 queries in chunks of 5 or 2 per device
    (1 step of 5 x 8 = 40 rows, or 3 of 16, padded) or of 8 on one device (not dividing 37) ==
    one batch."""
    queries, references = (x.astype(np.float32) for x in data)
    assert jax.device_count() == 8
    mesh8 = Mesh(np.array(jax.devices()), ("data",))
    one = nearest_neighbours(queries, references, k=5, batch_size=512, mesh=_one_device())
    for kwargs in (
        {"mesh": mesh8, "batch_size": 5},
        {"batch_size": 2},
        {"mesh": _one_device(), "batch_size": 8},
    ):
        got = nearest_neighbours(queries, references, k=5, **kwargs)
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(one.indices))
        np.testing.assert_array_equal(np.asarray(got.distances), np.asarray(one.distances))


def test_certified_search_sharded_matches_sklearn(x64, data):
    """The projection shortcut of mmh_jax._src.knn (forced: the data are small) under
    shard_map (8 devices) gives sklearn's neighbours."""
    queries, references = data
    ref_d, ref_i = _sklearn(queries, references, 5)
    got = nearest_neighbours(queries, references, k=5, projection_dim=8, batch_size=3)
    np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
    np.testing.assert_allclose(np.asarray(got.distances), ref_d, rtol=1e-12)


def _low_rank(n, seed, d=256, rank=128, noise=1e-3):
    """Image-like ``[n, d]`` data as in benchmarks/bench_retrieval.py, smaller: a rank-128
    signal with singular values ``i^-1`` plus isotropic noise."""
    rng = np.random.default_rng(seed)
    w, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((d, rank)))
    scale = np.arange(1, rank + 1) ** -1.0
    return (rng.standard_normal((n, rank)) * scale) @ w.T + noise * rng.standard_normal((n, d))


@pytest.fixture(scope="module")
def low_rank():
    references = _low_rank(2048, seed=0)
    queries = _low_rank(300, seed=1)
    rng = np.random.default_rng(2)
    queries[:30] = references[rng.choice(2048, 30, replace=False)] + 1e-4 * rng.standard_normal(
        (30, 256)
    )  # near-copies
    return queries, references


@pytest.mark.slow
def test_k1_takes_the_certified_search_and_matches_sklearn(x64, low_rank, monkeypatch):
    """k = 1 on image-like data with the default rule scaled down (subspace dimension 32 from
    128 features and 2,048 references instead of 256, 1,024 and 16,384): the probe accepts the
    certified search, the certificate answers (almost) every query itself, and the neighbours
    are scikit-learn's.  (With only 2k = 2 candidates ranked by exact distance, as before,
    about 40% of the probe and 70% of these queries were uncertified and k = 1 fell back to
    brute force.)"""
    monkeypatch.setattr(_knn, "PROJECTION_DIM", 32)
    monkeypatch.setattr(_knn, "_MIN_DIM", 128)
    monkeypatch.setattr(_knn, "_MIN_POINTS", 2048)
    queries, references = low_rank
    index = _knn.build_index(jnp.asarray(references), k=1, exclude_self=False)
    assert index.proj is not None and index.basis.shape == (256, 32)
    n_bad = sum(
        int(_knn.search_chunk(index, chunk, start, k=1, exclude_self=False)[2])
        for start, chunk, _ in _knn.iter_chunks(jnp.asarray(queries), 128)
    )
    assert n_bad <= 3
    for k in (1, 3):
        ref_d, ref_i = _sklearn(queries, references, k)
        got = nearest_neighbours(queries, references, k=k, batch_size=64)  # 8 devices
        np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
        # From the differences (scikit-learn's expansion loses digits on the near-copies).
        exact = np.linalg.norm(queries[:, None, :] - references[ref_i], axis=-1)
        np.testing.assert_allclose(np.asarray(got.distances), exact, rtol=1e-10)


@pytest.mark.slow
def test_calibrated_l2_matches_numpy(x64, data):
    queries, references = data
    queries = queries.copy()
    queries[3] = references[42] + 1e-3  # a near-copy: a small score
    n, alpha = 50, 0.5
    q = queries.reshape(37, -1)
    r = references.reshape(300, -1)
    dist = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    order = np.argsort(dist, axis=1)[:, :n]
    near = np.take_along_axis(dist, order, axis=1)
    expected = near[:, 0] / (alpha * near.mean(axis=1))
    got = calibrated_l2(queries, references)
    assert isinstance(got, CalibratedL2)
    np.testing.assert_allclose(np.asarray(got.score), expected, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(got.nearest), order[:, 0])
    np.testing.assert_allclose(np.asarray(got.distances), near, rtol=1e-10)
    assert int(np.argmin(np.asarray(got.score))) == 3 and float(got.score[3]) < 0.01
    assert np.all(np.asarray(got.score) <= 1 / alpha + 1e-12)
    other = calibrated_l2(queries, references, alpha=0.25)
    np.testing.assert_allclose(np.asarray(other.score), 2 * expected, rtol=1e-10)


def test_calibrated_l2_of_exact_copies_is_zero(x64):
    # Every item 50 times (shapes as in the test above: the same compiled search).
    references = np.repeat(_images(6, seed=3), 50, axis=0)
    got = calibrated_l2(references[::8][:37], references)
    np.testing.assert_array_equal(np.asarray(got.score), 0.0)


def test_bad_input(data):
    queries, references = data
    with pytest.raises(ValueError, match=r"\(3, 8, 8\).*\(3, 4, 16\)"):
        nearest_neighbours(queries, references.reshape(300, 3, 4, 16))
    with pytest.raises(ValueError, match="n=50 is larger than the training set.*40"):
        calibrated_l2(queries, references[:40])
    with pytest.raises(ValueError, match="k=301 is larger than the training set"):
        nearest_neighbours(queries, references, k=301)
    with pytest.raises(ValueError, match="k must be >= 1"):
        nearest_neighbours(queries, references, k=0)
    bad = references.copy()
    bad[5, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="references must be finite"):
        nearest_neighbours(queries, bad)
    bad = queries.copy()
    bad[0, 1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="queries must be finite"):
        calibrated_l2(bad, references)
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(queries, references, metric="l1")
    with pytest.raises(ValueError, match="alpha"):
        calibrated_l2(queries, references, alpha=0.0)
    with pytest.raises(ValueError, match="all-zero"):
        nearest_neighbours(np.zeros((2, 3, 8, 8)), references, metric="cosine")
