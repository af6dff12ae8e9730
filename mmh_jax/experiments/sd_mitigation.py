"""Which prompt tokens drive memorization in Stable Diffusion, and sampling that avoids it (paper,
Section 4.2, Appendix D.2-D.5, Figures 7, 9, 10, 11).

Two experiments on top of :mod:`mmh_jax.memorization.prompt` (the differentiable metrics
``A^CFG``, ``A^{s^CFG}``, ``A^FLIPD``, token attributions, embedding optimisation) and
:mod:`mmh_jax.memorization.rephrase` (token choice, rephrasers, random token addition):

* :func:`attribute_prompt` -- the per-token attribution of one prompt for one metric (Wen et
  al.'s gradient norms; paper, Section 4.2, Figures 7a and 11), on the prompt's own DDIM
  trajectories; :func:`plot_attributions` draws the prompt's tokens coloured by attribution.
* :func:`mitigate` -- for every prompt, method, ``k`` and repeat, a changed prompt (or a changed
  embedding), the image it gives from the *same starting noise* as the original generation, the
  similarity of that image to a reference (the memorized training image when given, else the
  original generation) and its CLIP score against the *original* prompt (paper, Figure 7c,
  Appendix D.4-D.5). Methods:

  - ``"attribution"``: ``k`` tokens drawn from the softmax of the attributions (temperature 0.1,
    smoothing 1e-3, as the public code), their words handed to a rephraser (the paper: GPT-4
    following Box 1; here any :data:`~mmh_jax.memorization.rephrase.Rephraser`, by default the
    offline :class:`~mmh_jax.memorization.rephrase.SynonymRephraser`);
  - ``"uniform"``: the paper's ablation, ``k`` tokens drawn uniformly;
  - ``"rta"``: random token addition (Somepalli et al. 2023a): ``k`` random CLIP vocabulary
    words inserted;
  - ``"embedding"``: the prompt embedding optimised with AdamW on the metric (Wen et al.'s
    inference-time mitigation for ``A^CFG``; Appendix D.3 and Figure 9 for ``A^FLIPD``), then
    sampled from the same noise. It has no ``k``: one row per prompt and metric, ``k = 0``.

  :func:`plot_mitigation_grid` draws Figure 10 (original and each method's image per prompt),
  :func:`plot_tradeoff` the Figure 7c curves (CLIP score against similarity, one line per
  method through its ``k`` values).

The scorers are plain callables, so any model works: ``similarity(images_a, images_b) -> [b]``
and ``clip_scorer(images, prompts) -> [b]`` take uint8 ``[b, h, w, 3]`` images (two batches
may differ in size). :func:`load_sscd_similarity` builds the paper's SSCD similarity from a
checkpoint file, :func:`load_clip_scorer` the CLIP score from a ``CLIPModel`` folder.

The command-line layer (``mmh-jax sd attribute`` and ``mmh-jax sd mitigate``) is
:func:`run_attribute` and :func:`run_mitigate` with their configs; everything else is usable from
Python without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from rich.console import Console
from rich.table import Table

from mmh_jax._src.batching import spans
from mmh_jax.experiments.common import (
    DemoInputError,
    finite_float,
    make_progress,
    prepare_out_dir,
    require,
    save_figure,
    write_csv,
    write_parquet,
)

__all__ = [
    "Metric",
    "Method",
    "METRICS",
    "METHODS",
    "Similarity",
    "ClipScorer",
    "PromptAttribution",
    "EmbeddingSettings",
    "MitigationResult",
    "attribute_prompt",
    "attribute_prompts",
    "default_attribution_images",
    "default_attribution_steps",
    "embedding_defaults",
    "mitigate",
    "method_label",
    "expected_rows",
    "summarise_mitigation",
    "load_sscd_similarity",
    "load_clip_scorer",
    "read_reference_images",
    "plot_attributions",
    "plot_mitigation_grid",
    "plot_tradeoff",
    "AttributeConfig",
    "MitigateConfig",
    "add_attribute_arguments",
    "add_mitigate_arguments",
    "attribute_config_from_args",
    "mitigate_config_from_args",
    "run_attribute",
    "run_mitigate",
]

Metric = Literal["cfg", "cfg_score", "flipd"]
Method = Literal["attribution", "uniform", "rta", "embedding"]
METRICS: tuple[str, ...] = get_args(Metric)
METHODS: tuple[str, ...] = get_args(Method)
_TEXT_METHODS = ("attribution", "uniform", "rta")
_METRIC_NAMES = {"cfg": "A^CFG", "cfg_score": "A^sCFG", "flipd": "A^FLIPD"}

Similarity = Callable[[np.ndarray, np.ndarray], Any]
"""``similarity(images_a, images_b) -> [b]``: how alike image ``i`` of two uint8
``[b, h, w, 3]`` batches is (higher: more alike; the paper's SSCD similarity). The two batches
may have different image sizes."""

ClipScorer = Callable[[np.ndarray, Sequence[str]], Any]
"""``clip_scorer(images, prompts) -> [b]``: how well uint8 image ``i`` ``[b, h, w, 3]`` matches
prompt ``i`` (higher: better; the paper's CLIP score)."""

_END_OF_WORD = "</w>"


# --------------------------------------------------------------------------------------------
# Token attributions
# --------------------------------------------------------------------------------------------


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


def _check_metric(metric: Any) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}, got {metric!r}")
    return metric


def _metric_list(metric: Any, what: str = "metric") -> list[str]:
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics:
        raise ValueError(f"{what} is empty: give at least one of {', '.join(METRICS)}")
    for m in metrics:
        _check_metric(m)
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"{what} lists a metric twice: {metrics}")
    return metrics


def _display(tokenizer: Any, token: str) -> str:
    text = token[: -len(_END_OF_WORD)] if token.endswith(_END_OF_WORD) else token
    decoder = getattr(tokenizer, "byte_decoder", None)
    if decoder and all(c in decoder for c in text):
        return bytearray(decoder[c] for c in text).decode("utf-8", errors="replace")
    return text


class _PromptTokens(NamedTuple):
    ids: np.ndarray  # [1, max_length] int32
    tokens: list[str]
    words: list[str]


def _prompt_tokens(sd: Any, prompt: Any, where: str = "prompt") -> _PromptTokens:
    """The prompt's ids and its own tokens (start, end and padding excluded); a truncated
    prompt warns (``StableDiffusion.tokenize``), an empty one raises."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where} must be a string, got {type(prompt).__name__}")
    ids = sd.tokenize([prompt])
    row = ids[0]
    eos = sd.tokenizer.eos_token_id
    ends = np.flatnonzero(row[1:] == eos)
    end = 1 + int(ends[0]) if ends.size else row.size
    content = row[1:end].tolist()
    if not content:
        raise ValueError(f"{where} {prompt!r} has no tokens (an empty prompt has nothing to "
                         "attribute or perturb)")
    tokens = list(sd.tokenizer.convert_ids_to_tokens(content))
    return _PromptTokens(ids, tokens, [_display(sd.tokenizer, t) for t in tokens])


def _first_images(result: Any, n: int) -> Any:
    """A DDIM result restricted to its first ``n`` images (one prompt)."""
    def cut(x):
        return None if x is None else x[:, :n]

    return result._replace(sample=result.sample[:n], latents=cut(result.latents),
                           eps_uncond=cut(result.eps_uncond), eps_cond=cut(result.eps_cond))


def _attributions_on(sd: Any, prompt: str, pt: _PromptTokens, cond: Any, result: Any, *,
                     metrics: Sequence[str], key: Any, num_images: int | None,
                     num_steps: int, steps: Sequence[int] | None, guidance: float,
                     num_probes: int) -> list[PromptAttribution]:
    """Attributions of one prompt for several metrics on one shared trajectory."""
    import jax

    from mmh_jax.memorization.prompt import token_attributions, trajectory_points

    out = []
    n_tokens = len(pt.tokens)
    for i, metric in enumerate(metrics):
        n = default_attribution_images(metric) if num_images is None else num_images
        chosen = default_attribution_steps(metric, num_steps) if steps is None else steps
        points = trajectory_points(_first_images(result, n), schedule=sd.schedule, steps=chosen)
        attr = token_attributions(sd.eps, cond, sd.uncond_embedding, points, metric=metric,
                                  schedule=sd.schedule, guidance=guidance,
                                  key=jax.random.fold_in(key, i), num_probes=num_probes)
        scores = np.asarray(attr.scores, np.float64)[1:1 + n_tokens]
        out.append(PromptAttribution(prompt, metric, list(pt.tokens), list(pt.words), scores,
                                     float(attr.value)))
    return out


def _check_count(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


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
    import jax

    metrics = _metric_list(metrics, "metrics")
    num_images = _check_count(num_images, "num_images", allow_none=True)
    num_steps = _check_count(num_steps, "num_steps")
    num_probes = _check_count(num_probes, "num_probes")
    pt = _prompt_tokens(sd, prompt)
    cond = sd.encode_prompt(pt.ids)
    needed = max(default_attribution_images(m) if num_images is None else num_images
                 for m in metrics)
    k_noise, k_probe = jax.random.split(key)
    result = sd.sample(cond, key=k_noise, images_per_prompt=needed, guidance=guidance,
                       num_steps=num_steps, return_trajectory=True)
    return _attributions_on(sd, prompt, pt, cond, result, metrics=metrics, key=k_probe,
                            num_images=num_images, num_steps=num_steps, steps=steps,
                            guidance=guidance, num_probes=num_probes)


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
    return attribute_prompts(sd, prompt, metrics=[_check_metric(metric)], key=key,
                             num_images=num_images, num_steps=num_steps, steps=steps,
                             guidance=guidance, num_probes=num_probes)[0]


# --------------------------------------------------------------------------------------------
# Mitigation
# --------------------------------------------------------------------------------------------


class EmbeddingSettings(NamedTuple):
    """Settings of the ``"embedding"`` mitigation (paper, Appendix D.3; Wen et al.)."""

    step: int
    """Index of the DDIM step whose latents are the metric's points."""
    learning_rate: float
    """AdamW's learning rate."""
    num_updates: int
    """At most this many AdamW updates."""
    target: float | None
    """Stop once the metric reaches it (below for the CFG metrics, above for FLIPD)."""


def embedding_defaults(metric: Metric, num_steps: int = 50) -> EmbeddingSettings:
    """The public code's settings of the embedding mitigation for ``metric``.

    * ``"flipd"`` (the paper, Appendix D.3): DDIM step 40 of 50 (scaled to ``num_steps``),
      lr 0.05, 20 updates, no target.
    * ``"cfg"`` (Wen et al.): step 0, lr 0.05, at most 10 updates, stop at
      ``||eps_c - eps_u|| <= 3``; the ``"cfg"`` metric of
      :mod:`mmh_jax.memorization.prompt` is the *squared* norm (Eq. 15), so the target is 9.
    * ``"cfg_score"``: as ``"cfg"`` without a target (none was published).

    Args:
        metric: the metric.
        num_steps: DDIM steps of the sampler.

    Returns:
        :class:`EmbeddingSettings`.
    """
    _check_metric(metric)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if metric == "flipd":
        return EmbeddingSettings(min(num_steps - 1, (40 * num_steps) // 50), 0.05, 20, None)
    return EmbeddingSettings(0, 0.05, 10, 9.0 if metric == "cfg" else None)


class MitigationResult(NamedTuple):
    """What :func:`mitigate` returns."""

    rows: list[dict]
    """One per prompt x method (x metric for ``"attribution"``, ``"embedding"``) x ``k`` x
    repeat (``"embedding"``: ``k = 0``, one repeat): ``prompt_index``, ``prompt``, ``method``,
    ``metric`` (``""`` for ``"uniform"``/``"rta"``), ``k``, ``repeat``, ``words`` (the perturbed
    words joined by ``" | "``), ``new_prompt``, ``changed``, ``error`` (``""`` unless the
    rephraser failed: the prompt was then kept), ``similarity`` (of the new image to the
    reference), ``clip_score`` (of the new image against the original prompt; both NaN without
    their scorer and averaged over the prompt's images), ``reference`` (``"training"`` or
    ``"generation"``), and for ``"embedding"`` ``metric_before``, ``metric_after``,
    ``updates`` (NaN, NaN, -1 otherwise)."""
    originals: list[dict]
    """One per prompt: ``prompt_index``, ``prompt``, ``num_tokens``, ``reference``,
    ``similarity`` and ``clip_score`` of the original generation (the start of each curve)."""
    attributions: list[PromptAttribution]
    """The attributions used by ``"attribution"`` (prompt-major, one per metric)."""
    images: dict[str, list[np.ndarray]]
    """For the grid (Figure 10): ``"original"`` and each method label (:func:`method_label`)
    -> per prompt the first image (uint8 ``[h, w, 3]``) of the row with ``k = grid_k`` and
    repeat 0 (the ``"embedding"`` row for that method)."""
    new_prompts: dict[str, list[str]]
    """The new prompt of each image in :attr:`images` (same keys and order)."""


def method_label(method: str, metric: str) -> str:
    """A method's name in tables and figures: ``"attribution (A^FLIPD)"``, ``"uniform"``..."""
    return f"{method} ({_METRIC_NAMES.get(metric, metric)})" if metric else method


def _to_uint8(images: Any) -> np.ndarray:
    from mmh_jax.evaluation import to_uint8_nhwc

    return to_uint8_nhwc(np.asarray(images, np.float32))


def _check_images(images: Any, where: str) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"{where} must be a uint8 [h, w, 3] image, got {x.dtype} {x.shape}")
    return x


def _scores(fn: Callable | None, *args: Any, n: int, name: str) -> np.ndarray:
    if fn is None:
        return np.full(n, np.nan)
    values = np.asarray(fn(*args), np.float64).reshape(-1)
    if values.size != n:
        raise ValueError(f"{name} returned {values.size} values for {n} images")
    return values


def _row_key(key: Any, prompt_index: int, method: str, metric: str, k: int, repeat: int) -> Any:
    import jax

    code = 16 + 4 * METHODS.index(method) + (METRICS.index(metric) + 1 if metric else 0)
    for value in (prompt_index, code, k, repeat):
        key = jax.random.fold_in(key, value)
    return key


def _generate(sd: Any, conds: list, *, key: Any, num_images: int, batch_size: int,
              num_steps: int, guidance: float, progress: Callable[[int], None] | None
              ) -> np.ndarray:
    """Images of several embeddings ``[1, n, dim]`` from one starting noise, in padded batches
    of ``batch_size`` (one compiled shape): uint8 ``[len(conds), num_images, h, w, 3]``."""
    from mmh_jax.experiments.stable_diffusion import _padded

    out = []
    for lo, hi in spans(len(conds), batch_size):
        cond = _padded(np.concatenate([np.asarray(c) for c in conds[lo:hi]]), batch_size)
        result = sd.sample(cond, key=key, images_per_prompt=num_images, guidance=guidance,
                           num_steps=num_steps)
        images = _to_uint8(sd.decode(result.sample))
        out.append(images.reshape((batch_size, num_images) + images.shape[1:])[:hi - lo])
        if progress is not None:
            progress(hi - lo)
    return np.concatenate(out)


def _closest(ks: Sequence[int], target: int) -> int:
    return min(ks, key=lambda k: (abs(k - target), k))


def mitigate(
    sd: Any,
    prompts: Sequence[str],
    *,
    methods: Sequence[Method] = METHODS,
    ks: Sequence[int] = (1, 2, 3, 4, 6, 8),
    repeats: int = 5,
    metric: Metric | Sequence[Metric],
    key: Any,
    rephraser: Callable[[str, Sequence[str]], str] | None = None,
    similarity: Similarity | None = None,
    clip_scorer: ClipScorer | None = None,
    reference_images: Sequence[Any | None] | None = None,
    num_images: int = 1,
    num_steps: int = 50,
    guidance: float = 7.5,
    attribution_images: int | None = None,
    temperature: float = 0.1,
    smoothing: float = 1e-3,
    embedding: EmbeddingSettings | dict[str, EmbeddingSettings] | None = None,
    vocabulary: Sequence[str] | None = None,
    rephrase_timeout: float | None = None,
    grid_k: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    on_prompt: Callable[[MitigationResult], None] | None = None,
) -> MitigationResult:
    """Sample-time mitigation of memorized prompts and its evaluation (paper, Section 4.2,
    Appendix D.3-D.5, Figures 7c, 9, 10).

    For every prompt: its attributions (one DDIM trajectory set, :func:`attribute_prompt`'s
    defaults), then for every method, metric, ``k`` and repeat a new prompt (or embedding,
    see the module docstring), then the new image(s) sampled from the same starting noise as
    the original generation, their similarity to the reference and their CLIP score against the
    original prompt. A rephraser that raises, times out or answers nonsense keeps the prompt and
    the row reports the error; the run goes on.

    Args:
        sd: a :class:`~mmh_jax.models.stable_diffusion.StableDiffusion`.
        prompts: the (memorized) prompts.
        methods: any of ``"attribution"``, ``"uniform"``, ``"rta"``, ``"embedding"``.
        ks: numbers of tokens to perturb (the paper: 1, 2, 3, 4, 6, 8); for ``"attribution"``
            and ``"uniform"`` each must be at most the prompt's number of tokens.
        repeats: rephrasings per prompt, method and ``k`` (the paper: 5).
        metric: the memorization metric(s) of the attributions and of the embedding
            optimisation: ``"cfg"``, ``"cfg_score"``, ``"flipd"``, or several (one
            ``"attribution"`` and ``"embedding"`` line per metric, as Figure 7c).
        key: PRNG key of everything random (noise, token draws, RTA, probes).
        rephraser: ``(prompt, words) -> new prompt``; default the offline
            :class:`~mmh_jax.memorization.rephrase.SynonymRephraser`.
        similarity: ``similarity(new_images, reference_images) -> [b]`` (e.g.
            :func:`load_sscd_similarity`); ``None`` leaves the column NaN.
        clip_scorer: ``clip_scorer(images, prompts) -> [b]`` (e.g. :func:`load_clip_scorer`);
            ``None`` leaves the column NaN.
        reference_images: per prompt the memorized training image (uint8 ``[h, w, 3]``) or
            ``None``; where none is given the reference is the original generation from the
            same noise.
        num_images: images per new prompt (and per original), all from the prompt's noise.
        num_steps: DDIM steps (50).
        guidance: the guidance scale (7.5).
        attribution_images: trajectories of the attributions (default per metric: 4 CFG,
            1 FLIPD).
        temperature, smoothing: of the attribution-guided token draw (0.1, 1e-3).
        embedding: :class:`EmbeddingSettings` for every metric, or a dict metric -> settings;
            default :func:`embedding_defaults`.
        vocabulary: words of ``"rta"``; default the tokenizer's whole words
            (:func:`~mmh_jax.memorization.rephrase.clip_vocabulary_words`).
        rephrase_timeout: seconds to wait for the rephraser (``None``: no limit).
        grid_k: the ``k`` whose images go to :attr:`MitigationResult.images` (default the one
            of ``ks`` closest to 4, as Figure 10).
        batch_size: new prompts sampled per compiled batch (padded; one shape for the run).
        progress: called with the number of images generated (rows and originals) as they are.
        on_prompt: called with the result so far after every prompt (to save partial results).

    Returns:
        :class:`MitigationResult`.

    Raises:
        ValueError: naming the argument: an empty prompt (no tokens), ``k`` larger than a
            prompt's number of tokens, unknown methods or metrics, bad counts, a reference
            image that is not uint8 ``[h, w, 3]``.
    """
    import jax

    from mmh_jax.memorization.prompt import optimize_embedding, trajectory_points
    from mmh_jax.memorization.rephrase import (
        RephraseOutcome,
        SynonymRephraser,
        choose_tokens,
        clip_vocabulary_words,
        random_token_addition,
        rephrase,
        selected_words,
        uniform_tokens,
    )

    # ---- checks, all before any computation
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of prompts, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names among {', '.join(METHODS)}, got "
                         f"{methods}")
    methods = [m for m in METHODS if m in methods]  # a fixed order
    metrics = _metric_list(metric)
    repeats = _check_count(repeats, "repeats")
    num_images = _check_count(num_images, "num_images")
    num_steps = _check_count(num_steps, "num_steps")
    batch_size = _check_count(batch_size, "batch_size")
    attribution_images = _check_count(attribution_images, "attribution_images", allow_none=True)
    text_methods = [m for m in methods if m in _TEXT_METHODS]
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    if text_methods:
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        ks = [_check_count(k, "k") for k in ks]
        if len(set(ks)) != len(ks):
            raise ValueError(f"ks lists a k twice: {ks}")
    grid_k = (_closest(ks, 4) if ks else 0) if grid_k is None else grid_k
    if text_methods and grid_k not in ks:
        raise ValueError(f"grid_k={grid_k} is not one of ks={ks}")
    tokens = [_prompt_tokens(sd, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if any(m in methods for m in ("attribution", "uniform")):
        for i, (p, pt) in enumerate(zip(prompts, tokens)):
            too_big = [k for k in ks if k > len(pt.tokens)]
            if too_big:
                raise ValueError(f"k={max(too_big)} is larger than the number of tokens of "
                                 f"prompts[{i}] ({len(pt.tokens)} tokens: {p!r}); lower the "
                                 "ks or drop the prompt")
    if reference_images is not None:
        reference_images = list(reference_images)
        if len(reference_images) != len(prompts):
            raise ValueError(f"reference_images has {len(reference_images)} entries for "
                             f"{len(prompts)} prompts (use None for a prompt without one)")
        reference_images = [None if r is None else _check_images(r, f"reference_images[{i}]")
                            for i, r in enumerate(reference_images)]
    if similarity is not None and not callable(similarity):
        raise ValueError("similarity must be a callable (images_a, images_b) -> [b]")
    if clip_scorer is not None and not callable(clip_scorer):
        raise ValueError("clip_scorer must be a callable (images, prompts) -> [b]")
    settings = {}
    if "embedding" in methods:
        for m in metrics:
            given = embedding.get(m) if isinstance(embedding, dict) else embedding
            s = embedding_defaults(m, num_steps) if given is None else EmbeddingSettings(*given)
            if not -num_steps <= s.step < num_steps:
                raise ValueError(f"embedding step {s.step} out of range for {num_steps} DDIM "
                                 "steps")
            settings[m] = s
    if "rta" in methods:
        vocabulary = clip_vocabulary_words(sd.tokenizer) if vocabulary is None else vocabulary
        if isinstance(vocabulary, str) or not list(vocabulary):
            raise ValueError("vocabulary must be a non-empty sequence of words")
    if rephraser is None:
        rephraser = SynonymRephraser()

    rows: list[dict] = []
    originals: list[dict] = []
    attributions: list[PromptAttribution] = []
    labels = [method_label(m, x) for m in methods
              for x in (metrics if m in ("attribution", "embedding") else [""])]
    images: dict[str, list[np.ndarray]] = {"original": [], **{label: [] for label in labels}}
    new_prompts: dict[str, list[str]] = {label: [] for label in images}

    for index, (prompt, pt) in enumerate(zip(prompts, tokens)):
        prompt_key = jax.random.fold_in(key, index)
        noise_key = jax.random.fold_in(prompt_key, 0)
        cond = sd.encode_prompt(pt.ids)
        attr = {}
        trajectory = None
        if "attribution" in methods or "embedding" in methods:
            needed = [num_images] if "embedding" in methods else []
            if "attribution" in methods:
                needed += [attribution_images or default_attribution_images(m) for m in metrics]
            trajectory = sd.sample(cond, key=noise_key, images_per_prompt=max(needed),
                                   guidance=guidance, num_steps=num_steps,
                                   return_trajectory=True)
        if "attribution" in methods:
            found = _attributions_on(sd, prompt, pt, cond, trajectory, metrics=metrics,
                                     key=jax.random.fold_in(prompt_key, 1),
                                     num_images=attribution_images, num_steps=num_steps,
                                     steps=None, guidance=guidance, num_probes=1)
            attributions.extend(found)
            attr = {a.metric: a.scores for a in found}

        jobs: list[tuple[dict, Any]] = []  # (row, embedding [1, n, dim])
        base = dict(prompt_index=index, prompt=prompt)
        for method in text_methods:
            for m in (metrics if method == "attribution" else [""]):
                for k in ks:
                    for r in range(repeats):
                        row_key = _row_key(key, index, method, m, k, r)
                        words: list[str] = []
                        if method == "rta":
                            new = random_token_addition(prompt, k, key=row_key,
                                                        vocabulary=vocabulary)
                            outcome = RephraseOutcome(new, new != prompt, None)
                        else:
                            chosen = (choose_tokens(attr[m], k, key=row_key,
                                                    temperature=temperature,
                                                    smoothing=smoothing)
                                      if method == "attribution"
                                      else uniform_tokens(len(pt.tokens), k, key=row_key))
                            words = selected_words(pt.tokens, chosen)
                            outcome = rephrase(rephraser, prompt, words,
                                               timeout=rephrase_timeout)
                        row = dict(base, method=method, metric=m, k=k, repeat=r,
                                   words=" | ".join(words), new_prompt=outcome.prompt,
                                   changed=bool(outcome.changed), error=outcome.error or "",
                                   metric_before=math.nan, metric_after=math.nan, updates=-1)
                        new_cond = (cond if not outcome.changed
                                    else sd.encode_prompt(sd.tokenize([outcome.prompt])))
                        jobs.append((row, new_cond))
        if "embedding" in methods:
            for j, m in enumerate(metrics):
                s = settings[m]
                points = trajectory_points(_first_images(trajectory, num_images),
                                           schedule=sd.schedule, steps=[s.step])
                opt = optimize_embedding(sd.eps, cond, sd.uncond_embedding, points, metric=m,
                                         schedule=sd.schedule, guidance=guidance,
                                         learning_rate=s.learning_rate,
                                         num_steps=s.num_updates, target=s.target,
                                         key=jax.random.fold_in(prompt_key, 2 + j))
                values = np.asarray(opt.values, np.float64)
                row = dict(base, method="embedding", metric=m, k=0, repeat=0, words="",
                           new_prompt=prompt, changed=opt.steps_taken > 0, error="",
                           metric_before=float(values[0]), metric_after=float(values[-1]),
                           updates=int(opt.steps_taken))
                jobs.append((row, opt.embedding))

        # the original first, then every row: one starting noise, one compiled batch shape
        generated = _generate(sd, [cond] + [c for _, c in jobs], key=noise_key,
                              num_images=num_images, batch_size=batch_size,
                              num_steps=num_steps, guidance=guidance, progress=progress)
        reference = None if reference_images is None else reference_images[index]
        if reference is None:
            refs = generated[0]
            kind = "generation"
        else:
            refs = np.repeat(reference[None], num_images, axis=0)
            kind = "training"
        sims, clips = [], []
        for lo, hi in spans(len(generated), batch_size):
            batch = generated[lo:hi].reshape((-1,) + generated.shape[2:])
            ref_batch = np.concatenate([refs] * (hi - lo))
            n = batch.shape[0]
            pad = batch_size * num_images - n
            if pad:  # one shape for the scorers too
                batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
                ref_batch = np.concatenate([ref_batch, np.repeat(ref_batch[-1:], pad, axis=0)])
            total = batch.shape[0]
            sims.append(_scores(similarity, batch, ref_batch, n=total, name="similarity")[:n])
            clips.append(_scores(clip_scorer, batch, [prompt] * total, n=total,
                                 name="clip_scorer")[:n])
        sim = np.concatenate(sims).reshape(len(generated), num_images).mean(axis=1)
        clip = np.concatenate(clips).reshape(len(generated), num_images).mean(axis=1)
        originals.append(dict(base, num_tokens=len(pt.tokens), reference=kind,
                              similarity=float(sim[0]), clip_score=float(clip[0])))
        for i, (row, _) in enumerate(jobs, start=1):
            row.update(similarity=float(sim[i]), clip_score=float(clip[i]), reference=kind)
            rows.append(row)

        images["original"].append(generated[0, 0])
        new_prompts["original"].append(prompt)
        for label in labels:
            pick = next(i for i, (row, _) in enumerate(jobs, start=1)
                        if method_label(row["method"], row["metric"]) == label
                        and row["k"] in (grid_k, 0) and row["repeat"] == 0)
            images[label].append(generated[pick, 0])
            new_prompts[label].append(jobs[pick - 1][0]["new_prompt"])
        if on_prompt is not None:
            on_prompt(MitigationResult(rows, originals, attributions, images, new_prompts))
    return MitigationResult(rows, originals, attributions, images, new_prompts)


def expected_rows(num_prompts: int, *, methods: Sequence[str], ks: Sequence[int], repeats: int,
                  metrics: Sequence[str]) -> int:
    """The number of rows :func:`mitigate` returns for these settings."""
    per_prompt = 0
    for method in methods:
        lines = len(metrics) if method in ("attribution", "embedding") else 1
        per_prompt += lines * (1 if method == "embedding" else len(ks) * repeats)
    return num_prompts * per_prompt


def summarise_mitigation(rows: Sequence[dict]) -> list[dict]:
    """Means per method, metric and ``k`` over prompts and repeats (the points of Figure 7c).

    Args:
        rows: :attr:`MitigationResult.rows`.

    Returns:
        One dict per (method, metric, k), in the order first seen: ``method``, ``metric``,
        ``label``, ``k``, ``rows``, ``similarity``, ``clip_score`` (NaN-ignoring means; NaN
        when none), ``changed`` (fraction), ``errors`` (count).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["metric"], row["k"]), []).append(row)
    out = []
    for (method, metric, k), members in groups.items():
        def mean(name: str, members=members) -> float:
            values = np.array([r[name] for r in members], np.float64)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else math.nan

        out.append(dict(method=method, metric=metric, label=method_label(method, metric), k=k,
                        rows=len(members), similarity=mean("similarity"),
                        clip_score=mean("clip_score"),
                        changed=float(np.mean([r["changed"] for r in members])),
                        errors=sum(bool(r["error"]) for r in members)))
    return out


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def load_sscd_similarity(path: str | os.PathLike, *, arch: str | None = None,
                         mode: str = "memorization", batch_size: int = 32) -> Similarity:
    """The paper's image similarity: the inner product of SSCD descriptors (Pizzi et al. 2022;
    Somepalli et al. count a copy above 0.5).

    Args:
        path: an SSCD checkpoint :func:`~mmh_jax.models.load_sscd` reads (``.torchvision.pt``,
            ``.torchscript.pt``, ``.safetensors``).
        arch: ``"resnext101_32x4d"`` (``sscd_disc_large``, the memorization papers') or
            ``"resnet50"``; ``None`` tries the first, then the second.
        mode: the preprocessing (:func:`~mmh_jax.models.sscd_preprocess`; ``"memorization"``:
            resize 256, centre crop 224, as Somepalli et al. and Wen et al.).
        batch_size: images per SSCD call.

    Returns:
        ``similarity(images_a, images_b) -> float64 [b]`` on uint8 ``[b, h, w, 3]`` batches
        (each batch of one size; the two may differ).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is no SSCD checkpoint of either architecture.
    """
    from mmh_jax.convert import ConversionError
    from mmh_jax.models import load_sscd, sscd_preprocess

    errors = []
    model = None
    for a in ([arch] if arch is not None else ["resnext101_32x4d", "resnet50"]):
        try:
            model = load_sscd(path, arch=a)
            break
        except ConversionError as err:
            errors.append(f"as {a}: {err}")
    if model is None:
        raise ValueError(f"cannot load SSCD from {str(path)!r}: " + "; ".join(errors))

    def embed(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        return np.concatenate([np.asarray(model.embed(sscd_preprocess(x[i:i + batch_size],
                                                                      mode=mode)))
                               for i in range(0, len(x), batch_size)]).astype(np.float64)

    def similarity(images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
        if len(images_a) != len(images_b):
            raise ValueError(f"similarity pairs image i of two batches: got {len(images_a)} "
                             f"and {len(images_b)} images")
        return np.sum(embed(images_a) * embed(images_b), axis=-1)

    return similarity


def load_clip_scorer(path: str | os.PathLike) -> ClipScorer:
    """torchmetrics' CLIP score (``100 * max(cos, 0)``) with a local transformers ``CLIPModel``
    folder (:func:`~mmh_jax.evaluation.load_clip`; the paper, Figure 7c).

    Args:
        path: the folder.

    Returns:
        ``clip_scorer(images, prompts) -> float64 [b]`` on uint8 ``[b, h, w, 3]`` images.
    """
    from mmh_jax.evaluation import clip_score, load_clip

    model = load_clip(path)

    def scorer(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(clip_score(model, np.asarray(images), list(prompts)), np.float64)

    return scorer


def read_reference_images(folder: str | os.PathLike, prompts: Sequence[str]
                          ) -> list[np.ndarray | None]:
    """The memorized training images of ``prompts`` from a folder of image-caption pairs
    (``KEY.png|jpg|jpeg|webp`` + ``KEY.txt``, as ``sd detect --images`` reads), matched by
    caption (surrounding whitespace ignored).

    Returns:
        Per prompt a uint8 ``[h, w, 3]`` image, or ``None`` when no caption matches.

    Raises:
        DemoInputError: no such folder, no image, an image without a caption or unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    from mmh_jax.experiments.stable_diffusion import read_image_folder

    by_caption = {}
    for item in read_image_folder(folder):
        by_caption.setdefault(item.caption.strip(), item.image)
    out: list[np.ndarray | None] = []
    for prompt in prompts:
        path = by_caption.get(prompt.strip())
        if path is None:
            out.append(None)
            continue
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img.convert("RGB"), np.uint8))
        except (OSError, UnidentifiedImageError) as err:
            raise DemoInputError(f"{str(path)!r} is not a readable image: {err}") from None
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attributions(attributions: Sequence[PromptAttribution], path: str | os.PathLike, *,
                      line_chars: int = 64, cmap: str = "Reds", dpi: int = 130) -> Path:
    """The prompts' tokens laid out as text, each on a background coloured by its attribution
    normalised by the row's largest (paper, Figures 7a and 11); one row per attribution, grouped
    by prompt (a prompt's metrics one under the other, headed by the prompt).

    Args:
        attributions: from :func:`attribute_prompt` / :func:`attribute_prompts`.
        path: the PNG to write (atomically).
        line_chars: characters per text line before wrapping.
        cmap: matplotlib colormap of the normalised attribution (0 .. 1).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not attributions:
        raise ValueError("no attributions to plot")
    plt = _pyplot()
    colours = plt.get_cmap(cmap)
    label_chars = 16
    # lay out first (monospace: one data unit per character), then size the figure
    items: list[tuple[str, float, float, str, float]] = []  # (kind, x, line, text, value)
    line = 0.0
    previous = None
    for a in attributions:
        if a.prompt != previous:
            if previous is not None:
                line += 0.5
            shown = a.prompt if len(a.prompt) <= 110 else a.prompt[:107] + "..."
            items.append(("header", -label_chars, line, shown, 0.0))
            line += 1
            previous = a.prompt
        top = float(np.max(a.scores)) if len(a.scores) else 0.0
        norm = a.scores / top if top > 0 else np.zeros_like(a.scores)
        items.append(("label", -label_chars, line,
                      f"{_METRIC_NAMES.get(a.metric, a.metric)} {a.value:.3g}", 0.0))
        x = 0.0
        for token, word, v in zip(a.tokens, a.words, norm):
            width = max(1, len(word))
            if x > 0 and x + width > line_chars:
                x, line = 0.0, line + 1
            items.append(("token", x, line, word, float(v)))
            x += width + (1 if token.endswith(_END_OF_WORD) else 0)
        line += 1
    char_in, line_in = 0.095, 0.3
    fig = plt.figure(figsize=((label_chars + line_chars + 1) * char_in, (line + 0.8) * line_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-label_chars - 0.5, line_chars + 0.5)
    ax.set_ylim(line + 0.3, -0.7)
    ax.axis("off")
    for kind, x, y, text, colour in items:
        if kind == "header":
            ax.text(x, y, text, ha="left", va="center", fontsize=9, fontweight="bold")
        elif kind == "label":
            ax.text(x, y, text, ha="left", va="center", fontsize=8, family="monospace",
                    color="0.25")
        else:  # colour holds the normalised attribution; light text on dark backgrounds
            ax.text(x, y, text, ha="left", va="center", fontsize=11, family="monospace",
                    color="white" if colour > 0.6 else "black",
                    bbox=dict(boxstyle="square,pad=0.12", facecolor=colours(0.05 + 0.9 * colour),
                              edgecolor="none"))
    ax.text(-label_chars, line + 0.1, "colour: attribution / largest attribution of the row "
            "(gradient norm of the metric per token)", fontsize=7, color="0.4", va="center")
    return save_figure(fig, path, dpi=dpi)


def plot_mitigation_grid(images: dict[str, list[np.ndarray]], new_prompts: dict[str, list[str]],
                         path: str | os.PathLike, *, dpi: int = 130, wrap: int = 30) -> Path:
    """Images before and after mitigation (paper, Figure 10): one row per prompt, columns the
    original generation and each method, every image titled with its prompt.

    Args:
        images: :attr:`MitigationResult.images` (``"original"`` first).
        new_prompts: :attr:`MitigationResult.new_prompts`.
        path: the PNG to write (atomically).
        dpi: resolution.
        wrap: characters per title line.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    columns = list(images)
    if not columns or not images[columns[0]]:
        raise ValueError("no images to plot")
    n = len(images[columns[0]])
    plt = _pyplot()
    fig, axes = plt.subplots(n, len(columns), figsize=(2.3 * len(columns), 2.9 * n),
                             squeeze=False)
    for c, name in enumerate(columns):
        for r in range(n):
            ax = axes[r, c]
            ax.imshow(images[name][r])
            ax.set_xticks([])
            ax.set_yticks([])
            text = new_prompts[name][r]
            text = text if len(text) <= 3 * wrap else text[:3 * wrap - 3] + "..."
            ax.set_xlabel(textwrap.fill(text, wrap), fontsize=6)
            if r == 0:
                ax.set_title(name if name != "original" else "original prompt", fontsize=8,
                             fontweight="bold")
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def plot_tradeoff(rows: Sequence[dict], path: str | os.PathLike, *,
                  originals: Sequence[dict] | None = None,
                  x_label: str = "SSCD similarity to the memorized image (lower is better)",
                  y_label: str = "CLIP score with the original prompt (higher is better)",
                  dpi: int = 130) -> Path:
    """The paper's Figure 7c: mean CLIP score against mean similarity to the memorized image,
    one line per method (and metric) through its ``k`` values, each point annotated with ``k``
    (means over prompts and repeats); the embedding method is a single point, the original
    prompts a star.

    Args:
        rows: :attr:`MitigationResult.rows` with finite ``similarity`` and ``clip_score``.
        path: the PNG to write (atomically).
        originals: :attr:`MitigationResult.originals` (the star), optional.
        x_label, y_label: axis labels.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no row with both scores.
    """
    points = [s for s in summarise_mitigation(rows)
              if np.isfinite(s["similarity"]) and np.isfinite(s["clip_score"])]
    if not points:
        raise ValueError("no row has both a similarity and a CLIP score to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    lines: dict[str, list[dict]] = {}
    for s in points:
        lines.setdefault(s["label"], []).append(s)
    for label, members in lines.items():
        members.sort(key=lambda s: s["k"])
        x = [s["similarity"] for s in members]
        y = [s["clip_score"] for s in members]
        marker = "s" if members[0]["method"] == "embedding" else "o"
        ax.plot(x, y, marker=marker, markersize=4, label=label)
        for s in members:
            if s["method"] != "embedding":
                ax.annotate(f"k={s['k']}", (s["similarity"], s["clip_score"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
    if originals:
        sim = np.array([o["similarity"] for o in originals], np.float64)
        clip = np.array([o["clip_score"] for o in originals], np.float64)
        if np.isfinite(sim).any() and np.isfinite(clip).any():
            ax.plot([np.nanmean(sim)], [np.nanmean(clip)], marker="*", markersize=11,
                    color="black", linestyle="none", label="original prompt")
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(y_label, fontsize=8)
    ax.set_title("Figure 7c: mitigation trade-off (mean over prompts and repeats)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


# --------------------------------------------------------------------------------------------
# Command line: configs, arguments, runs
# --------------------------------------------------------------------------------------------


def _check_common(config: Any) -> None:
    require(config.num_steps >= 1, f"--num-steps must be at least 1, got {config.num_steps}")
    require(config.guidance >= 0, f"--guidance must be >= 0, got {config.guidance}")
    require(config.dtype in ("float32", "bfloat16"),
            f"--dtype must be float32 or bfloat16, got {config.dtype!r}")


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
    """Settings of ``mmh-jax sd attribute`` (the CLI flags map one to one onto these)."""

    model: Path
    prompt: str | None = None
    prompts: Path | None = None
    out: Path = Path("mmh-sd-attribute")
    metrics: tuple[str, ...] = METRICS
    num_images: int | None = None
    num_steps: int = 50
    guidance: float = 7.5
    num_probes: int = 1
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require((self.prompt is None) != (self.prompts is None),
                "give exactly one of --prompt TEXT and --prompts FILE")
        require(self.prompt is None or bool(self.prompt.strip()),
                "--prompt is empty: there are no tokens to attribute")
        require(bool(self.metrics) and all(m in METRICS for m in self.metrics),
                f"--metric must be among {', '.join(METRICS)}, got {list(self.metrics)}")
        require(self.num_images is None or self.num_images >= 1,
                f"--num-images must be at least 1, got {self.num_images}")
        require(self.num_probes >= 1, f"--num-probes must be at least 1, got {self.num_probes}")
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class MitigateConfig:
    """Settings of ``mmh-jax sd mitigate`` (the CLI flags map one to one onto these)."""

    model: Path
    prompts: Path
    out: Path = Path("mmh-sd-mitigate")
    methods: tuple[str, ...] = METHODS
    metrics: tuple[str, ...] = ("flipd",)
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    repeats: int = 5
    rephraser: Literal["synonyms", "chat"] = "synonyms"
    chat_url: str | None = None
    chat_model: str = "gpt-4o"
    chat_key_env: str = "OPENAI_API_KEY"
    chat_timeout: float = 60.0
    sscd: Path | None = None
    clip: Path | None = None
    reference_images: Path | None = None
    num_images: int = 1
    attribution_images: int | None = None
    num_steps: int = 50
    guidance: float = 7.5
    batch_size: int = 1
    grid_k: int | None = None
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings (before the model loads)."""
        require(bool(self.methods) and all(m in METHODS for m in self.methods),
                f"--methods must be among {', '.join(METHODS)}, got {list(self.methods)}")
        require(len(set(self.methods)) == len(self.methods), "--methods lists a method twice")
        require(bool(self.metrics) and all(m in METRICS for m in self.metrics)
                and len(set(self.metrics)) == len(self.metrics),
                f"--metric must be distinct names among {', '.join(METRICS)}, got "
                f"{list(self.metrics)}")
        require(bool(self.ks) and all(k >= 1 for k in self.ks) and len(set(self.ks)) == len(
            self.ks), f"--ks must be distinct integers >= 1, got {list(self.ks)}")
        require(self.grid_k is None or self.grid_k in self.ks,
                f"--grid-k {self.grid_k} is not one of --ks {list(self.ks)}")
        require(self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}")
        require(self.num_images >= 1, f"--num-images must be at least 1, got {self.num_images}")
        require(self.attribution_images is None or self.attribution_images >= 1,
                f"--attribution-images must be at least 1, got {self.attribution_images}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.rephraser in ("synonyms", "chat"),
                f"--rephraser must be synonyms or chat, got {self.rephraser!r}")
        require(self.rephraser != "chat" or self.chat_url is not None,
                "--rephraser chat needs --chat-url URL (an OpenAI-compatible endpoint)")
        require(self.chat_timeout > 0, f"--chat-timeout must be > 0, got {self.chat_timeout}")
        require(self.sscd is None or self.sscd.is_file(),
                f"--sscd {str(self.sscd)!r} does not exist or is a folder")
        require(self.clip is None or self.clip.is_dir(),
                f"--clip {str(self.clip)!r} is not a folder")
        require(self.reference_images is None or self.reference_images.is_dir(),
                f"--reference-images {str(self.reference_images)!r} is not a folder")
        _check_common(self)


def _common_arguments(parser: argparse.ArgumentParser, d: Any) -> None:
    parser.add_argument("--num-steps", type=int, metavar="N", default=d.num_steps,
                        help="DDIM steps (default %(default)s)")
    parser.add_argument("--guidance", type=finite_float, metavar="LAMBDA", default=d.guidance,
                        help="classifier-free guidance scale (default %(default)s)")
    parser.add_argument("--seed", type=int, metavar="N", default=d.seed,
                        help="seed of the noise and every random choice (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                        help="compute dtype of the networks (default %(default)s)")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL",
                        help="a diffusers Stable Diffusion pipeline folder, or a file written by "
                        "`mmh-jax convert stable-diffusion`")


def add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd attribute``'s arguments and flags to ``parser``."""
    d = AttributeConfig(model=Path("."))
    _model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts: one a line, or JSON lines (.jsonl) with 'caption'")
    parser.add_argument("--metric", dest="metrics", nargs="+", choices=METRICS,
                        default=list(d.metrics), metavar="METRIC",
                        help="metrics to attribute with: cfg (Wen et al.'s A^CFG), cfg_score "
                        "(A^sCFG), flipd (A^FLIPD) (default: all three, as Figure 11)")
    parser.add_argument("-o", "--out", type=Path, default=d.out,
                        help="output folder (default ./%(default)s/)")
    parser.add_argument("--num-images", type=int, metavar="N", default=None,
                        help="trajectories per prompt (default: 4 for the CFG metrics, 1 for "
                        "FLIPD, as the public code)")
    parser.add_argument("--num-probes", type=int, metavar="N", default=d.num_probes,
                        help="Hutchinson probes of A^FLIPD (default %(default)s)")
    _common_arguments(parser, d)


def add_mitigate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd mitigate``'s arguments and flags to ``parser``."""
    d = MitigateConfig(model=Path("."), prompts=Path("."))
    _model_argument(parser)
    parser.add_argument("--prompts", type=Path, metavar="FILE", required=True,
                        help="the memorized prompts: one a line, or JSON lines (.jsonl) with "
                        "'caption'")
    parser.add_argument("-o", "--out", type=Path, default=d.out,
                        help="output folder (default ./%(default)s/); a rerun starts over")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods),
                        metavar="METHOD",
                        help="attribution (rephrase k tokens drawn from the attributions), "
                        "uniform (k tokens drawn uniformly), rta (k random vocabulary words "
                        "added), embedding (AdamW on the prompt embedding) (default: all)")
    parser.add_argument("--metric", dest="metrics", nargs="+", choices=METRICS,
                        default=list(d.metrics), metavar="METRIC",
                        help="metric(s) of the attributions and the embedding optimisation "
                        "(default: flipd); several give one line each")
    parser.add_argument("--ks", nargs="+", type=int, default=list(d.ks), metavar="K",
                        help="numbers of tokens to perturb (default: 1 2 3 4 6 8)")
    parser.add_argument("--repeats", type=int, metavar="N", default=d.repeats,
                        help="rephrasings per prompt, method and k (default %(default)s)")
    parser.add_argument("--rephraser", choices=("synonyms", "chat"), default=d.rephraser,
                        help="synonyms: offline synonym substitution (default); chat: an "
                        "OpenAI-compatible endpoint (--chat-url, key in $%s)" % d.chat_key_env)
    parser.add_argument("--chat-url", metavar="URL",
                        help="chat endpoint base, e.g. https://api.openai.com/v1")
    parser.add_argument("--chat-model", metavar="M", default=d.chat_model,
                        help="chat model name (default %(default)s)")
    parser.add_argument("--chat-key-env", metavar="VAR", default=d.chat_key_env,
                        help="environment variable holding the endpoint's key (default "
                        "%(default)s)")
    parser.add_argument("--chat-timeout", type=finite_float, metavar="S", default=d.chat_timeout,
                        help="seconds to wait for each rephrasing (default %(default)s)")
    parser.add_argument("--sscd", type=Path, metavar="FILE",
                        help="SSCD checkpoint for the similarity to the memorized image")
    parser.add_argument("--clip", type=Path, metavar="FOLDER",
                        help="transformers CLIPModel folder for the CLIP score")
    parser.add_argument("--reference-images", type=Path, metavar="FOLDER",
                        help="memorized training images: KEY.png|jpg + KEY.txt (the caption, "
                        "matched to the prompts); default reference: the original generation")
    parser.add_argument("--num-images", type=int, metavar="N", default=d.num_images,
                        help="images per (new) prompt, all from the prompt's noise (default "
                        "%(default)s)")
    parser.add_argument("--attribution-images", type=int, metavar="N", default=None,
                        help="trajectories of the attributions (default: 4 for the CFG "
                        "metrics, 1 for FLIPD, as the public code)")
    parser.add_argument("--batch-size", type=int, metavar="N", default=d.batch_size,
                        help="new prompts sampled per compiled batch (default %(default)s)")
    parser.add_argument("--grid-k", type=int, metavar="K", default=None,
                        help="k shown in the image grid (default: the one of --ks closest to "
                        "4, as Figure 10)")
    _common_arguments(parser, d)


def attribute_config_from_args(args: argparse.Namespace) -> AttributeConfig:
    """Build an :class:`AttributeConfig` from parsed flags."""
    return AttributeConfig(
        model=args.model, prompt=args.prompt, prompts=args.prompts, out=args.out,
        metrics=tuple(dict.fromkeys(args.metrics)), num_images=args.num_images,
        num_steps=args.num_steps, guidance=args.guidance, num_probes=args.num_probes,
        seed=args.seed, dtype=args.dtype, progress=not args.quiet,
        figure=not args.no_figure)


def mitigate_config_from_args(args: argparse.Namespace) -> MitigateConfig:
    """Build a :class:`MitigateConfig` from parsed flags."""
    return MitigateConfig(
        model=args.model, prompts=args.prompts, out=args.out, methods=tuple(args.methods),
        metrics=tuple(args.metrics), ks=tuple(args.ks), repeats=args.repeats,
        rephraser=args.rephraser, chat_url=args.chat_url, chat_model=args.chat_model,
        chat_key_env=args.chat_key_env, chat_timeout=args.chat_timeout, sscd=args.sscd,
        clip=args.clip, reference_images=args.reference_images, num_images=args.num_images,
        attribution_images=args.attribution_images, num_steps=args.num_steps,
        guidance=args.guidance, batch_size=args.batch_size,
        grid_k=args.grid_k, seed=args.seed, dtype=args.dtype, progress=not args.quiet,
        figure=not args.no_figure)


def _load(config: Any, console: Console):
    import jax.numpy as jnp

    from mmh_jax.models import load_stable_diffusion

    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    with console.status(f"loading {config.model} ..."):
        try:
            return load_stable_diffusion(config.model, dtype=dtype)
        except (FileNotFoundError, ValueError) as err:
            raise DemoInputError(str(err)) from None


def _attribution_table(attributions: Sequence[PromptAttribution], ids: Sequence[str]) -> dict:
    columns: dict[str, list] = {name: [] for name in (
        "id", "prompt", "metric", "value", "position", "token", "word", "score", "normalized")}
    for pid, a in zip(ids, attributions):
        top = float(np.max(a.scores)) if len(a.scores) else 0.0
        for i, (token, word, score) in enumerate(zip(a.tokens, a.words, a.scores)):
            for name, v in (("id", pid), ("prompt", a.prompt), ("metric", a.metric),
                            ("value", a.value), ("position", i), ("token", token),
                            ("word", word), ("score", float(score)),
                            ("normalized", float(score) / top if top > 0 else 0.0)):
                columns[name].append(v)
    return columns


def _attribution_figures(attributions: list[PromptAttribution], out: Path, stem: str,
                         per_page: int) -> list[Path]:
    """One PNG per ``per_page`` prompts (``stem.png`` when one page is enough)."""
    prompts = list(dict.fromkeys(a.prompt for a in attributions))
    pages = [prompts[i:i + per_page] for i in range(0, len(prompts), per_page)]
    files = []
    for p, page in enumerate(pages, start=1):
        name = f"{stem}.png" if len(pages) == 1 else f"{stem}-{p}.png"
        chosen = [a for a in attributions if a.prompt in set(page)]
        files.append(plot_attributions(chosen, out / name))
    return files


def _top_tokens(a: PromptAttribution, n: int = 3) -> str:
    order = np.argsort(-a.scores, kind="stable")[:n]
    return ", ".join(f"{a.words[i]} ({a.scores[i]:.3g})" for i in order)


def run_attribute(config: AttributeConfig, *, console: Console | None = None):
    """``mmh-jax sd attribute``: token attributions of every prompt for every metric; returns
    ``(attributions, files)``.

    Writes ``attributions.parquet`` / ``.csv`` (one row per prompt x metric x token: ``id``,
    ``prompt``, ``metric``, ``value`` (``A(c)``), ``position``, ``token``, ``word``,
    ``score``, ``normalized``) and ``attributions.png`` (Figures 7a/11; ``attributions-N.png``
    pages of 8 prompts for longer files).

    Raises:
        DemoInputError: bad settings or input, an empty prompt, an unwritable output folder.
    """
    import jax

    from mmh_jax.experiments.stable_diffusion import Item, read_prompt_file

    config.validate()
    items = (read_prompt_file(config.prompts) if config.prompts is not None
             else [Item("prompt", config.prompt, -1)])
    for item in items:
        require(bool(item.caption.strip()), f"{item.id}: empty prompt, nothing to attribute")
    out = prepare_out_dir(config.out)
    console = console or Console()
    err_console = Console(stderr=True)
    start = time.perf_counter()
    sd = _load(config, err_console)
    load_s = time.perf_counter() - start
    attributions: list[PromptAttribution] = []
    ids: list[str] = []
    start = time.perf_counter()
    with make_progress(err_console, enabled=config.progress) as progress:
        task = progress.add_task("attributing", total=len(items))
        for n, item in enumerate(items):
            try:
                found = attribute_prompts(
                    sd, item.caption, metrics=config.metrics,
                    key=jax.random.fold_in(jax.random.key(config.seed), n),
                    num_images=config.num_images, num_steps=config.num_steps,
                    guidance=config.guidance, num_probes=config.num_probes)
            except ValueError as err:
                raise DemoInputError(f"{item.id}: {err}") from None
            attributions.extend(found)
            ids.extend([item.id] * len(found))
            progress.advance(task)
    attribute_s = time.perf_counter() - start
    table = _attribution_table(attributions, ids)
    files = [write_parquet(table, out / "attributions.parquet"),
             write_csv(table, out / "attributions.csv")]
    if config.figure:
        files += _attribution_figures(attributions, out, "attributions", per_page=8)
    summary = Table(title=f"Token attributions of {len(items)} prompt(s)")
    for column in ("id", "metric", "A(c)", "top tokens (attribution)"):
        summary.add_column(column, justify="right" if column == "A(c)" else "left")
    for pid, a in zip(ids, attributions):
        summary.add_row(pid, _METRIC_NAMES[a.metric], f"{a.value:.4g}", _top_tokens(a))
    console.print(summary)
    console.print(f"load {load_s:.1f} s, attribution {attribute_s:.1f} s; wrote "
                  f"{', '.join(str(f) for f in files)}")
    return attributions, files


def _rephraser(config: MitigateConfig):
    from mmh_jax.memorization.rephrase import ChatRephraser, SynonymRephraser

    if config.rephraser == "synonyms":
        return SynonymRephraser(seed=config.seed)
    key = os.environ.get(config.chat_key_env)
    require(bool(key), f"--rephraser chat needs the endpoint's key in ${config.chat_key_env} "
                       "(set it, or pick another variable with --chat-key-env)")
    try:
        return ChatRephraser(config.chat_url, api_key=key, model=config.chat_model,
                             timeout=config.chat_timeout)
    except ValueError as err:
        raise DemoInputError(f"--rephraser chat: {err}") from None


def _rows_table(rows: Sequence[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def run_mitigate(config: MitigateConfig, *, console: Console | None = None):
    """``mmh-jax sd mitigate``: :func:`mitigate` on a prompt file; returns
    ``(result, summary, files)``.

    Writes ``results.parquet`` / ``.csv`` (:attr:`MitigationResult.rows`, rewritten after every
    prompt), ``originals.csv``, ``summary.csv`` (:func:`summarise_mitigation`),
    ``attributions.csv`` (when ``attribution`` runs) and the figures ``grid.png`` (Figure 10;
    ``grid-N.png`` pages of 6 prompts), ``tradeoff.png`` (Figure 7c, when both a similarity and
    a CLIP score are computed) and ``attributions.png``.

    Raises:
        DemoInputError: bad settings or input (a chat rephraser without a key, k larger than a
            prompt's tokens, ...), an unloadable scorer, an unwritable output folder.
    """
    import jax

    from mmh_jax.experiments.stable_diffusion import read_prompt_file

    config.validate()
    items = read_prompt_file(config.prompts)
    rephraser = _rephraser(config)  # a missing key fails here, before anything loads
    out = prepare_out_dir(config.out)
    console = console or Console()
    err_console = Console(stderr=True)
    start = time.perf_counter()
    sd = _load(config, err_console)
    similarity = clip_scorer = None
    try:
        if config.sscd is not None:
            with err_console.status(f"loading SSCD {config.sscd} ..."):
                similarity = load_sscd_similarity(config.sscd)
        if config.clip is not None:
            with err_console.status(f"loading CLIP {config.clip} ..."):
                clip_scorer = load_clip_scorer(config.clip)
    except (FileNotFoundError, ValueError) as err:
        raise DemoInputError(str(err)) from None
    prompts = [item.caption for item in items]
    references = (read_reference_images(config.reference_images, prompts)
                  if config.reference_images is not None else None)
    load_s = time.perf_counter() - start

    files: list[Path] = []

    def save(result: MitigationResult) -> None:
        files[:] = [write_parquet(_rows_table(result.rows), out / "results.parquet"),
                    write_csv(_rows_table(result.rows), out / "results.csv")]

    ks = config.ks if any(m in _TEXT_METHODS for m in config.methods) else ()
    images_total = len(items) * (1 + expected_rows(1, methods=config.methods, ks=ks,
                                                   repeats=config.repeats,
                                                   metrics=config.metrics))
    start = time.perf_counter()
    with make_progress(err_console, enabled=config.progress) as progress:
        task = progress.add_task("generating", total=images_total)
        try:
            result = mitigate(
                sd, prompts, methods=config.methods, ks=ks, repeats=config.repeats,
                metric=config.metrics, key=jax.random.key(config.seed), rephraser=rephraser,
                similarity=similarity, clip_scorer=clip_scorer, reference_images=references,
                num_images=config.num_images, attribution_images=config.attribution_images,
                num_steps=config.num_steps, guidance=config.guidance, grid_k=config.grid_k,
                batch_size=config.batch_size,
                progress=lambda n: progress.advance(task, n), on_prompt=save)
        except ValueError as err:
            raise DemoInputError(str(err)) from None
    mitigate_s = time.perf_counter() - start
    summary = summarise_mitigation(result.rows)
    files.append(write_csv(_rows_table(result.originals), out / "originals.csv"))
    files.append(write_csv(_rows_table(summary), out / "summary.csv"))
    if result.attributions:
        ids = [items[prompts.index(a.prompt)].id for a in result.attributions]
        files.append(write_csv(_attribution_table(result.attributions, ids),
                               out / "attributions.csv"))
    if config.figure:
        if result.attributions:
            files += _attribution_figures(result.attributions, out, "attributions", per_page=8)
        per_page = 6
        for p, lo in enumerate(range(0, len(prompts), per_page), start=1):
            name = "grid.png" if len(prompts) <= per_page else f"grid-{p}.png"
            files.append(plot_mitigation_grid(
                {k: v[lo:lo + per_page] for k, v in result.images.items()},
                {k: v[lo:lo + per_page] for k, v in result.new_prompts.items()}, out / name))
        if similarity is not None and clip_scorer is not None:
            trained = references is not None and all(r is not None for r in references)
            x_label = ("SSCD similarity to the memorized image (lower is better)" if trained
                       else "SSCD similarity to the reference (training image or original "
                       "generation; lower is better)")
            files.append(plot_tradeoff(result.rows, out / "tradeoff.png",
                                       originals=result.originals, x_label=x_label))
    _print_mitigation(console, summary, result, config, files, load_s, mitigate_s)
    return result, summary, files


def _print_mitigation(console: Console, summary: list[dict], result: MitigationResult,
                      config: MitigateConfig, files: list[Path], load_s: float,
                      mitigate_s: float) -> None:
    table = Table(title=f"Mitigation of {len(result.originals)} prompt(s): means over prompts "
                        f"and {config.repeats} repeat(s)")
    for column in ("method", "k", "rows", "similarity", "CLIP score", "changed", "errors"):
        table.add_column(column, justify="left" if column == "method" else "right")
    sim = np.array([o["similarity"] for o in result.originals], np.float64)
    clip = np.array([o["clip_score"] for o in result.originals], np.float64)
    table.add_row("original prompt", "-", str(len(result.originals)),
                  f"{np.nanmean(sim):.4g}" if np.isfinite(sim).any() else "n/a",
                  f"{np.nanmean(clip):.4g}" if np.isfinite(clip).any() else "n/a", "-", "-")
    for s in summary:
        table.add_row(s["label"], str(s["k"]) if s["method"] != "embedding" else "-",
                      str(s["rows"]), f"{s['similarity']:.4g}", f"{s['clip_score']:.4g}",
                      f"{100 * s['changed']:.0f}%", str(s["errors"]))
    console.print(table)
    errors = sum(s["errors"] for s in summary)
    if errors:
        first = next(r["error"] for r in result.rows if r["error"])
        console.print(f"[yellow]{errors} rephrasing(s) failed and kept their prompt; first: "
                      f"{first}[/yellow]")
    if config.sscd is None or config.clip is None:
        console.print("no trade-off figure: it needs both --sscd and --clip")
    console.print(f"load {load_s:.1f} s, mitigation {mitigate_s:.1f} s; wrote "
                  f"{', '.join(str(f) for f in files)}")
