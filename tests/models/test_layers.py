"""Shared layers against their PyTorch definitions and against float64 arithmetic."""

import numpy as np
import torch

from mmh_jax.models.layers import GroupNorm


def _affine(rng):
    return {
        "scale": rng.standard_normal(8).astype(np.float32),
        "bias": rng.standard_normal(8).astype(np.float32),
    }


def test_group_norm_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 8)).astype(np.float32)  # NHWC, 8 channels, 4 groups
    params = _affine(rng)
    ref = torch.nn.GroupNorm(4, 8, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.as_tensor(params["scale"]))
        ref.bias.copy_(torch.as_tensor(params["bias"]))
        want = ref(torch.as_tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = GroupNorm(4, 1e-5).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_group_norm_is_accurate_with_large_means():
    # group means of 1e3 next to unit spread: E[x^2] - E[x]^2 loses everything in float32 (torch's
    # CPU GroupNorm is off by about 0.4 here); the two-pass form stays within float32 rounding
    rng = np.random.default_rng(1)
    x = (1e3 + rng.standard_normal((2, 6, 5, 8))).astype(np.float32)
    params = _affine(rng)
    g = x.astype(np.float64).reshape(2, -1, 4, 2)
    c = g - g.mean(axis=(1, 3), keepdims=True)
    y = (c / np.sqrt((c * c).mean(axis=(1, 3), keepdims=True) + 1e-5)).reshape(x.shape)
    want = y * params["scale"] + params["bias"]
    got = GroupNorm(4, 1e-5).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-3)


def test_attention_matches_torch_and_keeps_float32_softmax():
    import jax.numpy as jnp

    from mmh_jax.models.layers import attention

    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 7, 3, 5)).astype(np.float32)  # 7 queries, 3 heads of 5
    k, v = (3 * rng.standard_normal((2, 4, 3, 5)).astype(np.float32) for _ in range(2))
    want = (
        torch.nn.functional.scaled_dot_product_attention(
            *(torch.as_tensor(a).transpose(1, 2) for a in (q, k, v))
        )
        .transpose(1, 2)
        .numpy()
    )
    got = attention(q, k, v)
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    half = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=0.05 * np.abs(want).max())


def test_causal_attention_matches_torch():
    from mmh_jax.models.layers import attention

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 6, 2, 4)).astype(np.float32) for _ in range(3))
    want = (
        torch.nn.functional.scaled_dot_product_attention(
            *(torch.as_tensor(a).transpose(1, 2) for a in (q, k, v)), is_causal=True
        )
        .transpose(1, 2)
        .numpy()
    )
    np.testing.assert_allclose(np.asarray(attention(q, k, v, causal=True)), want, atol=1e-5)
    assert not np.allclose(np.asarray(attention(q, k, v)), want, atol=1e-3)
