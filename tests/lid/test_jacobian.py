import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.lid import jacobian_rank, lid_from_singular_values, numerical_rank


def low_rank_matrix(key, rows, cols, rank):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (rows, rank)) @ jax.random.normal(k2, (rank, cols))


@pytest.mark.parametrize("rank", [0, 1, 3, 5])
def test_linear_maps_of_known_rank(x64, rank):
    w = low_rank_matrix(jax.random.key(rank), 12, 5, rank)
    z = jax.random.normal(jax.random.key(9), (4, 5))
    res = jacobian_rank(lambda z: z @ w.T, z, threshold=1e-8, chunk_size=2)
    np.testing.assert_array_equal(res.lid, rank)
    np.testing.assert_allclose(
        res.singular_values[0], np.linalg.svd(np.asarray(w), compute_uv=False), atol=1e-10
    )


def test_nonlinear_generator_with_image_output(x64):
    # x = tanh(W z) reshaped to [3, 4, 4]: Jacobian diag(1 - tanh^2) W, rank of W.
    w = low_rank_matrix(jax.random.key(1), 48, 8, 4)
    gen = lambda z: jnp.tanh(0.1 * z.reshape(z.shape[0], -1) @ w.T).reshape(z.shape[0], 3, 4, 4)  # noqa: E731
    z = jax.random.normal(jax.random.key(2), (3, 2, 4))  # latent shaped [2, 4]
    res = jacobian_rank(gen, z, threshold=1e-8)
    np.testing.assert_array_equal(res.lid, 4)
    zf = np.asarray(z.reshape(3, 8))
    for i in range(3):
        jac = (1 - np.tanh(0.1 * zf[i] @ np.asarray(w).T) ** 2)[:, None] * 0.1 * np.asarray(w)
        np.testing.assert_allclose(
            res.singular_values[i], np.linalg.svd(jac, compute_uv=False), atol=1e-10
        )
    np.testing.assert_array_equal(
        lid_from_singular_values(res.singular_values, threshold=1e-8, space="tangent"), 4
    )


def test_numerical_rank_thresholds():
    s = jnp.array([[3.0, 2.0, 1.0], [3.0, 0.5, 0.1]])
    np.testing.assert_array_equal(numerical_rank(s, threshold=1.0), [2, 1])
    np.testing.assert_array_equal(numerical_rank(s, threshold=jnp.array([0.5, 0.05])), [3, 3])
    np.testing.assert_array_equal(
        lid_from_singular_values(s, threshold=1.0, space="normal"), [1, 2]
    )
    with pytest.raises(ValueError, match="threshold must be a scalar"):
        numerical_rank(s, threshold=jnp.ones(3))


def test_bad_input():
    with pytest.raises(ValueError, match="z must have shape"):
        jacobian_rank(lambda z: z, jnp.ones(3), threshold=0.1)
    with pytest.raises(ValueError, match=r"fn\(z\) must return"):
        jacobian_rank(lambda z: z.sum(), jnp.ones((2, 3)), threshold=0.1)


def test_default_threshold_is_the_rank_up_to_rounding():
    """float32, no threshold: a generator that reads only 3 of its 8 latent directions (through
    a smooth nonlinearity) has rank 3, as numpy.linalg.matrix_rank says of the same Jacobian."""
    w = jax.random.normal(jax.random.key(3), (30, 3))
    gen = lambda z: jnp.sin(z[:, :3] @ w.T).reshape(-1, 3, 10)  # noqa: E731
    z = jax.random.normal(jax.random.key(4), (5, 8))
    res = jacobian_rank(gen, z)
    np.testing.assert_array_equal(res.lid, 3)
    jac = np.asarray(jax.vmap(jax.jacfwd(lambda v: gen(v[None])[0].reshape(-1)))(z))
    np.testing.assert_array_equal(res.lid, [np.linalg.matrix_rank(j) for j in jac])
