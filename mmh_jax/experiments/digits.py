"""Image-scale memorization demo on scikit-learn's shipped 8x8 digits (no download).

Training set (seeded): ``common_per_class`` images of each common class, plus ``num_duplicated``
images each repeated ``copies`` times -- duplicated data, ``LID_* = 0`` at those
images (paper, Proposition 3.1), so a well-fitted model reproduces them (DD-Mem) --
plus only ``rare_per_class`` images of each of the ``rare_classes`` -- isolated
points the model can only fit by collapsing onto them (OD-Mem). A small
convolutional diffusion model is trained on it, samples are drawn, each sample's
nearest training image is retrieved with the calibrated l2 distance of Carlini et
al. (2023), and a sample is called *memorized* when that calibrated distance is
below ``mem_threshold``. FLIPD (paper, Eq. 6) should then be low exactly on the
memorized samples: the demo reports the AUROC of ``-FLIPD`` for "memorized" and
writes a grid of the lowest- and highest-FLIPD samples next to their nearest
training images and FLIPD histograms (in the spirit of the paper's Figures 5, 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console

from mmh_jax.experiments.common import (
    add_display_flags,
    add_flags,
    config_from_flags,
    finite_float,
    make_progress,
    prepare_outputs,
    require,
    require_at_least,
    require_positive,
    results_table,
    save_figure,
    train_and_sample,
    write_csv,
    write_parquet,
)

__all__ = [
    "DigitsConfig",
    "DigitsData",
    "make_digits_training_set",
    "add_arguments",
    "config_from_args",
    "run",
]


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Settings of the digits demo (the CLI flags map one to one onto these)."""

    seed: int = 0
    common_per_class: int | None = 40
    num_duplicated: int = 8
    copies: int = 40
    rare_classes: tuple[int, ...] = (8, 9)
    rare_per_class: int = 1
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 3e-3
    train_t_min: float = 1e-3
    time_sampling: str = "mixed"
    channels: int = 16
    mlp_width: int = 256
    num_samples: int = 256
    sample_steps: int = 200
    t0: float = 0.05
    mem_threshold: float = 1 / 3
    calibration_k: int = 20
    out: Path = Path("mmh-demo-digits")
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require(
            self.common_per_class is None or self.common_per_class >= 1,
            f"--common-per-class must be at least 1, got {self.common_per_class}",
        )
        require(
            self.num_duplicated >= 0,
            f"--num-duplicated must be non-negative, got {self.num_duplicated}",
        )
        require_at_least(self, 1, "copies")
        require(all(0 <= c <= 9 for c in self.rare_classes), "--rare-classes must be digits 0-9")
        require(
            len(set(self.rare_classes)) < 10, "--rare-classes must leave at least one common class"
        )
        require_at_least(self, 1, "rare_per_class")
        require_positive(self, "steps", "batch_size", "learning_rate", "channels")
        require(self.mlp_width >= 0, f"--mlp-width must be non-negative, got {self.mlp_width}")
        require_at_least(self, 2, "num_samples")
        require_positive(self, "sample_steps")
        require(0.0 < self.t0 <= 1.0, f"--t0 must lie in (0, 1], got {self.t0}")
        require_positive(self, "mem_threshold")
        require_at_least(self, 1, "calibration_k")
        require(
            self.train_t_min > 0 and self.train_t_min < 1,
            f"train_t_min must lie in (0, 1), got {self.train_t_min}",
        )
        require(
            self.time_sampling in ("log-uniform", "mixed"),
            f"time_sampling must be 'log-uniform' or 'mixed', got {self.time_sampling!r}",
        )


class DigitsData(NamedTuple):
    """Training set of the digits demo.

    Attributes:
        images: ``[n, 8, 8]`` training images in ``[-1, 1]`` (duplicates included).
        unique_images: ``[u, 8, 8]`` the distinct images.
        unique_kind: ``[u]`` ``"common"``, ``"duplicated"`` or ``"rare"``.
        unique_label: ``[u]`` digit class.
        unique_count: ``[u]`` how often each distinct image occurs in ``images``.
    """

    images: np.ndarray
    unique_images: np.ndarray
    unique_kind: np.ndarray
    unique_label: np.ndarray
    unique_count: np.ndarray


def make_digits_training_set(
    *,
    seed: int,
    num_duplicated: int = 8,
    copies: int = 60,
    rare_classes=(8, 9),
    rare_per_class: int = 1,
    common_per_class: int | None = None,
) -> DigitsData:
    """Build the digits training set with duplicated images and rare classes.

    Args:
        seed: NumPy seed choosing the duplicated and the rare images.
        num_duplicated: number of common-class images repeated ``copies`` times.
        copies: occurrences of each duplicated image.
        rare_classes: classes represented by only ``rare_per_class`` images.
        rare_per_class: images kept per rare class.
        common_per_class: images kept per common class (drawn at random); ``None``
            keeps all of them (about 180 per class).

    Returns:
        :class:`DigitsData`.
    """
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = ds.images.astype(np.float32) / 8.0 - 1.0
    y = ds.target
    rng = np.random.default_rng(seed)
    rare = np.isin(y, rare_classes)
    if common_per_class is None:
        common_idx = np.flatnonzero(~rare)
    else:
        common_idx = np.concatenate(
            [
                rng.choice(
                    np.flatnonzero(y == c),
                    min(common_per_class, int((y == c).sum())),
                    replace=False,
                )
                for c in range(10)
                if c not in rare_classes
            ]
        )
    rare_idx = (
        np.concatenate(
            [
                rng.choice(np.flatnonzero(y == c), rare_per_class, replace=False)
                for c in rare_classes
            ]
        )
        if len(rare_classes)
        else np.zeros((0,), int)
    )
    dup_idx = rng.choice(common_idx, num_duplicated, replace=False)
    kind = np.array(["common"] * len(common_idx) + ["rare"] * len(rare_idx), dtype=object)
    uidx = np.concatenate([common_idx, rare_idx])
    kind[np.isin(uidx, dup_idx)] = "duplicated"
    count = np.where(kind == "duplicated", copies, 1)
    images = np.repeat(x[uidx], count, axis=0)
    return DigitsData(images, x[uidx], kind.astype(str), y[uidx], count)


def run(config: DigitsConfig, *, console: Console | None = None):
    """Run the digits demo; returns ``(table, summary, files)``.

    Raises:
        DemoInputError: on invalid settings or an unwritable output folder.
    """
    config.validate()
    out, console, err_console = prepare_outputs(config.out, console=console)

    import jax
    import jax.numpy as jnp
    from sklearn.metrics import roc_auc_score

    from mmh_jax.lid import flipd
    from mmh_jax.models import ConvEpsNet
    from mmh_jax.retrieval import calibrated_l2
    from mmh_jax.schedules import VP

    t_start = time.perf_counter()
    data = make_digits_training_set(
        seed=config.seed,
        num_duplicated=config.num_duplicated,
        copies=config.copies,
        rare_classes=config.rare_classes,
        rare_per_class=config.rare_per_class,
        common_per_class=config.common_per_class,
    )
    require(
        config.calibration_k <= len(data.unique_images),
        f"--calibration-k must be at most the number of distinct training images, "
        f"{len(data.unique_images)}, got {config.calibration_k}",
    )
    schedule = VP()
    net = ConvEpsNet(channels=config.channels, mlp_width=config.mlp_width, schedule=schedule)
    k_init, k_train, k_sample, k_fl = jax.random.split(jax.random.key(config.seed), 4)
    with make_progress(err_console, enabled=config.progress) as progress:
        trained, score_fn, samples, timings = train_and_sample(
            progress,
            net,
            data.images,
            config,
            schedule=schedule,
            keys=(k_init, k_train, k_sample),
            chunk=min(50, config.steps),
            time_sampling=config.time_sampling,
        )
        est = progress.add_task("FLIPD", total=1)
        t = time.perf_counter()
        fl = np.asarray(
            jax.jit(
                lambda x, k: flipd(
                    score_fn,
                    x,
                    t0=config.t0,
                    schedule=schedule,
                    key=k,
                    trace="exact",
                    chunk_size=16,
                )
            )(jnp.asarray(samples), k_fl)
        )
        timings["flipd_s"] = time.perf_counter() - t
        progress.advance(est)

    # the ratio of the nearest distance to the mean of the k nearest: Carlini et al.'s
    # calibrated l2 with alpha = 1
    match = calibrated_l2(samples, data.unique_images, n=config.calibration_k, alpha=1.0)
    nearest, l2, cal = (
        np.asarray(match.nearest),
        np.asarray(match.distances[:, 0], np.float64),
        np.asarray(match.score, np.float64),
    )
    memorized = cal < config.mem_threshold
    kind = data.unique_kind[nearest]
    # undefined (None) unless both classes occur
    auroc = float(roc_auc_score(memorized, -fl)) if 0 < memorized.sum() < len(memorized) else None
    table = {
        "sample_index": np.arange(len(samples)),
        "flipd": fl.astype(np.float64),
        "nearest_train_index": nearest.astype(np.int64),
        "nearest_train_kind": kind,
        "nearest_train_label": data.unique_label[nearest].astype(np.int64),
        "l2": l2,
        "calibrated_l2": cal,
        "memorized": memorized,
    }
    summary = {
        "seed": config.seed,
        "auroc_neg_flipd": auroc,
        "num_memorized": int(memorized.sum()),
        "num_samples": len(samples),
        "final_loss": float(trained.losses[-1]),
        "by_kind": {},
    }
    for kd in ("duplicated", "rare", "common"):
        m = kind == kd
        summary["by_kind"][kd] = {
            "n": int(m.sum()),
            "memorized": int((m & memorized).sum()),
            "flipd_median": float(np.median(fl[m])) if m.any() else None,
        }
    summary["flipd_median_memorized"] = float(np.median(fl[memorized])) if memorized.any() else None
    summary["flipd_median_not_memorized"] = (
        float(np.median(fl[~memorized])) if (~memorized).any() else None
    )

    files = [
        write_csv(table, out / "digits_samples.csv"),
        write_parquet(table, out / "digits_samples.parquet"),
    ]
    if config.figure:
        files.append(
            save_figure(
                _grid(samples, data, nearest, fl, cal), out / "digits_lowest_highest_flipd.png"
            )
        )
        files.append(save_figure(_hist(fl, memorized, kind), out / "digits_flipd_histograms.png"))
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    _print_summary(console, summary, config, files)
    return table, summary, files


def _print_summary(console: Console, s: dict, config: DigitsConfig, files: list) -> None:
    tab = results_table(
        ("nearest training image", "samples", "memorized", "FLIPD median"),
        title=f"8x8 digits, seed {config.seed}: FLIPD (t0 = {config.t0}) of {s['num_samples']} samples",
    )
    for kd, e in s["by_kind"].items():
        tab.add_row(
            kd,
            str(e["n"]),
            str(e["memorized"]),
            "-" if e["flipd_median"] is None else f"{e['flipd_median']:.1f}",
        )
    console.print(tab)
    if s["auroc_neg_flipd"] is not None:
        auroc = f"{s['auroc_neg_flipd']:.3f}"
    else:
        auroc = (
            "undefined: " + ("no" if s["num_memorized"] == 0 else "every") + " sample is memorized"
        )
    console.print(
        f"memorized (calibrated l2 < {config.mem_threshold:.3g}): {s['num_memorized']} / {s['num_samples']}; "
        f"AUROC of -FLIPD for memorized: {auroc}"
    )
    t = s["timings"]
    console.print(
        f"train {t['train_s']:.1f} s, sample {t['sample_s']:.1f} s, FLIPD {t['flipd_s']:.1f} s; "
        f"wrote {', '.join(str(f) for f in files)}"
    )


def _grid(samples, data, nearest, fl, cal, n: int = 8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(fl)
    picks = [("lowest FLIPD", order[:n]), ("highest FLIPD", order[::-1][:n])]
    fig, axes = plt.subplots(4, n, figsize=(1.1 * n, 5.4))
    for block, (title, idx) in enumerate(picks):
        for j, i in enumerate(idx):
            top, bot = axes[2 * block, j], axes[2 * block + 1, j]
            top.imshow(samples[i], cmap="gray_r", vmin=-1, vmax=1)
            top.set_title(f"{fl[i]:.1f}", fontsize=8)
            bot.imshow(data.unique_images[nearest[i]], cmap="gray_r", vmin=-1, vmax=1)
            bot.set_title(f"c={cal[i]:.2f}", fontsize=7)
        axes[2 * block, 0].set_ylabel(f"{title}\nsample", fontsize=8)
        axes[2 * block + 1, 0].set_ylabel("nearest\ntraining", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Samples (FLIPD above) and nearest training images (calibrated l2 above)", fontsize=9
    )
    fig.tight_layout()
    return fig


def _hist(fl, memorized, kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    bins = np.linspace(np.percentile(fl, 1), np.percentile(fl, 99), 30)
    for m, lab in ((memorized, "memorized"), (~memorized, "not memorized")):
        if m.any():
            a.hist(fl[m], bins=bins, density=True, alpha=0.55, label=f"{lab} ({m.sum()})")
    a.set_xlabel("FLIPD")
    a.set_ylabel("density")
    a.set_title("by calibrated-l2 memorization label")
    a.legend(fontsize=8)
    for kd in ("duplicated", "rare", "common"):
        m = kind == kd
        if m.any():
            b.hist(fl[m], bins=bins, density=True, alpha=0.55, label=f"nearest is {kd} ({m.sum()})")
    b.set_xlabel("FLIPD")
    b.set_title("by kind of nearest training image")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


_FLAGS = (
    ("seed", int, None, "seed of data selection, training, sampling"),
    ("common_per_class", int, None, "images kept of each common class 0-7"),
    ("num_duplicated", int, None, "training images repeated --copies times (DD-Mem)"),
    ("copies", int, None, "copies of each duplicated image"),
    ("rare_per_class", int, None, "images kept of each rare class 8 and 9 (OD-Mem)"),
    ("steps", int, None, "Adam steps"),
    ("batch_size", int, None, "training batch size"),
    ("learning_rate", finite_float, None, "peak learning rate"),
    ("channels", int, None, "feature maps of the conv net"),
    ("mlp_width", int, None, "width of the dense layer after the conv blocks; 0: none"),
    ("num_samples", int, None, "generated samples"),
    ("sample_steps", int, None, "reverse-SDE steps"),
    ("t0", finite_float, None, "FLIPD time in (0, 1]"),
    (
        "mem_threshold",
        finite_float,
        None,
        "memorized when calibrated l2 < this (default %(default).3g, i.e. 1/3)",
    ),
    ("calibration_k", int, None, "neighbours in the calibrated l2 denominator"),
    ("out", Path, None, "output folder (default ./%(default)s/)"),
)
"""The digits demo's flags (:func:`~mmh_jax.experiments.common.add_flags`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the digits demo's flags to ``parser``."""
    add_flags(parser, DigitsConfig(), _FLAGS)
    add_display_flags(parser)


def config_from_args(args: argparse.Namespace) -> DigitsConfig:
    """Build a :class:`DigitsConfig` from parsed flags."""
    return config_from_flags(DigitsConfig, args)
