"""Sample-time mitigation of memorized Stable Diffusion prompts and its evaluation (paper,
Section 4.2, Appendix D.3-D.5, Figures 7c, 9, 10).

:func:`mitigate` makes, for every prompt, method, ``k`` and repeat, a changed prompt (or a
changed embedding), the image it gives from the *same starting noise* as the original
generation, the similarity of that image to a reference (the memorized training image when
given, else the original generation) and its CLIP score against the *original* prompt. The
settings are one immutable :class:`MitigationConfig`. Methods:

- ``"attribution"``: ``k`` tokens drawn from the softmax of the token attributions
  (:mod:`mmh_jax.memorization.attribution`; temperature 0.1, smoothing 1e-3, as the public
  code), their words handed to a rephraser (the paper: GPT-4 following Box 1; here any
  :data:`~mmh_jax.memorization.rephrase.Rephraser`, by default the offline
  :class:`~mmh_jax.memorization.rephrase.SynonymRephraser`);
- ``"uniform"``: the paper's ablation, ``k`` tokens drawn uniformly;
- ``"rta"``: random token addition (Somepalli et al. 2023a): ``k`` random CLIP vocabulary
  words inserted;
- ``"embedding"``: the prompt embedding optimised with AdamW on the metric (Wen et al.'s
  inference-time mitigation for ``A^CFG``; Appendix D.3 and Figure 9 for ``A^FLIPD``), then
  sampled from the same noise. It has no ``k``: one row per prompt and metric, ``k = 0``.

:func:`summarise_mitigation` gives the points of Figure 7c (means per method, metric and ``k``).

The scorers are plain callables, so any model works: ``similarity(images_a, images_b) -> [b]``
and ``clip_scorer(images, prompts) -> [b]`` take uint8 ``[b, h, w, 3]`` images (two batches
may differ in size); e.g. ``Partial(sscd_similarity, load_sscd(path))``
(:func:`mmh_jax.models.sscd_similarity`) and ``Partial(clip_score, load_clip(folder))``
(:func:`mmh_jax.evaluation.clip_score`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import numpy as np

from mmh_jax._src.batching import padded, spans
from mmh_jax._src.checks import check_strings
from mmh_jax.memorization.attribution import (
    METRICS,
    PromptAttribution,
    _attributions_on,
    _check_count,
    _check_metric,
    _first_images,
    _metric_list,
    _prompt_tokens,
    default_attribution_images,
    metric_label,
)
from mmh_jax.memorization.prompt import Metric, optimize_embedding, trajectory_points
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

__all__ = [
    "Method",
    "METHODS",
    "Similarity",
    "ClipScorer",
    "EmbeddingSettings",
    "MitigationConfig",
    "MitigationResult",
    "embedding_defaults",
    "mitigate",
    "check_prompt_tokens",
    "new_prompts",
    "method_label",
    "expected_rows",
    "summarise_mitigation",
]

Method = Literal["attribution", "uniform", "rta", "embedding"]
"""A mitigation: rephrase attributed tokens, rephrase uniformly drawn tokens, add random tokens
(RTA), or optimise the prompt embedding."""
METHODS: tuple[str, ...] = get_args(Method)
"""Every :data:`Method`, in order."""
_TEXT_METHODS = ("attribution", "uniform", "rta")

Similarity = Callable[[np.ndarray, np.ndarray], Any]
"""``similarity(images_a, images_b) -> [b]``: how alike image ``i`` of two uint8
``[b, h, w, 3]`` batches is (higher: more alike; the paper's SSCD similarity). The two batches
may have different image sizes."""

ClipScorer = Callable[[np.ndarray, Sequence[str]], Any]
"""``clip_scorer(images, prompts) -> [b]``: how well uint8 image ``i`` ``[b, h, w, 3]`` matches
prompt ``i`` (higher: better; the paper's CLIP score)."""


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


def _closest(ks: Sequence[int], target: int) -> int:
    return min(ks, key=lambda k: (abs(k - target), k))


@dataclasses.dataclass(frozen=True)
class MitigationConfig:
    """What :func:`mitigate` does: methods, ``k`` values, repeats, metrics and the sampling,
    attribution and embedding settings (the paper's by default). Checked when built: a bad
    value raises ``ValueError`` naming its field. Sequences are stored as tuples (``methods``
    in the order of :data:`METHODS`); a single metric or method name and a single ``k`` are
    accepted too."""

    methods: tuple[Method, ...] = METHODS
    """Any of ``"attribution"``, ``"uniform"``, ``"rta"``, ``"embedding"``, each once."""
    metrics: tuple[Metric, ...] = ("flipd",)
    """The memorization metric(s) of the attributions and of the embedding optimisation:
    ``"cfg"``, ``"cfg_score"``, ``"flipd"``; several give one ``"attribution"`` and one
    ``"embedding"`` line per metric, as Figure 7c."""
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    """Numbers of tokens to perturb (the paper's); for ``"attribution"`` and ``"uniform"``
    each must be at most a prompt's number of tokens. Unused by ``"embedding"`` alone."""
    repeats: int = 5
    """Rephrasings per prompt, method and ``k`` (the paper: 5)."""
    num_images: int = 1
    """Images per new prompt (and per original), all from the prompt's noise."""
    num_steps: int = 50
    """DDIM steps."""
    guidance: float = 7.5
    """The classifier-free guidance scale."""
    batch_size: int = 1
    """New prompts sampled per compiled batch (padded; one shape for the run)."""
    attribution_images: int | None = None
    """Trajectories of the attributions (default per metric: 4 CFG, 1 FLIPD)."""
    temperature: float = 0.1
    """Of the attribution-guided token draw."""
    smoothing: float = 1e-3
    """Of the attribution-guided token draw."""
    embedding: EmbeddingSettings | Mapping[str, EmbeddingSettings] | None = None
    """:class:`EmbeddingSettings` for every metric, or metric -> settings; default
    :func:`embedding_defaults`."""
    vocabulary: tuple[str, ...] | None = None
    """Words of ``"rta"``; default the tokenizer's whole words
    (:func:`~mmh_jax.memorization.rephrase.clip_vocabulary_words`)."""
    rephrase_timeout: float | None = None
    """Seconds to wait for the rephraser (``None``: no limit)."""
    grid_k: int | None = None
    """The ``k`` whose images go to :attr:`MitigationResult.images` (default the one of ``ks``
    closest to 4, as Figure 10)."""

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if (
            not methods
            or any(m not in METHODS for m in methods)
            or len(set(methods)) != len(methods)
        ):
            raise ValueError(
                f"methods must be distinct names among {', '.join(METHODS)}, got {list(methods)}"
            )
        store("methods", tuple(m for m in METHODS if m in methods))
        store("metrics", _metric_list(self.metrics))
        for name in ("repeats", "num_images", "num_steps", "batch_size"):
            store(name, _check_count(getattr(self, name), name))
        store(
            "attribution_images",
            _check_count(self.attribution_images, "attribution_images", allow_none=True),
        )
        ks = (self.ks,) if isinstance(self.ks, (int, np.integer)) else tuple(self.ks)
        if self.text_methods:
            if not ks:
                raise ValueError("ks is empty: give at least one k")
            ks = tuple(_check_count(k, "each of ks") for k in ks)
            if len(set(ks)) != len(ks):
                raise ValueError(f"ks lists a k twice: {list(ks)}")
            if self.grid_k is not None and self.grid_k not in ks:
                raise ValueError(f"grid_k={self.grid_k} is not one of ks={list(ks)}")
        store("ks", ks)
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if "embedding" in self.methods:
            for m in self.metrics:
                s = self.embedding_settings(m)
                if not -self.num_steps <= s.step < self.num_steps:
                    raise ValueError(
                        f"embedding step {s.step} (metric {m}) out of range for "
                        f"num_steps={self.num_steps} DDIM steps"
                    )
        if self.vocabulary is not None:
            if isinstance(self.vocabulary, str) or not tuple(self.vocabulary):
                raise ValueError("vocabulary must be a non-empty sequence of words")
            store("vocabulary", tuple(self.vocabulary))

    @property
    def text_methods(self) -> tuple[str, ...]:
        """The methods that change the prompt text (all but ``"embedding"``)."""
        return tuple(m for m in self.methods if m in _TEXT_METHODS)

    @property
    def shown_k(self) -> int:
        """The ``k`` of the image grid: ``grid_k``, else the one of ``ks`` closest to 4 (0
        without a text method)."""
        if not self.text_methods:
            return 0
        return _closest(self.ks, 4) if self.grid_k is None else self.grid_k

    def embedding_settings(self, metric: str) -> EmbeddingSettings:
        """The embedding mitigation's settings for ``metric`` (``embedding``, else
        :func:`embedding_defaults`)."""
        given = (
            self.embedding.get(metric) if isinstance(self.embedding, Mapping) else (self.embedding)
        )
        if given is None:
            return embedding_defaults(metric, self.num_steps)
        return EmbeddingSettings(*given)

    def labels(self) -> list[str]:
        """The method labels (:func:`method_label`) of the run, one per line of Figure 7c."""
        return [
            method_label(m, x)
            for m in self.methods
            for x in (self.metrics if m in ("attribution", "embedding") else [""])
        ]


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
    -> per prompt the first image (uint8 ``[h, w, 3]``) of the row with ``k =``
    :attr:`MitigationConfig.shown_k` and repeat 0 (the ``"embedding"`` row for that method)."""
    new_prompts: dict[str, list[str]]
    """The new prompt of each image in :attr:`images` (same keys and order)."""


def method_label(method: str, metric: str) -> str:
    """A method's name in tables and figures: ``"attribution (A^FLIPD)"``, ``"uniform"``..."""
    return f"{method} ({metric_label(metric)})" if metric else method


def expected_rows(num_prompts: int, *, config: MitigationConfig) -> int:
    """The number of rows :func:`mitigate` returns for ``num_prompts`` prompts."""
    per_prompt = 0
    for method in config.methods:
        lines = len(config.metrics) if method in ("attribution", "embedding") else 1
        per_prompt += lines * (1 if method == "embedding" else len(config.ks) * config.repeats)
    return num_prompts * per_prompt


def _to_uint8(images: Any) -> np.ndarray:
    from mmh_jax.evaluation import to_uint8_nhwc

    return to_uint8_nhwc(np.asarray(images, np.float32))


def _check_image(image: Any, where: str) -> np.ndarray:
    x = np.asarray(image)
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
    code = 16 + 4 * METHODS.index(method) + (METRICS.index(metric) + 1 if metric else 0)
    for value in (prompt_index, code, k, repeat):
        key = jax.random.fold_in(key, value)
    return key


def _generate(
    sd: Any,
    conds: list,
    *,
    key: Any,
    config: MitigationConfig,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    """Images of several embeddings ``[1, n, dim]`` from one starting noise, in padded batches
    of ``batch_size`` (one compiled shape): uint8 ``[len(conds), num_images, h, w, 3]``."""
    out = []
    b, m = config.batch_size, config.num_images
    for lo, hi in spans(len(conds), b):
        cond = padded(np.concatenate([np.asarray(c) for c in conds[lo:hi]]), b)
        result = sd.sample(
            cond, key=key, images_per_prompt=m, guidance=config.guidance, num_steps=config.num_steps
        )
        images = _to_uint8(sd.decode(result.sample))
        out.append(images.reshape((b, m) + images.shape[1:])[: hi - lo])
        if progress is not None:
            progress(hi - lo)
    return np.concatenate(out)


def _similarity_and_clip(
    generated: np.ndarray,
    refs: np.ndarray,
    prompt: str,
    *,
    similarity: Similarity | None,
    clip_scorer: ClipScorer | None,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per generation (``[g, m, h, w, 3]``) the mean over its ``m`` images of the similarity to
    ``refs`` (``[m, ...]``) and of the CLIP score against ``prompt``; the scorers see padded
    batches of one shape."""
    g, m = generated.shape[:2]
    sims, clips = [], []
    for lo, hi in spans(g, batch_size):
        n = (hi - lo) * m
        batch = padded(generated[lo:hi].reshape((-1,) + generated.shape[2:]), batch_size * m)
        ref_batch = padded(np.concatenate([refs] * (hi - lo)), batch_size * m)
        total = batch_size * m
        sims.append(_scores(similarity, batch, ref_batch, n=total, name="similarity")[:n])
        clips.append(_scores(clip_scorer, batch, [prompt] * total, n=total, name="clip_scorer")[:n])
    return (
        np.concatenate(sims).reshape(g, m).mean(axis=1),
        np.concatenate(clips).reshape(g, m).mean(axis=1),
    )


def check_prompt_tokens(
    sd: Any,
    prompts: Sequence[str],
    *,
    config: MitigationConfig | None,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """The tokens of every prompt, checked for :func:`mitigate` and :func:`new_prompts`: per
    prompt ``ids`` (``[1, max_length]``, padded), ``tokens`` (the raw CLIP BPE tokens, start,
    end and padding excluded) and ``words`` (each token as display text).

    Args:
        sd: a :class:`~mmh_jax.models.stable_diffusion.StableDiffusion` (its tokenizer).
        prompts: the prompts.
        config: the run's settings (its ``ks`` and methods); ``None``: no ``k`` to check
            (attribution alone).
        names: how errors name each prompt (default ``prompts[i]``).

    Raises:
        ValueError: an empty prompt (no tokens), or ``k`` larger than a prompt's number of
            tokens for ``"attribution"`` or ``"uniform"``.
    """
    names = [f"prompts[{i}]" for i in range(len(prompts))] if names is None else list(names)
    tokens = [_prompt_tokens(sd, p, where=n) for p, n in zip(prompts, names)]
    if config is not None and any(m in config.methods for m in ("attribution", "uniform")):
        for name, p, pt in zip(names, prompts, tokens):
            too_big = [k for k in config.ks if k > len(pt.tokens)]
            if too_big:
                raise ValueError(
                    f"k={max(too_big)} is larger than the number of tokens of "
                    f"{name} ({len(pt.tokens)} tokens: {p!r}); lower the ks or "
                    "drop the prompt"
                )
    return tokens


def new_prompts(
    prompt: str,
    tokens: Sequence[str],
    *,
    index: int,
    key: Any,
    config: MitigationConfig,
    attributions: Mapping[str, np.ndarray],
    rephraser: Callable[[str, Sequence[str]], str],
    vocabulary: Sequence[str] | None,
) -> list[dict]:
    """The changed prompts of the text methods for one prompt (paper, Section 4.2, Appendix
    D.4-D.5): per method (``"attribution"`` once per metric), ``k`` and repeat, ``k`` tokens
    drawn from the softmax of the attributions (``"attribution"``) or uniformly (``"uniform"``)
    and rephrased, or ``k`` random vocabulary words inserted (``"rta"``). The draws of row
    ``(index, method, metric, k, repeat)`` depend on ``key`` and those values only.

    Args:
        prompt: the prompt.
        tokens: its raw CLIP BPE tokens (start, end and padding excluded).
        index: the prompt's position in the run (enters the draws).
        key: the run's PRNG key.
        config: the methods, metrics, ``ks``, repeats and draw settings.
        attributions: metric -> the attribution of each token (``[len(tokens)]``), for
            ``"attribution"``.
        rephraser: ``(prompt, words) -> new prompt``; one that raises, times out or answers
            nonsense keeps the prompt and the row reports the error.
        vocabulary: the words of ``"rta"``.

    Returns:
        One dict per row, in the order method, metric, ``k``, repeat: ``prompt_index``,
        ``prompt``, ``method``, ``metric``, ``k``, ``repeat``, ``words`` (joined by ``" | "``),
        ``new_prompt``, ``changed``, ``error``, ``metric_before``, ``metric_after`` (NaN) and
        ``updates`` (-1).
    """
    rows = []
    for method in config.text_methods:
        for m in config.metrics if method == "attribution" else [""]:
            for k in config.ks:
                for r in range(config.repeats):
                    row_key = _row_key(key, index, method, m, k, r)
                    words: list[str] = []
                    if method == "rta":
                        new = random_token_addition(prompt, k=k, key=row_key, vocabulary=vocabulary)
                        outcome = RephraseOutcome(new, new != prompt, None)
                    else:
                        chosen = (
                            choose_tokens(
                                attributions[m],
                                k=k,
                                key=row_key,
                                temperature=config.temperature,
                                smoothing=config.smoothing,
                            )
                            if method == "attribution"
                            else uniform_tokens(len(tokens), k=k, key=row_key)
                        )
                        words = selected_words(list(tokens), chosen)
                        outcome = rephrase(
                            rephraser, prompt, words, timeout=config.rephrase_timeout
                        )
                    rows.append(
                        dict(
                            prompt_index=index,
                            prompt=prompt,
                            method=method,
                            metric=m,
                            k=k,
                            repeat=r,
                            words=" | ".join(words),
                            new_prompt=outcome.prompt,
                            changed=bool(outcome.changed),
                            error=outcome.error or "",
                            metric_before=math.nan,
                            metric_after=math.nan,
                            updates=-1,
                        )
                    )
    return rows


def mitigate(
    sd: Any,
    prompts: Sequence[str],
    *,
    key: Any,
    config: MitigationConfig = MitigationConfig(),
    rephraser: Callable[[str, Sequence[str]], str] | None = None,
    similarity: Similarity | None = None,
    clip_scorer: ClipScorer | None = None,
    reference_images: Sequence[Any | None] | None = None,
    progress: Callable[[int], None] | None = None,
    on_prompt: Callable[[MitigationResult], None] | None = None,
) -> MitigationResult:
    """Sample-time mitigation of memorized prompts and its evaluation (paper, Section 4.2,
    Appendix D.3-D.5, Figures 7c, 9, 10).

    For every prompt: its attributions (one DDIM trajectory set,
    :func:`~mmh_jax.memorization.attribute_prompt`'s defaults), then for every method, metric,
    ``k`` and repeat a new prompt (or embedding, see the module docstring), then the new
    image(s) sampled from the same starting noise as the original generation, their similarity
    to the reference and their CLIP score against the original prompt. A rephraser that raises,
    times out or answers nonsense keeps the prompt and the row reports the error; the run goes
    on.

    Args:
        sd: a :class:`~mmh_jax.models.stable_diffusion.StableDiffusion`.
        prompts: the (memorized) prompts.
        key: PRNG key of everything random (noise, token draws, RTA, probes).
        config: the methods, ``k`` values, repeats, metrics and settings
            (:class:`MitigationConfig`; default the paper's with ``A^FLIPD``).
        rephraser: ``(prompt, words) -> new prompt``; default the offline
            :class:`~mmh_jax.memorization.rephrase.SynonymRephraser`.
        similarity: ``similarity(new_images, reference_images) -> [b]`` (e.g.
            ``Partial(sscd_similarity, load_sscd(path))``); ``None`` leaves the column NaN.
        clip_scorer: ``clip_scorer(images, prompts) -> [b]`` (e.g.
            ``Partial(clip_score, load_clip(folder))``); ``None`` leaves the column NaN.
        reference_images: per prompt the memorized training image (uint8 ``[h, w, 3]``) or
            ``None``; where none is given the reference is the original generation from the
            same noise.
        progress: called with the number of images generated (rows and originals) as they are.
        on_prompt: called with the result so far after every prompt (to save partial results).

    Returns:
        :class:`MitigationResult`.

    Raises:
        ValueError: naming the argument: an empty prompt (no tokens), ``k`` larger than a
            prompt's number of tokens, a config that is not a :class:`MitigationConfig`, a
            reference image that is not uint8 ``[h, w, 3]``.
    """
    # ---- checks, all before any computation
    if not isinstance(config, MitigationConfig):
        raise ValueError(f"config must be a MitigationConfig, got {type(config).__name__}")
    prompts = check_strings(prompts, "prompts", what="prompts")
    methods, metrics = config.methods, config.metrics
    tokens = check_prompt_tokens(sd, prompts, config=config)
    if reference_images is not None:
        reference_images = list(reference_images)
        if len(reference_images) != len(prompts):
            raise ValueError(
                f"reference_images has {len(reference_images)} entries for "
                f"{len(prompts)} prompts (use None for a prompt without one)"
            )
        reference_images = [
            None if r is None else _check_image(r, f"reference_images[{i}]")
            for i, r in enumerate(reference_images)
        ]
    if similarity is not None and not callable(similarity):
        raise ValueError("similarity must be a callable (images_a, images_b) -> [b]")
    if clip_scorer is not None and not callable(clip_scorer):
        raise ValueError("clip_scorer must be a callable (images, prompts) -> [b]")
    vocabulary = config.vocabulary
    if "rta" in methods and vocabulary is None:
        vocabulary = clip_vocabulary_words(sd.tokenizer)
    if rephraser is None:
        rephraser = SynonymRephraser()
    num_images, grid_k = config.num_images, config.shown_k

    rows: list[dict] = []
    originals: list[dict] = []
    attributions: list[PromptAttribution] = []
    labels = config.labels()
    images: dict[str, list[np.ndarray]] = {"original": [], **{label: [] for label in labels}}
    grid_prompts: dict[str, list[str]] = {label: [] for label in images}

    for index, (prompt, pt) in enumerate(zip(prompts, tokens)):
        prompt_key = jax.random.fold_in(key, index)
        noise_key = jax.random.fold_in(prompt_key, 0)
        cond = sd.encode_prompt(pt.ids)
        attr = {}
        trajectory = None
        if "attribution" in methods or "embedding" in methods:
            needed = [num_images] if "embedding" in methods else []
            if "attribution" in methods:
                needed += [
                    config.attribution_images or default_attribution_images(m) for m in metrics
                ]
            trajectory = sd.sample(
                cond,
                key=noise_key,
                images_per_prompt=max(needed),
                guidance=config.guidance,
                num_steps=config.num_steps,
                return_trajectory=True,
            )
        if "attribution" in methods:
            found = _attributions_on(
                sd,
                prompt,
                pt,
                cond,
                trajectory,
                metrics=metrics,
                key=jax.random.fold_in(prompt_key, 1),
                num_images=config.attribution_images,
                num_steps=config.num_steps,
                guidance=config.guidance,
            )
            attributions.extend(found)
            attr = {a.metric: a.scores for a in found}

        jobs: list[tuple[dict, Any]] = []  # (row, embedding [1, n, dim])
        base = dict(prompt_index=index, prompt=prompt)
        for row in new_prompts(
            prompt,
            pt.tokens,
            index=index,
            key=key,
            config=config,
            attributions=attr,
            rephraser=rephraser,
            vocabulary=vocabulary,
        ):
            new_cond = (
                cond if not row["changed"] else sd.encode_prompt(sd.tokenize([row["new_prompt"]]))
            )
            jobs.append((row, new_cond))
        if "embedding" in methods:
            for j, m in enumerate(metrics):
                s = config.embedding_settings(m)
                points = trajectory_points(
                    _first_images(trajectory, num_images), schedule=sd.schedule, steps=[s.step]
                )
                opt = optimize_embedding(
                    sd.eps,
                    cond,
                    sd.uncond_embedding,
                    points,
                    metric=m,
                    schedule=sd.schedule,
                    guidance=config.guidance,
                    learning_rate=s.learning_rate,
                    num_steps=s.num_updates,
                    target=s.target,
                    key=jax.random.fold_in(prompt_key, 2 + j),
                )
                values = np.asarray(opt.values, np.float64)
                row = dict(
                    base,
                    method="embedding",
                    metric=m,
                    k=0,
                    repeat=0,
                    words="",
                    new_prompt=prompt,
                    changed=opt.steps_taken > 0,
                    error="",
                    metric_before=float(values[0]),
                    metric_after=float(values[-1]),
                    updates=int(opt.steps_taken),
                )
                jobs.append((row, opt.embedding))

        # the original first, then every row: one starting noise, one compiled batch shape
        generated = _generate(
            sd, [cond] + [c for _, c in jobs], key=noise_key, config=config, progress=progress
        )
        reference = None if reference_images is None else reference_images[index]
        if reference is None:
            refs, kind = generated[0], "generation"
        else:
            refs, kind = np.repeat(reference[None], num_images, axis=0), "training"
        sim, clip = _similarity_and_clip(
            generated,
            refs,
            prompt,
            similarity=similarity,
            clip_scorer=clip_scorer,
            batch_size=config.batch_size,
        )
        originals.append(
            dict(
                base,
                num_tokens=len(pt.tokens),
                reference=kind,
                similarity=float(sim[0]),
                clip_score=float(clip[0]),
            )
        )
        for i, (row, _) in enumerate(jobs, start=1):
            row.update(similarity=float(sim[i]), clip_score=float(clip[i]), reference=kind)
            rows.append(row)

        images["original"].append(generated[0, 0])
        grid_prompts["original"].append(prompt)
        for label in labels:
            pick = next(
                i
                for i, (row, _) in enumerate(jobs, start=1)
                if method_label(row["method"], row["metric"]) == label
                and row["k"] in (grid_k, 0)
                and row["repeat"] == 0
            )
            images[label].append(generated[pick, 0])
            grid_prompts[label].append(jobs[pick - 1][0]["new_prompt"])
        if on_prompt is not None:
            on_prompt(MitigationResult(rows, originals, attributions, images, grid_prompts))
    return MitigationResult(rows, originals, attributions, images, grid_prompts)


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

        out.append(
            dict(
                method=method,
                metric=metric,
                label=method_label(method, metric),
                k=k,
                rows=len(members),
                similarity=mean("similarity"),
                clip_score=mean("clip_score"),
                changed=float(np.mean([r["changed"] for r in members])),
                errors=sum(bool(r["error"]) for r in members),
            )
        )
    return out
