"""Tests of the exact neighbour search (mmh_jax._src.knn), brute force and certified, against
scikit-learn's brute-force neighbours in float64."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import skdim
from sklearn.neighbors import NearestNeighbors

from mmh_jax._src import knn as _knn
from mmh_jax._src.knn import build_index, iter_chunks, knn, search_chunk
from mmh_jax.lid.lpca import lpca


def _curved(n, d, dim, noise=1e-3, seed=0):
    """A ``dim``-dimensional curved manifold ``sin(z W + b)`` in R^d plus a little noise."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 1.0, (n, dim))
    x = np.sin(z @ rng.standard_normal((dim, d)) + rng.uniform(0, 2 * np.pi, d))
    return x + noise * rng.standard_normal((n, d))


def _sklearn(x, queries, k):
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x)
    return nn.kneighbors(queries)


def _uncertified_per_chunk(x, queries, *, k, batch_size, projection_dim):
    exclude_self = queries is None
    index = build_index(x, k=k, exclude_self=exclude_self, projection_dim=projection_dim)
    assert index.proj is not None
    qs = x if queries is None else queries
    return [
        int(search_chunk(index, chunk, start, k=k, exclude_self=exclude_self)[2])
        for start, chunk, _ in iter_chunks(qs, batch_size)
    ]


@pytest.mark.parametrize("with_queries", [False, True])
def test_certified_search_matches_sklearn(x64, with_queries):
    x = _curved(900, 96, 4)
    # Queries near (not on) data points, so that none is a data point itself.
    queries = x[:150] + 0.01 * _curved(150, 96, 4, seed=1) if with_queries else None
    k = 10
    ref_d, ref_i = _sklearn(x, queries, k)
    d, i = knn(x, queries, k=k, batch_size=128, projection_dim=12)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-10)
    # The certificate itself answered (almost) every query: the shortcut was really taken.
    bad = _uncertified_per_chunk(x, queries, k=k, batch_size=128, projection_dim=12)
    assert sum(bad) <= 0.02 * (x if queries is None else queries).shape[0]


@pytest.mark.parametrize("projection_dim, branch", [(3, "few"), (2, "all")])
def test_uncertified_queries_are_redone_by_brute_force(x64, projection_dim, branch):
    """A noisy 3-D manifold seen through a 3-D (2-D) projection: some (most) queries are not
    certified and are redone by brute force, a few rows of a chunk (more than one repair group
    of 16)."""
    x = _curved(500, 24, 3, noise=1e-1)
    k = 5
    bad = _uncertified_per_chunk(x, None, k=k, batch_size=64, projection_dim=projection_dim)
    if branch == "few":
        assert any(0 < b <= 16 for b in bad)
    else:
        assert any(b > 16 for b in bad)
    ref_d, ref_i = _sklearn(x, None, k)
    d, i = knn(x, k=k, batch_size=64, projection_dim=projection_dim)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-10)


def test_certified_search_keeps_duplicates_and_excludes_self(x64):
    x = _curved(600, 64, 3)
    x[100:104] = x[7]  # x[7] has 4 exact copies
    d, i = knn(x, k=6, projection_dim=10)
    i, d = np.asarray(i), np.asarray(d)
    assert not np.any(i == np.arange(600)[:, None])
    assert set(i[7, :4]) == {100, 101, 102, 103}
    np.testing.assert_array_equal(d[7, :4], 0.0)
    ref_d, _ = _sklearn(x, None, 6)
    np.testing.assert_allclose(d, ref_d, rtol=1e-10, atol=1e-12)


def test_k1_certified_search_excludes_self_and_matches_sklearn(x64):
    """k = 1 among the data points themselves through the certified search (forced): each
    point's nearest other point, as scikit-learn's, and certified (64 candidates ranked by exact
    distance; with 2k = 2, half of these points were not)."""
    rng = np.random.default_rng(5)
    w, _ = np.linalg.qr(rng.standard_normal((256, 96)))
    x = (rng.standard_normal((1024, 96)) / np.arange(1, 97)) @ w.T
    x += 1e-3 * rng.standard_normal(x.shape)
    ref_d, ref_i = _sklearn(x, None, 1)
    d, i = knn(x, k=1, batch_size=256, projection_dim=24)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-10)
    assert sum(_uncertified_per_chunk(x, None, k=1, batch_size=256, projection_dim=24)) <= 10


@pytest.fixture
def small_thresholds(monkeypatch):
    """Let the default rule pick the certified search from 2048 points (16384 in use)."""
    monkeypatch.setattr(_knn, "_MIN_POINTS", 2048)


@pytest.mark.slow
def test_lpca_on_high_dimensional_data_takes_the_certified_search(x64, small_thresholds):
    """d >= 1024: lpca's default search is the certified one, and its answers equal
    scikit-dimension's on scikit-learn's neighbours."""
    x = _curved(2048, 1024, 3)
    k = 20
    assert build_index(x, k=k, exclude_self=True).proj is not None
    got = np.asarray(lpca(x, k=k))
    sel = np.arange(0, 2048, 16)
    _, ref_i = _sklearn(x, None, k)
    ref = skdim.id.lPCA(ver="FO").fit_pw(x, precomputed_knn=ref_i[sel], n_neighbors=k)
    np.testing.assert_array_equal(got[sel], ref.dimension_pw_)


def test_probe_falls_back_to_brute_force_when_few_queries_are_certified(x64, small_thresholds):
    """Isotropic Gaussian data have no low-dimensional structure: a projection certifies
    almost nothing, the probe sees it, and the index is brute force."""
    x = np.random.default_rng(3).standard_normal((2048, 1024))
    assert build_index(x, k=10, exclude_self=True).proj is None
    assert build_index(x, k=10, exclude_self=True, projection_dim=256).proj is not None
    assert build_index(x[:, :1000], k=10, exclude_self=True).proj is None  # d < 1024


@pytest.mark.slow
def test_certified_search_under_jit_and_vmap(x64):
    x = _curved(300, 40, 3, noise=1e-1)
    eager = knn(x, k=5, batch_size=64, projection_dim=2)  # some queries need the repair loop
    assert sum(_uncertified_per_chunk(x, None, k=5, batch_size=64, projection_dim=2)) > 0
    jitted = jax.jit(lambda d: knn(d, k=5, batch_size=64, projection_dim=2))(x)
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(eager[1]))
    batched = jax.vmap(lambda d: knn(d, k=5, batch_size=64, projection_dim=2))(np.stack([x, 2 * x]))
    np.testing.assert_array_equal(np.asarray(batched[1][1]), np.asarray(eager[1]))
    np.testing.assert_allclose(np.asarray(batched[0][1]), 2 * np.asarray(eager[0]), rtol=1e-10)


@pytest.mark.parametrize("k, block", [(1, 4), (3, 7), (3, 50), (5, 1000)])
@pytest.mark.slow
def test_knn_in_blocks_matches_sklearn_under_jit_and_shard_map(x64, k, block):
    """Blocks dividing the data or not, one block, k above the last block's rows (7 leaves 1):
    scikit-learn's neighbours; the same inside shard_map on 8 devices (queries split)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mmh_jax._src.knn import knn_in_blocks
    from mmh_jax.scoring import data_mesh

    rng = np.random.default_rng(k + block)
    x = rng.standard_normal((50, 6))
    queries = np.concatenate([x[:3] + 1e-9, rng.standard_normal((13, 6))])  # near-duplicates too
    expected_index = _sklearn(x, queries, k)[1]
    expected_d2 = np.sum((x[expected_index] - queries[:, None]) ** 2, axis=-1)  # from differences
    d2, index = jax.jit(lambda q: knn_in_blocks(x, q, k=k, block=block))(queries)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(d2, expected_d2, rtol=1e-12)
    assert 0 < d2[0, 0] < 1e-16
    mesh = data_mesh()
    sharded = jax.jit(
        jax.shard_map(
            lambda data, q: knn_in_blocks(data, q, k=k, block=block),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
        )
    )
    d2_sharded, index_sharded = sharded(
        jax.device_put(x, NamedSharding(mesh, P())),
        jax.device_put(queries, NamedSharding(mesh, P("data"))),
    )
    np.testing.assert_array_equal(index_sharded, expected_index)
    np.testing.assert_allclose(d2_sharded, d2, rtol=1e-12)


def test_knn_in_blocks_argument_errors():
    from mmh_jax._src.knn import knn_in_blocks

    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="block"):
        knn_in_blocks(x, x, k=1, block=0)
    with pytest.raises(ValueError, match="k=5 is too large"):
        knn_in_blocks(x, x, k=5, block=2)
