"""``mmh-jax sd benchmark-detectors``: every memorization detector of the literature and the
paper's metrics on one labelled prompt file, scored by the same evaluation code.

Each detector group is one run of :func:`mmh_jax.scoring.score` on the same prompts, seed and
generation settings (so the same images), in its own folder under ``OUT/scores/``; its wall time
is its cost (NaN for a group resumed from an earlier run), next to the run of the CFG norms,
which costs one guided DDIM generation and nothing more. The prompt-level tests then combine a prompt's images: Webster's edge agreement of
the one-step predictions, Carlini et al.'s cluster score of the generations, and NeMo's z-scores
of the value activations against the clean prompts (each clean prompt against the other clean
prompts, leave one out). AUROC and TPR at 1% FPR with stratified bootstrap CIs
(:func:`mmh_jax.evaluation.detection_report`), overall and per memorization ``kind`` when the
prompt file has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Console

from mmh_jax.experiments.common import (
    check_dtype,
    config_from_flags,
    finite_float,
    prepare_outputs,
    require,
    save_figure,
    write_csv,
)
from mmh_jax.experiments.stable_diffusion import (
    _open_prompt_file,
    add_model_argument,
    add_pipeline_flags,
    load_pipeline,
    score_pipeline,
)

__all__ = ["BenchmarkConfig", "run", "add_arguments", "config_from_args", "GROUPS"]

GROUPS = ("cfg_norms", "flipd_cond", "cross_attention", "nemo", "sharpness", "images")
"""The detector groups, one engine run each, in the order they run (``cfg_norms`` first: its
time is the generation's, the unit of the cost column)."""


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of ``mmh-jax sd benchmark-detectors`` (the flags' defaults)."""

    model: Path
    prompts: Path
    out: Path = Path("sd-benchmark-detectors")
    images_per_prompt: int = 4
    num_steps: int = 50
    guidance: float = 7.5
    flipd_t0: float = 0.05
    num_probes: int = 1
    early_steps: int = 1
    cluster_size: int = 3
    nemo_threshold: float = 3.0
    n_bootstrap: int = 1000
    batch_size: int = 4
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` naming the first bad setting."""
        for name in ("images_per_prompt", "num_steps", "num_probes", "early_steps", "batch_size"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        require(
            self.images_per_prompt >= 2,
            "--images-per-prompt must be >= 2 (Webster's and "
            "Carlini et al.'s tests compare a prompt's images)",
        )
        require(
            2 <= self.cluster_size <= self.images_per_prompt,
            f"--cluster-size must lie in 2..--images-per-prompt ({self.images_per_prompt})",
        )
        require(self.early_steps <= self.num_steps, "--early-steps must be <= --num-steps")
        require(0 < self.flipd_t0 <= 1, "--flipd-t0 must lie in (0, 1]")
        require(self.n_bootstrap >= 0, "--n-bootstrap must be >= 0")
        check_dtype(self.dtype)


def _kinds(path: Path, n: int) -> list[str | None]:
    """The ``kind`` field of each line of a JSON-lines prompt file (``None`` where absent)."""
    if path.suffix != ".jsonl":
        return [None] * n
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r.get("kind") if isinstance(r.get("kind"), str) else None for r in rows][:n]


def _columns(config: BenchmarkConfig, group: str) -> list:
    from mmh_jax import scoring

    g = config.guidance
    return {
        "cfg_norms": lambda: [scoring.CFGNorms(guidance=g)],
        "flipd_cond": lambda: [
            scoring.Flipd(
                t0=config.flipd_t0, num_probes=config.num_probes, conditional=True, guidance=g
            )
        ],
        "cross_attention": lambda: [scoring.CrossAttentionStats(early_steps=config.early_steps)],
        "nemo": lambda: [scoring.ValueActivations()],
        "sharpness": lambda: [scoring.Sharpness(guidance=g, num_probes=config.num_probes)],
        "images": lambda: [scoring.DetectorImages(guidance=g)],
    }[group]()


def _unet_evals(config: BenchmarkConfig) -> dict[str, float]:
    """UNet evaluations per prompt of each group, the generation's ``2 * steps`` per image
    included where the detector reads it (a ``jvp`` counted as two). NeMo reads the prompt
    alone: its run compiles without the generation, which XLA drops as unused."""
    k, gen = config.images_per_prompt, 2 * config.num_steps
    return {
        "cfg_norms": k * gen,
        "flipd_cond": k * (gen + 4 * config.num_probes),
        "cross_attention": k * (gen + config.early_steps + 1),
        "nemo": k,
        "sharpness": k * (gen + 4 * config.num_probes),
        "images": k * gen,
    }


def _per_prompt(scores, name: str, n: int) -> np.ndarray:
    """The mean of a column over each prompt's images (vectors: the mean vector)."""
    index = scores["index"].to_numpy()
    values = scores[name].to_numpy(zero_copy_only=False)
    values = (
        np.stack([np.asarray(v, np.float64) for v in values])
        if values.dtype == object
        else values.astype(np.float64)
    )
    out = np.zeros((n, *values.shape[1:]))
    np.add.at(out, index, values)
    return out / np.bincount(index, minlength=n).reshape(-1, *([1] * (values.ndim - 1)))


def _images_of(scores, name: str, n: int, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Each prompt's images of a uint8 pixel column as float ``[k, c, h, w]`` in ``[-1, 1]``."""
    index = scores["index"].to_numpy()
    values = scores[name].to_numpy(zero_copy_only=False)
    c, h, w = shape
    images = [[] for _ in range(n)]
    for i, v in zip(index, values):
        images[i].append(np.asarray(v, np.float32).reshape(h, w, c).transpose(2, 0, 1) / 127.5 - 1)
    return [np.stack(x) for x in images]


def _nemo_scores(activations: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """NeMo's max |z| and outlier count of every prompt against the clean prompts (a clean
    prompt against the others)."""
    from mmh_jax.memorization.detectors import nemo_outliers, nemo_reference

    clean = np.flatnonzero(labels == 0)
    max_z, count = np.zeros(len(labels)), np.zeros(len(labels))
    everyone = nemo_outliers(activations, nemo_reference(activations[clean]), threshold=threshold)
    max_z[:], count[:] = everyone.max_z, everyone.count
    for i in clean:
        ref = nemo_reference(activations[clean[clean != i]])
        one = nemo_outliers(activations[i : i + 1], ref, threshold=threshold)
        max_z[i], count[i] = float(one.max_z[0]), float(one.count[0])
    return {"nemo_max_z": max_z, "nemo_outliers": count}


def run(config: BenchmarkConfig, *, console: Console | None = None):
    """Run every detector group on the prompts and report; returns ``(table, files)``.

    Raises:
        DemoInputError: bad settings or input, a prompt file without both memorized
            (``label`` true) and clean prompts, or fewer than 3 clean prompts (NeMo's
            leave-one-out reference needs 2).
    """
    import jax

    from mmh_jax import scoring
    from mmh_jax.evaluation import detection_report
    from mmh_jax.memorization import memorized_when_high
    from mmh_jax.memorization.detectors import (
        DETECTOR_DIRECTIONS,
        cluster_score,
        edge_agreement,
    )

    config.validate()
    source, items = _open_prompt_file(config.prompts)
    labels = np.array([-1 if it.label is None else it.label for it in items])
    require(
        np.all(labels >= 0),
        f"{config.prompts}: every prompt needs a 'label' (true: memorized) to benchmark detectors",
    )
    require(
        np.any(labels == 1),
        f"{config.prompts}: no memorized prompt (label true): AUROC "
        "and TPR are undefined without positives",
    )
    require(
        np.any(labels == 0),
        f"{config.prompts}: no clean prompt (label false): AUROC and "
        "TPR are undefined without negatives",
    )
    require(
        np.sum(labels == 0) >= 3,
        f"{config.prompts}: NeMo's reference needs at least 3 clean prompts",
    )
    kinds = _kinds(Path(config.prompts), len(items))
    out, console, err = prepare_outputs(config.out, console=console)
    sd = load_pipeline(config.model, dtype=config.dtype, console=err)
    image_shape = scoring.Model.from_stable_diffusion(sd).image_shape
    n = len(items)
    seconds, merged = {}, {}
    for group in GROUPS:
        start = time.perf_counter()
        done = score_pipeline(
            sd,
            _columns(config, group),
            source,
            out / "scores" / group,
            seed=config.seed,
            batch_size=config.batch_size * config.images_per_prompt,
            images_per_prompt=config.images_per_prompt,
            guidance=config.guidance,
            num_steps=config.num_steps,
            console=err if config.progress else None,
        )
        # a group resumed from an earlier run has no cost to report
        seconds[group] = (time.perf_counter() - start) / n if done.scored == n else float("nan")
        merged[group] = scoring.merge(out / "scores" / group).scores

    signals = {
        "cfg_vector_norm": _per_prompt(merged["cfg_norms"], "cfg_vector_norm", n),
        "cfg_score_norm": _per_prompt(merged["cfg_norms"], "cfg_score_norm", n),
        f"flipd_cond_{config.flipd_t0:g}": _per_prompt(
            merged["flipd_cond"], f"flipd_cond_{config.flipd_t0:g}", n
        ),
        "attention_entropy": _per_prompt(merged["cross_attention"], "ren_entropy", n),
        "begin_token_attention": _per_prompt(merged["cross_attention"], "ren_begin", n),
        "end_token_attention": _per_prompt(merged["cross_attention"], "ren_end", n),
        "bright_ending": _per_prompt(merged["cross_attention"], "bright_ending", n),
        **_nemo_scores(
            _per_prompt(merged["nemo"], "value_activations", n), labels, config.nemo_threshold
        ),
        "sharpness": _per_prompt(merged["sharpness"], "sharpness", n),
        "edge_consistency": np.array(
            [
                float(edge_agreement(x))
                for x in _images_of(merged["images"], "one_step_pixels", n, image_shape)
            ]
        ),
        "generation_clusters": np.array(
            [
                float(cluster_score(x, cluster_size=config.cluster_size))
                for x in _images_of(merged["images"], "final_pixels", n, image_shape)
            ]
        ),
    }
    group_of = {
        "cfg_vector_norm": "cfg_norms",
        "cfg_score_norm": "cfg_norms",
        "attention_entropy": "cross_attention",
        "begin_token_attention": "cross_attention",
        "end_token_attention": "cross_attention",
        "bright_ending": "cross_attention",
        "nemo_max_z": "nemo",
        "nemo_outliers": "nemo",
        "sharpness": "sharpness",
        "edge_consistency": "images",
        "generation_clusters": "images",
    }
    group_of[f"flipd_cond_{config.flipd_t0:g}"] = "flipd_cond"
    direction = {
        "cfg_vector_norm": memorized_when_high("cfg"),
        "cfg_score_norm": memorized_when_high("cfg_score"),
        f"flipd_cond_{config.flipd_t0:g}": memorized_when_high("flipd"),
        **{
            name: DETECTOR_DIRECTIONS[name]
            for name in signals
            if name in group_of and name in DETECTOR_DIRECTIONS
        },
    }
    evals = _unet_evals(config)
    subsets = [("all", np.ones(n, bool))]
    for kind in sorted({k for k, y in zip(kinds, labels) if y == 1 and k is not None}):
        subsets.append((kind, (labels == 0) | (np.array(kinds, dtype=object) == kind)))
    rows = []
    for subset, mask in subsets:
        report = detection_report(
            {k: v[mask] for k, v in signals.items()},
            labels[mask],
            higher_is_positive=direction,
            n_bootstrap=config.n_bootstrap,
            key=jax.random.key(config.seed),
        )
        for name, m in report.items():
            g = group_of[name]
            rows.append(
                dict(
                    subset=subset,
                    signal=name,
                    memorized_when_high=direction[name],
                    auroc=m.auroc,
                    auroc_lo=m.auroc_ci[0],
                    auroc_hi=m.auroc_ci[1],
                    tpr_at_1pct_fpr=m.tpr,
                    tpr_lo=m.tpr_ci[0],
                    tpr_hi=m.tpr_ci[1],
                    n_memorized=m.n_positive,
                    n_clean=m.n_negative,
                    unet_evals_per_prompt=evals[g],
                    seconds_per_prompt=seconds[g],
                    cost_vs_generation=seconds[g] / seconds["cfg_norms"],
                )
            )
    table = {k: [r[k] for r in rows] for k in rows[0]}
    files = [
        write_csv(table, out / "detectors.csv"),
        write_csv(
            {
                "id": [it.id for it in items],
                "caption": [it.caption for it in items],
                "label": labels,
                "kind": [k or "" for k in kinds],
                **{k: v for k, v in signals.items()},
            },
            out / "prompts.csv",
        ),
    ]
    (out / "detectors.md").write_text(_markdown(rows))
    files.append(out / "detectors.md")
    if config.figure:
        files.append(save_figure(_roc_figure(signals, labels, direction), out / "roc.png"))
    console.print(_markdown([r for r in rows if r["subset"] == "all"]))
    for f in files:
        console.print(f"wrote {f}")
    return table, files


def _markdown(rows: list[dict]) -> str:
    """The table as Markdown: one line per subset and signal."""
    lines = [
        "| subset | signal | AUROC [95% CI] | TPR@1%FPR [95% CI] | UNet evals / prompt | "
        "s / prompt | x generation |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['subset']} | {r['signal']} | {r['auroc']:.3f} [{r['auroc_lo']:.3f}, "
            f"{r['auroc_hi']:.3f}] | {r['tpr_at_1pct_fpr']:.3f} [{r['tpr_lo']:.3f}, "
            f"{r['tpr_hi']:.3f}] | {r['unet_evals_per_prompt']:g} | "
            f"{r['seconds_per_prompt']:.3g} | {r['cost_vs_generation']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _roc_figure(signals: dict, labels: np.ndarray, direction: dict):
    """ROC curves of every signal on all prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmh_jax.evaluation import roc_points

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for name, values in signals.items():
        fpr, tpr = roc_points(values, labels == 1, higher_is_positive=direction[name])
        ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title="memorization detectors"
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


_FLAGS = (
    ("images_per_prompt", int, None, "images generated per prompt"),
    ("num_steps", int, None, "DDIM steps"),
    ("guidance", finite_float, None, "classifier-free guidance scale"),
    ("flipd_t0", finite_float, None, "conditional FLIPD time"),
    ("num_probes", int, None, "Hutchinson probes of FLIPD and the sharpness"),
    ("early_steps", int, None, "first steps of Ren et al.'s attention statistics"),
    ("cluster_size", int, None, "clique size of Carlini et al.'s test"),
    ("nemo_threshold", finite_float, None, "NeMo's z-score threshold"),
    ("n_bootstrap", int, None, "bootstrap resamples of the CIs"),
    ("batch_size", int, None, "prompts per compiled batch"),
    ("seed", int, None, "seed of the starting noise, the probes and the bootstrap"),
)
"""``sd benchmark-detectors``' number flags (:func:`~mmh_jax.experiments.common.add_flags`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``sd benchmark-detectors``' arguments and flags to ``parser``."""
    d = BenchmarkConfig(model=Path("."), prompts=Path("."))
    add_model_argument(parser)
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        required=True,
        help="JSON lines (.jsonl) with 'caption', 'label' (true: memorized) and "
        "an optional 'kind' (memorization kind, reported separately)",
    )
    add_pipeline_flags(parser, d, _FLAGS)


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """Build a :class:`BenchmarkConfig` from parsed flags."""
    return config_from_flags(BenchmarkConfig, args)
