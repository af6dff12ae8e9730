"""Which tokens of a prompt drive memorization in Stable Diffusion: per-token attributions of a
prompt on its own DDIM trajectories (Wen et al.; paper, Section 4.2, Appendix D.2, Figures 7a
and 11).

:func:`attribute_prompt` generates the prompt's trajectories, takes their latents at chosen DDIM
steps as the points of a memorization metric (``A^CFG``, ``A^{s^CFG}`` or ``A^FLIPD``,
:mod:`mmh_jax.memorization.prompt`) and returns, per prompt token, the norm of the metric's
gradient with respect to that token's embedding; :func:`attribute_prompts` does several metrics
on one shared set of trajectories. The defaults follow the authors' public code
(:func:`default_attribution_images`, :func:`default_attribution_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, get_args

import jax
import numpy as np

from mmh_jax._src.checks import check_option
from mmh_jax.memorization.prompt import Metric, token_attributions, trajectory_points
from mmh_jax.memorization.rephrase import _decode_word

__all__ = [
    "METRICS",
    "PromptAttribution",
    "attribute_prompt",
    "attribute_prompts",
    "default_attribution_images",
    "default_attribution_steps",
    "metric_label",
]

METRICS: tuple[str, ...] = get_args(Metric)
"""The prompt metrics tokens can be attributed by (``cfg``, ``cfg_score``, ``flipd``)."""
_METRIC_LABELS = {"cfg": "A^CFG", "cfg_score": "A^sCFG", "flipd": "A^FLIPD"}
_END_OF_WORD = "</w>"


class PromptAttribution(NamedTuple):
    """What :func:`attribute_prompt` returns: one prompt's token attributions for one metric."""

    prompt: str
    """The prompt."""
    metric: str
    """``"cfg"``, ``"cfg_score"`` or ``"flipd"``."""
    tokens: list[str]
    """The prompt's raw CLIP BPE tokens (``"</w>"`` closes a word), start, end and padding
    excluded: what :func:`~mmh_jax.memorization.rephrase.selected_words` takes."""
    words: list[str]
    """Each token as display text (``"</w>"`` stripped, byte-level BPE decoded)."""
    scores: np.ndarray
    """float64 ``[len(tokens)]``: the attribution of each token (the L2 norm of the metric's
    gradient with respect to the token's embedding, averaged over the points)."""
    value: float
    """The metric ``A(c)`` of the prompt on the same points."""


def metric_label(metric: str) -> str:
    """A metric's name in tables and figures: ``"A^CFG"``, ``"A^sCFG"``, ``"A^FLIPD"``."""
    return _METRIC_LABELS.get(metric, metric)


def _check_metric(metric: Any) -> str:
    check_option(metric, "metric", METRICS)
    return metric


def _metric_list(metrics: Any, what: str = "metrics") -> tuple[str, ...]:
    """``metrics`` (one name or several) as a tuple of distinct known metrics.

    Raises:
        ValueError: naming ``what``: empty, an unknown metric, a metric twice.
    """
    found = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not found:
        raise ValueError(f"{what} is empty: give at least one of {', '.join(METRICS)}")
    for m in found:
        _check_metric(m)
    if len(set(found)) != len(found):
        raise ValueError(f"{what} lists a metric twice: {list(found)}")
    return found


def _check_count(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (or ``None`` where allowed); a ValueError names ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def default_attribution_images(metric: Metric) -> int:
    """Images per prompt of the public code's attributions: 4 for the CFG metrics, 1 for
    FLIPD."""
    _check_metric(metric)
    return 1 if metric == "flipd" else 4


def default_attribution_steps(metric: Metric, num_steps: int) -> list[int]:
    """DDIM step indices of the public code's attributions: all for the CFG metrics (the
    paper's ``t ~ U(0, 1]``), steps 10-49 of 50 for FLIPD (``t`` in about ``(0, 0.2]``),
    scaled to ``num_steps`` (the last fifth is kept, ``num_steps // 5`` onward)."""
    _check_metric(metric)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    first = (10 * num_steps) // 50 if metric == "flipd" else 0
    return list(range(first, num_steps))


class _PromptTokens(NamedTuple):
    """A prompt's token ids and its own tokens (what :func:`_prompt_tokens` returns)."""

    ids: np.ndarray
    """int32 ``[1, max_length]``: the padded ids the text encoder reads."""
    tokens: list[str]
    """The raw CLIP BPE tokens, start, end and padding excluded."""
    words: list[str]
    """Each token as display text."""


def _prompt_tokens(sd: Any, prompt: Any, *, where: str = "prompt") -> _PromptTokens:
    """The prompt's ids and its own tokens (start, end and padding excluded); a truncated
    prompt warns (``StableDiffusion.tokenize``).

    Raises:
        ValueError: naming ``where``: not a string, or no tokens (an empty prompt).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"{where} must be a string, got {type(prompt).__name__}")
    ids = sd.tokenize([prompt])
    row = ids[0]
    ends = np.flatnonzero(row[1:] == sd.tokenizer.eos_token_id)
    end = 1 + int(ends[0]) if ends.size else row.size
    content = row[1:end].tolist()
    if not content:
        raise ValueError(
            f"{where} {prompt!r} has no tokens (an empty prompt has nothing to "
            "attribute or perturb)"
        )
    tokens = list(sd.tokenizer.convert_ids_to_tokens(content))
    return _PromptTokens(ids, tokens, [_decode_word(t.removesuffix(_END_OF_WORD)) for t in tokens])


def _first_images(result: Any, n: int) -> Any:
    """A DDIM result (with its trajectory) restricted to its first ``n`` images (one prompt)."""

    def cut(x):
        return None if x is None else x[:, :n]

    return result._replace(
        sample=result.sample[:n],
        latents=cut(result.latents),
        eps_uncond=cut(result.eps_uncond),
        eps_cond=cut(result.eps_cond),
    )


def _attributions_on(
    sd: Any,
    prompt: str,
    tokens: _PromptTokens,
    cond: Any,
    result: Any,
    *,
    metrics: Sequence[str],
    key: Any,
    num_images: int | None,
    num_steps: int,
    steps: Sequence[int] | None = None,
    guidance: float = 7.5,
    num_probes: int = 1,
) -> list[PromptAttribution]:
    """Attributions of one prompt for several metrics on one given DDIM trajectory set
    (``result``, sampled from ``cond`` with ``return_trajectory=True``); each metric uses the
    first images it needs. The other arguments are :func:`attribute_prompts`'.

    Returns:
        One :class:`PromptAttribution` per metric, in the order given.
    """
    out = []
    n_tokens = len(tokens.tokens)
    for i, metric in enumerate(metrics):
        n = default_attribution_images(metric) if num_images is None else num_images
        chosen = default_attribution_steps(metric, num_steps) if steps is None else steps
        points = trajectory_points(_first_images(result, n), schedule=sd.schedule, steps=chosen)
        attr = token_attributions(
            sd.eps,
            cond,
            sd.uncond_embedding,
            points,
            metric=metric,
            schedule=sd.schedule,
            guidance=guidance,
            key=jax.random.fold_in(key, i),
            num_probes=num_probes,
        )
        scores = np.asarray(attr.scores, np.float64)[1 : 1 + n_tokens]
        out.append(
            PromptAttribution(
                prompt, metric, list(tokens.tokens), list(tokens.words), scores, float(attr.value)
            )
        )
    return out


def attribute_prompts(
    sd: Any,
    prompt: str,
    *,
    metrics: Sequence[Metric],
    key: Any,
    num_images: int | None = None,
    num_steps: int = 50,
    steps: Sequence[int] | None = None,
    guidance: float = 7.5,
    num_probes: int = 1,
) -> list[PromptAttribution]:
    """:func:`attribute_prompt` for several metrics at once, on one shared set of DDIM
    trajectories (as many images as the most demanding metric needs; each metric uses the first
    images it needs, so the results equal separate :func:`attribute_prompt` calls with the same
    ``key``).

    Args:
        sd: a :class:`~mmh_jax.models.stable_diffusion.StableDiffusion`.
        prompt: the prompt.
        metrics: metrics to attribute with, each once.
        key, num_images, num_steps, steps, guidance, num_probes: as
            :func:`attribute_prompt`.

    Returns:
        One :class:`PromptAttribution` per metric, in the order given.
    """
    metrics = _metric_list(metrics)
    num_images = _check_count(num_images, "num_images", allow_none=True)
    num_steps = _check_count(num_steps, "num_steps")
    num_probes = _check_count(num_probes, "num_probes")
    tokens = _prompt_tokens(sd, prompt)
    cond = sd.encode_prompt(tokens.ids)
    needed = max(
        default_attribution_images(m) if num_images is None else num_images for m in metrics
    )
    k_noise, k_probe = jax.random.split(key)
    result = sd.sample(
        cond,
        key=k_noise,
        images_per_prompt=needed,
        guidance=guidance,
        num_steps=num_steps,
        return_trajectory=True,
    )
    return _attributions_on(
        sd,
        prompt,
        tokens,
        cond,
        result,
        metrics=metrics,
        key=k_probe,
        num_images=num_images,
        num_steps=num_steps,
        steps=steps,
        guidance=guidance,
        num_probes=num_probes,
    )


def attribute_prompt(
    sd: Any,
    prompt: str,
    *,
    metric: Metric,
    key: Any,
    num_images: int | None = None,
    num_steps: int = 50,
    steps: Sequence[int] | None = None,
    guidance: float = 7.5,
    num_probes: int = 1,
) -> PromptAttribution:
    """Which tokens of a prompt drive a memorization metric (Wen et al.; paper, Section 4.2,
    Appendix D.2, Figures 7a and 11).

    Generates ``num_images`` DDIM trajectories of the prompt (classifier-free guidance
    ``guidance``), takes their latents at ``steps`` as the points of the metric (Eqs. 24, 25,
    28: ``t ~ U(0, 1]`` for the CFG metrics, about ``(0, 0.2]`` for FLIPD) and returns, per
    prompt token, the L2 norm of the gradient of the metric with respect to that token's
    embedding, averaged over the points
    (:func:`~mmh_jax.memorization.prompt.token_attributions`: one UNet backward at a time).

    Args:
        sd: a :class:`~mmh_jax.models.stable_diffusion.StableDiffusion`.
        prompt: the prompt; one longer than the text encoder reads is truncated with a warning.
        metric: ``"cfg"`` (``A^CFG``, Wen et al.'s), ``"cfg_score"`` (``A^{s^CFG}``) or
            ``"flipd"`` (``A^FLIPD``).
        key: PRNG key of the starting noise and the FLIPD probes.
        num_images: trajectories; default the public code's, 4 for the CFG metrics and 1 for
            FLIPD (:func:`default_attribution_images`).
        num_steps: DDIM steps (50).
        steps: indices of the DDIM steps used as points; default all for the CFG metrics and
            steps 10-49 of 50 for FLIPD, scaled to ``num_steps``
            (:func:`default_attribution_steps`).
        guidance: the guidance scale (7.5).
        num_probes: Hutchinson probes per point (FLIPD).

    Returns:
        :class:`PromptAttribution` of the prompt's tokens (start, end and padding excluded).

    Raises:
        ValueError: an empty prompt (no tokens), a bad metric or count.
    """
    return attribute_prompts(
        sd,
        prompt,
        metrics=[_check_metric(metric)],
        key=key,
        num_images=num_images,
        num_steps=num_steps,
        steps=steps,
        guidance=guidance,
        num_probes=num_probes,
    )[0]
