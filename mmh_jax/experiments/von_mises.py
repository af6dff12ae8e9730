"""The paper's von Mises mixture experiment (Section 4, Figure 4), end to end on CPU.

Ground truth ``p_*``: with weight ``1 - w`` a von Mises distribution on the unit
circle (``LID_* = 1``), with weight ``w`` a point mass at the origin (``LID_* = 0``).
The training set of ``n`` points has ``round(w n)`` copies of the origin, one
*isolated* circle point at angle ``pi`` (the antipode of the von Mises mode, where
the density is lowest) and ``n - round(w n) - 1`` von Mises draws. The isolated
point is placed by construction -- von Mises draws closer than ``isolation`` radians
to it are redrawn -- so it exists for every seed, instead of appearing "by chance"
as in the paper.

A small diffusion model (VP SDE, EDM-preconditioned MLP epsilon-network) is
trained long enough to fit the *empirical* distribution at the scale
``sigma(t0)``. Its samples are then scored with FLIPD (paper, Eq. 6, exact trace)
and the normal bundle (Eqs. 7-8) for ``LID_theta``, and with the paper's local PCA
on the nearest training point for ``LID_*``; :func:`mmh_jax.memorization.classify`
labels them. Expected: samples at the origin are DD-Mem (``LID_theta ~ LID_* = 0``),
samples at the isolated point OD-Mem (``LID_theta ~ 0 < LID_* = 1``), samples on the
well-covered arc are not memorized (``LID_theta ~ 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console

from mmh_jax.experiments.common import (
    DemoInputError,
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
    "VonMisesConfig",
    "TrainingSet",
    "VonMisesResult",
    "make_training_set",
    "add_arguments",
    "config_from_args",
    "run",
]

REGIONS = ("origin", "isolated", "circle", "other")


@dataclasses.dataclass(frozen=True)
class VonMisesConfig:
    """Settings of the von Mises demo (the CLI flags map one to one onto these)."""

    seed: int = 0
    num_train: int = 100
    origin_weight: float = 0.2
    kappa: float = 4.0
    isolation: float = 0.8
    steps: int = 16000
    batch_size: int = 256
    learning_rate: float = 3e-3
    train_t_min: float = 1e-3
    width: int = 64
    depth: int = 3
    num_samples: int = 1000
    sample_steps: int = 500
    t0: float = 0.02
    od_gap: float = 0.5
    dd_max_lid: float = 0.5
    copy_radius: float = 0.1
    lpca_k: int = 20
    lpca_q: float = 60.0
    out: Path = Path("mmh-demo")
    progress: bool = True
    figure: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require_at_least(self, 3, "num_train")
        require(
            0.0 <= self.origin_weight < 1.0,
            f"--origin-weight must lie in [0, 1), got {self.origin_weight}",
        )
        n_origin = round(self.origin_weight * self.num_train)
        require(
            self.num_train - n_origin - 1 >= 1,
            "--num-train too small for --origin-weight: no room for von Mises points",
        )
        require_positive(self, "kappa")
        require(
            0.0 <= self.isolation < math.pi,
            f"--isolation must lie in [0, pi), got {self.isolation}",
        )
        require_positive(self, "steps", "batch_size", "learning_rate")
        require(self.width > 0 and self.depth > 0, "--width and --depth must be positive")
        require_positive(self, "num_samples", "sample_steps")
        require(0.0 < self.t0 <= 1.0, f"--t0 must lie in (0, 1], got {self.t0}")
        require_positive(self, "od_gap")
        require(self.dd_max_lid >= 0, f"--dd-max-lid must be non-negative, got {self.dd_max_lid}")
        require_positive(self, "copy_radius")
        require_at_least(self, 2, "lpca_k")
        require(0.0 <= self.lpca_q <= 100.0, f"--lpca-q must lie in [0, 100], got {self.lpca_q}")


class TrainingSet(NamedTuple):
    """The demo's training data.

    Attributes:
        points: ``[n, 2]`` training points.
        lid_true: ground-truth ``LID_*`` of each point (0 at the origin, 1 on the circle).
        isolated_index: row of the isolated low-density circle point.
        origin_indices: rows holding copies of the origin.
    """

    points: np.ndarray
    lid_true: np.ndarray
    isolated_index: int
    origin_indices: np.ndarray


def make_training_set(
    *,
    seed: int,
    num_train: int = 100,
    origin_weight: float = 0.2,
    kappa: float = 4.0,
    isolation: float = 0.8,
) -> TrainingSet:
    """Draw the von Mises mixture training set with one isolated point by construction.

    Args:
        seed: NumPy seed of the von Mises draws.
        num_train: total number of training points ``n``.
        origin_weight: mixture weight ``w`` of the point mass; ``round(w n)`` copies.
        kappa: von Mises concentration around angle 0.
        isolation: minimum angular distance of every von Mises draw from angle ``pi``,
            where the isolated point sits.

    Returns:
        :class:`TrainingSet`; the isolated point is row ``num_train - n_origin - 1``.
    """
    rng = np.random.default_rng(seed)
    n_origin = round(origin_weight * num_train)
    n_vm = num_train - n_origin - 1
    angles = np.empty((0,))
    while angles.size < n_vm:
        draw = rng.vonmises(0.0, kappa, size=2 * n_vm)
        far = np.abs(np.angle(np.exp(1j * (draw - math.pi)))) >= isolation
        angles = np.concatenate([angles, draw[far]])
    angles = np.sort(angles[:n_vm])
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.concatenate([circle, [[-1.0, 0.0]], np.zeros((n_origin, 2))]).astype(np.float32)
    lid_true = np.concatenate([np.ones(n_vm + 1), np.zeros(n_origin)])
    return TrainingSet(points, lid_true, n_vm, np.arange(n_vm + 1, num_train))


class VonMisesResult(NamedTuple):
    """What :func:`run` computed (also written to the output folder)."""

    table: dict
    summary: dict
    files: list
    timings: dict


def _region(samples: np.ndarray, train: TrainingSet, radius: float) -> np.ndarray:
    iso = train.points[train.isolated_index]
    r = np.linalg.norm(samples, axis=1)
    d_iso = np.linalg.norm(samples - iso, axis=1)
    region = np.full(samples.shape[0], "other", dtype=object)
    region[np.abs(r - 1.0) < radius] = "circle"
    region[d_iso < radius] = "isolated"
    region[r < radius] = "origin"
    return region


def run(config: VonMisesConfig, *, console: Console | None = None) -> VonMisesResult:
    """Run the von Mises demo: data, training, sampling, LID estimates, labels, files.

    Args:
        config: the demo's settings.
        console: where the summary goes (progress bars go to stderr).

    Returns:
        :class:`VonMisesResult` with the per-sample table, a summary dict, the files
        written and stage timings.

    Raises:
        DemoInputError: on invalid settings or an unwritable output folder.
    """
    config.validate()
    out, console, err_console = prepare_outputs(config.out, console=console)

    import jax
    import jax.numpy as jnp

    from mmh_jax.lid import flipd, lpca, normal_bundle
    from mmh_jax.memorization import LABEL_NAMES, classify
    from mmh_jax.models import MLPEpsNet
    from mmh_jax.schedules import VP

    t_start = time.perf_counter()
    train = make_training_set(
        seed=config.seed,
        num_train=config.num_train,
        origin_weight=config.origin_weight,
        kappa=config.kappa,
        isolation=config.isolation,
    )
    schedule = VP()
    net = MLPEpsNet(dim=2, width=config.width, depth=config.depth, schedule=schedule)
    k_init, k_train, k_sample, k_nb = jax.random.split(jax.random.key(config.seed), 4)

    with make_progress(err_console, enabled=config.progress) as progress:
        trained, score_fn, samples, timings = train_and_sample(
            progress,
            net,
            train.points,
            config,
            schedule=schedule,
            keys=(k_init, k_train, k_sample),
            chunk=min(100, config.steps),
        )
        est = progress.add_task("LID", total=3)
        t = time.perf_counter()
        fl = np.asarray(
            jax.jit(lambda x: flipd(score_fn, x, t0=config.t0, schedule=schedule, trace="exact"))(
                jnp.asarray(samples)
            )
        )
        progress.advance(est)
        nb = jax.jit(
            lambda x, k: normal_bundle(score_fn, x, t0=config.t0, schedule=schedule, key=k)
        )(jnp.asarray(samples), k_nb)
        nb_lid = np.asarray(nb.lid)
        progress.advance(est)
        # LID_* of every training point (paper's local PCA), read at each sample's nearest one.
        lid_star_train = np.asarray(
            lpca(
                jnp.asarray(train.points),
                k=min(config.lpca_k, config.num_train - 1),
                method="paper",
                q=config.lpca_q,
            )
        )
        d2 = ((samples[:, None, :] - train.points[None, :, :]) ** 2).sum(-1)
        nearest = d2.argmin(1)
        nn_dist = np.sqrt(d2[np.arange(len(samples)), nearest])
        lid_star = lid_star_train[nearest].astype(np.float64)
        progress.advance(est)
        timings["estimate_s"] = time.perf_counter() - t

    cls = classify(fl, lid_star, od_gap=config.od_gap, dd_max_lid=config.dd_max_lid)
    cls_nb = classify(nb_lid, lid_star, od_gap=config.od_gap, dd_max_lid=config.dd_max_lid)
    labels = np.asarray(cls.labels)
    region = _region(samples, train, config.copy_radius)
    lid_true = np.select(
        [region == "origin", region == "isolated", region == "circle"], [0.0, 1.0, 1.0], np.nan
    )
    table = {
        "x": samples[:, 0].astype(np.float64),
        "y": samples[:, 1].astype(np.float64),
        "region": region.astype(str),
        "lid_true": lid_true,
        "flipd": fl.astype(np.float64),
        "normal_bundle_lid": nb_lid.astype(np.int64),
        "nearest_train_index": nearest.astype(np.int64),
        "nearest_train_distance": nn_dist.astype(np.float64),
        "lid_star_lpca": lid_star,
        "label": np.array([LABEL_NAMES[c] for c in labels]),
        "label_normal_bundle": np.array([LABEL_NAMES[c] for c in np.asarray(cls_nb.labels)]),
        "gap": np.asarray(cls.gap, dtype=np.float64),
        "od_margin": np.asarray(cls.od_margin, dtype=np.float64),
        "dd_margin": np.asarray(cls.dd_margin, dtype=np.float64),
    }

    summary = {"seed": config.seed, "isolated_point": train.points[train.isolated_index].tolist()}
    summary["counts"] = {name: int((table["label"] == name).sum()) for name in LABEL_NAMES}
    summary["counts_normal_bundle"] = {
        name: int((table["label_normal_bundle"] == name).sum()) for name in LABEL_NAMES
    }
    summary["regions"] = {}
    for reg in REGIONS:
        m = region == reg
        entry = {"n": int(m.sum())}
        if m.any():
            entry["flipd_median"] = float(np.median(fl[m]))
            entry["flipd_min"] = float(fl[m].min())
            entry["flipd_max"] = float(fl[m].max())
            entry["nb_median"] = float(np.median(nb_lid[m]))
            entry["lid_star_median"] = float(np.median(lid_star[m]))
            entry["labels"] = {name: int((table["label"][m] == name).sum()) for name in LABEL_NAMES}
        summary["regions"][reg] = entry
    summary["lid_star_isolated_point"] = float(lid_star_train[train.isolated_index])
    summary["lid_star_origin"] = (
        float(lid_star_train[train.origin_indices[0]]) if len(train.origin_indices) else None
    )
    summary["final_loss"] = float(trained.losses[-1])

    files = []
    t = time.perf_counter()
    files.append(write_csv(table, out / "samples.csv"))
    files.append(write_parquet(table, out / "samples.parquet"))
    train_table = {
        "x": train.points[:, 0].astype(np.float64),
        "y": train.points[:, 1].astype(np.float64),
        "lid_true": train.lid_true,
        "lid_star_lpca": lid_star_train.astype(np.float64),
        "is_isolated": np.arange(config.num_train) == train.isolated_index,
    }
    files.append(write_csv(train_table, out / "training_set.csv"))
    if config.figure:
        files.append(save_figure(_figure(train, table, config), out / "figure4.png"))
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    _print_summary(console, summary, config, files)
    return VonMisesResult(table, summary, files, timings)


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _print_summary(console: Console, summary: dict, config: VonMisesConfig, files: list) -> None:
    iso = summary["isolated_point"]
    tab = results_table(
        (
            "region",
            "samples",
            "FLIPD median [min, max]",
            "NB median",
            "LID_* (lpca)",
            "od-mem",
            "dd-mem",
            "not-mem",
        ),
        title=f"von Mises mixture, seed {config.seed}: LID of {config.num_samples} samples (t0 = {config.t0})",
        caption=f"isolated training point at ({iso[0]:.2f}, {iso[1]:.2f}); "
        f"labels from FLIPD vs. local-PCA LID_* (od_gap {config.od_gap}, dd_max_lid {config.dd_max_lid})",
    )
    for reg in REGIONS:
        e = summary["regions"][reg]
        if e["n"] == 0:
            tab.add_row(reg, "0", "-", "-", "-", "-", "-", "-")
            continue
        lab = e["labels"]
        tab.add_row(
            reg,
            str(e["n"]),
            f"{_fmt(e['flipd_median'])} [{_fmt(e['flipd_min'])}, {_fmt(e['flipd_max'])}]",
            _fmt(e["nb_median"], ".0f"),
            _fmt(e["lid_star_median"], ".0f"),
            str(lab["od-mem"]),
            str(lab["dd-mem"]),
            str(lab["not-memorized"]),
        )
    c = summary["counts"]
    tab.add_row(
        "all",
        str(config.num_samples),
        "",
        "",
        "",
        str(c["od-mem"]),
        str(c["dd-mem"]),
        str(c["not-memorized"]),
    )
    console.print(tab)
    t = summary["timings"]
    console.print(
        f"train {t['train_s']:.1f} s, sample {t['sample_s']:.1f} s, estimate {t['estimate_s']:.1f} s; "
        f"wrote {', '.join(str(f) for f in files)}"
    )


def _figure(train: TrainingSet, table: dict, config: VonMisesConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 9.6))
    # Top: ground-truth manifold coloured by the von Mises density, the point mass, the data.
    th = np.linspace(-math.pi, math.pi, 400)
    pts = np.stack([np.cos(th), np.sin(th)], 1)
    segs = np.stack([pts[:-1], pts[1:]], 1)
    dens = np.exp(config.kappa * np.cos(th[:-1]))
    lc = LineCollection(segs, cmap="Greys", linewidths=4, alpha=0.8)
    lc.set_array(np.log(dens))
    top.add_collection(lc)
    top.scatter([0], [0], s=260, c="0.2", marker="o", alpha=0.35, label="point mass (LID* = 0)")
    p = train.points
    top.scatter(
        p[:, 0], p[:, 1], s=14, c="tab:blue", label=f"training data (n = {len(p)})", zorder=3
    )
    iso = p[train.isolated_index]
    top.scatter(
        [iso[0]], [iso[1]], s=120, facecolors="none", edgecolors="tab:red", linewidths=1.8, zorder=4
    )
    top.annotate(
        "isolated point",
        iso,
        xytext=(iso[0] + 0.15, iso[1] + 0.35),
        color="tab:red",
        arrowprops=dict(arrowstyle="->", color="tab:red"),
    )
    top.set_title("Ground truth: von Mises on the circle (LID* = 1) + point mass")
    top.legend(loc="lower right", fontsize=8)
    # Bottom: samples coloured by FLIPD; memorized ones marked.
    x, y, fl = table["x"], table["y"], table["flipd"]
    sc = bottom.scatter(
        x, y, c=np.clip(fl, -0.25, 2.25), cmap="viridis", vmin=-0.25, vmax=2.25, s=10, zorder=3
    )
    od = table["label"] == "od-mem"
    dd = table["label"] == "dd-mem"
    for name, mask, marker, colour, width in (
        ("OD-Mem", od, "o", "tab:red", 1.2),
        ("DD-Mem", dd, "s", "k", 1.0),
    ):
        bottom.scatter(
            x[mask],
            y[mask],
            s=70,
            marker=marker,
            facecolors="none",
            edgecolors=colour,
            linewidths=width,
            label=f"{name} ({mask.sum()})",
            zorder=4,
        )
    fig.colorbar(
        sc,
        ax=bottom,
        orientation="horizontal",
        fraction=0.05,
        pad=0.08,
        label="FLIPD estimate of LID_theta",
    )
    bottom.set_title(f"{len(x)} model samples coloured by FLIPD (t0 = {config.t0})")
    bottom.legend(loc="lower right", fontsize=8)
    for ax in (top, bottom):
        ax.set_aspect("equal")
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


_FLAG_GROUPS = {
    "data": (
        ("seed", int, None, "seed of data, training, sampling and estimation"),
        (
            "num_train",
            int,
            None,
            "training points: round(w n) origin copies, 1 isolated point, rest von Mises",
        ),
        ("origin_weight", finite_float, None, "mixture weight w of the point mass at the origin"),
        ("kappa", finite_float, None, "von Mises concentration"),
    ),
    "model and training": (
        (
            "steps",
            int,
            None,
            "Adam steps; too few and the model is too smooth to memorize the isolated point",
        ),
        ("batch_size", int, None, "training batch size"),
        ("learning_rate", finite_float, None, "peak learning rate"),
        ("width", int, None, "hidden width of the MLP"),
    ),
    "sampling and LID": (
        ("num_samples", int, None, "samples drawn with the reverse SDE"),
        ("sample_steps", int, None, "Euler-Maruyama steps of the sampler"),
        (
            "t0",
            finite_float,
            None,
            "diffusion time in (0, 1] for FLIPD and the normal bundle (default %(default)s, "
            "sigma ~ 0.08)",
        ),
        ("od_gap", finite_float, None, "OD-Mem when LID_* - LID_theta >= this"),
        ("dd_max_lid", finite_float, None, "DD-Mem when LID_* and LID_theta are both <= this"),
        (
            "lpca_q",
            finite_float,
            None,
            "percentile of all local explained variances used as the local-PCA threshold for "
            "LID_* (paper, App. C.1, uses 10); it must exceed the share of off-manifold "
            "variances, here 100 (1 - mean LID_* / d) = 60",
        ),
    ),
    "output": (
        (
            "out",
            Path,
            None,
            "output folder for figure4.png, samples.csv/.parquet, training_set.csv "
            "(default ./%(default)s/)",
        ),
    ),
}
"""The von Mises demo's flags by argument group
(:func:`~mmh_jax.experiments.common.add_flags`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the von Mises demo's flags to ``parser``."""
    for title, flags in _FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        add_flags(group, VonMisesConfig(), flags)
    add_display_flags(group)


def config_from_args(args: argparse.Namespace) -> VonMisesConfig:
    """Build a :class:`VonMisesConfig` from parsed flags."""
    return config_from_flags(VonMisesConfig, args)


__all__ += ["DemoInputError"]
