"""Memorization detectors of the literature on the Stable Diffusion ports, in one place.

Each detector is a pure function of a loaded :class:`~mmh_jax.models.StableDiffusion` and a
list of prompts, with randomness only through ``key``; it returns one number per prompt (and,
for the bright-ending detector, a map). The attention detectors read the UNet's
cross-attention by Flax method interception (:func:`cross_attention`): the ``to_q``, ``to_k``
and ``to_v`` projections of every cross-attention layer (``attn2`` of a
``BasicTransformerBlock``, diffusers' name) are recorded as the network runs, and the attention
probabilities ``softmax(q k^T / sqrt(d))`` are recomputed from them; the model's code and
numbers are untouched.

Image ``j`` of every prompt starts from the noise ``normal(fold_in(key, j))`` (the rule of
``StableDiffusion.sample``), so a prompt's score does not depend on the other prompts of the
call. The DDIM grid is the pipeline's (``StableDiffusion.ddim_grid``).

Detectors and what memorization does to them (``memorized when high`` is each result's
direction; :data:`DETECTOR_DIRECTIONS`):

- :func:`attention_entropy` (Ren et al., ECCV 2024): entropy of the cross-attention over the
  prompt's tokens at the first denoising steps (high), the attention on the beginning token
  (low) and on the end (summary) tokens.
- :func:`bright_ending` (Chen et al., ICLR 2025): the end token's attention at the final
  denoising step (high), and its map, which localises the memorized region.
- :func:`value_activations`, :func:`nemo_reference`, :func:`nemo_outliers` (Hintersdorf et al.,
  NeurIPS 2024, "Finding NeMo"): out-of-distribution activations of the cross-attention value
  projections, z-scored against non-memorized prompts (high).
- :func:`score_jacobian_trace`, :func:`sharpness` (Jeon et al., 2025): the trace of the score's
  Jacobian (the Hessian of ``log p_t``) at the starting noise; memorized prompts have sharp,
  very negative traces (``-trace`` is high).
- :func:`edge_consistency` (Webster, 2023): the edges of the one-step ``x_0`` prediction agree
  across seeds for template copies (high).
- :func:`generation_clusters` (Carlini et al., 2023): many generations of a memorized prompt
  fall into one tight cluster (high; the expensive black-box reference).

Where a paper leaves a rule open, the choice here is stated in the function's docstring (NeMo's
threshold, Webster's agreement score, a threshold-free form of Carlini et al.'s cliques).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from mmh_jax._src.checks import per_sample_keys
from mmh_jax._src.ddim import ddim_alphas, ddim_update, ddim_x0
from mmh_jax._src.noise import images_noise
from mmh_jax._src.partial import as_pytree_fn
from mmh_jax._src.trace import sum_vjv
from mmh_jax.guidance import cfg_score_fn, eps_pair
from mmh_jax.lid.flipd import hutchinson_probe
from mmh_jax.models.stable_diffusion import StableDiffusion
from mmh_jax.retrieval import nearest_neighbours
from mmh_jax.sampling import ddim_timesteps

__all__ = [
    "CrossAttention",
    "cross_attention",
    "AttentionEntropy",
    "attention_entropy",
    "BrightEnding",
    "bright_ending",
    "value_activations",
    "NemoReference",
    "nemo_reference",
    "NemoOutliers",
    "nemo_outliers",
    "score_jacobian_trace",
    "sharpness",
    "edge_consistency",
    "generation_clusters",
    "DETECTOR_DIRECTIONS",
    "end_positions",
    "token_attention",
    "token_statistics",
    "end_token_map",
    "cross_attention_paths",
    "bright_ending_layers",
    "edge_agreement",
    "cluster_score",
]

DETECTOR_DIRECTIONS: dict[str, bool] = {
    "attention_entropy": True,
    "begin_token_attention": False,
    "end_token_attention": True,
    "bright_ending": True,
    "nemo_max_z": True,
    "nemo_outliers": True,
    "sharpness": True,
    "edge_consistency": True,
    "generation_clusters": True,
}
"""``{result name: True when memorized prompts read high}``: the direction of every number the
detectors return, as the papers report it on Stable Diffusion's CLIP text encoder (Ren et al.'s
entropy as their code's ``detect.py`` scores it, memorized high). On the prompt world's toy
model (a 2-layer text encoder trained from scratch) Ren et al.'s and Chen et al.'s statistics
read the other way: its cross-attention over the 24 tokens is nearly uniform (entropy 3.157 of
at most log 24 = 3.178 for held-out prompts, beginning token 0.064), and memorized prompts
concentrate it on their trigger words and on the beginning token, which lowers the entropy in
every layer and at every step. Concentration on trigger tokens raises the entropy only where
the attention is otherwise held by one token, the beginning token in Stable Diffusion's reading
by Ren et al. (their mitigation rescales that token's attention logits);
``benchmarks/RESULTS.md``."""

_CROSS_ATTENTION = "attn2"  # diffusers' name of BasicTransformerBlock's cross-attention
_PROJECTIONS = ("to_q", "to_k", "to_v")


class CrossAttention(NamedTuple):
    """The cross-attention of one UNet call, layer by layer in call order.

    Attributes:
        eps: the network's output (the noise prediction), ``[b, c, h, w]``.
        probs: per layer, ``softmax(q k^T / sqrt(d))`` ``[b, heads, pixels, tokens]`` (float32).
        values: per layer, the value projection of the context ``[b, tokens, heads * d]``.
    """

    eps: Float[Array, "b c h w"]
    probs: tuple[Float[Array, "b heads n m"], ...]
    values: tuple[Float[Array, "b m inner"], ...]


def cross_attention(
    eps_fn: Any,
    z_t: Float[Array, "b c h w"],
    t: Float[ArrayLike, " b"],
    context: Float[Array, "b m e"],
) -> CrossAttention:
    """Run ``eps_fn(z_t, t, context)`` and record its cross-attention by Flax interception.

    Every ``to_q``/``to_k``/``to_v`` call of a module named ``attn2`` (diffusers'
    cross-attention of a ``BasicTransformerBlock``, which the Flax port keeps) is recorded
    through :func:`flax.linen.intercept_methods`; the probabilities are recomputed from the
    recorded queries and keys as ``softmax(q k^T / sqrt(d))`` over the context tokens, per head
    (``heads`` read from the attention module). Traceable: call it under ``jax.jit``.

    Args:
        eps_fn: the conditional noise predictor, e.g. ``StableDiffusion.eps``.
        z_t: noisy latents.
        t: continuous times ``(timestep + 1) / T``, ``[b]`` or a scalar.
        context: prompt embeddings ``[b, tokens, dim]``.

    Returns:
        :class:`CrossAttention`.

    Raises:
        ValueError: when the network has no such cross-attention layer (attention absent, or
            fused into one kernel that interception cannot see).
    """
    found: dict[str, list[Array]] = {name: [] for name in _PROJECTIONS}
    heads: list[int] = []

    def interceptor(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        module = ctx.module
        parent = module.parent
        if (
            ctx.method_name == "__call__"
            and module.name in found
            and isinstance(parent, nn.Module)
            and parent.name == _CROSS_ATTENTION
        ):
            found[module.name].append(out)
            if module.name == "to_q":
                heads.append(int(parent.heads))
        return out

    with nn.intercept_methods(interceptor):
        eps = eps_fn(z_t, t, context)
    counts = {name: len(v) for name, v in found.items()}
    if not counts["to_q"] or len(set(counts.values())) != 1:
        raise ValueError(
            "eps_fn's network has no readable cross-attention: the attention detectors need "
            f"'{_CROSS_ATTENTION}' modules with separate to_q/to_k/to_v projections (diffusers' "
            f"BasicTransformerBlock as mmh_jax's UNet2DCondition ports it); found {counts}. A "
            "model with fused or absent attention cannot be read this way."
        )
    probs = []
    for q, k, h in zip(found["to_q"], found["to_k"], heads):
        b, n, inner = q.shape
        d = inner // h
        qh = q.reshape(b, n, h, d).astype(jnp.float32)
        kh = k.reshape(b, k.shape[1], h, d).astype(jnp.float32)
        logits = jnp.einsum("bnhd,bmhd->bhnm", qh, kh) * d**-0.5
        probs.append(jax.nn.softmax(logits, axis=-1))
    return CrossAttention(eps, tuple(probs), tuple(found["to_v"]))


def cross_attention_paths(
    eps_fn: Any, z_t: Float[Array, "b c h w"], t: Float[ArrayLike, " b"], context: Array
) -> tuple[str, ...]:
    """The module path of every cross-attention layer :func:`cross_attention` records, in its
    order (``"down_blocks_0/attentions_0/transformer_blocks_0/attn2"``: diffusers' names).
    Traces ``eps_fn`` abstractly (``jax.eval_shape``): nothing is computed."""
    paths: list[str] = []

    def interceptor(next_fun, args, kwargs, ctx):
        module = ctx.module
        parent = module.parent
        if (
            ctx.method_name == "__call__"
            and module.name == "to_q"
            and isinstance(parent, nn.Module)
            and parent.name == _CROSS_ATTENTION
        ):
            paths.append("/".join(parent.scope.path))
        return next_fun(*args, **kwargs)

    def run(z, tt, c):
        with nn.intercept_methods(interceptor):
            return eps_fn(z, tt, c)

    jax.eval_shape(run, z_t, t, context)
    return tuple(paths)


def bright_ending_layers(paths: Sequence[str], pixels: Sequence[int]) -> tuple[int, ...]:
    """The cross-attention layers Chen et al. read the bright ending from: those of the UNet's
    down path (``down_blocks_*``) at its highest resolution (the most pixels; SD v1: the two of
    the first down block, 64 x 64 on 512-pixel images, as their code's ``AttentionStore``).

    Args:
        paths: each layer's module path (:func:`cross_attention_paths`).
        pixels: each layer's number of query pixels (``probs[i].shape[2]``).

    Returns:
        The indices of the chosen layers.

    Raises:
        ValueError: when no layer is on the down path.
    """
    down = [i for i, p in enumerate(paths) if p.split("/")[0].startswith("down_blocks")]
    if not down:
        raise ValueError(
            f"no cross-attention layer on the UNet's down path (down_blocks_*): {list(paths)}"
        )
    most = max(pixels[i] for i in down)
    return tuple(i for i in down if pixels[i] == most)


def _prompt_inputs(sd: StableDiffusion, prompts: Sequence[str]) -> tuple[Array, np.ndarray]:
    """Prompt embeddings ``[p, m, dim]`` and the position of each prompt's end token ``[p]``."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"prompts must be a non-empty list of strings, got {type(prompts).__name__}"
        )
    ids = sd.tokenize(list(prompts))
    return sd.encode_prompt(ids), np.asarray(end_positions(ids))


def end_positions(tokens: Any) -> Any:
    """The position of each prompt's end token: the first position holding the row's last
    token (Stable Diffusion v1 pads with the end token, so that is the end token itself).

    Args:
        tokens: token ids ``[b, n]`` (NumPy or JAX).

    Returns:
        ``[b]`` positions.
    """
    xp = jnp if isinstance(tokens, jax.Array) else np
    return xp.argmax(tokens == tokens[:, -1:], axis=1)


def token_attention(maps: Sequence[Float[Array, "b n m"]]) -> Float[Array, "b m"]:
    """The attention on each token averaged over the pixels and the layers, from the
    head-averaged cross-attention ``[b, pixels, tokens]`` of each layer."""
    return jnp.mean(jnp.stack([m.mean(axis=1) for m in maps]), axis=0)


def token_statistics(a: Float[Array, "b m"], end: Any) -> AttentionEntropy:
    """Ren et al.'s statistics of the token attention ``a`` (:func:`token_attention`): the
    entropy ``-sum_j a_j log a_j``, ``a_0`` and the attention on the end token and after it."""
    entropy = -jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), axis=-1)
    after_end = jnp.arange(a.shape[1])[None, :] >= jnp.asarray(end)[:, None]
    return AttentionEntropy(entropy, a[:, 0], jnp.sum(jnp.where(after_end, a, 0.0), axis=-1))


def end_token_map(
    maps: Sequence[Float[Array, "b n m"]], end: Any, shape: tuple[int, int]
) -> Float[Array, "b h w"]:
    """The attention each pixel pays to the end token, averaged over the layers, each layer's
    map upsampled (nearest) to ``shape``, the latents' ``(h, w)``."""
    rows = jnp.asarray(end)[:, None, None]
    return jnp.mean(
        jnp.stack(
            [_upsample_map(jnp.take_along_axis(m, rows, axis=2)[..., 0], shape) for m in maps]
        ),
        axis=0,
    )


def _check_count(value: int, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _grid(sd: StableDiffusion, num_steps: int) -> tuple[np.ndarray, Array, Array]:
    grid = sd.ddim_grid
    steps = ddim_timesteps(
        sd.schedule.num_timesteps,
        num_steps=num_steps,
        spacing=grid.spacing,
        steps_offset=grid.steps_offset,
    )
    a, a_next = ddim_alphas(
        sd.schedule, jnp.asarray(steps), num_steps, grid.set_alpha_to_one, jnp.float32
    )
    return steps, a, a_next


def _starting_noise(sd: StableDiffusion, key: Array, prompts: int, images: int) -> Array:
    """The starting noise of every prompt x image (prompt-major): image ``j`` of every prompt
    starts from ``normal(fold_in(key, j))``, as ``StableDiffusion.sample``."""
    return jnp.tile(images_noise(key, images, sd.latent_shape), (prompts, 1, 1, 1))


def _first_time(sd: StableDiffusion, steps: np.ndarray) -> Array:
    """The continuous time ``(timestep + 1) / T`` of the grid's first (noisiest) step."""
    return jnp.float32((steps[0] + 1) / sd.schedule.num_timesteps)


@functools.partial(jax.jit, static_argnames=("capture",))
def _guided_step(eps_fn, x, t, a, a_next, cond, uncond, guidance, *, capture: bool):
    """One DDIM step with guidance; with ``capture`` also the conditional branch's
    head-averaged cross-attention ``[b, pixels, tokens]`` of every layer."""
    b = x.shape[0]
    if not capture:
        eps_u, eps_c = eps_pair(eps_fn, x, t, cond, uncond)
        maps = ()
    else:
        recorded = {}

        def recording(x2, t2, context):
            att = cross_attention(eps_fn, x2, t2, context)
            recorded["maps"] = tuple(jnp.mean(p[b:], axis=1) for p in att.probs)
            return att.eps

        eps_u, eps_c = eps_pair(recording, x, t, cond, uncond)
        maps = recorded["maps"]
    eps = eps_u + guidance * (eps_c - eps_u)
    return ddim_update(x, eps, a, a_next), maps


def _attention_along_ddim(sd, cond, *, key, images_per_prompt, num_steps, guidance, capture):
    """Run DDIM up to the last step in ``capture`` (0-based step indices) for every prompt x
    image (prompt-major) and return the head-averaged attention maps of the captured steps,
    ``{step: (per layer [p * k, pixels, tokens])}``."""
    steps, a, a_next = _grid(sd, num_steps)
    x = _starting_noise(sd, key, cond.shape[0], images_per_prompt)
    cond = jnp.repeat(cond, images_per_prompt, axis=0)
    T = sd.schedule.num_timesteps
    out = {}
    for i in range(max(capture) + 1):
        t = jnp.full((x.shape[0],), (steps[i] + 1) / T, x.dtype)
        x, maps = _guided_step(
            sd.eps,
            x,
            t,
            a[i],
            a_next[i],
            cond,
            sd.uncond_embedding,
            jnp.float32(guidance),
            capture=i in capture,
        )
        if i in capture:
            out[i] = maps
    return out


class AttentionEntropy(NamedTuple):
    """Ren et al.'s cross-attention statistics of each prompt (see :func:`attention_entropy`).

    Attributes:
        entropy: ``-sum_j a_j log a_j`` of the mean attention over the tokens, ``[p]``.
        begin: attention on the beginning token ``a_0``, ``[p]``.
        end: attention on the end (summary) tokens, the end token and the padding after it,
            ``[p]``.
    """

    entropy: Float[Array, " p"]
    begin: Float[Array, " p"]
    end: Float[Array, " p"]


def attention_entropy(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    images_per_prompt: int = 1,
    num_steps: int = 50,
    early_steps: int = 1,
    guidance: float = 7.5,
) -> AttentionEntropy:
    """Cross-attention entropy and beginning/end-token attention at the first denoising steps
    (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models
    through Cross Attention", ECCV 2024).

    With ``a_j`` the attention on token ``j`` averaged over pixels, heads, cross-attention
    layers, the first ``early_steps`` DDIM steps and the images, the statistic is the entropy
    ``E = -sum_j a_j log a_j`` over the ``m`` context tokens (``log m`` for uniform attention),
    the beginning token and the padding included, as Ren et al.'s code computes it. Memorized
    prompts pull attention off the beginning token onto their trigger tokens: their entropy is
    higher and ``a_0`` lower at the first steps (``early_steps=1``: the first step alone). Ren
    et al.'s detection reads one layer at the first step (their code's mode E: the fourth of SD
    v1's 16 cross-attention layers) or all layers at the last 20% of steps (mode D); this
    function averages all layers. The direction assumes attention held by the beginning token
    (:data:`DETECTOR_DIRECTIONS`). Cost: ``2 * early_steps * images_per_prompt`` UNet
    evaluations per prompt.

    Args:
        sd: the pipeline.
        prompts: the prompts.
        key: PRNG key of the starting noise.
        images_per_prompt: starting noises per prompt.
        num_steps: the DDIM grid (50).
        early_steps: how many first steps to average (1).
        guidance: the guidance scale of the steps taken (7.5).

    Returns:
        :class:`AttentionEntropy`.
    """
    k = _check_count(images_per_prompt, "images_per_prompt")
    early = _check_count(early_steps, "early_steps")
    if early > _check_count(num_steps, "num_steps"):
        raise ValueError(f"early_steps={early} exceeds num_steps={num_steps}")
    cond, end = _prompt_inputs(sd, prompts)
    maps = _attention_along_ddim(
        sd,
        cond,
        key=key,
        images_per_prompt=k,
        num_steps=num_steps,
        guidance=guidance,
        capture=set(range(early)),
    )
    a = jnp.mean(jnp.stack([token_attention(layers) for layers in maps.values()]), axis=0)
    return token_statistics(a.reshape(len(prompts), k, -1).mean(axis=1), end)


def _upsample_map(m: Array, shape: tuple[int, int]) -> Array:
    """``[b, pixels]`` of one layer -> ``[b, h, w]`` at the latents' resolution (nearest)."""
    h, w = shape
    factor = math.isqrt(h * w // m.shape[1])
    hl, wl = h // factor, w // factor
    m = m.reshape(m.shape[0], hl, wl)
    return jnp.repeat(jnp.repeat(m, factor, axis=1), factor, axis=2)


class BrightEnding(NamedTuple):
    """Chen et al.'s bright-ending attention of each prompt (see :func:`bright_ending`).

    Attributes:
        score: the mean of ``map`` over the pixels, ``[p]``.
        map: the end token's attention at the final step, ``[p, h, w]`` at the latents'
            resolution (the localisation of the memorized region).
    """

    score: Float[Array, " p"]
    map: Float[Array, "p h w"]


def bright_ending(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    images_per_prompt: int = 1,
    num_steps: int = 50,
    guidance: float = 7.5,
) -> BrightEnding:
    """The end token's cross-attention at the final denoising step (Chen et al., "Exploring
    Local Memorization in Diffusion Models via Bright Ending Attention", ICLR 2025).

    At the last DDIM step, the attention each pixel pays to the prompt's end token, averaged
    over heads, over the cross-attention layers Chen et al.'s code reads (the down path's at
    its highest resolution, :func:`bright_ending_layers`; each upsampled to the latents'
    resolution) and over the images, is the bright-ending map ``BE(u)``: for memorized prompts
    it is bright over the memorized region and dark elsewhere, for others dim everywhere. The
    score is its mean over the pixels, a prompt-level reading of that contrast; Chen et al.
    themselves detect with ``BE`` as a mask of Wen et al.'s CFG-noise norm,
    ``||BE * (eps_c - eps_u)|| / mean(BE)``. Cost: a whole generation,
    ``2 * num_steps * images_per_prompt`` UNet evaluations per prompt.

    Args:
        sd: the pipeline.
        prompts: the prompts.
        key: PRNG key of the starting noise.
        images_per_prompt: generations per prompt.
        num_steps: DDIM steps (50).
        guidance: the guidance scale (7.5).

    Returns:
        :class:`BrightEnding`.
    """
    k = _check_count(images_per_prompt, "images_per_prompt")
    num_steps = _check_count(num_steps, "num_steps")
    cond, end = _prompt_inputs(sd, prompts)
    maps = _attention_along_ddim(
        sd,
        cond,
        key=key,
        images_per_prompt=k,
        num_steps=num_steps,
        guidance=guidance,
        capture={num_steps - 1},
    )[num_steps - 1]
    shape = sd.latent_shape[1:]
    paths = cross_attention_paths(
        sd.eps, jnp.zeros((1, *sd.latent_shape)), jnp.ones((1,)), cond[:1]
    )
    maps = [maps[i] for i in bright_ending_layers(paths, [m.shape[1] for m in maps])]
    be = end_token_map(maps, jnp.repeat(jnp.asarray(end), k), shape)
    be = be.reshape(len(prompts), k, *shape).mean(axis=1)
    return BrightEnding(be.mean(axis=(1, 2)), be)


@jax.jit
def _value_activations(eps_fn, z, t, context):
    values = cross_attention(eps_fn, z, t, context).values
    return jnp.concatenate(
        [jnp.mean(jnp.abs(v.astype(jnp.float32)), axis=1) for v in values], axis=-1
    )


def value_activations(sd: StableDiffusion, prompts: Sequence[str]) -> Float[Array, "p neurons"]:
    """The activation of every neuron of every cross-attention value projection (Hintersdorf
    et al., "Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion
    Models", NeurIPS 2024).

    The value projection ``V = W_v c`` of each cross-attention layer sees the prompt only; a
    neuron's activation is ``mean_j |V_j|`` over the context tokens. One UNet evaluation
    (at ``t = 1`` on zero latents, which the values do not depend on) per prompt.

    Args:
        sd: the pipeline.
        prompts: the prompts.

    Returns:
        ``[p, neurons]``, the layers' neurons concatenated in call order.
    """
    cond, _ = _prompt_inputs(sd, prompts)
    z = jnp.zeros((cond.shape[0], *sd.latent_shape), jnp.float32)
    return _value_activations(sd.eps, z, jnp.ones((cond.shape[0],), jnp.float32), cond)


class NemoReference(NamedTuple):
    """Mean and standard deviation of each neuron's activation over non-memorized prompts.

    Attributes:
        mean: ``[neurons]``.
        std: ``[neurons]``.
    """

    mean: Float[Array, " neurons"]
    std: Float[Array, " neurons"]


def nemo_reference(activations: Float[ArrayLike, "n neurons"]) -> NemoReference:
    """The per-neuron statistics NeMo z-scores against, from the :func:`value_activations` of
    ``n >= 2`` prompts known not to be memorized (the standard deviation with ``n - 1``)."""
    a = jnp.asarray(activations, jnp.float32)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"activations must be [n >= 2, neurons], got shape {a.shape}")
    return NemoReference(a.mean(axis=0), a.std(axis=0, ddof=1))


class NemoOutliers(NamedTuple):
    """NeMo's out-of-distribution neurons of each prompt (see :func:`nemo_outliers`).

    Attributes:
        max_z: the largest ``|z|`` over the neurons, ``[p]``.
        count: how many neurons have ``|z| > threshold``, ``[p]``.
    """

    max_z: Float[Array, " p"]
    count: Float[Array, " p"]


def nemo_outliers(
    activations: Float[ArrayLike, "p neurons"], reference: NemoReference, *, threshold: float = 3.0
) -> NemoOutliers:
    """NeMo's z-score rule: ``z_i = (a_i - mu_i) / sigma_i`` of every neuron against the
    non-memorized prompts' statistics; neurons with ``|z_i| > threshold`` are out of
    distribution, and memorized prompts have many and large ones.

    Args:
        activations: :func:`value_activations` of the prompts to screen.
        reference: :func:`nemo_reference` of non-memorized prompts.
        threshold: the z-score threshold (3, this library's default).

    Returns:
        :class:`NemoOutliers`.
    """
    a = jnp.asarray(activations, jnp.float32)
    if a.ndim != 2 or a.shape[1] != reference.mean.shape[0]:
        raise ValueError(
            f"activations must be [p, {reference.mean.shape[0]}] (the reference's "
            f"neurons), got shape {a.shape}"
        )
    z = jnp.abs(a - reference.mean) / jnp.maximum(reference.std, jnp.finfo(jnp.float32).tiny)
    return NemoOutliers(z.max(axis=1), jnp.sum(z > threshold, axis=1).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("num_probes", "exact"))
def _jacobian_trace(score_fn, x, t, keys, *, num_probes, exact):
    event = x.shape[1:]
    d = math.prod(event)
    if exact:

        def tangent_at(i):
            return jnp.broadcast_to(jax.nn.one_hot(i, d, dtype=x.dtype).reshape(event), x.shape)

        num = d
    else:

        def tangent_at(i):
            return hutchinson_probe(keys, i, event_shape=event, dtype=x.dtype)

        num = num_probes
    _, total = sum_vjv(lambda y: score_fn(y, t), x, tangent_at, num, min(num, 32))
    return total if exact else total / num_probes


def score_jacobian_trace(
    score_fn: Any,
    x_t: Float[Array, "b *event"],
    t: Float[ArrayLike, " b"],
    *,
    key: Array | None = None,
    num_probes: int = 1,
    exact: bool = False,
) -> Float[Array, " b"]:
    """``tr grad_x s(x_t, t)``, the trace of the score's Jacobian (the Laplacian of
    ``log p_t``, the sum of its Hessian's eigenvalues), through the library's FLIPD trace kernel
    (forward-mode ``jvp``; Hutchinson with Rademacher probes, or exact).

    Args:
        score_fn: ``score_fn(x_t, t)``.
        x_t: the points ``[b, *event]`` (where the score is evaluated, no scaling).
        t: times ``[b]`` or a scalar.
        key: PRNG key of the probes: one key, or one per point (then a point's estimate does
            not depend on its batch). Required unless ``exact``.
        num_probes: Hutchinson probes.
        exact: ``d`` basis tangents instead of probes.

    Returns:
        ``[b]``.
    """
    x_t = jnp.asarray(x_t)
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), (x_t.shape[0],))
    keys = None if exact else per_sample_keys(key, x_t.shape[0])
    return _jacobian_trace(
        as_pytree_fn(score_fn),
        x_t,
        t,
        keys,
        num_probes=_check_count(num_probes, "num_probes"),
        exact=exact,
    )


def _image_keys(key: Array, prompts: int, images: int) -> Array:
    """One key per prompt x image (prompt-major), ``fold_in(key, j)`` for image ``j``."""
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(images))
    return jnp.tile(keys, prompts)


def sharpness(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    images_per_prompt: int = 1,
    num_steps: int = 50,
    guidance: float = 7.5,
    num_probes: int = 1,
) -> Float[Array, " p"]:
    """Sharpness of the guided density at the start of sampling (Jeon et al., "Understanding
    Memorization in Generative Models via Sharpness in Probability Landscapes", 2025).

    ``-tr grad s^CFG(x_T, t_T)``, the negated trace of the Hessian of ``log p_t`` under the
    CFG-adjusted score (paper, Eq. 2) at the starting noise and the first DDIM timestep,
    averaged over the images: memorized prompts sit in sharp (strongly curved) regions, large
    positive values. Hutchinson with ``num_probes`` Rademacher probes per image, keyed by
    ``fold_in(fold_in(key, j), 1)``; cost about ``2 * (1 + num_probes) * images_per_prompt``
    UNet evaluations per prompt (a ``jvp`` costs about two).

    Args:
        sd: the pipeline.
        prompts: the prompts.
        key: PRNG key of the starting noise and the probes.
        images_per_prompt: starting noises per prompt.
        num_steps: the DDIM grid whose first timestep is used (50).
        guidance: the guidance scale (7.5).
        num_probes: Hutchinson probes per image.

    Returns:
        ``[p]``.
    """
    k = _check_count(images_per_prompt, "images_per_prompt")
    cond, _ = _prompt_inputs(sd, prompts)
    steps, _, _ = _grid(sd, _check_count(num_steps, "num_steps"))
    p = cond.shape[0]
    x = _starting_noise(sd, key, p, k)
    score_fn = cfg_score_fn(
        sd.eps,
        jnp.repeat(cond, k, axis=0),
        sd.uncond_embedding,
        schedule=sd.schedule,
        guidance=guidance,
    )
    t = _first_time(sd, steps)
    probe_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(_image_keys(key, p, k))
    trace = score_jacobian_trace(score_fn, x, t, key=probe_keys, num_probes=num_probes)
    return -trace.reshape(p, k).mean(axis=1)


@jax.jit
def _one_step_x0(eps_fn, x, t, a, cond, uncond, guidance):
    eps_u, eps_c = eps_pair(eps_fn, x, t, cond, uncond)
    return ddim_x0(x, eps_u + guidance * (eps_c - eps_u), a)


def _sobel(gray: Float[Array, "b h w"]) -> Float[Array, "b h w"]:
    """Sobel gradient magnitude (edge replicated at the border)."""
    g = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (
        g[:, :-2, 2:]
        + 2 * g[:, 1:-1, 2:]
        + g[:, 2:, 2:]
        - g[:, :-2, :-2]
        - 2 * g[:, 1:-1, :-2]
        - g[:, 2:, :-2]
    )
    gy = (
        g[:, 2:, :-2]
        + 2 * g[:, 2:, 1:-1]
        + g[:, 2:, 2:]
        - g[:, :-2, :-2]
        - 2 * g[:, :-2, 1:-1]
        - g[:, :-2, 2:]
    )
    return jnp.sqrt(gx**2 + gy**2)


def edge_consistency(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    images_per_prompt: int = 4,
    num_steps: int = 50,
    guidance: float = 7.5,
) -> Float[Array, " p"]:
    """Webster's one-step white-box test for template copies (Webster, "A Reproducible
    Extraction of Training Images from Diffusion Models", 2023).

    One guided denoising step from ``k`` starting noises predicts ``x_0`` (DDIM's
    ``(x_T - sqrt(1 - a) eps) / sqrt(a)`` at the first timestep); for a memorized prompt the
    decoded predictions already share their edges, for others they are blurred and differ.
    With ``E_i`` the Sobel magnitude of image ``i``'s grey levels, the score is
    ``||mean_i E_i|| / mean_i ||E_i||`` (Frobenius norms): 1 when all edge maps coincide, about
    ``1 / sqrt(k)`` for unrelated ones. Cost: ``2 * images_per_prompt`` UNet evaluations and as
    many VAE decodes per prompt.

    Args:
        sd: the pipeline.
        prompts: the prompts.
        key: PRNG key of the starting noise.
        images_per_prompt: seeds compared, at least 2 (4).
        num_steps: the DDIM grid whose first timestep is used (50).
        guidance: the guidance scale (7.5).

    Returns:
        ``[p]`` in ``[0, 1]``.
    """
    k = _check_count(images_per_prompt, "images_per_prompt", low=2)
    cond, _ = _prompt_inputs(sd, prompts)
    steps, a, _ = _grid(sd, _check_count(num_steps, "num_steps"))
    p = cond.shape[0]
    x = _starting_noise(sd, key, p, k)
    images = sd.decode(
        _one_step_x0(
            sd.eps,
            x,
            _first_time(sd, steps),
            a[0],
            jnp.repeat(cond, k, axis=0),
            sd.uncond_embedding,
            jnp.float32(guidance),
        )
    )
    return jax.vmap(edge_agreement)(images.reshape(p, k, *images.shape[1:]))


def edge_agreement(images: Float[ArrayLike, "k c h w"]) -> Float[Array, ""]:
    """``||mean_i E_i|| / mean_i ||E_i||`` of the Sobel magnitudes ``E_i`` of the images'
    grey levels (the channel mean): 1 when all edge maps coincide (Webster's one-step test,
    :func:`edge_consistency`)."""
    images = jnp.asarray(images, jnp.float32)
    edges = _sobel(images.mean(axis=1)).reshape(images.shape[0], -1)
    return jnp.linalg.norm(edges.mean(axis=0)) / jnp.maximum(
        jnp.linalg.norm(edges, axis=-1).mean(), jnp.finfo(jnp.float32).tiny
    )


def generation_clusters(
    sd: StableDiffusion,
    prompts: Sequence[str],
    *,
    key: Array,
    images_per_prompt: int = 16,
    cluster_size: int = 10,
    num_steps: int = 50,
    guidance: float = 7.5,
    space: Literal["pixels", "latents"] = "pixels",
) -> Float[Array, " p"]:
    """Carlini et al.'s generate-many-and-cluster black-box test ("Extracting Training Data
    from Diffusion Models", USENIX Security 2023).

    Carlini et al. generate 500 images per prompt, join two generations when their l2 distance
    is below a threshold and call the prompt memorized when a clique of at least 10 forms. As a
    threshold-free score: the smallest, over the generations, l2 distance (root mean square per
    value) to the ``cluster_size - 1``-th nearest other generation, negated: high when some
    ``cluster_size`` generations are near-copies of one another. Distances through
    :func:`mmh_jax.retrieval.nearest_neighbours`. Cost: ``2 * num_steps * images_per_prompt``
    UNet evaluations per prompt (and the decodes with ``space="pixels"``).

    Args:
        sd: the pipeline.
        prompts: the prompts.
        key: PRNG key of the starting noise.
        images_per_prompt: generations per prompt (Carlini et al.: 500).
        cluster_size: the clique size (10), at most ``images_per_prompt``.
        num_steps: DDIM steps (50).
        guidance: the guidance scale (7.5).
        space: compare decoded images or latents.

    Returns:
        ``[p]``, ``-radius`` of the tightest ``cluster_size``-cluster.
    """
    k = _check_count(images_per_prompt, "images_per_prompt", low=2)
    size = _check_count(cluster_size, "cluster_size", low=2)
    if size > k:
        raise ValueError(f"cluster_size={size} exceeds images_per_prompt={k}")
    if space not in ("pixels", "latents"):
        raise ValueError(f"space must be 'pixels' or 'latents', got {space!r}")
    cond, _ = _prompt_inputs(sd, prompts)
    latents = sd.sample(
        cond,
        key=key,
        images_per_prompt=k,
        guidance=guidance,
        num_steps=_check_count(num_steps, "num_steps"),
    ).sample
    items = sd.decode(latents) if space == "pixels" else latents
    items = items.reshape(cond.shape[0], k, -1)
    return jnp.stack([cluster_score(g, cluster_size=size) for g in items])


def cluster_score(
    items: Float[ArrayLike, "k *item"], *, cluster_size: int = 10
) -> Float[Array, ""]:
    """Minus the radius of the tightest ``cluster_size``-cluster of one prompt's generations:
    the smallest, over the items, root-mean-square distance to the ``cluster_size - 1``-th
    nearest other item (:func:`mmh_jax.retrieval.nearest_neighbours`; Carlini et al.'s
    test, :func:`generation_clusters`)."""
    items = jnp.asarray(items, jnp.float32)
    items = items.reshape(items.shape[0], -1)
    size = _check_count(cluster_size, "cluster_size", low=2)
    if size > items.shape[0]:
        raise ValueError(f"cluster_size={size} exceeds the {items.shape[0]} items")
    radius = nearest_neighbours(items, items, k=size).distances[:, -1].min()
    return -radius / math.sqrt(items.shape[1])
