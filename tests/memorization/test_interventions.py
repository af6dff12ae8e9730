"""The cross-attention interventions on the tiny random SD folder (tests/conftest.py's
``sd_folder``): identity settings change nothing, Ren et al.'s re-scaling against a PyTorch
reimplementation through diffusers' attention processors, NeMo's deactivation zeroes exactly the
chosen value channels, and bad input is refused naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.memorization import detectors as D
from mmh_jax.memorization import interventions as I

PROMPTS = ["a cat, the cat", "the fox", "the sea"]


def _inputs(sd, n=2):
    z = jax.random.normal(jax.random.key(0), (2 * n, *sd.latent_shape))
    t = jnp.full((2 * n,), 501 / 1000, jnp.float32)
    cond = sd.encode_prompt(PROMPTS[:n])
    context = jnp.concatenate([jnp.repeat(sd.uncond_embedding, n, axis=0), cond])
    return z, t, context


def _torch_eps(pipe, z, timestep, context, factor, cond_rows):
    """diffusers' UNet with the beginning token's logit (``get_attention_scores`` applies the
    scale before the softmax, so the logits are rebuilt here) multiplied by ``factor`` in the
    cross-attention of the ``cond_rows``."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    class Rescaled(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            if encoder_hidden_states is None:
                return super().__call__(attn, hidden_states, None, **kwargs)
            b = hidden_states.shape[0]
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
            logits = (q @ k.transpose(1, 2)) * attn.scale
            logits = logits.reshape(b, attn.heads, *logits.shape[1:])
            logits[cond_rows, :, :, 0] *= factor
            p = logits.softmax(-1).reshape(b * attn.heads, *logits.shape[2:])
            out = attn.batch_to_head_dim(p @ v)
            return attn.to_out[1](attn.to_out[0](out))

    unet = pipe.unet
    unet.set_attn_processor(Rescaled())
    try:
        with torch.no_grad():
            return unet(
                torch.from_numpy(np.array(z)),
                timestep,
                encoder_hidden_states=torch.from_numpy(np.array(context)),
            ).sample.numpy()
    finally:
        unet.set_attn_processor(AttnProcessor())


@pytest.mark.slow
def test_identity_settings_change_nothing(sd):
    z, t, context = _inputs(sd)
    plain = jax.jit(sd.eps)(z, t, context)
    for eps in (
        I.rescale_begin_attention(sd.eps, uncond=sd.uncond_embedding, factor=1.0),
        I.deactivate_neurons(sd.eps, []),
    ):
        np.testing.assert_array_equal(jax.jit(eps)(z, t, context), plain)


@pytest.mark.parametrize("factor", [8.0, 0.25])
@pytest.mark.slow
def test_rescale_matches_a_pytorch_reimplementation(sd, sd_folder, factor):
    _, pipe = sd_folder
    z, t, context = _inputs(sd)
    eps = I.rescale_begin_attention(sd.eps, uncond=sd.uncond_embedding, factor=factor)
    got = np.asarray(jax.jit(eps)(z, t, context))
    expected = _torch_eps(pipe, z, 500, context, factor, slice(2, 4))  # the conditional rows
    plain = _torch_eps(pipe, z, 500, context, 1.0, slice(2, 4))
    np.testing.assert_allclose(got, expected, atol=3e-5)
    np.testing.assert_allclose(got[:2], plain[:2], atol=3e-5)  # unconditional rows untouched
    # the change itself (the tiny random UNet's attention hardly matters to its output)
    change = got - np.asarray(jax.jit(sd.eps)(z, t, context))
    assert np.abs(change[2:]).max() > 3e-4
    np.testing.assert_allclose(change, expected - plain, atol=2e-6)


@jax.jit
def _values(eps_fn, z, t, context):
    """The cross-attention value projections as the next module receives them: recorded by an
    outer interceptor around the intervention's own (an inner one sees the output first)."""
    import flax.linen as nn

    got = []

    def record(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        parent = ctx.module.parent
        if (
            ctx.method_name == "__call__"
            and ctx.module.name == "to_v"
            and isinstance(parent, nn.Module)
            and parent.name == "attn2"
        ):
            got.append(out)
        return out

    with nn.intercept_methods(record):
        eps_fn(z, t, context)
    return got


def test_deactivation_zeroes_exactly_the_chosen_channels(sd):
    z, t, context = _inputs(sd)
    plain = _values(sd.eps, z, t, context)
    widths = [v.shape[-1] for v in plain]
    total = sum(widths)
    chosen = [0, 5, widths[0] + 1, total - 1]
    off = _values(I.deactivate_neurons(sd.eps, chosen), z, t, context)
    flat_plain = np.concatenate([np.asarray(v) for v in plain], axis=-1)
    flat_off = np.concatenate([np.asarray(v) for v in off], axis=-1)
    mask = np.zeros(total, bool)
    mask[chosen] = True
    assert np.all(flat_off[..., mask] == 0)
    np.testing.assert_array_equal(flat_off[..., ~mask], flat_plain[..., ~mask])
    assert np.all(flat_plain[..., mask] != 0)
    with pytest.raises(ValueError, match=f"neurons: index {total} is out of range"):
        jax.jit(I.deactivate_neurons(sd.eps, [total]))(z, t, context)


@pytest.mark.slow
def test_nemo_deactivation_applies_the_z_score_rule_per_row(sd):
    z, t, context = _inputs(sd, n=3)
    acts = np.asarray(D.value_activations(sd, PROMPTS))
    ref = D.nemo_reference(acts[:2])
    threshold = 2.0
    eps = I.nemo_deactivation(sd.eps, ref, threshold=threshold, layers=I.PARTS)
    plain = np.concatenate([np.asarray(v) for v in _values(sd.eps, z, t, context)], axis=-1)
    off = np.concatenate([np.asarray(v) for v in _values(eps, z, t, context)], axis=-1)
    # truth: the detector's z-scores of each context row (the empty prompt's for the first 3)
    all_acts = np.abs(plain).mean(axis=1)
    expected = np.abs(all_acts - np.asarray(ref.mean)) / np.asarray(ref.std) > threshold
    np.testing.assert_allclose(all_acts[3:], acts, rtol=1e-5, atol=1e-7)
    assert expected[5].sum() > 0  # the third prompt, not in the reference, has outliers
    for row in range(6):
        assert np.all(off[row][:, expected[row]] == 0)
        np.testing.assert_array_equal(off[row][:, ~expected[row]], plain[row][:, ~expected[row]])
    np.testing.assert_array_equal(
        I.nemo_neurons(acts[2], ref, threshold=threshold), np.flatnonzero(expected[5])
    )
    # the same neurons, fixed: the third prompt's image is the same
    fixed = I.deactivate_neurons(sd.eps, np.flatnonzero(expected[5]))
    one = (z[2::3], t[2::3], context[2::3])  # its unconditional and conditional rows
    np.testing.assert_allclose(
        np.asarray(jax.jit(eps)(*one))[1], np.asarray(jax.jit(fixed)(*one))[1], atol=1e-6
    )


def test_nemo_deactivation_only_in_the_chosen_layers(sd):
    z, t, context = _inputs(sd, n=3)
    ref = D.nemo_reference(np.asarray(D.value_activations(sd, PROMPTS))[:2])
    eps = I.nemo_deactivation(sd.eps, ref, threshold=1e-6, layers=("up",))
    plain = _values(sd.eps, z, t, context)
    off = _values(eps, z, t, context)
    # the tiny UNet: down 1, mid 1, up 2 cross-attentions; threshold ~0 turns all off
    np.testing.assert_array_equal(off[0], plain[0])
    np.testing.assert_array_equal(off[1], plain[1])
    assert np.all(np.asarray(off[2]) == 0) and np.all(np.asarray(off[3]) == 0)


def test_bad_input_is_refused_naming_the_argument(sd):
    u = sd.uncond_embedding
    for factor in (0.0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="factor must be"):
            I.rescale_begin_attention(sd.eps, uncond=u, factor=factor)
    with pytest.raises(ValueError, match="layers must be.*'middle'"):
        I.rescale_begin_attention(sd.eps, uncond=u, layers=("down", "middle"))
    with pytest.raises(ValueError, match="uncond must be"):
        I.rescale_begin_attention(sd.eps, uncond=u[0])
    ref = D.nemo_reference(np.ones((2, 8), np.float32) * np.arange(2)[:, None])
    with pytest.raises(ValueError, match="threshold must be"):
        I.nemo_deactivation(sd.eps, ref, threshold=0)
    with pytest.raises(ValueError, match="top_k must be"):
        I.nemo_deactivation(sd.eps, ref, top_k=-1)
    with pytest.raises(ValueError, match="layers must be"):
        I.nemo_deactivation(sd.eps, ref, layers=("sideways",))
    with pytest.raises(ValueError, match="neurons: index -1 is negative"):
        I.deactivate_neurons(sd.eps, [-1])
    z, t, context = _inputs(sd)
    with pytest.raises(ValueError, match="reference has 8 neurons"):
        jax.jit(I.nemo_deactivation(sd.eps, ref))(z, t, context)
    with pytest.raises(ValueError, match="activations must be one prompt's"):
        I.nemo_neurons(np.ones(9), ref)


def test_nemo_top_k_turns_off_the_largest_activations(sd):
    z, t, context = _inputs(sd)
    ref = D.nemo_reference(np.asarray(D.value_activations(sd, PROMPTS)))
    eps = I.nemo_deactivation(sd.eps, ref, threshold=1e30, top_k=2, layers="down")
    plain = [np.asarray(v) for v in _values(sd.eps, z, t, context)]
    off = [np.asarray(v) for v in _values(eps, z, t, context)]
    a = np.abs(plain[0]).mean(axis=1)  # layer 0, the down block's
    top = np.argsort(-a, axis=1)[:, :2]
    for row in range(len(a)):
        mask = np.zeros(a.shape[1], bool)
        mask[top[row]] = True
        assert np.all(off[0][row][:, mask] == 0)
        np.testing.assert_array_equal(off[0][row][:, ~mask], plain[0][row][:, ~mask])
    for ours, theirs in zip(off[1:], plain[1:]):
        np.testing.assert_array_equal(ours, theirs)
