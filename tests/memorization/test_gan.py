"""Jacobian-rank LID of StyleGAN2 samples against the SVD of the full Jacobian (jax.jacfwd) and
against generators whose rank is known by construction."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.lid import lid_from_singular_values, percentile_threshold
from mmh_jax.memorization import gan_lid
from mmh_jax.models import load_stylegan2

FIXTURES = Path(__file__).parents[1] / "models" / "fixtures" / "stylegan2"


@pytest.fixture(scope="module")
def generator():
    model = load_stylegan2(FIXTURES / "skip_cond.pkl")
    ref = np.load(FIXTURES / "skip_cond.npz")
    return model.module, model.params, jnp.asarray(ref["z"]), jnp.asarray(ref["c"])


def _jacobian_spectra(fn, latents, c):
    """Singular values of the Jacobians of ``fn(latent [1, d], c [1, ...])`` sample by sample."""
    jac = jax.jit(
        jax.vmap(lambda v, ci: jax.jacfwd(lambda v: fn(v[None], ci[None])[0].reshape(-1))(v))
    )(latents, c)
    return np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)


def _with(params, path, update):
    """``params`` with the leaf at ``path`` replaced by ``update(leaf)``."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    new = [update(leaf) if "/".join(k.key for k in p) == path else leaf for p, leaf in flat]
    return jax.tree.unflatten(jax.tree.structure(params), new)


@pytest.mark.slow
def test_spectra_equal_the_full_jacobian(generator):
    module, params, z, c = generator
    result = gan_lid(module, params, z, c, truncation_psi=0.7, chunk_size=5)
    want = _jacobian_spectra(
        lambda v, ci: module.apply({"params": params}, v, ci, truncation_psi=0.7), z, c
    )
    assert result.singular_values.shape == (4, 16)
    np.testing.assert_allclose(result.singular_values, want, rtol=1e-4, atol=1e-4 * want.max())
    # the mapping normalises z: the radial direction is invisible, so the rank is below z_dim
    assert np.all(np.asarray(result.lid) <= 15)
    np.testing.assert_array_equal(
        result.lid,
        [
            np.linalg.matrix_rank(np.diag(s), tol=s[0] * 768 * np.finfo(np.float32).eps)
            for s in np.asarray(result.singular_values)
        ],
    )


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.slow
def test_z_rank_known_by_construction(generator, k):
    """Zeroing the first mapping layer's rows of z's last 16 - k coordinates leaves an output
    that depends on z[:k] (scaled by 1/|z|): the Jacobian has rank k."""
    module, params, z, c = generator
    params = _with(params, "mapping/fc0/kernel", lambda w: w.at[k:16].set(0.0))
    result = gan_lid(module, params, z, c)
    np.testing.assert_array_equal(result.lid, k)


@pytest.mark.parametrize("k", [2, 9])
@pytest.mark.slow
def test_w_rank_known_by_construction(generator, k):
    """With every affine layer blind to w's last 16 - k coordinates the image depends on w[:k]
    only: rank k with respect to w, with and without truncation."""
    module, params, z, c = generator
    for path in [
        p
        for p in (
            "/".join(e.key for e in q) for q, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        )
        if p.endswith("affine/kernel")
    ]:
        params = _with(params, path, lambda w: w.at[k:].set(0.0))
    for psi in (1.0, 0.5):
        result = gan_lid(module, params, z, c, wrt="w", truncation_psi=psi)
        np.testing.assert_array_equal(result.lid, k)
    w = module.apply({"params": params}, z, c, method="mapping")[:, 0]
    want = _jacobian_spectra(
        lambda v, _: module.apply(
            {"params": params},
            module.apply({"params": params}, v, truncation_psi=0.5, method="broadcast_w"),
            method="synthesis",
        ),
        w,
        c,
    )
    np.testing.assert_allclose(result.singular_values, want, rtol=1e-4, atol=1e-4 * want.max())


def test_paper_threshold_over_a_sample_set(generator):
    """The paper's rule: one threshold, the 10th percentile of all singular values."""
    module, params, z, c = generator
    spectra = np.concatenate(
        [gan_lid(module, params, z[i : i + 2], c[i : i + 2]).singular_values for i in (0, 2)]
    )
    tau = float(percentile_threshold(spectra, q=10))
    assert tau == pytest.approx(np.percentile(spectra, 10), rel=1e-6)
    lid = lid_from_singular_values(spectra, threshold=tau, space="tangent")
    np.testing.assert_array_equal(lid, (spectra > tau).sum(1))
    np.testing.assert_array_equal(gan_lid(module, params, z, c, threshold=tau).lid, lid)


@pytest.mark.slow
def test_random_noise_and_labels(generator):
    module, params, z, c = generator
    labels = jnp.argmax(c, axis=1)
    np.testing.assert_allclose(
        gan_lid(module, params, z, labels).singular_values,
        gan_lid(module, params, z, c).singular_values,
        rtol=1e-5,
    )
    key = jax.random.key(0)
    a = gan_lid(module, params, z, c, noise_mode="random", key=key).singular_values
    b = gan_lid(module, params, z, c, noise_mode="random", key=key).singular_values
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, gan_lid(module, params, z, c).singular_values)


def test_bad_input(generator):
    module, params, z, c = generator
    with pytest.raises(ValueError, match="wrt must be"):
        gan_lid(module, params, z, c, wrt="x")
    with pytest.raises(ValueError, match=r"z must have shape \[b, 16\]"):
        gan_lid(module, params, z[:, :8], c)
    with pytest.raises(ValueError, match="c is required"):
        gan_lid(module, params, z, None)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        gan_lid(module, params, z, jnp.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        gan_lid(module, params, z, c, noise_mode="random")
