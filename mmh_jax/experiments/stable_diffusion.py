"""Memorization detection for Stable Diffusion (paper, Section 3.2, Section 4.1, Figures 3 and 6).

``mmh-jax sd detect MODEL --prompts FILE`` generates ``--images-per-prompt`` images per prompt
with DDIM and classifier-free guidance and scores each prompt with every metric of
:mod:`mmh_jax.memorization.conditional`: Wen et al.'s CFG vector norm and the CFG-adjusted score
norm (both from the sampler's own evaluations, averaged over steps and images) and FLIPD of the
generated latents under the unconditional and the CFG-conditional model (averaged over images).
``--images FOLDER`` scores real image-caption pairs instead (the paper's Figure 6): the CFG norms
after 3 Euler steps of the conditional probability-flow ODE to ``t0 = 0.01`` (Appendix C) and
FLIPD of the encoded image.

Inputs:

* a prompt file: one prompt a line (blank lines skipped), or JSON lines (``.jsonl``) with a
  ``caption`` and an optional ``label`` (true / 1 for memorized), as Wen et al.'s prompt lists;
* a folder of pairs ``KEY.png|jpg|jpeg|webp`` + ``KEY.txt`` (the caption), with an optional
  ``KEY.json`` holding ``{"label": ...}`` (img2dataset writes such folders).

Outputs in ``--out``: ``scores/`` (the run of :func:`mmh_jax.scoring.score`: one row per
generated or given image, sharded over the devices, written exactly once, so an interrupted run
resumes where it stopped; ``mmh-jax score merge`` reads it), ``results.parquet`` and
``results.csv`` (one row per prompt or image: the means over its images), ``histograms.png``
(density histograms of every metric by label, Figure 6), ``cfg_scatter.png`` (CFG-adjusted score
norm against CFG vector norm, Figure 3) and, with labels, the AUROC and TPR at 1% FPR of every
metric in the summary and ``detection.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from rich.console import Console

from mmh_jax.experiments.common import (
    DemoInputError,
    add_display_flags,
    add_dtype_flag,
    add_flags,
    add_out_flag,
    check_dtype,
    config_from_flags,
    finite_float,
    input_errors,
    prepare_outputs,
    require,
    require_at_least,
    results_table,
    save_figure,
    write_csv,
    write_parquet,
)

__all__ = [
    "DetectConfig",
    "Item",
    "METRICS",
    "load_pipeline",
    "read_prompt_file",
    "read_image_folder",
    "read_reference_images",
    "detection_metrics",
    "detection_columns",
    "score_pipeline",
    "add_model_argument",
    "add_pipeline_flags",
    "add_arguments",
    "config_from_args",
    "run",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # ImageFolder's

METRICS: tuple[tuple[str, str, bool], ...] = (
    ("cfg_vector_norm", "CFG vector norm ||eps_c - eps_u||", True),
    ("cfg_score_norm", "CFG-adjusted score norm ||s^CFG||", True),
    ("flipd_uncond", "FLIPD, unconditional LID_theta(z)", False),
    ("flipd_cond", "FLIPD, conditional LID_theta(z | c)", False),
)
"""The per-image signals of ``sd detect``: (column, description, whether a larger value
means memorized)."""


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    """Settings of ``mmh-jax sd detect`` (the CLI flags map one to one onto these)."""

    model: Path
    prompts: Path | None = None
    images: Path | None = None
    out: Path = Path("mmh-sd-detect")
    images_per_prompt: int = 4
    num_steps: int = 50
    guidance: float = 7.5
    flipd_t0: float = 0.05
    num_probes: int = 1
    cfg_t0: float = 0.01
    euler_steps: int = 3
    batch_size: int = 4
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require(
            (self.prompts is None) != (self.images is None),
            "give exactly one of --prompts FILE and --images FOLDER",
        )
        require_at_least(
            self, 1, "images_per_prompt", "num_steps", "batch_size", "num_probes", "euler_steps"
        )
        require(self.guidance >= 0, f"--guidance must be >= 0, got {self.guidance}")
        require(0 < self.flipd_t0 <= 1, f"--flipd-t0 must lie in (0, 1], got {self.flipd_t0}")
        require(0 < self.cfg_t0 <= 1, f"--cfg-t0 must lie in (0, 1], got {self.cfg_t0}")
        check_dtype(self.dtype)


class Item(NamedTuple):
    """One prompt or image-caption pair to score."""

    id: str
    caption: str
    label: int  # 1 memorized, 0 not, -1 unknown
    image: Path | None = None


def _label(value: object, where: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    raise DemoInputError(f"{where}: label must be true/false or 1/0, got {value!r}")


def load_pipeline(path: Path, *, dtype: Literal["float32", "bfloat16"], console: Console):
    """The Stable Diffusion pipeline of ``path`` computing in ``dtype``, a status line on
    ``console`` meanwhile (the ``sd`` commands' loader).

    Raises:
        DemoInputError: no such pipeline, or one that does not load.
    """
    import jax.numpy as jnp

    from mmh_jax.models import load_stable_diffusion

    with console.status(f"loading {path} ..."), input_errors(FileNotFoundError, ValueError):
        return load_stable_diffusion(
            path, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        )


def read_prompt_file(path: str | Path) -> list[Item]:
    """The prompts of a text file (one a line; blank lines skipped) or a JSON-lines file
    (``.jsonl``: objects with a string ``caption`` and optional ``label`` and ``id``), read by
    the scoring sources' :class:`~mmh_jax.scoring.PromptFile`.

    Raises:
        DemoInputError: no such file, no prompt in it, or a bad line (naming file and line).
    """
    return _open_prompt_file(path)[1]


def _open_prompt_file(path: str | Path):
    """The :class:`~mmh_jax.scoring.PromptFile` of ``path`` and its items (labels checked)."""
    from mmh_jax.scoring import PromptFile

    try:
        source = PromptFile(path)
    except (FileNotFoundError, ValueError) as err:
        raise DemoInputError(str(err).removeprefix("PromptFile: ")) from None
    items = []
    for i in range(len(source)):
        item = source[i]
        number, fields = source.fields(i)
        items.append(Item(item.id, item.text, _label(fields.get("label"), f"{path}:{number}")))
    return source, items


def read_image_folder(path: str | Path) -> list[Item]:
    """The image-caption pairs of a folder: ``KEY.<image>`` + ``KEY.txt`` (+ ``KEY.json`` with
    an optional ``label``), sorted by key.

    Raises:
        DemoInputError: no such folder, no image in it, an image without its caption, or a bad
            label file (naming the file).
    """
    path = Path(path)
    require(path.is_dir(), f"image folder {str(path)!r} does not exist")
    items = []
    for image in sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        require(caption_file.is_file(), f"{str(image)!r} has no caption file {caption_file.name!r}")
        label, meta = -1, image.with_suffix(".json")
        if meta.is_file():
            try:
                record = json.loads(meta.read_text())
            except json.JSONDecodeError as err:
                raise DemoInputError(f"{str(meta)!r}: not JSON: {err.msg}") from None
            if isinstance(record, dict):
                label = _label(record.get("label"), str(meta))
        items.append(Item(image.stem, caption_file.read_text().strip(), label, image))
    require(bool(items), f"image folder {str(path)!r} holds no {'/'.join(_IMAGE_SUFFIXES)} image")
    return items


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 ``[h, w, 3]``; an unreadable one raises :class:`DemoInputError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise DemoInputError(f"{str(path)!r} is not a readable image: {err}") from None


def read_reference_images(folder: str | Path, prompts: Sequence[str]) -> list[np.ndarray | None]:
    """The memorized training images of ``prompts`` from a folder of image-caption pairs
    (:func:`read_image_folder`), matched by caption (surrounding whitespace ignored): the
    references of ``mmh-jax sd mitigate``.

    Returns:
        Per prompt a uint8 ``[h, w, 3]`` image, or ``None`` when no caption matches.

    Raises:
        DemoInputError: no such folder, no image, an image without a caption or unreadable.
    """
    by_caption: dict[str, Path] = {}
    for item in read_image_folder(folder):
        by_caption.setdefault(item.caption.strip(), item.image)
    return [
        None if (path := by_caption.get(p.strip())) is None else _read_rgb(path) for p in prompts
    ]


def detection_metrics(
    scores: np.ndarray, labels: np.ndarray, *, higher_is_memorized: bool, fpr: float = 0.01
) -> tuple[float, float]:
    """AUROC and TPR at ``fpr`` false-positive rate of a score for the label "memorized"
    (:func:`mmh_jax.evaluation.auroc` and :func:`mmh_jax.evaluation.tpr_at_fpr`); NaN without
    both classes."""
    from mmh_jax.evaluation import auroc, tpr_at_fpr

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan"), float("nan")
    scores = np.asarray(scores, np.float64)
    return (
        auroc(scores, labels, higher_is_positive=higher_is_memorized),
        tpr_at_fpr(scores, labels, fpr=fpr, higher_is_positive=higher_is_memorized),
    )


def _write_results(rows: list[dict], out: Path) -> list[Path]:
    table = {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
    return [write_parquet(table, out / "results.parquet"), write_csv(table, out / "results.csv")]


def run(config: DetectConfig, *, console: Console | None = None):
    """Score every prompt or image-caption pair; returns ``(rows, summary, files)``.

    A recipe over :func:`mmh_jax.scoring.score`: the per-image rows go to ``OUT/scores/``
    (sharded over the devices, written exactly once, resumed after an interruption); the
    per-item means, tables, figures and detection metrics are then read from its Parquet.

    Raises:
        DemoInputError: bad settings or input (naming the file and line), an unwritable output
            folder, or one that holds a run of other inputs or settings.
    """
    from mmh_jax import scoring

    config.validate()
    prompts = config.prompts is not None
    if prompts:
        source, items = _open_prompt_file(config.prompts)
    else:
        items = read_image_folder(config.images)
        source = scoring.ImageFolder(config.images, recursive=False)
    out, console, err_console = prepare_outputs(config.out, console=console)
    start = time.perf_counter()
    sd = load_pipeline(config.model, dtype=config.dtype, console=err_console)
    timings = {"load_s": time.perf_counter() - start}
    columns = detection_columns(
        guidance=config.guidance,
        flipd_t0=config.flipd_t0,
        num_probes=config.num_probes,
        cfg_t0=config.cfg_t0,
        euler_steps=config.euler_steps,
    )
    per_item = config.images_per_prompt if prompts else 1
    start = time.perf_counter()
    done = score_pipeline(
        sd,
        columns,
        source,
        out / "scores",
        seed=config.seed,
        batch_size=config.batch_size * per_item,
        images_per_prompt=per_item,
        guidance=config.guidance,
        num_steps=config.num_steps,
        console=err_console if config.progress else None,
    )
    timings["score_s"] = time.perf_counter() - start
    merged = scoring.merge(out / "scores")
    rows = _item_rows(merged.scores, items, columns)
    bad = merged.errors.to_pylist()
    files = _write_results(rows, out)
    summary = _summarise(rows, timings, done.scored)
    if config.figure and rows:
        files.append(save_figure(_histograms(rows), out / "histograms.png"))
        files.append(save_figure(_scatter(rows), out / "cfg_scatter.png"))
    if summary["detection"]:
        det = {
            "metric": list(summary["detection"]),
            "auroc": [v[0] for v in summary["detection"].values()],
            "tpr_at_1pct_fpr": [v[1] for v in summary["detection"].values()],
        }
        files.append(write_csv(det, out / "detection.csv"))
    _print_summary(console, summary, config, files)
    for row in bad:
        err_console.print(f"not scored: {row['id']!r}: {row['error']}")
    return rows, summary, files


def detection_columns(
    *,
    guidance: float,
    flipd_t0: float = 0.05,
    num_probes: int = 1,
    cfg_t0: float = 0.01,
    euler_steps: int = 3,
) -> list:
    """The columns of ``sd detect``: the CFG vector and CFG-adjusted score norms
    (:class:`~mmh_jax.scoring.CFGNorms`: of a generation, over the sampler's own steps; of an
    image-caption pair, after ``euler_steps`` Euler steps to ``cfg_t0``), unconditional FLIPD
    and conditional FLIPD at ``guidance`` (:class:`~mmh_jax.scoring.Flipd`; paper, Section 3.2,
    Eqs. 6 and 26).

    Args:
        guidance: the classifier-free guidance weight of the CFG norms and conditional FLIPD.
        flipd_t0: FLIPD's time.
        num_probes: Hutchinson probes per FLIPD estimate.
        cfg_t0: where the CFG norms of given images are read (Appendix C).
        euler_steps: Euler steps of the conditional PF-ODE to ``cfg_t0``.

    Returns:
        ``[CFGNorms, Flipd, Flipd(conditional=True)]``: output columns ``cfg_vector_norm``,
        ``cfg_score_norm``, ``flipd_<t0>``, ``flipd_cond_<t0>``.
    """
    from mmh_jax import scoring

    flipd = dict(t0=flipd_t0, num_probes=num_probes)
    return [
        scoring.CFGNorms(guidance=guidance, t0=cfg_t0, num_steps=euler_steps),
        scoring.Flipd(**flipd),
        scoring.Flipd(**flipd, conditional=True, guidance=guidance),
    ]


def score_pipeline(
    sd,
    columns: Sequence,
    source,
    out: str | Path,
    *,
    seed: int,
    batch_size: int,
    images_per_prompt: int = 1,
    guidance: float = 7.5,
    num_steps: int = 50,
    chunk_size: int = 1024,
    console: Console | None = None,
    record: dict | None = None,
):
    """Score ``source`` with ``columns`` on a Stable Diffusion pipeline through
    :func:`mmh_jax.scoring.score` into ``out`` (one row per image, exactly once, resumed
    after an interruption): the one scoring step of the ``sd`` commands and ``demo prompts``
    (``sd detect``, ``sd benchmark-detectors``, ``sd mitigate``).

    Prompts alone are generated with DDIM and guidance (``images_per_prompt`` images of
    ``num_steps`` steps each, noise from ``seed``); images are centre-cropped to the model's
    size and encoded by the VAE; arrays of the image's shape (``[3, H, W]`` in ``[-1, 1]``) are
    encoded as they are.

    Args:
        sd: the pipeline (:class:`~mmh_jax.models.StableDiffusion`), or the
            :class:`~mmh_jax.scoring.Model` of one (e.g. with its noise predictor wrapped by an
            intervention, as ``sd mitigate --methods nemo``).
        columns: the columns (:func:`detection_columns`, :mod:`mmh_jax.scoring.prompt_columns`).
        source: the items (:mod:`mmh_jax.scoring.sources`).
        out: the run's folder.
        seed: the run's seed (sampling noise, probes).
        batch_size: images per step over all devices (rounded up to a multiple of them).
        images_per_prompt: images generated per prompt.
        guidance: the sampler's guidance weight.
        num_steps: the sampler's DDIM steps.
        chunk_size: items per written part, the unit of resumption (the engine's default).
        console: where the engine's progress goes (``None``: no progress).
        record: extra settings kept in the run's ``run.json`` (a resumed run must match them).

    Returns:
        The engine's :class:`~mmh_jax.scoring.Summary`.

    Raises:
        DemoInputError: ``out`` holds a run of other inputs or settings.
    """
    import jax

    from mmh_jax import scoring

    # the engine's batch is of images, shared by every device: rounded up to a multiple of them
    batch = -(-batch_size // jax.device_count()) * jax.device_count()
    try:
        return scoring.score(
            sd if isinstance(sd, scoring.Model) else scoring.Model.from_stable_diffusion(sd),
            columns,
            source,
            str(out),
            seed=seed,
            batch_size=batch,
            chunk_size=chunk_size,
            resize="center_crop",
            generation=scoring.Generation(
                guidance=guidance, num_steps=num_steps, num_images=images_per_prompt
            ),
            console=console,
            record=record,
        )
    except scoring.RunMismatch as err:
        raise DemoInputError(
            f"{str(out)!r} holds results of other inputs or settings ({err}); choose another --out"
        ) from None


def _item_rows(scores, items: list[Item], columns: list) -> list[dict]:
    """One row per scored item: its id, caption and label and the mean of every metric over
    the item's images (the engine's ``scores`` table has a row per image)."""
    cfg, flipd, flipd_cond = (c.names for c in columns)
    names = dict(zip(("cfg_vector_norm", "cfg_score_norm"), cfg))
    names.update(flipd_uncond=flipd[0], flipd_cond=flipd_cond[0])
    index = scores["index"].to_numpy()
    ids = scores["id"].to_numpy(zero_copy_only=False)
    if any(ids[i] != items[j].id for i, j in enumerate(index)):  # the same reader on both sides
        raise RuntimeError("the scoring run's item ids differ from the input's")
    scored = np.unique(index)
    counts = np.bincount(index)[scored]
    means = {
        name: np.bincount(index, weights=scores[column].to_numpy().astype(np.float64))[scored]
        / counts
        for name, column in names.items()
    }
    return [
        dict(
            id=items[j].id,
            caption=items[j].caption,
            label=items[j].label,
            **{name: float(means[name][k]) for name in names},
        )
        for k, j in enumerate(scored)
    ]


def _summarise(rows: list[dict], timings: dict, scored: int) -> dict:
    labels = np.array([row["label"] for row in rows])
    known = labels >= 0
    summary = {
        "rows": len(rows),
        "scored_now": scored,
        "timings": timings,
        "medians": {},
        "detection": {},
    }
    for name, _, higher in METRICS:
        values = np.array([row[name] for row in rows])
        summary["medians"][name] = {
            group: float(np.median(values[mask])) if mask.any() else float("nan")
            for group, mask in (
                ("memorized", labels == 1),
                ("not memorized", labels == 0),
                ("all", np.ones_like(known)),
            )
        }
        if known.any() and 0 < labels[known].sum() < known.sum():
            summary["detection"][name] = detection_metrics(
                values[known], labels[known], higher_is_memorized=higher
            )
    return summary


def _print_summary(console: Console, s: dict, config: DetectConfig, files: list) -> None:
    what = "prompts" if config.prompts is not None else "image-caption pairs"
    # a label group no row is in, and detection without both labels, are left out (not nan)
    groups = [
        (f"median ({short})", group)
        for short, group in (("memorized", "memorized"), ("not", "not memorized"), ("all", "all"))
        if any(np.isfinite(med[group]) for med in s["medians"].values())
    ]
    detection = ["AUROC", "TPR @ 1% FPR"] if s["detection"] else []
    table = results_table(
        ("metric", *(header for header, _ in groups), *detection),
        title=f"Stable Diffusion memorization metrics of {s['rows']} {what}",
    )
    for name, description, _ in METRICS:
        values = [s["medians"][name][group] for _, group in groups]
        values += list(s["detection"].get(name, (float("nan"),) * 2))[: len(detection)]
        table.add_row(description, *(f"{v:.4g}" for v in values))
    console.print(table)
    t = s["timings"]
    console.print(
        f"scored {s['scored_now']} now ({s['rows'] - s['scored_now']} resumed); load "
        f"{t['load_s']:.1f} s, scoring {t['score_s']:.1f} s; wrote "
        f"{', '.join(str(f) for f in files)}"
    )


def _groups(rows: list[dict]) -> list[tuple[str, np.ndarray]]:
    labels = np.array([row["label"] for row in rows])
    groups = [
        ("memorized", labels == 1),
        ("not memorized", labels == 0),
        ("unlabelled", labels < 0),
    ]
    return [(name, mask) for name, mask in groups if mask.any()]


def _histograms(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (name, description, _) in zip(axes, METRICS):
        values = np.array([row[name] for row in rows])
        bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 3)))
        for group, mask in _groups(rows):
            ax.hist(
                values[mask], bins=bins, density=True, alpha=0.55, label=f"{group} ({mask.sum()})"
            )
        ax.set_xlabel(description)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _scatter(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    vector = np.array([row["cfg_vector_norm"] for row in rows])
    score = np.array([row["cfg_score_norm"] for row in rows])
    for group, mask in _groups(rows):
        ax.scatter(vector[mask], score[mask], s=14, alpha=0.7, label=f"{group} ({mask.sum()})")
    ax.set_xlabel("CFG vector norm ||eps_c - eps_u||")
    ax.set_ylabel("CFG-adjusted score norm ||s^CFG||")
    ax.set_title("Figure 3: CFG-adjusted score vs CFG vector")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """Add the ``MODEL`` argument of the ``sd`` commands (read by :func:`load_pipeline`)."""
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a diffusers Stable Diffusion pipeline folder, or a file written by "
        "`mmh-jax convert stable-diffusion`",
    )


def add_pipeline_flags(parser: argparse.ArgumentParser, defaults: Any, flags: Sequence) -> None:
    """Add the flags an ``sd`` command ends with: ``-o/--out`` (a rerun resumes there), its
    number ``flags`` (:func:`~mmh_jax.experiments.common.add_flags`, defaults from the config
    ``defaults``), ``--dtype`` of the networks, ``--no-figure`` and ``--quiet``."""
    add_out_flag(parser, defaults.out)
    add_flags(parser, defaults, flags)
    add_dtype_flag(parser, defaults.dtype, of="the networks")
    add_display_flags(parser)


_FLAGS = (
    ("images_per_prompt", int, "N", "images generated per prompt"),
    ("num_steps", int, "N", "DDIM steps"),
    ("guidance", finite_float, "LAMBDA", "classifier-free guidance scale"),
    ("flipd_t0", finite_float, "T", "FLIPD time (default %(default)s, the paper's)"),
    ("num_probes", int, "N", "Hutchinson probes of FLIPD"),
    (
        "cfg_t0",
        finite_float,
        "T",
        "--images: time at which the CFG norms are read (default %(default)s, Appendix C)",
    ),
    ("euler_steps", int, "N", "--images: Euler steps of the PF-ODE to --cfg-t0"),
    (
        "batch_size",
        int,
        "N",
        "prompts (or images) per compiled batch, its images rounded up to a multiple of the "
        "devices",
    ),
    ("seed", int, "N", "seed of the starting noise and the probes"),
)
"""``sd detect``'s number flags (:func:`~mmh_jax.experiments.common.add_flags`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd detect``'s arguments and flags to ``parser``."""
    d = DetectConfig(model=Path("."))
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="prompts: one a line, or JSON lines (.jsonl) with 'caption' and an "
        "optional 'label' (true: memorized)",
    )
    source.add_argument(
        "--images",
        type=Path,
        metavar="FOLDER",
        help="image-caption pairs KEY.png|jpg + KEY.txt (+ KEY.json with 'label')",
    )
    add_pipeline_flags(parser, d, _FLAGS)


def config_from_args(args: argparse.Namespace) -> DetectConfig:
    """Build a :class:`DetectConfig` from parsed flags."""
    return config_from_flags(DetectConfig, args)
