"""The command-line recipes ``mmh-jax sd attribute`` and ``mmh-jax sd mitigate`` (paper,
Section 4.2, Appendix D.2-D.5, Figures 7, 9, 10, 11): their configs and flags, and
:func:`run_attribute` / :func:`run_mitigate`, which read a prompt file, load the model and the
scorers, run their stages through :func:`mmh_jax.scoring.score` (the engine's token
attributions, generations and scorer columns; resumable), write the tables and draw the
figures (:mod:`mmh_jax.experiments.mitigation_figures`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from rich.console import Console
from rich.table import Table

from mmh_jax.experiments.common import (
    DemoInputError,
    add_display_flags,
    add_dtype_flag,
    check_dtype,
    finite_float,
    host_stage,
    prepare_out_dir,
    require,
    write_csv,
    write_parquet,
    write_prompt_file,
)
from mmh_jax.experiments.mitigation_figures import (
    plot_attributions,
    plot_mitigation_grid,
    plot_tradeoff,
)
from mmh_jax.experiments.stable_diffusion import (
    Item,
    _open_prompt_file,
    add_model_argument,
    load_pipeline,
    read_prompt_file,
    read_reference_images,
    score_pipeline,
)
from mmh_jax.memorization import (
    INTERVENTIONS,
    METHODS,
    METRICS,
    ClipScorer,
    MitigationConfig,
    MitigationResult,
    PromptAttribution,
    Rephraser,
    Similarity,
    metric_label,
    summarise_mitigation,
)

__all__ = [
    "AttributeConfig",
    "MitigateConfig",
    "Scorers",
    "add_attribute_arguments",
    "add_mitigate_arguments",
    "attribute_config_from_args",
    "mitigate_config_from_args",
    "run_attribute",
    "run_mitigate",
]


def _check_common(config: Any) -> None:
    require(config.num_steps >= 1, f"--num-steps must be at least 1, got {config.num_steps}")
    require(config.guidance >= 0, f"--guidance must be >= 0, got {config.guidance}")
    check_dtype(config.dtype)


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
    batch_size: int = 1
    chunk_size: int = 32
    """Prompts per written chunk: the unit of resumption."""

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require(
            (self.prompt is None) != (self.prompts is None),
            "give exactly one of --prompt TEXT and --prompts FILE",
        )
        require(
            self.prompt is None or bool(self.prompt.strip()),
            "--prompt is empty: there are no tokens to attribute",
        )
        require(
            bool(self.metrics) and all(m in METRICS for m in self.metrics),
            f"--metric must be among {', '.join(METRICS)}, got {list(self.metrics)}",
        )
        require(
            self.num_images is None or self.num_images >= 1,
            f"--num-images must be at least 1, got {self.num_images}",
        )
        require(self.num_probes >= 1, f"--num-probes must be at least 1, got {self.num_probes}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.chunk_size >= 1, f"chunk_size must be at least 1, got {self.chunk_size}")
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class MitigateConfig:
    """Settings of ``mmh-jax sd mitigate`` (the CLI flags map one to one onto these)."""

    model: Path
    prompts: Path
    out: Path = Path("mmh-sd-mitigate")
    methods: tuple[str, ...] = ("attribution", "uniform", "rta")
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
    chunk_size: int = 32
    """Prompts (stage 1) or new prompts (stage 3) per written chunk: the unit of resumption."""
    rescale_factor: float = 1.25
    nemo_reference: Path | None = None
    nemo_threshold: float = 5.0

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings (before the model loads)."""
        require(
            bool(self.methods) and all(m in METHODS + INTERVENTIONS for m in self.methods),
            f"--methods must be among {', '.join(METHODS + INTERVENTIONS)}, "
            f"got {list(self.methods)}",
        )
        require(len(set(self.methods)) == len(self.methods), "--methods lists a method twice")
        require(
            any(m in METHODS for m in self.methods),
            f"--methods {', '.join(INTERVENTIONS)} come with at least one of "
            f"{', '.join(METHODS)} (the rephrasing they are compared with)",
        )
        require(
            math.isfinite(self.rescale_factor) and self.rescale_factor > 0,
            f"--rescale-factor must be a finite number > 0, got {self.rescale_factor}",
        )
        require(
            math.isfinite(self.nemo_threshold) and self.nemo_threshold > 0,
            f"--nemo-threshold must be a finite number > 0, got {self.nemo_threshold}",
        )
        require(
            "nemo" not in self.methods
            or (self.nemo_reference is not None and self.nemo_reference.is_file()),
            "--methods nemo needs --nemo-reference FILE, a prompt file of non-memorized "
            f"prompts (got {self.nemo_reference})",
        )
        require(
            "nemo" not in self.methods or len(read_prompt_file(self.nemo_reference)) >= 2,
            f"--nemo-reference {self.nemo_reference} needs at least 2 prompts",
        )
        require(self.chunk_size >= 1, f"chunk_size must be at least 1, got {self.chunk_size}")
        require(
            bool(self.metrics)
            and all(m in METRICS for m in self.metrics)
            and len(set(self.metrics)) == len(self.metrics),
            f"--metric must be distinct names among {', '.join(METRICS)}, got {list(self.metrics)}",
        )
        require(
            bool(self.ks) and all(k >= 1 for k in self.ks) and len(set(self.ks)) == len(self.ks),
            f"--ks must be distinct integers >= 1, got {list(self.ks)}",
        )
        require(
            self.grid_k is None or self.grid_k in self.ks,
            f"--grid-k {self.grid_k} is not one of --ks {list(self.ks)}",
        )
        require(self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}")
        require(self.num_images >= 1, f"--num-images must be at least 1, got {self.num_images}")
        require(
            self.attribution_images is None or self.attribution_images >= 1,
            f"--attribution-images must be at least 1, got {self.attribution_images}",
        )
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(
            self.rephraser in ("synonyms", "chat"),
            f"--rephraser must be synonyms or chat, got {self.rephraser!r}",
        )
        require(
            self.rephraser != "chat" or self.chat_url is not None,
            "--rephraser chat needs --chat-url URL (an OpenAI-compatible endpoint)",
        )
        require(self.chat_timeout > 0, f"--chat-timeout must be > 0, got {self.chat_timeout}")
        require(
            self.sscd is None or self.sscd.is_file(),
            f"--sscd {str(self.sscd)!r} does not exist or is a folder",
        )
        require(
            self.clip is None or self.clip.is_dir(), f"--clip {str(self.clip)!r} is not a folder"
        )
        require(
            self.reference_images is None or self.reference_images.is_dir(),
            f"--reference-images {str(self.reference_images)!r} is not a folder",
        )
        _check_common(self)


def _common_arguments(parser: argparse.ArgumentParser, d: Any) -> None:
    parser.add_argument(
        "--num-steps",
        type=int,
        metavar="N",
        default=d.num_steps,
        help="DDIM steps (default %(default)s)",
    )
    parser.add_argument(
        "--guidance",
        type=finite_float,
        metavar="LAMBDA",
        default=d.guidance,
        help="classifier-free guidance scale (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=d.seed,
        help="seed of the noise and every random choice (default %(default)s)",
    )
    add_dtype_flag(parser, d.dtype, of="the networks")
    add_display_flags(parser)


def add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd attribute``'s arguments and flags to ``parser``."""
    d = AttributeConfig(model=Path("."))
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="prompts: one a line, or JSON lines (.jsonl) with 'caption'",
    )
    parser.add_argument(
        "--metric",
        dest="metrics",
        nargs="+",
        choices=METRICS,
        default=list(d.metrics),
        metavar="METRIC",
        help="metrics to attribute with: cfg (Wen et al.'s A^CFG), cfg_score "
        "(A^sCFG), flipd (A^FLIPD) (default: all three, as Figure 11)",
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=d.out, help="output folder (default ./%(default)s/)"
    )
    parser.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        default=None,
        help="trajectories per prompt (default: 4 for the CFG metrics, 1 for "
        "FLIPD, as the public code)",
    )
    parser.add_argument(
        "--num-probes",
        type=int,
        metavar="N",
        default=d.num_probes,
        help="Hutchinson probes of A^FLIPD (default %(default)s)",
    )
    _batch_argument(parser, d, "prompts")
    _common_arguments(parser, d)


def _batch_argument(parser: argparse.ArgumentParser, d: Any, what: str) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=d.batch_size,
        help=f"{what} sampled per compiled batch (default %(default)s)",
    )


def add_mitigate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd mitigate``'s arguments and flags to ``parser``."""
    d = MitigateConfig(model=Path("."), prompts=Path("."))
    add_model_argument(parser)
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        required=True,
        help="the memorized prompts: one a line, or JSON lines (.jsonl) with 'caption'",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=d.out,
        help="output folder; a rerun resumes there (default ./%(default)s/)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS + INTERVENTIONS,
        default=list(d.methods),
        metavar="METHOD",
        help="attribution (rephrase k tokens drawn from the attributions), "
        "uniform (k tokens drawn uniformly), rta (k random vocabulary words "
        "added), embedding (AdamW on the prompt embedding, one row per prompt "
        "and metric; each image's embedding on its own trajectory), attention-rescale (Ren et al.: the beginning "
        "token's cross-attention logits times --rescale-factor), nemo (Hintersdorf et al.: "
        "value neurons that are z-score outliers against --nemo-reference switched off); the "
        "last two with one of the others (default: the first three)",
    )
    parser.add_argument(
        "--rescale-factor",
        type=finite_float,
        default=d.rescale_factor,
        metavar="C",
        help="attention-rescale's factor of the beginning token's logits (default %(default)s)",
    )
    parser.add_argument(
        "--nemo-reference",
        type=Path,
        metavar="FILE",
        help="nemo's non-memorized prompts (one a line, or .jsonl), at least 2",
    )
    parser.add_argument(
        "--nemo-threshold",
        type=finite_float,
        default=d.nemo_threshold,
        metavar="Z",
        help="nemo's z-score threshold (default %(default)s)",
    )
    parser.add_argument(
        "--metric",
        dest="metrics",
        nargs="+",
        choices=METRICS,
        default=list(d.metrics),
        metavar="METRIC",
        help="metric(s) of the attributions and the embedding optimisation "
        "(default: flipd); several give one line each",
    )
    parser.add_argument(
        "--ks",
        nargs="+",
        type=int,
        default=list(d.ks),
        metavar="K",
        help="numbers of tokens to perturb (default: 1 2 3 4 6 8)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        default=d.repeats,
        help="rephrasings per prompt, method and k (default %(default)s)",
    )
    parser.add_argument(
        "--rephraser",
        choices=("synonyms", "chat"),
        default=d.rephraser,
        help="synonyms: offline synonym substitution (default); chat: an "
        f"OpenAI-compatible endpoint (--chat-url, key in ${d.chat_key_env})",
    )
    parser.add_argument(
        "--chat-url", metavar="URL", help="chat endpoint base, e.g. https://api.openai.com/v1"
    )
    parser.add_argument(
        "--chat-model",
        metavar="M",
        default=d.chat_model,
        help="chat model name (default %(default)s)",
    )
    parser.add_argument(
        "--chat-key-env",
        metavar="VAR",
        default=d.chat_key_env,
        help="environment variable holding the endpoint's key (default %(default)s)",
    )
    parser.add_argument(
        "--chat-timeout",
        type=finite_float,
        metavar="S",
        default=d.chat_timeout,
        help="seconds to wait for each rephrasing (default %(default)s)",
    )
    parser.add_argument(
        "--sscd",
        type=Path,
        metavar="FILE",
        help="SSCD checkpoint for the similarity to the memorized image",
    )
    parser.add_argument(
        "--clip",
        type=Path,
        metavar="FOLDER",
        help="transformers CLIPModel folder for the CLIP score",
    )
    parser.add_argument(
        "--reference-images",
        type=Path,
        metavar="FOLDER",
        help="memorized training images: KEY.png|jpg + KEY.txt (the caption, "
        "matched to the prompts); default reference: the original generation",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        default=d.num_images,
        help="images per (new) prompt, all from the prompt's noise (default %(default)s)",
    )
    parser.add_argument(
        "--attribution-images",
        type=int,
        metavar="N",
        default=None,
        help="trajectories of the attributions (default: 4 for the CFG "
        "metrics, 1 for FLIPD, as the public code)",
    )
    _batch_argument(parser, d, "new prompts")
    parser.add_argument(
        "--grid-k",
        type=int,
        metavar="K",
        default=None,
        help="k shown in the image grid (default: the one of --ks closest to 4, as Figure 10)",
    )
    _common_arguments(parser, d)


def attribute_config_from_args(args: argparse.Namespace) -> AttributeConfig:
    """Build an :class:`AttributeConfig` from parsed flags."""
    return AttributeConfig(
        model=args.model,
        prompt=args.prompt,
        prompts=args.prompts,
        out=args.out,
        metrics=tuple(dict.fromkeys(args.metrics)),
        num_images=args.num_images,
        num_steps=args.num_steps,
        guidance=args.guidance,
        num_probes=args.num_probes,
        seed=args.seed,
        dtype=args.dtype,
        progress=not args.quiet,
        figure=not args.no_figure,
        batch_size=args.batch_size,
    )


def mitigate_config_from_args(args: argparse.Namespace) -> MitigateConfig:
    """Build a :class:`MitigateConfig` from parsed flags."""
    return MitigateConfig(
        model=args.model,
        prompts=args.prompts,
        out=args.out,
        methods=tuple(args.methods),
        metrics=tuple(args.metrics),
        ks=tuple(args.ks),
        repeats=args.repeats,
        rephraser=args.rephraser,
        chat_url=args.chat_url,
        chat_model=args.chat_model,
        chat_key_env=args.chat_key_env,
        chat_timeout=args.chat_timeout,
        sscd=args.sscd,
        clip=args.clip,
        reference_images=args.reference_images,
        num_images=args.num_images,
        attribution_images=args.attribution_images,
        num_steps=args.num_steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        grid_k=args.grid_k,
        seed=args.seed,
        dtype=args.dtype,
        progress=not args.quiet,
        figure=not args.no_figure,
        rescale_factor=args.rescale_factor,
        nemo_reference=args.nemo_reference,
        nemo_threshold=args.nemo_threshold,
    )


def _attribution_table(attributions: Sequence[PromptAttribution], ids: Sequence[str]) -> dict:
    columns: dict[str, list] = {
        name: []
        for name in (
            "id",
            "prompt",
            "metric",
            "value",
            "position",
            "token",
            "word",
            "score",
            "normalized",
        )
    }
    for pid, a in zip(ids, attributions):
        top = float(np.max(a.scores)) if len(a.scores) else 0.0
        for i, (token, word, score) in enumerate(zip(a.tokens, a.words, a.scores)):
            for name, v in (
                ("id", pid),
                ("prompt", a.prompt),
                ("metric", a.metric),
                ("value", a.value),
                ("position", i),
                ("token", token),
                ("word", word),
                ("score", float(score)),
                ("normalized", float(score) / top if top > 0 else 0.0),
            ):
                columns[name].append(v)
    return columns


def _attribution_figures(
    attributions: list[PromptAttribution], out: Path, stem: str, per_page: int
) -> list[Path]:
    """One PNG per ``per_page`` prompts (``stem.png`` when one page is enough)."""
    prompts = list(dict.fromkeys(a.prompt for a in attributions))
    pages = [prompts[i : i + per_page] for i in range(0, len(prompts), per_page)]
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
    """``mmh-jax sd attribute``: token attributions of every prompt for every metric, as one run
    of :func:`mmh_jax.scoring.score` (generations with their trajectories and
    :class:`~mmh_jax.scoring.TokenAttributions` columns, in ``engine/``; a rerun resumes it);
    returns ``(attributions, files)``.

    Writes ``attributions.parquet`` / ``.csv`` (one row per prompt x metric x token: ``id``,
    ``prompt``, ``metric``, ``value`` (``A(c)``), ``position``, ``token``, ``word``,
    ``score``, ``normalized``) and ``attributions.png`` (Figures 7a/11; ``attributions-N.png``
    pages of 8 prompts for longer files). A prompt's attribution for a metric is the mean over
    the first images the metric uses (``--num-images``, else 4 for the CFG metrics and 1 for
    FLIPD) of its images' attribution vectors.

    Raises:
        DemoInputError: bad settings or input, an empty prompt, an unwritable output folder, or
            one holding a run of other prompts or settings.
    """
    from mmh_jax import scoring
    from mmh_jax.memorization import default_attribution_images

    config.validate()
    out = prepare_out_dir(config.out)
    path = config.prompts
    if path is None:
        path = write_prompt_file(out / "prompt.jsonl", ["prompt"], [config.prompt])
    source, items = _open_prompt_file(path)
    for item in items:
        require(bool(item.caption.strip()), f"{item.id}: empty prompt, nothing to attribute")
    from mmh_jax.experiments.common import output_console

    console = console or output_console()
    err_console = Console(stderr=True)
    start = time.perf_counter()
    sd = load_pipeline(config.model, dtype=config.dtype, console=err_console)
    prompts = [item.caption for item in items]
    tokens = _checked_tokens(sd, prompts, items, path, None)
    model = scoring.Model.from_stable_diffusion(sd)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    columns = [
        scoring.TokenAttributions(metric=m, guidance=config.guidance, num_probes=config.num_probes)
        for m in config.metrics
    ]
    images = max(config.num_images or default_attribution_images(m) for m in config.metrics)
    generation = scoring.Generation(
        guidance=config.guidance, num_steps=config.num_steps, num_images=images
    )
    engine = out / "engine"
    _score(
        engine,
        source,
        columns,
        generation,
        config,
        {"model": str(config.model), "dtype": config.dtype},
        err_console,
        model,
    )
    attributions = _attributions(
        scoring.merge(engine).scores,
        prompts,
        tokens,
        metrics=config.metrics,
        num_images=config.num_images,
    )
    ids = [item.id for item in items for _ in config.metrics]
    attribute_s = time.perf_counter() - start
    table = _attribution_table(attributions, ids)
    files = [
        write_parquet(table, out / "attributions.parquet"),
        write_csv(table, out / "attributions.csv"),
    ]
    if config.figure:
        files += _attribution_figures(attributions, out, "attributions", per_page=8)
    summary = Table(title=f"Token attributions of {len(items)} prompt(s)")
    for column in ("id", "metric", "A(c)", "top tokens (attribution)"):
        summary.add_column(column, justify="right" if column == "A(c)" else "left")
    for pid, a in zip(ids, attributions):
        summary.add_row(pid, metric_label(a.metric), f"{a.value:.4g}", _top_tokens(a))
    console.print(summary)
    console.print(
        f"load {load_s:.1f} s, attribution {attribute_s:.1f} s; wrote "
        f"{', '.join(str(f) for f in files)}"
    )
    return attributions, files


def _checked_tokens(
    sd, prompts: Sequence[str], items: Sequence[Item], path: Path, settings: Any
) -> list:
    """:func:`~mmh_jax.memorization.check_prompt_tokens`, its errors naming ``FILE: prompt ID``."""
    from mmh_jax.memorization import check_prompt_tokens

    try:
        return check_prompt_tokens(
            sd, prompts, config=settings, names=[f"{path}: prompt {item.id}" for item in items]
        )
    except ValueError as err:
        raise DemoInputError(str(err)) from None


def _rephraser(config: MitigateConfig):
    import jax

    from mmh_jax.memorization.rephrase import ChatRephraser, SynonymRephraser

    if config.rephraser == "synonyms":
        return SynonymRephraser(key=jax.random.key(config.seed))
    key = os.environ.get(config.chat_key_env)
    require(
        bool(key),
        f"--rephraser chat needs the endpoint's key in ${config.chat_key_env} "
        "(set it, or pick another variable with --chat-key-env)",
    )
    try:
        return ChatRephraser(
            config.chat_url, api_key=key, model=config.chat_model, timeout=config.chat_timeout
        )
    except ValueError as err:
        raise DemoInputError(f"--rephraser chat: {err}") from None


def _mitigation_config(
    config: MitigateConfig, vocabulary: Sequence[str] | None = None
) -> MitigationConfig:
    """The library settings of the run (``ks`` only matter to the text methods)."""
    try:
        return MitigationConfig(
            vocabulary=None if vocabulary is None else tuple(vocabulary),
            methods=tuple(m for m in config.methods if m in METHODS),
            metrics=config.metrics,
            ks=config.ks,
            repeats=config.repeats,
            num_images=config.num_images,
            num_steps=config.num_steps,
            guidance=config.guidance,
            batch_size=config.batch_size,
            attribution_images=config.attribution_images,
            grid_k=config.grid_k,
        )
    except ValueError as err:
        raise DemoInputError(str(err)) from None


def _load_sscd(path: Path) -> Similarity:
    """SSCD similarity from a checkpoint of either published architecture (the large one
    first)."""
    from jax.tree_util import Partial

    from mmh_jax.convert import ConversionError
    from mmh_jax.models import load_sscd, sscd_similarity

    errors = []
    for arch in ("resnext101_32x4d", "resnet50"):
        try:
            return Partial(sscd_similarity, load_sscd(path, arch=arch))
        except ConversionError as err:
            errors.append(f"as {arch}: {err}")
    raise DemoInputError(f"cannot load SSCD from {str(path)!r}: " + "; ".join(errors))


class Scorers(NamedTuple):
    """The scorers of an ``sd mitigate`` run (:func:`run_mitigate`): a similarity of each
    generated image to its reference (the copy measure) and a score of the image against the
    original prompt (the fidelity measure), each ``None`` to skip it, with the labels that name
    them in the run record. ``--sscd`` and ``--clip`` give SSCD and CLIP; code can give others
    (``mmh-jax demo prompts`` gives its world's copy judge and attribute classifier)."""

    similarity: Similarity | None
    clip_score: ClipScorer | None
    similarity_label: str
    clip_label: str


def _scorers(config: MitigateConfig, console: Console) -> Scorers:
    """The SSCD similarity and the CLIP score of ``--sscd`` and ``--clip`` (``None`` without)."""
    from jax.tree_util import Partial

    from mmh_jax.evaluation import clip_score, load_clip

    similarity = clip_scorer = None
    try:
        if config.sscd is not None:
            with console.status(f"loading SSCD {config.sscd} ..."):
                similarity = _load_sscd(config.sscd)
        if config.clip is not None:
            with console.status(f"loading CLIP {config.clip} ..."):
                clip_scorer = Partial(clip_score, load_clip(config.clip))
    except (FileNotFoundError, ValueError) as err:
        raise DemoInputError(str(err)) from None
    return Scorers(similarity, clip_scorer, str(config.sscd), str(config.clip))


def _rows_table(rows: Sequence[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


_NEW_PROMPT_FIELDS = (
    "prompt_index",
    "prompt",
    "method",
    "metric",
    "k",
    "repeat",
    "words",
    "changed",
    "error",
)
"""The columns of ``new_prompts.parquet`` besides ``id`` and ``new_prompt``, carried by the
``mitigated`` stage into its Parquet."""


def _digest(arrays: Sequence[np.ndarray | None]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(
            b"none" if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode()
        )
    return digest.hexdigest()[:16]


def _score(
    stage: Path,
    source,
    columns: list,
    generation,
    config: MitigateConfig,
    record: dict,
    err_console: Console,
    model,
):
    """One engine stage of ``sd mitigate`` into ``stage`` (a rerun resumes it):
    :func:`~mmh_jax.experiments.stable_diffusion.score_pipeline` with the run's settings."""
    return score_pipeline(
        model,
        columns,
        source,
        stage,
        seed=config.seed,
        batch_size=config.batch_size * generation.num_images,
        images_per_prompt=generation.num_images,
        guidance=generation.guidance,
        num_steps=generation.num_steps,
        chunk_size=config.chunk_size,
        console=err_console if config.progress else None,
        record=record,
    )


def _per_item_means(scores, names: Sequence[str], *, images: int | None = None) -> dict:
    """Per item index: the mean of each column over its images (``image_index < images``)."""
    index = scores["index"].to_numpy()
    keep = (
        np.ones(len(index), bool) if images is None else (scores["image_index"].to_numpy() < images)
    )
    index = index[keep]
    items = np.unique(index)
    counts = np.bincount(index)[items]
    means = {
        name: np.bincount(
            index, weights=scores[name].to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        )[items]
        / counts
        for name in names
    }
    return {int(i): {name: float(means[name][k]) for name in names} for k, i in enumerate(items)}


def _attributions(
    scores,
    prompts: Sequence[str],
    tokens: Sequence[Any],
    *,
    metrics: Sequence[str],
    num_images: int | None,
) -> list[PromptAttribution]:
    """Per prompt and metric, the attribution of its tokens: the mean of its images' vectors
    over the images the metric uses (``num_images``, else its default; prompt-major, as
    :func:`mitigate` returns them)."""
    from mmh_jax.memorization import default_attribution_images

    index = scores["index"].to_numpy()
    image = scores["image_index"].to_numpy()
    found = []
    for p, (prompt, pt) in enumerate(zip(prompts, tokens)):
        n_tokens = len(pt.tokens)
        for m in metrics:
            n = num_images or default_attribution_images(m)
            rows = (index == p) & (image < n)
            vectors = np.stack(scores[f"attribution_{m}"].filter(rows).to_pylist())
            values = scores[f"attribution_value_{m}"].to_numpy()[rows]
            found.append(
                PromptAttribution(
                    prompt,
                    m,
                    list(pt.tokens),
                    list(pt.words),
                    vectors.astype(np.float64).mean(axis=0)[1 : 1 + n_tokens],
                    float(values.astype(np.float64).mean()),
                )
            )
    return found


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


def run_mitigate(
    config: MitigateConfig,
    *,
    console: Console | None = None,
    scorers: Scorers | None = None,
    rephraser: Rephraser | None = None,
    vocabulary: Sequence[str] | None = None,
):
    """``mmh-jax sd mitigate``: sample-time mitigation of a prompt file (paper, Section 4.2,
    Appendix D.3-D.5, Figures 7c, 9, 10), as four stages over :func:`mmh_jax.scoring.score`;
    returns ``(result, summary, files)`` (``result`` a
    :class:`~mmh_jax.memorization.MitigationResult`).

    1. ``originals/`` (engine): every prompt's images (``--num-images``, more if the
       attributions need them), their token attributions (``attribution``), similarity to the
       reference and CLIP score; the images are kept as ``originals/images/INDEX-J.png``.
    2. ``new_prompts.parquet`` (host): every changed prompt
       (:func:`~mmh_jax.memorization.new_prompts`, drawn from the seed) with its prompt index,
       method, metric, ``k`` and repeat; kept on a rerun with the same settings.
    3. ``mitigated/`` (engine): the new prompts' images from the same starting noise, their
       similarity to the reference (the training image, else the original generation) and
       CLIP score against the original prompt; the grid's images are kept as PNGs.
    4. ``embedding/METRIC/`` (engine, with ``embedding``): per metric, every prompt's embedding
       optimised by AdamW (:class:`~mmh_jax.scoring.EmbeddingMitigation`, the settings of
       :func:`~mmh_jax.memorization.embedding_defaults`), its image from the same noise, the
       same scores, and ``A(c)`` before and after.

    Each stage resumes where a killed run stopped; a rerun with other prompts or settings is
    refused. With ``--num-images`` above 1, ``embedding`` optimises each image's embedding on
    that image's own trajectory (:func:`~mmh_jax.memorization.mitigate` optimises one embedding
    on all the images of a prompt jointly).

    Args:
        config: the settings (the command's flags).
        console: where the tables go (default: standard output).
        scorers: the similarity and fidelity scorers, instead of loading ``--sscd`` /
            ``--clip``.
        rephraser: the rephraser of the text methods, instead of ``--rephraser`` (recorded by
            its type's name).
        vocabulary: the words ``rta`` inserts, instead of the tokenizer's vocabulary. The tables and figures are then read from the stages' Parquet: ``results.parquet``
    / ``.csv`` (:attr:`~mmh_jax.memorization.MitigationResult.rows`), ``originals.csv``,
    ``summary.csv`` (:func:`~mmh_jax.memorization.summarise_mitigation`),
    ``attributions.csv`` (when ``attribution`` runs) and the figures ``grid.png`` (Figure 10;
    ``grid-N.png`` pages of 6 prompts), ``tradeoff.png`` (Figure 7c, when both a similarity and
    a CLIP score are computed) and ``attributions.png``.

    Raises:
        DemoInputError: bad settings or input (a chat rephraser without a key, k larger than a
            prompt's tokens, ...), an unloadable scorer, an unwritable output folder, or one
            holding a run of other prompts or settings.
    """
    import jax

    from mmh_jax import scoring
    from mmh_jax.memorization import (
        default_attribution_images,
        method_label,
        new_prompts,
    )
    from mmh_jax.memorization.rephrase import clip_vocabulary_words

    config.validate()
    source, items = _open_prompt_file(config.prompts)
    rephraser_name = config.rephraser if rephraser is None else type(rephraser).__name__
    rephraser = rephraser or _rephraser(config)  # a missing key fails here, before loading
    out = prepare_out_dir(config.out)
    from mmh_jax.experiments.common import output_console

    console = console or output_console()
    err_console = Console(stderr=True)
    start = time.perf_counter()
    sd = load_pipeline(config.model, dtype=config.dtype, console=err_console)
    settings = _mitigation_config(config, vocabulary)
    prompts = [item.caption for item in items]
    tokens = _checked_tokens(sd, prompts, items, config.prompts, settings)
    scorers = scorers or _scorers(config, err_console)
    similarity, clip_scorer = scorers.similarity, scorers.clip_score
    references = (
        read_reference_images(config.reference_images, prompts)
        if config.reference_images is not None
        else [None] * len(prompts)
    )
    model = scoring.Model.from_stable_diffusion(sd)
    load_s = time.perf_counter() - start
    record = {"model": str(config.model), "dtype": config.dtype}
    labels = (f"{scorers.similarity_label} to {_digest(references)}", scorers.clip_label)

    def scorer_columns(reference, prompt) -> list:
        columns = []
        if similarity is not None:
            columns.append(scoring.ImageSimilarity(similarity, reference, labels[0]))
        if clip_scorer is not None:
            columns.append(scoring.ClipScore(clip_scorer, prompt, labels[1]))
        return columns

    # ---- stage 1: the original prompts
    start = time.perf_counter()
    m = config.num_images
    attribution = "attribution" in settings.methods
    needed = [m] + (
        [settings.attribution_images or default_attribution_images(x) for x in settings.metrics]
        if attribution
        else []
    )
    columns = [
        scoring.TokenAttributions(metric=x, guidance=config.guidance)
        for x in (settings.metrics if attribution else ())
    ]
    columns += scorer_columns(lambda i, j: references[i], lambda i: prompts[i])
    originals_dir = out / "originals"
    columns.append(
        scoring.SavedImage(str(originals_dir / "images"), lambda i, j: j < m, f"image_index < {m}")
    )
    generation = scoring.Generation(
        guidance=config.guidance, num_steps=config.num_steps, num_images=max(needed)
    )
    _score(originals_dir, source, columns, generation, config, record, err_console, model)
    first = scoring.merge(originals_dir).scores
    attributions = (
        _attributions(
            first,
            prompts,
            tokens,
            metrics=settings.metrics,
            num_images=settings.attribution_images,
        )
        if attribution
        else []
    )

    # ---- stage 2: the new prompts (host, drawn from the seed)
    table = out / "new_prompts.parquet"
    vocabulary = (
        clip_vocabulary_words(sd.tokenizer)
        if "rta" in settings.methods and settings.vocabulary is None
        else settings.vocabulary
    )

    def make() -> dict[str, list]:
        attr = {(a.prompt, a.metric): a.scores for a in attributions}
        rows = []
        key = jax.random.key(config.seed)
        for i, (item, pt) in enumerate(zip(items, tokens)):
            for row in new_prompts(
                item.caption,
                pt.tokens,
                index=i,
                key=key,
                config=settings,
                attributions={x: attr.get((item.caption, x)) for x in settings.metrics},
                rephraser=rephraser,
                vocabulary=vocabulary,
            ):
                tag = f"{row['method']}-{row['metric']}" if row["metric"] else row["method"]
                rows.append(dict(row, id=f"{item.id}/{tag}/k{row['k']}/r{row['repeat']}"))
        names = ("id", "new_prompt", *_NEW_PROMPT_FIELDS)
        return {name: [r[name] for r in rows] for name in names}

    stage_record = {
        "prompts": source.fingerprint,
        "seed": config.seed,
        "methods": list(settings.methods),
        "metrics": list(settings.metrics),
        "ks": list(settings.ks),
        "repeats": settings.repeats,
        "temperature": settings.temperature,
        "smoothing": settings.smoothing,
        "rephraser": rephraser_name,
        "vocabulary": (
            None if settings.vocabulary is None else _digest([np.asarray(settings.vocabulary)])
        ),
        **({"chat": [config.chat_url, config.chat_model]} if config.rephraser == "chat" else {}),
        "originals": json.loads((originals_dir / "run.json").read_text()),
    }
    host_stage(table, stage_record, make, what="new prompts")

    # ---- stage 3: the new prompts' images from the same noise
    new = (
        scoring.ParquetTable(
            table, image_column=None, text_column="new_prompt", metadata=_NEW_PROMPT_FIELDS
        )
        if settings.text_methods
        else None
    )  # embedding alone: no new prompt
    meta = {
        name: new.metadata[name].to_pylist() if new else []
        for name in ("prompt_index", "k", "repeat")
    }
    shown = settings.shown_k

    @functools.lru_cache(maxsize=256)
    def original_image(p: int, j: int) -> np.ndarray:
        return _read_png(scoring.saved_image_path(originals_dir / "images", p, j))

    def reference(i: int, j: int) -> np.ndarray:
        p = meta["prompt_index"][i]
        return original_image(p, j) if references[p] is None else references[p]

    mitigated_dir = out / "mitigated"
    columns = scorer_columns(reference, lambda i: prompts[meta["prompt_index"][i]])
    columns.append(
        scoring.SavedImage(
            str(mitigated_dir / "images"),
            lambda i, j: j == 0 and meta["k"][i] == shown and meta["repeat"][i] == 0,
            f"image 0 of k = {shown}, repeat 0",
        )
    )
    if new is not None:
        _score(
            mitigated_dir,
            new,
            columns,
            generation._replace(num_images=m),
            config,
            record,
            err_console,
            model,
        )
    second = scoring.merge(mitigated_dir).scores if new is not None else None

    # ---- stage 4: the optimised embeddings' images (a function of its own)
    embedding = (
        _embedding_stage(
            out / "embedding",
            source,
            prompts,
            settings=settings,
            config=config,
            generation=generation._replace(num_images=m),
            record=record,
            err_console=err_console,
            model=model,
            scorer_columns=scorer_columns,
            reference=lambda p, j: original_image(p, j) if references[p] is None else references[p],
        )
        if "embedding" in settings.methods
        else None
    )
    mitigate_s = time.perf_counter() - start

    # ---- tables and figures from the Parquet
    values = [n for n in ("similarity", "clip_score") if n in first.column_names]
    before = _per_item_means(first, values, images=m)
    after = _per_item_means(second, values) if second is not None else {}
    kinds = ["generation" if r is None else "training" for r in references]
    nan = {n: math.nan for n in ("similarity", "clip_score")}
    originals = [
        dict(
            prompt_index=i,
            prompt=p,
            num_tokens=len(tokens[i].tokens),
            reference=kinds[i],
            **{**nan, **before.get(i, {})},
        )
        for i, p in enumerate(prompts)
    ]
    rows = []
    for i, row in enumerate(new.metadata["prompt_index"].to_pylist() if new else []):
        fields = {name: new.metadata[name][i].as_py() for name in _NEW_PROMPT_FIELDS}
        rows.append(
            dict(
                fields,
                new_prompt=new[i].text,
                metric_before=math.nan,
                metric_after=math.nan,
                updates=-1,
                reference=kinds[row],
                **{**nan, **after.get(i, {})},
            )
        )
    rows = [
        {
            name: r[name]
            for name in (
                "prompt_index",
                "prompt",
                "method",
                "metric",
                "k",
                "repeat",
                "words",
                "new_prompt",
                "changed",
                "error",
                "metric_before",
                "metric_after",
                "updates",
                "similarity",
                "clip_score",
                "reference",
            )
        }
        for r in rows
    ]
    images: dict[str, list[np.ndarray]] = {"original": []}
    grid_prompts: dict[str, list[str]] = {"original": []}
    for p, prompt in enumerate(prompts):
        images["original"].append(original_image(p, 0))
        grid_prompts["original"].append(prompt)
        for i, r in enumerate(rows):
            label = method_label(r["method"], r["metric"])
            if (
                r["prompt_index"] == p
                and r["k"] == shown
                and r["repeat"] == 0
                and len(images.setdefault(label, [])) == p
            ):
                images[label].append(
                    _read_png(scoring.saved_image_path(mitigated_dir / "images", i, 0))
                )
                grid_prompts.setdefault(label, []).append(r["new_prompt"])
    if embedding is not None:
        rows = _with_embedding_rows(rows, embedding, kinds, images, grid_prompts)
    rows = _with_intervention_rows(
        rows,
        out,
        source,
        sd,
        config=config,
        generation=generation._replace(num_images=m),
        record=record,
        err_console=err_console,
        model=model,
        scorer_columns=scorer_columns,
        reference=lambda p, j: original_image(p, j) if references[p] is None else references[p],
        kinds=kinds,
        images=images,
        grid_prompts=grid_prompts,
    )
    result = MitigationResult(rows, originals, attributions, images, grid_prompts)

    summary = summarise_mitigation(rows)
    files = [
        write_parquet(_rows_table(rows), out / "results.parquet"),
        write_csv(_rows_table(rows), out / "results.csv"),
        write_csv(_rows_table(originals), out / "originals.csv"),
        write_csv(_rows_table(summary), out / "summary.csv"),
    ]
    if attributions:
        ids = [items[prompts.index(a.prompt)].id for a in attributions]
        files.append(write_csv(_attribution_table(attributions, ids), out / "attributions.csv"))
    if config.figure:
        if attributions:
            files += _attribution_figures(attributions, out, "attributions", per_page=8)
        per_page = 6
        for p, lo in enumerate(range(0, len(prompts), per_page), start=1):
            name = "grid.png" if len(prompts) <= per_page else f"grid-{p}.png"
            files.append(
                plot_mitigation_grid(
                    {k: v[lo : lo + per_page] for k, v in images.items()},
                    {k: v[lo : lo + per_page] for k, v in grid_prompts.items()},
                    out / name,
                )
            )
        if similarity is not None and clip_scorer is not None:
            trained = all(r is not None for r in references)
            x_label = (
                "SSCD similarity to the memorized image (lower is better)"
                if trained
                else "SSCD similarity to the reference (training image or original "
                "generation; lower is better)"
            )
            files.append(
                plot_tradeoff(rows, out / "tradeoff.png", originals=originals, x_label=x_label)
            )
    _print_mitigation(console, summary, result, config, files, load_s, mitigate_s)
    return result, summary, files


def _print_mitigation(
    console: Console,
    summary: list[dict],
    result: MitigationResult,
    config: MitigateConfig,
    files: list[Path],
    load_s: float,
    mitigate_s: float,
) -> None:
    table = Table(
        title=f"Mitigation of {len(result.originals)} prompt(s): means over prompts "
        f"and {config.repeats} repeat(s)"
    )
    for column in ("method", "k", "rows", "similarity", "CLIP score", "changed", "errors"):
        table.add_column(column, justify="left" if column == "method" else "right")
    sim = np.array([o["similarity"] for o in result.originals], np.float64)
    clip = np.array([o["clip_score"] for o in result.originals], np.float64)
    table.add_row(
        "original prompt",
        "-",
        str(len(result.originals)),
        f"{np.nanmean(sim):.4g}" if np.isfinite(sim).any() else "n/a",
        f"{np.nanmean(clip):.4g}" if np.isfinite(clip).any() else "n/a",
        "-",
        "-",
    )
    for s in summary:
        table.add_row(
            s["label"],
            str(s["k"]) if s["method"] != "embedding" else "-",
            str(s["rows"]),
            f"{s['similarity']:.4g}",
            f"{s['clip_score']:.4g}",
            f"{100 * s['changed']:.0f}%",
            str(s["errors"]),
        )
    console.print(table)
    errors = sum(s["errors"] for s in summary)
    if errors:
        first = next(r["error"] for r in result.rows if r["error"])
        console.print(
            f"[yellow]{errors} rephrasing(s) failed and kept their prompt; first: {first}[/yellow]"
        )
    if config.sscd is None or config.clip is None:
        console.print("no trade-off figure: it needs both --sscd and --clip")
    console.print(
        f"load {load_s:.1f} s, mitigation {mitigate_s:.1f} s; wrote "
        f"{', '.join(str(f) for f in files)}"
    )


class _EmbeddingStage(NamedTuple):
    """What :func:`_embedding_stage` read back: per metric, per prompt index, the columns'
    means over the prompt's images, and the folder of its saved images."""

    values: dict[str, dict[int, dict[str, float]]]
    folders: dict[str, Path]


def _embedding_stage(
    out: Path,
    source,
    prompts: Sequence[str],
    *,
    settings: MitigationConfig,
    config: MitigateConfig,
    generation,
    record: dict,
    err_console: Console,
    model,
    scorer_columns,
    reference,
) -> _EmbeddingStage:
    """Stage 4 of ``sd mitigate``: one engine run per metric into ``out/METRIC/`` over the
    prompt file itself; each prompt's embedding is optimised on its own image's trajectory
    (:class:`~mmh_jax.scoring.EmbeddingMitigation`, as :func:`~mmh_jax.memorization.mitigate`)
    and the image of the optimised embedding (from the prompt's noise) is scored against
    ``reference(prompt index, image index)`` and the prompt; image 0 is kept as a PNG. A rerun
    resumes, and one with other settings is refused (:func:`_score`)."""
    from mmh_jax import scoring

    values, folders = {}, {}
    for metric in settings.metrics:
        s = settings.embedding_settings(metric)
        stage = out / metric
        columns = [
            scoring.EmbeddingMitigation(
                metric=metric,
                step=s.step,
                learning_rate=s.learning_rate,
                num_updates=s.num_updates,
                target=s.target,
                guidance=config.guidance,
            )
        ]
        columns += scorer_columns(reference, lambda i: prompts[i])
        columns.append(
            scoring.SavedImage(str(stage / "images"), lambda i, j: j == 0, "image_index == 0")
        )
        _score(stage, source, columns, generation, config, record, err_console, model)
        scores = scoring.merge(stage).scores
        names = [
            n
            for n in ("metric_before", "metric_after", "updates", "similarity", "clip_score")
            if n in scores.column_names
        ]
        values[metric] = _per_item_means(scores, names)
        folders[metric] = stage / "images"
    return _EmbeddingStage(values, folders)


def _with_embedding_rows(
    rows: list[dict],
    stage: _EmbeddingStage,
    kinds: Sequence[str],
    images: dict[str, list[np.ndarray]],
    grid_prompts: dict[str, list[str]],
) -> list[dict]:
    """``rows`` with the embedding rows of ``stage`` (one per prompt and metric, ``k = 0``,
    :func:`~mmh_jax.memorization.mitigate`'s fields) after each prompt's text rows, and the
    grid's images of each ``embedding (A^...)`` line added to ``images`` / ``grid_prompts``."""
    from mmh_jax import scoring
    from mmh_jax.memorization import method_label

    added = []
    for metric, per_item in stage.values.items():
        label = method_label("embedding", metric)
        for p in sorted(per_item):
            v = {"similarity": math.nan, "clip_score": math.nan, **per_item[p]}
            prompt = grid_prompts["original"][p]
            added.append(
                dict(
                    prompt_index=p,
                    prompt=prompt,
                    method="embedding",
                    metric=metric,
                    k=0,
                    repeat=0,
                    words="",
                    new_prompt=prompt,
                    changed=v["updates"] > 0,
                    error="",
                    metric_before=v["metric_before"],
                    metric_after=v["metric_after"],
                    updates=int(v["updates"]),
                    similarity=v["similarity"],
                    clip_score=v["clip_score"],
                    reference=kinds[p],
                )
            )
            images.setdefault(label, []).append(
                _read_png(scoring.saved_image_path(stage.folders[metric], p, 0))
            )
            grid_prompts.setdefault(label, []).append(prompt)
    return sorted(rows + added, key=lambda r: r["prompt_index"])


def _with_intervention_rows(
    rows: list[dict],
    out: Path,
    source,
    sd,
    *,
    config: MitigateConfig,
    generation,
    record: dict,
    err_console: Console,
    model,
    scorer_columns,
    reference,
    kinds: Sequence[str],
    images: dict[str, list[np.ndarray]],
    grid_prompts: dict[str, list[str]],
) -> list[dict]:
    """The stage of ``--methods attention-rescale`` / ``nemo``: per intervention, one engine
    run into ``out/METHOD/`` over the prompt file itself with the model's noise predictor
    wrapped (:func:`~mmh_jax.memorization.rescale_begin_attention`,
    :func:`~mmh_jax.memorization.nemo_deactivation` against the ``--nemo-reference`` prompts'
    :func:`~mmh_jax.memorization.detectors.value_activations`), so each image starts from the
    original's noise; scored against ``reference(prompt index, image index)`` and the prompt,
    image 0 kept as a PNG. Returns ``rows`` with one row per prompt and intervention (``k =
    0``, the prompt unchanged, ``changed`` true even where NeMo's rule picks no neuron) after
    each prompt's other rows, and the grid's images added to ``images`` / ``grid_prompts``. A
    rerun resumes; one with other settings is refused. Runs after the tables' other rows are
    read, so its time is not in the printed mitigation time."""
    import dataclasses

    from mmh_jax import scoring
    from mmh_jax.memorization import nemo_deactivation, rescale_begin_attention
    from mmh_jax.memorization.detectors import nemo_reference, value_activations

    added = []
    for method in (m for m in INTERVENTIONS if m in config.methods):
        if method == "attention-rescale":
            eps = rescale_begin_attention(
                model.eps_fn, uncond=model.uncond, factor=config.rescale_factor
            )
            settings = {"factor": config.rescale_factor}
        else:
            clean = [item.caption for item in read_prompt_file(config.nemo_reference)]
            ref = nemo_reference(value_activations(sd, clean))
            eps = nemo_deactivation(model.eps_fn, ref, threshold=config.nemo_threshold)
            settings = {
                "threshold": config.nemo_threshold,
                "reference": _digest([np.asarray(ref.mean), np.asarray(ref.std)]),
            }
        stage = out / method
        columns = scorer_columns(reference, lambda i: grid_prompts["original"][i])
        columns.append(
            scoring.SavedImage(str(stage / "images"), lambda i, j: j == 0, "image_index == 0")
        )
        _score(
            stage,
            source,
            columns,
            generation,
            config,
            dict(record, intervention=method, **settings),
            err_console,
            dataclasses.replace(model, eps_fn=eps, description=f"{model.description}, {method}"),
        )
        scores = scoring.merge(stage).scores
        names = [n for n in ("similarity", "clip_score") if n in scores.column_names]
        for p, v in sorted(_per_item_means(scores, names).items()):
            prompt = grid_prompts["original"][p]
            added.append(
                dict(
                    prompt_index=p,
                    prompt=prompt,
                    method=method,
                    metric="",
                    k=0,
                    repeat=0,
                    words="",
                    new_prompt=prompt,
                    changed=True,
                    error="",
                    metric_before=math.nan,
                    metric_after=math.nan,
                    updates=-1,
                    similarity=v.get("similarity", math.nan),
                    clip_score=v.get("clip_score", math.nan),
                    reference=kinds[p],
                )
            )
            images.setdefault(method, []).append(
                _read_png(scoring.saved_image_path(stage / "images", p, 0))
            )
            grid_prompts.setdefault(method, []).append(prompt)
    return sorted(rows + added, key=lambda r: r["prompt_index"]) if added else rows
