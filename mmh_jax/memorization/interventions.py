"""Inference-time mitigations that act inside the UNet's cross-attention, by Flax interception.

Each function here wraps a conditional noise predictor ``eps_fn(z_t, t, context)`` (e.g.
``StableDiffusion.eps``) into another one of the same signature, returned as a
:class:`jax.tree_util.Partial`: the model's code and weights are untouched, and the projections
of every cross-attention layer (``attn2`` of a ``BasicTransformerBlock``, diffusers' name, the
modules :func:`~mmh_jax.memorization.detectors.cross_attention` reads) are modified as the
network runs through :func:`flax.linen.intercept_methods`. The wrapped predictor drops in
wherever ``eps_fn`` goes (``StableDiffusion.sample``'s DDIM, or the scoring engine's
generation with ``dataclasses.replace(model, eps_fn=...)``), so a mitigated image is generated
from the same starting noise as the unmitigated one.

- :func:`rescale_begin_attention` (Ren et al., ECCV 2024): the cross-attention logit of the
  beginning token multiplied by ``factor`` in the conditional branch.
- :func:`deactivate_neurons` and :func:`nemo_deactivation` (Hintersdorf et al., NeurIPS 2024,
  "Finding NeMo"): chosen output channels of the cross-attention value projections set to
  zero; :func:`nemo_deactivation` chooses them per prompt by NeMo's z-score rule against
  non-memorized prompts (:func:`~mmh_jax.memorization.detectors.nemo_reference`).

The neurons are numbered as :func:`~mmh_jax.memorization.detectors.value_activations` numbers
them: every cross-attention value projection's output channels, the layers concatenated in call
order (down blocks, mid block, up blocks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import ArrayLike, Float

from mmh_jax._src.partial import as_pytree_fn

if TYPE_CHECKING:
    import flax.linen as nn

    from mmh_jax.memorization.detectors import NemoReference

__all__ = [
    "Part",
    "PARTS",
    "INTERVENTIONS",
    "rescale_begin_attention",
    "deactivate_neurons",
    "nemo_deactivation",
    "nemo_neurons",
]

Part = Literal["down", "mid", "up"]
"""Where a cross-attention layer sits in the UNet: a down block, the mid block or an up block."""
PARTS: tuple[str, ...] = get_args(Part)
"""Every :data:`Part`, in the UNet's call order."""
INTERVENTIONS: tuple[str, ...] = ("attention-rescale", "nemo")
"""The names of the interventions in ``mmh-jax sd mitigate --methods``: Ren et al.'s
:func:`rescale_begin_attention` and Hintersdorf et al.'s :func:`nemo_deactivation`."""

_CROSS_ATTENTION = "attn2"  # diffusers' name of BasicTransformerBlock's cross-attention


def _check_layers(layers: Any) -> tuple[str, ...]:
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers or any(p not in PARTS for p in layers) or len(set(layers)) != len(layers):
        raise ValueError(
            f"layers must be distinct names among {', '.join(PARTS)}, got {list(layers)}"
        )
    return tuple(p for p in PARTS if p in layers)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_top_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"top_k must be an int >= 0, got {value!r}")
    return int(value)


def _part(module: nn.Module) -> str | None:
    """The :data:`Part` of a projection of a cross-attention layer, ``None`` for any other
    module call."""
    import flax.linen as nn

    parent = module.parent
    if not (isinstance(parent, nn.Module) and parent.name == _CROSS_ATTENTION):
        return None
    top = module.path[0] if module.path else ""
    return next((p for p in PARTS if top.startswith(p)), None)


def _no_layer(found: int, what: str) -> None:
    if not found:
        raise ValueError(
            f"eps_fn's network has no cross-attention {what} to modify: the interventions "
            f"need '{_CROSS_ATTENTION}' modules with separate to_k/to_v projections "
            "(diffusers' BasicTransformerBlock as mmh_jax's UNet2DCondition ports it)"
        )


@dataclasses.dataclass(frozen=True)
class _BeginRescaled:
    layers: tuple[str, ...]

    def __call__(self, eps_fn, uncond, factor, z_t, t, context):
        import flax.linen as nn

        seen = []

        def interceptor(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name != "__call__" or ctx.module.name != "to_k":
                return out
            part = _part(ctx.module)
            if part is None:
                return out
            seen.append(part)
            if part not in self.layers:
                return out
            keys_of = args[0]  # the context the keys are computed from, [b, m, e]
            cond = jnp.any(keys_of != uncond.astype(keys_of.dtype), axis=(1, 2))
            scale = jnp.where(cond, factor, 1.0).astype(out.dtype)
            # q . (c k_0) = c (q . k_0): scaling the key scales the logit, for every query
            return out.at[:, 0].multiply(scale[:, None])

        with nn.intercept_methods(interceptor):
            eps = eps_fn(z_t, t, context)
        _no_layer(len(seen), "key projection")
        return eps


def rescale_begin_attention(
    eps_fn: Any,
    *,
    uncond: Float[ArrayLike, "1 m e"],
    factor: float = 1.25,
    layers: Sequence[Part] = PARTS,
) -> Partial:
    """Ren et al.'s inference-time mitigation ("Unveiling and Mitigating Memorization in
    Text-to-image Diffusion Models through Cross Attention", ECCV 2024): the cross-attention
    logit of the beginning token is multiplied by ``factor``,

        ``S_{n,0} <- factor * S_{n,0}``, ``S_{n,j} = q_n . k_j / sqrt(d)``,

    before the softmax, for every pixel ``n``, head and cross-attention layer, at every
    denoising step, in the conditional branch only (rows whose context differs from
    ``uncond``): where the beginning token's logits are positive, ``factor > 1`` raises its
    share of the attention and pulls attention off the trigger tokens that memorized prompts
    concentrate on. Their public code (github.com/renjie3/MemAttn,
    ``local_cmd_inference_time_mitigation.sh``: ``--c1 1.25 --cross_attn_mask --miti_mem``;
    ``refactored_attention_processor.py``) re-scales the logits of the conditional rows of the
    batch (``[1::2]`` of a one-prompt ``[uncond, cond]`` batch) in every ``attn2`` layer at all
    steps with ``c1 = 1.25``. Done here by multiplying the
    beginning token's key ``k_0`` by ``factor`` as the ``to_k`` projection returns it, which
    gives the same logits. Not done: their ``--cross_attn_mask``, which also masks the
    summary tokens (the padding after the end token) out of the softmax in both branches; it
    needs each prompt's length, which the context alone does not carry.

    Args:
        eps_fn: the conditional noise predictor ``eps_fn(z_t, t, context)``.
        uncond: the unconditional (empty prompt) context ``[1, m, e]``; rows equal to it are
            left alone.
        factor: the logit factor, ``> 0`` (1.25; 1 changes nothing).
        layers: the parts of the UNet (:data:`PARTS`) whose cross-attention is re-scaled.

    Returns:
        ``eps(z_t, t, context)`` with the re-scaled attention (a ``Partial``).

    Raises:
        ValueError: ``factor`` not a finite number ``> 0``, an unknown part in ``layers``; when
            called, a network without such cross-attention layers.
    """
    factor = _check_positive(factor, "factor")
    uncond = jnp.asarray(uncond)
    if uncond.ndim != 3 or uncond.shape[0] != 1:
        raise ValueError(f"uncond must be one context [1, m, e], got shape {uncond.shape}")
    return Partial(
        _BeginRescaled(_check_layers(layers)), as_pytree_fn(eps_fn), uncond, jnp.float32(factor)
    )


@dataclasses.dataclass(frozen=True)
class _Deactivated:
    """Zero value channels: the fixed ``neurons`` (sorted indices), or with ``threshold`` per
    row by NeMo's rule against ``(mean, std)``."""

    neurons: tuple[int, ...] | None
    layers: tuple[str, ...]
    threshold: float | None = None
    top_k: int = 0

    def __call__(self, eps_fn, mean, std, z_t, t, context):
        import flax.linen as nn

        offsets = [0]
        parts = []

        def interceptor(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name != "__call__" or ctx.module.name != "to_v":
                return out
            part = _part(ctx.module)
            if part is None:
                return out
            lo = offsets[-1]
            width = out.shape[-1]
            offsets.append(lo + width)
            parts.append(part)
            if part not in self.layers:
                return out
            if self.neurons is not None:
                chosen = np.zeros(width, bool)
                picked = [i - lo for i in self.neurons if lo <= i < lo + width]
                chosen[picked] = True
                off = jnp.asarray(chosen)[None, None, :]
            else:
                if mean.shape[0] < lo + width:
                    _wrong_reference(mean.shape[0])
                a = jnp.mean(jnp.abs(out.astype(jnp.float32)), axis=1)  # [b, width]
                off = _nemo_rule(
                    a, mean[lo : lo + width], std[lo : lo + width], self.threshold, self.top_k
                )[:, None, :]
            return jnp.where(off, jnp.zeros((), out.dtype), out)

        with nn.intercept_methods(interceptor):
            eps = eps_fn(z_t, t, context)
        _no_layer(len(parts), "value projection")
        total = offsets[-1]
        if self.neurons is not None and self.neurons and self.neurons[-1] >= total:
            raise ValueError(
                f"neurons: index {self.neurons[-1]} is out of range for the network's "
                f"{total} value neurons"
            )
        if self.neurons is None and mean.shape[0] != total:
            _wrong_reference(mean.shape[0], total)
        return eps


def _wrong_reference(size: int, total: int | None = None) -> None:
    raise ValueError(
        f"reference has {size} neurons, "
        + ("fewer than the network's value neurons" if total is None else f"not {total}")
        + ": compute it with value_activations on the same model"
    )


def _nemo_rule(a, mean, std, threshold, top_k):
    """``|a - mean| / std > threshold``, or among the ``top_k`` largest ``a``, per row."""
    z = jnp.abs(a - mean) / jnp.maximum(std, jnp.finfo(jnp.float32).tiny)
    off = z > threshold
    if top_k:
        k = min(top_k, a.shape[-1])
        top = jax.lax.top_k(a, k)[1]
        off = off | jnp.any(jax.nn.one_hot(top, a.shape[-1], dtype=bool), axis=1)
    return off


def deactivate_neurons(eps_fn: Any, neurons: Sequence[int] | ArrayLike) -> Partial:
    """Hintersdorf et al.'s deactivation ("Finding NeMo: Localizing Neurons Responsible For
    Memorization in Diffusion Models", NeurIPS 2024): the chosen output channels of the
    cross-attention value projections ``V = W_v c`` set to zero,

        ``V[:, :, i] <- 0`` for every chosen neuron ``i``,

    for every token, at every denoising step and in both guidance branches (their hook
    ``RescaleLinearActivations`` with ``scaling_factor = 0`` on ``attn2.to_v``, applied to the
    whole batch).

    Args:
        eps_fn: the conditional noise predictor ``eps_fn(z_t, t, context)``.
        neurons: the neurons' indices in
            :func:`~mmh_jax.memorization.detectors.value_activations`' numbering (e.g.
            :func:`nemo_neurons`), or a boolean mask over them.

    Returns:
        ``eps(z_t, t, context)`` with the neurons off (a ``Partial``).

    Raises:
        ValueError: a negative or non-integer index; when called, an index beyond the
            network's value neurons.
    """
    idx = np.asarray(neurons)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"neurons must be integer indices or a boolean mask, got {neurons!r}")
    if idx.size and idx.min() < 0:
        raise ValueError(f"neurons: index {int(idx.min())} is negative")
    none = jnp.zeros((0,), jnp.float32)
    return Partial(
        _Deactivated(tuple(int(i) for i in np.unique(idx)), PARTS),
        as_pytree_fn(eps_fn),
        none,
        none,
    )


def nemo_deactivation(
    eps_fn: Any,
    reference: NemoReference,
    *,
    threshold: float = 5.0,
    top_k: int = 0,
    layers: Sequence[Part] = ("down", "mid"),
) -> Partial:
    """NeMo's mitigation with each prompt's neurons chosen as it is generated (Hintersdorf et
    al., NeurIPS 2024): in every cross-attention value projection of ``layers``, the neurons
    whose activation ``a_i = mean_j |V_{j,i}|`` (over the context tokens, as
    :func:`~mmh_jax.memorization.detectors.value_activations`) is out of distribution,

        ``|a_i - mu_i| / sigma_i > threshold``

    against non-memorized prompts' statistics ``reference``
    (:func:`~mmh_jax.memorization.detectors.nemo_reference`), and with ``top_k`` also the
    ``top_k`` largest activations of the layer, are set to zero (:func:`deactivate_neurons`).
    Each context row is judged on its own activations, so one batch may hold many prompts; the
    values depend on the prompt alone, so the choice is the same at every step.

    This is NeMo's initial selection at its first setting (their
    ``3_detect_memorized_neurons.py``: ``theta = 5``, ``k = 0``, the value layers of the down
    blocks and the mid block). Simplified: NeMo then lowers ``theta`` by 0.25 (down to 1) and
    raises ``k`` until the SSIM of the first step's noise difference falls below 0.428, and
    refines the set by re-activating the layers and neurons that are not needed; both cost many
    generations per prompt and are not done. NeMo also zeroes the memorized prompt's neurons in
    the unconditional branch; here that branch is judged on the empty prompt's own
    activations.

    Args:
        eps_fn: the conditional noise predictor.
        reference: per-neuron statistics of non-memorized prompts, over all value neurons.
        threshold: the z-score threshold, ``> 0`` (5).
        top_k: the largest activations of each layer also deactivated (0).
        layers: the parts of the UNet (:data:`PARTS`) whose neurons may be deactivated.

    Returns:
        ``eps(z_t, t, context)`` with each row's outlier neurons off (a ``Partial``).

    Raises:
        ValueError: ``threshold`` not a finite number ``> 0``, ``top_k < 0``, an unknown part
            in ``layers``; when called, a reference of another network.
    """
    threshold = _check_positive(threshold, "threshold")
    return Partial(
        _Deactivated(None, _check_layers(layers), threshold, _check_top_k(top_k)),
        as_pytree_fn(eps_fn),
        jnp.asarray(reference.mean, jnp.float32),
        jnp.asarray(reference.std, jnp.float32),
    )


def nemo_neurons(
    activations: Float[ArrayLike, " neurons"],
    reference: NemoReference,
    *,
    threshold: float = 5.0,
) -> np.ndarray:
    """The neurons NeMo's z-score rule picks for one prompt: ``|a_i - mu_i| / sigma_i >
    threshold`` (Hintersdorf et al.'s initial selection, ``theta = 5``), as indices for
    :func:`deactivate_neurons`.

    Args:
        activations: the prompt's
            :func:`~mmh_jax.memorization.detectors.value_activations` ``[neurons]``.
        reference: :func:`~mmh_jax.memorization.detectors.nemo_reference` of non-memorized
            prompts.
        threshold: the z-score threshold, ``> 0``.

    Returns:
        Sorted int indices.
    """
    threshold = _check_positive(threshold, "threshold")
    a = np.asarray(activations, np.float32)
    if a.shape != tuple(reference.mean.shape):
        raise ValueError(
            f"activations must be one prompt's [{reference.mean.shape[0]}] (the reference's "
            f"neurons), got shape {a.shape}"
        )
    z = np.abs(a - np.asarray(reference.mean)) / np.maximum(
        np.asarray(reference.std), np.finfo(np.float32).tiny
    )
    return np.flatnonzero(z > threshold)
