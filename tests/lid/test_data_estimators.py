"""Tests of the kNN-distance LID estimators (Levina-Bickel MLE, TwoNN) and the shared kNN."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skdim

from mmh_jax._src.knn import knn, masked_percentile
from mmh_jax.lid.data import mle, twonn
from mmh_jax.lid.lpca import lpca


def _sphere(n=500, dim=4, pad=0, noise=0.0, seed=0):
    x = skdim.datasets.hyperSphere(n=n, d=dim, random_state=seed)  # S^dim in R^(dim+1)
    if pad:
        x = np.hstack([x, np.zeros((n, pad))])
    if noise:
        x = x + noise * np.random.default_rng(seed + 1).standard_normal(x.shape)
    return x


@pytest.mark.parametrize("pad", [0, 30])  # skdim uses a kd-tree / brute force respectively
@pytest.mark.parametrize("unbiased", [False, True])
def test_mle_matches_skdim(x64, pad, unbiased):
    x = _sphere(pad=pad, noise=1e-3 if pad else 0.0)
    ref = skdim.id.MLE(unbiased=unbiased).fit(x, n_neighbors=20).dimension_pw_
    got = np.asarray(mle(x, k=20, unbiased=unbiased))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_mle_closed_form_and_queries(x64):
    x = _sphere(n=300)
    got = np.asarray(mle(x, x[:5], k=10))  # explicit queries: the point itself is at distance 0
    np.testing.assert_array_equal(got, 0.0)
    q = x[:5] + 1e-3
    d = np.sqrt(((q[:, None, :] - x[None]) ** 2).sum(-1))
    t = np.sort(d, axis=1)[:, :10]
    expect = 9 / np.log(t[:, -1:] / t).sum(1)
    np.testing.assert_allclose(np.asarray(mle(x, q, k=10)), expect, rtol=1e-10)


def test_mle_and_lpca_read_a_cluster_of_duplicates_as_dimension_zero(x64):
    # every neighbour at distance 0 (T_k = 0): 0, as lpca reads it, never NaN
    x = np.vstack([np.ones((30, 4)), _sphere(n=30, dim=3)[:, :4]])
    for unbiased in (False, True):
        np.testing.assert_array_equal(np.asarray(mle(x[:30], k=5, unbiased=unbiased)), 0.0)
    got = np.asarray(mle(x, k=5))
    np.testing.assert_array_equal(got[:30], 0.0)
    assert np.all(np.isfinite(got[30:])) and np.all(got[30:] > 0)
    np.testing.assert_array_equal(np.asarray(lpca(x[:30], k=5)), 0)


def test_mle_float32_and_dimension():
    x = _sphere(n=1000, dim=3).astype(np.float32)
    got = np.asarray(mle(x, k=20))
    assert got.dtype == np.float32
    assert abs(np.median(got) - 3.0) < 0.5


@pytest.mark.parametrize("pad", [0, 30])
@pytest.mark.parametrize(
    "method, fraction", [("linear", 0.1), ("linear", 0.3), ("mle", 0.1), ("mle", 0.0)]
)
def test_twonn_matches_skdim(x64, pad, method, fraction):
    x = _sphere(pad=pad, noise=1e-3 if pad else 0.0)
    ref = skdim.id.TwoNN(discard_fraction=fraction, method=method).fit(x).dimension_
    got = float(twonn(x, discard_fraction=fraction, method=method))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_twonn_drops_duplicates_like_skdim(x64):
    x = _sphere(n=400)
    x = np.vstack([x, x[:5]])  # 5 duplicated points: 10 points with r1 = 0
    with pytest.warns(UserWarning):
        ref = skdim.id.TwoNN().fit(x).dimension_
    np.testing.assert_allclose(float(twonn(x)), ref, rtol=1e-6)


def test_twonn_dimension_float32():
    x = skdim.datasets.hyperBall(n=1000, d=5, random_state=0).astype(np.float32)
    assert abs(float(twonn(x)) - 5.0) < 0.6


def test_knn_matches_bruteforce(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 7))
    d, i = knn(x, k=6, batch_size=64)  # several chunks, last one padded
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    order = np.argsort(full, axis=1)[:, :6]
    np.testing.assert_array_equal(np.asarray(i), order)
    np.testing.assert_allclose(np.asarray(d), np.take_along_axis(full, order, 1), rtol=1e-12)


def test_masked_percentile_matches_numpy(x64):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((30, 7))
    mask = rng.uniform(size=v.shape) < 0.6
    for q in (0.0, 10.0, 37.5, 100.0):
        np.testing.assert_allclose(
            float(masked_percentile(v, mask, q)), np.percentile(v[mask], q), rtol=1e-12
        )


def test_bad_inputs():
    x = np.random.default_rng(0).standard_normal((50, 3))
    with pytest.raises(ValueError, match="k"):
        mle(x, k=50)
    with pytest.raises(ValueError, match="k"):
        mle(x, k=1)
    with pytest.raises(TypeError, match="k"):
        mle(x, k="5")
    with pytest.raises(ValueError, match="discard_fraction"):
        twonn(x, discard_fraction=1.0)
    with pytest.raises(ValueError, match="method"):
        twonn(x, method="ols")
    with pytest.raises(ValueError, match="discard_fraction"):
        twonn(x, discard_fraction=0.0, method="linear")
    with pytest.raises(ValueError, match="data"):
        twonn(x[:, 0])
    with pytest.raises(ValueError, match="queries"):
        mle(x, np.zeros((2, 4)), k=5)


@pytest.mark.slow
def test_jit_and_vmap_agree_with_eager():
    rng = np.random.default_rng(0)
    x = np.hstack([rng.standard_normal((200, 3)), 1e-4 * rng.standard_normal((200, 2))]).astype(
        np.float32
    )
    np.testing.assert_allclose(jax.jit(twonn)(x), twonn(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda d: mle(d, k=10))(x), mle(x, k=10), rtol=1e-5)
    batched = jax.vmap(lambda d: mle(d, k=10))(jnp.stack([x, 3 * x]))
    np.testing.assert_allclose(batched[1], mle(x, k=10), rtol=1e-4)  # MLE is scale-free
    for method in ("fo", "paper"):
        eager = lpca(x, k=20, method=method)
        np.testing.assert_array_equal(
            jax.jit(functools.partial(lpca, k=20, method=method))(x), eager
        )
    np.testing.assert_array_equal(lpca(x, k=20), 3)
