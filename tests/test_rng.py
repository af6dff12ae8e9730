"""Tests of mmh_jax._src.rng: NumPy generators from PRNG keys keep the integer seeds' streams."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmh_jax._src.rng import key_seed, numpy_generator


@pytest.mark.parametrize("seed", [0, 5, 2**31 + 7])
def test_a_key_from_a_seed_gives_numpys_stream_of_that_seed(seed):
    key = jax.random.key(seed)
    assert key_seed(key) == seed
    assert key_seed(jax.random.PRNGKey(seed)) == seed
    np.testing.assert_array_equal(
        numpy_generator(key).random(4), np.random.default_rng(seed).random(4)
    )
    np.testing.assert_array_equal(
        numpy_generator(key, 1, 7).integers(0, 100, 5),
        np.random.default_rng([seed, 1, 7]).integers(0, 100, 5),
    )


def test_split_keys_and_streams_differ_and_bad_keys_are_refused():
    a, b = jax.random.split(jax.random.key(0))
    assert key_seed(a) != key_seed(b)
    assert numpy_generator(a).random() != numpy_generator(a, 1).random()
    with pytest.raises(ValueError, match="single key"):
        key_seed(jax.random.split(jax.random.key(0), 2))
    with pytest.raises(TypeError, match="PRNG key"):
        key_seed(3)
