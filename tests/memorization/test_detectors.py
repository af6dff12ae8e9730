"""The memorization detectors on the tiny random SD folder (tests/conftest.py's ``sd_folder``):
shapes, determinism, independence from the rest of the batch, closed forms (uniform attention,
Gaussian scores, planted edge maps and cliques), a PyTorch reading of the same diffusers UNet
(attention processors), Webster's one-step edges through diffusers and PyTorch, and Carlini et
al.'s clusters of diffusers' generations through scikit-learn and brute-force cliques."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmh_jax.memorization import detectors as D

PROMPTS = ["a cat, the cat", "the fox", "the sea"]
KEY = jax.random.key(3)


def _torch_reading(pipe, z, timestep, context):
    """diffusers' own attention probabilities (``Attention.get_attention_scores``), value
    projections and module names of every cross-attention layer, in call order, through a
    recording processor."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    probs, values, names = [], [], []
    unet = pipe.unet
    name_of = {module: name for name, module in unet.named_modules()}

    class Recording(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            if encoder_hidden_states is not None:
                b = hidden_states.shape[0]
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                p = attn.get_attention_scores(q, k, None)
                probs.append(p.reshape(b, attn.heads, *p.shape[1:]).numpy())
                values.append(attn.to_v(encoder_hidden_states).numpy())
                names.append(name_of[attn])
            return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)

    unet.set_attn_processor(Recording())
    with torch.no_grad():
        unet(
            torch.from_numpy(np.array(z)),
            timestep,
            encoder_hidden_states=torch.from_numpy(np.array(context)),
        )
    return probs, values, names


@pytest.mark.slow
def test_cross_attention_matches_diffusers_processors(sd, sd_folder):
    _, pipe = sd_folder
    z = jax.random.normal(jax.random.key(0), (2, *sd.latent_shape))
    context = sd.encode_prompt(PROMPTS[:2])
    read = jax.jit(D.cross_attention)(sd.eps, z, jnp.float32(501 / 1000), context)
    probs, values, names = _torch_reading(pipe, z, 500, context)
    assert len(read.probs) == len(probs) == 4  # down 1, mid 1, up 2 cross-attentions
    # diffusers' "down_blocks.0.attentions.0...." is the port's "down_blocks_0/attentions_0/..."
    flax_names = tuple(re.sub(r"\.(\d+)", r"_\1", n).replace(".", "/") for n in names)
    assert D.cross_attention_paths(sd.eps, z, jnp.float32(501 / 1000), context) == flax_names
    for ours, theirs in zip(read.probs, probs):
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
    for ours, theirs in zip(read.values, values):
        np.testing.assert_allclose(ours, theirs, atol=2e-5)


def _first_step_reference(sd, pipe, prompts, images):
    """The conditional branch's attention at the first DDIM step (50-step grid), in PyTorch."""
    from mmh_jax._src.noise import images_noise
    from mmh_jax.sampling import ddim_timesteps

    step = int(ddim_timesteps(1000, num_steps=50, steps_offset=1)[0])
    noise = np.tile(np.asarray(images_noise(KEY, images, sd.latent_shape)), (len(prompts), 1, 1, 1))
    context = np.repeat(np.asarray(sd.encode_prompt(prompts)), images, axis=0)
    probs, _, _ = _torch_reading(pipe, noise, step, context)
    return probs


@pytest.mark.slow
def test_attention_entropy_matches_a_pytorch_reimplementation(sd, sd_folder):
    _, pipe = sd_folder
    got = D.attention_entropy(sd, PROMPTS, key=KEY, images_per_prompt=2, num_steps=50)
    probs = _first_step_reference(sd, pipe, PROMPTS, 2)
    a = np.mean([p.mean(axis=(1, 2)) for p in probs], axis=0)  # [p * k, tokens]
    a = a.reshape(len(PROMPTS), 2, -1).mean(axis=1)
    ids = sd.tokenize(PROMPTS)
    end = (ids == sd.tokenizer.eos_token_id).argmax(axis=1)
    np.testing.assert_allclose(got.entropy, -(a * np.log(a)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got.begin, a[:, 0], rtol=1e-4)
    np.testing.assert_allclose(got.end, [row[e:].sum() for row, e in zip(a, end)], rtol=1e-4)


@pytest.mark.slow
def test_bright_ending_matches_a_pytorch_reimplementation(sd, sd_folder):
    _, pipe = sd_folder
    # with a one-step grid the final step is the first: its latents are the starting noise
    got = D.bright_ending(sd, PROMPTS[:2], key=KEY, images_per_prompt=1, num_steps=1)
    from mmh_jax._src.noise import images_noise
    from mmh_jax.sampling import ddim_timesteps

    step = int(ddim_timesteps(1000, num_steps=1, steps_offset=1)[0])
    noise = np.tile(np.asarray(images_noise(KEY, 1, sd.latent_shape)), (2, 1, 1, 1))
    probs, _, names = _torch_reading(pipe, noise, step, sd.encode_prompt(PROMPTS[:2]))
    end = (sd.tokenize(PROMPTS[:2]) == sd.tokenizer.eos_token_id).argmax(axis=1)
    h, w = sd.latent_shape[1:]
    # Chen et al.'s layers: the down path's cross-attention at its highest resolution
    down = [p for p, name in zip(probs, names) if name.startswith("down_blocks.")]
    most = max(p.shape[2] for p in down)
    chosen = [p for p in down if p.shape[2] == most]
    assert len(chosen) < len(probs)  # the tiny UNet also has mid and up cross-attention
    maps = []
    for p in chosen:
        m = p.mean(axis=1)[np.arange(2), :, end]  # [b, pixels]
        f = math.isqrt(h * w // m.shape[1])
        maps.append(np.kron(m.reshape(2, h // f, w // f), np.ones((1, f, f))))
    expected = np.mean(maps, axis=0)
    assert got.map.shape == (2, h, w)
    np.testing.assert_allclose(got.map, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.score, expected.mean(axis=(1, 2)), rtol=1e-4)


def test_bright_ending_layers_of_stable_diffusion_v1():
    # SD v1's 16 cross-attention layers in call order (64 x 64 latents): Chen et al.'s
    # AttentionStore keeps the down path's at 64 x 64, the first two
    blocks = [("down_blocks_0", 2, 4096), ("down_blocks_1", 2, 1024), ("down_blocks_2", 2, 256)]
    blocks += [("mid_block", 1, 64), ("up_blocks_1", 3, 256), ("up_blocks_2", 3, 1024)]
    blocks += [("up_blocks_3", 3, 4096)]
    paths = [
        f"{b}/attentions_{i}/transformer_blocks_0/attn2" for b, n, _ in blocks for i in range(n)
    ]
    pixels = [px for _, n, px in blocks for _ in range(n)]
    assert len(paths) == 16
    assert D.bright_ending_layers(paths, pixels) == (0, 1)
    with pytest.raises(ValueError, match="down path"):
        D.bright_ending_layers(paths[6:], pixels[6:])


def test_value_activations_match_pytorch_and_nemo_z_scores(sd, sd_folder):
    _, pipe = sd_folder
    got = D.value_activations(sd, PROMPTS)
    _, values, _ = _torch_reading(
        pipe, np.zeros((3, *sd.latent_shape), np.float32), 999, sd.encode_prompt(PROMPTS)
    )
    expected = np.concatenate([np.abs(v).mean(axis=1) for v in values], axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ref = D.nemo_reference(expected[:2])
    out = D.nemo_outliers(expected, ref, threshold=3.0)
    z = np.abs(expected - expected[:2].mean(0)) / expected[:2].std(0, ddof=1)
    np.testing.assert_allclose(out.max_z, z.max(axis=1), rtol=1e-4)
    np.testing.assert_array_equal(out.count, (z > 3.0).sum(axis=1))
    with pytest.raises(ValueError, match="activations must be"):
        D.nemo_outliers(expected[:, :5], ref)
    with pytest.raises(ValueError, match="n >= 2"):
        D.nemo_reference(expected[:1])


def _torch_sobel_agreement(images, k):
    """Webster's edge agreement of each prompt's ``k`` images (prompt-major ``[p * k, 3, H, W]``
    torch tensor) in PyTorch: Sobel magnitudes of the grey levels, border replicated, then
    ``||mean_i E_i|| / mean_i ||E_i||``."""
    import torch
    import torch.nn.functional as F

    grey = F.pad(images.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    g = F.conv2d(grey, torch.stack([kx, kx.T])[:, None])  # cross-correlation: d/dx, d/dy
    edges = g.pow(2).sum(dim=1).sqrt().reshape(-1, k, grey[0, 0, 1:-1, 1:-1].numel())
    return (edges.mean(dim=1).norm(dim=-1) / edges.norm(dim=-1).mean(dim=1)).numpy()


@pytest.mark.slow
def test_edge_consistency_matches_a_pytorch_reimplementation(sd, sd_folder):
    import torch

    _, pipe = sd_folder
    k, guidance = 3, 7.5
    got = D.edge_consistency(sd, PROMPTS[:2], key=KEY, images_per_prompt=k, num_steps=50)
    # diffusers' one guided step from the same noises: its first timestep of a 50-step grid,
    # DDIM's x_0 prediction, decoded by the PyTorch VAE
    from mmh_jax._src.noise import images_noise

    noise = torch.as_tensor(
        np.tile(np.asarray(images_noise(KEY, k, sd.latent_shape)), (2, 1, 1, 1))
    )
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    step = scheduler.timesteps[0]
    a = scheduler.alphas_cumprod[step]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS[:2], "cpu", k, True)
        eps_u, eps_c = pipe.unet(
            torch.cat([noise, noise]), step, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample.chunk(2)
        x0 = (noise - (1 - a).sqrt() * (eps_u + guidance * (eps_c - eps_u))) / a.sqrt()
        images = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    np.testing.assert_allclose(got, _torch_sobel_agreement(images, k), rtol=1e-5)


def test_edge_agreement_of_planted_edge_maps():
    # identical images: every edge map coincides, the agreement is 1; k images whose edges do
    # not overlap (one bright dot each, far apart) and have equal norms: 1 / sqrt(k)
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(D.edge_agreement(np.repeat(one, 4, axis=0)), 1.0, rtol=1e-6)
    dots = np.zeros((4, 3, 12, 12), np.float32)
    for i, (r, c) in enumerate([(2, 2), (2, 9), (9, 2), (9, 9)]):
        dots[i, :, r, c] = 1.0
    np.testing.assert_allclose(D.edge_agreement(dots), 0.5, rtol=1e-6)
    import torch

    np.testing.assert_allclose(
        D.edge_agreement(dots[:3]),
        _torch_sobel_agreement(torch.as_tensor(dots[:3]), 3)[0],
        rtol=1e-6,
    )


def _sklearn_cluster_score(items, size):
    """Carlini et al.'s clique radius in scikit-learn: each item's distance to its
    ``size - 1``-th nearest other item, the smallest over the items, per value (RMS), negated."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(items, np.float64).reshape(len(items), -1)
    dist, _ = NearestNeighbors(n_neighbors=size).fit(x).kneighbors(x)
    return -dist[:, -1].min() / math.sqrt(x.shape[1])


def _has_clique(items, size, threshold):
    """Whether ``size`` items are pairwise within ``threshold`` (Carlini et al.'s rule, l2 over
    all values), by trying every subset."""
    import itertools

    from scipy.spatial.distance import pdist, squareform

    d = squareform(pdist(np.asarray(items, np.float64).reshape(len(items), -1)))
    return any(
        all(d[i, j] <= threshold for i, j in itertools.combinations(subset, 2))
        for subset in itertools.combinations(range(len(d)), size)
    )


def test_cluster_score_of_planted_cliques():
    rng = np.random.default_rng(0)
    # four identical images among random ones form a clique of 4: radius 0, the highest score
    items = rng.normal(size=(8, 3, 4, 4))
    items[[1, 3, 4, 6]] = items[1]
    assert float(D.cluster_score(items, cluster_size=4)) == 0.0
    assert float(D.cluster_score(items, cluster_size=5)) < 0.0
    # against scikit-learn, and bracketing Carlini et al.'s clique rule: a clique of `size`
    # pairwise within delta exists for delta = 2 * radius (triangle inequality) and for none
    # below the radius (each clique member has size - 1 others within delta)
    d = items[0].size
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(9, 3, 4, 4)).astype(np.float32)
        for size in (2, 3, 5):
            got = float(D.cluster_score(x, cluster_size=size))
            np.testing.assert_allclose(got, _sklearn_cluster_score(x, size), rtol=1e-5)
            radius = -got * math.sqrt(d)
            assert _has_clique(x, size, 2 * radius * (1 + 1e-5))
            assert not _has_clique(x, size, radius * (1 - 1e-5))


@pytest.mark.slow
def test_generation_clusters_match_a_diffusers_generation_and_sklearn(sd, sd_folder):
    import torch

    _, pipe = sd_folder
    k, size = 4, 3
    got = D.generation_clusters(
        sd, PROMPTS[:2], key=KEY, images_per_prompt=k, cluster_size=size, num_steps=2
    )
    # the same generations by diffusers' pipeline (DDIM, the same starting noises), decoded by
    # its VAE, clustered by scikit-learn
    from mmh_jax._src.noise import images_noise

    noise = np.tile(np.asarray(images_noise(KEY, k, sd.latent_shape)), (2, 1, 1, 1))
    with torch.no_grad():
        latents = pipe(
            PROMPTS[:2],
            num_images_per_prompt=k,
            num_inference_steps=2,
            guidance_scale=7.5,
            latents=torch.as_tensor(noise),
            output_type="latent",
        ).images
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.numpy()
    expected = [_sklearn_cluster_score(g, size) for g in images.reshape(2, k, -1)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_uniform_attention_has_entropy_log_n(sd):
    # a text encoder with all weights zero gives every token the same embedding: the keys are
    # equal, every pixel attends uniformly to the 77 tokens
    zero = sd._replace(text_encoder_params=jax.tree.map(jnp.zeros_like, sd.text_encoder_params))
    got = D.attention_entropy(zero, PROMPTS[:2], key=KEY, num_steps=5)
    np.testing.assert_allclose(got.entropy, math.log(77), rtol=1e-6)
    np.testing.assert_allclose(got.begin, 1 / 77, rtol=1e-5)
    end = (zero.tokenize(PROMPTS[:2]) == zero.tokenizer.eos_token_id).argmax(axis=1)
    np.testing.assert_allclose(got.end, (77 - end) / 77, rtol=1e-5)


@pytest.mark.parametrize("exact", [False, True])
def test_jacobian_trace_of_a_gaussian_score(exact, x64):
    # s(x) = -A^{-1} (x - mu): the trace is -tr(A^{-1}) exactly, and Rademacher probes are exact
    # on a diagonal Jacobian
    rng = np.random.default_rng(0)
    var = rng.uniform(0.5, 2.0, size=(3, 4))
    mu = rng.normal(size=(3, 4))
    inv = jnp.asarray(1 / var)

    def score(x, t):
        return -(x - mu) * inv

    x = jnp.asarray(rng.normal(size=(5, 3, 4)))
    got = D.score_jacobian_trace(
        score, x, 0.5, key=None if exact else KEY, num_probes=3, exact=exact
    )
    np.testing.assert_allclose(got, -np.sum(1 / var), rtol=1e-12)


def test_jacobian_trace_of_a_full_covariance_score_exact(x64):
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    precision = jnp.asarray(m @ m.T + np.eye(6))

    def score(x, t):
        return -x @ precision

    x = jnp.asarray(rng.normal(size=(2, 6)))
    np.testing.assert_allclose(
        D.score_jacobian_trace(score, x, 0.3, exact=True),
        -np.trace(np.asarray(precision)),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="key"):
        D.score_jacobian_trace(score, x, 0.3)


@pytest.mark.slow
def test_detectors_are_deterministic_and_independent_of_the_batch(sd):
    fast = dict(key=KEY, num_steps=3)
    runs = {
        "entropy": lambda p: D.attention_entropy(sd, p, early_steps=2, **fast).entropy,
        "bright": lambda p: D.bright_ending(sd, p, **fast).score,
        "sharpness": lambda p: D.sharpness(sd, p, **fast),
        "edges": lambda p: D.edge_consistency(sd, p, images_per_prompt=2, **fast),
        "clusters": lambda p: D.generation_clusters(
            sd, p, images_per_prompt=3, cluster_size=2, space="latents", **fast
        ),
        "nemo": lambda p: D.value_activations(sd, p),
    }
    for name, run in runs.items():
        full = np.asarray(run(PROMPTS))
        assert full.shape[0] == 3 and np.all(np.isfinite(full)), name
        np.testing.assert_array_equal(run(PROMPTS), full, err_msg=name)
        np.testing.assert_allclose(run(PROMPTS[1:2]), full[1:2], rtol=2e-5, atol=1e-6, err_msg=name)
    assert np.all((0 <= runs["edges"](PROMPTS)) & (runs["edges"](PROMPTS) <= 1 + 1e-6))


def test_bad_input_is_refused_clearly(sd):
    def no_attention(x, t, context):  # a network without cross-attention layers
        return x

    with pytest.raises(ValueError, match="no readable cross-attention"):
        D.cross_attention(no_attention, jnp.zeros((1, 4, 8, 8)), 0.5, jnp.zeros((1, 77, 32)))
    with pytest.raises(ValueError, match="prompts must be"):
        D.attention_entropy(sd, "a cat", key=KEY)
    with pytest.raises(ValueError, match="early_steps"):
        D.attention_entropy(sd, PROMPTS, key=KEY, num_steps=2, early_steps=3)
    with pytest.raises(ValueError, match="images_per_prompt"):
        D.edge_consistency(sd, PROMPTS, key=KEY, images_per_prompt=1)
    with pytest.raises(ValueError, match="cluster_size"):
        D.generation_clusters(sd, PROMPTS, key=KEY, images_per_prompt=3, cluster_size=4)
