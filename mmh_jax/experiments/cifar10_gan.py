"""LID of GAN samples from the rank of the generator's Jacobian (paper, Section 4, Figure 5a-b,
Appendix B.3 and C.1).

``mmh-jax gan lid MODEL`` generates ``--num-samples`` class-balanced samples of a StyleGAN2-ADA
generator (an official ``.pkl``, read without running its code, or a file written by
``mmh-jax convert stylegan2``), computes the singular values of the Jacobian of every sample
``x = G(z, c)`` with respect to its latent ``z`` (or ``w``), thresholds all of them at their
pooled ``--percentile`` (the paper: the 10th) and counts the singular values above it:
``LID_theta(x)``. Sample ``i`` is drawn as the official ``generate.py`` draws seed ``--seed + i``
(``z = RandomState(seed).randn(z_dim)``) with class ``i mod c_dim``, so a sample can be matched
with the official code's image of that seed and class.

Outputs in ``--out``: ``latents.npz`` (every sample's ``z``, class and seed: the input of
:func:`mmh_jax.scoring.score`), ``scores/`` (its run: every sample's Jacobian spectrum and uint8
image, sharded over the devices, written exactly once, so an interrupted run resumes where it
stopped; ``mmh-jax score merge`` reads it; a rerun with other settings or another number of
samples into the same folder is refused), ``results.parquet`` and ``results.csv`` (one row per
sample: index, seed,
class, LID, the largest and smallest singular value, the PNG length of the image at compression
level 9 and the LID per PNG kilobyte, Appendix E), ``spectra.npy`` (all singular values
``[N, min(d, d')]``), ``lid_histogram.png`` (Figure 5b; by label with ``--labels``) and
``lid_extremes.png`` (the lowest- and highest-LID samples, Figure 5a). ``--labels`` reads a CSV with columns ``index`` and ``label`` (e.g. human
labels ``exact``, ``reconstructive``, ``not``); the summary then gives the median LID per label
and the AUROC of ``-LID`` for every label against ``not``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from mmh_jax._src.files import atomic_path, sha256_file
from mmh_jax.experiments.common import (
    DemoInputError,
    add_display_flags,
    add_dtype_flag,
    add_out_flag,
    add_percentile_flag,
    check_dtype,
    check_percentile,
    check_seed_range,
    config_from_flags,
    finite_float,
    input_errors,
    int_field,
    key_value_table,
    prepare_outputs,
    read_csv_rows,
    require,
    require_at_least,
    save_figure,
    write_csv,
    write_parquet,
)

__all__ = [
    "GanLidConfig",
    "sample_latents",
    "write_latents",
    "latent_source",
    "add_arguments",
    "config_from_args",
    "run",
]

#: The label of not-memorized samples in a ``--labels`` file.
NOT_MEMORIZED = "not"


@dataclasses.dataclass(frozen=True)
class GanLidConfig:
    """Settings of ``mmh-jax gan lid`` (the CLI flags map one to one onto these)."""

    model: Path
    out: Path = Path("mmh-gan-lid")
    network: Literal["G", "G_ema"] = "G_ema"
    num_samples: int = 1000
    seed: int = 0
    wrt: Literal["z", "w"] = "z"
    truncation_psi: float = 1.0
    noise_mode: Literal["const", "none"] = "const"
    percentile: float = 10.0
    batch_size: int = 8
    chunk_size: int = 64
    labels: Path | None = None
    num_extremes: int = 8
    dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True
    figure: bool = True
    part_size: int = 1024
    """Samples per Parquet part of ``OUT/scores/`` (the unit of resumption; not a flag)."""

    def validate(self) -> None:
        """Raise :class:`DemoInputError` naming the first bad setting."""
        require_at_least(self, 1, "num_samples", "batch_size", "chunk_size")
        require(self.part_size >= 1, f"part_size must be at least 1, got {self.part_size}")
        require_at_least(self, 1, "num_extremes")
        check_seed_range(self.seed, self.num_samples)
        check_percentile(self.percentile)
        require(
            0 <= self.truncation_psi <= 1,
            f"--truncation-psi must lie in [0, 1], got {self.truncation_psi}",
        )
        require(
            self.network in ("G", "G_ema"), f"--network must be G or G_ema, got {self.network!r}"
        )
        require(self.wrt in ("z", "w"), f"--wrt must be z or w, got {self.wrt!r}")
        require(
            self.noise_mode in ("const", "none"),
            f"--noise-mode must be const or none, got {self.noise_mode!r}",
        )
        check_dtype(self.dtype)


def sample_latents(
    indices: np.ndarray, *, seed: int, z_dim: int, c_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Latents and classes of samples ``indices``: ``z_i`` as the official ``generate.py``
    draws seed ``seed + i`` (``np.random.RandomState(seed + i).randn(z_dim)``), class
    ``i mod c_dim`` (``-1`` for an unconditional generator).

    Returns:
        ``z`` float32 ``[b, z_dim]`` and integer classes ``[b]``.
    """
    z = np.stack([np.random.RandomState(seed + int(i)).randn(z_dim) for i in indices])
    classes = np.asarray(indices) % c_dim if c_dim else np.full(len(indices), -1)
    return z.astype(np.float32), classes.astype(np.int64)


def _read_labels(path: Path, num_samples: int) -> np.ndarray:
    """``--labels``: a CSV with ``index`` and ``label`` columns -> one label string per sample
    (``""`` where the file gives none)."""
    labels = np.full(num_samples, "", dtype=object)
    for line, row in read_csv_rows(path, flag="--labels", columns=("index", "label")):
        index = int_field(row, "index", where=f"{path}:{line}")
        require(
            0 <= index < num_samples,
            f"{path}:{line}: index {index} is not a sample (0 .. {num_samples - 1})",
        )
        labels[index] = row["label"].strip()
    return labels


def run(config: GanLidConfig, *, console: Console | None = None):
    """Generate, compute the Jacobian spectra, threshold, write; returns ``(table, summary,
    files)``.

    A recipe over :func:`mmh_jax.scoring.score`: the latents of the samples go to
    ``OUT/latents.npz`` (the engine's input, with each sample's class and seed), each sample's
    spectrum and image to ``OUT/scores/`` (sharded over the devices, written exactly once,
    resumed after an interruption); the pooled threshold, tables and figures are then computed
    from its Parquet.

    Raises:
        DemoInputError: bad settings or input, an unreadable model, an unwritable output folder,
            or one that holds a run of other settings.
    """
    config.validate()
    require(config.model.is_file(), f"model {str(config.model)!r} does not exist or is a folder")
    labels = _read_labels(config.labels, config.num_samples) if config.labels is not None else None
    out, console, err_console = prepare_outputs(config.out, console=console)

    import jax
    import jax.numpy as jnp

    from mmh_jax import scoring
    from mmh_jax.convert import ConversionError
    from mmh_jax.evaluation import png_length
    from mmh_jax.lid import lid_from_singular_values, percentile_threshold
    from mmh_jax.memorization import stylegan2_fns
    from mmh_jax.models import load_stylegan2

    start = time.perf_counter()
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    with err_console.status(f"loading {config.model} ..."):
        with input_errors(ConversionError, ValueError):
            model = load_stylegan2(config.model, network=config.network, dtype=dtype)
        fingerprint = sha256_file(config.model)
    module = model.module
    timings = {"load_s": time.perf_counter() - start}

    source = latent_source(
        out / "latents.npz", module, num_samples=config.num_samples, seed=config.seed
    )
    fns = stylegan2_fns(
        module,
        model.params,
        wrt=config.wrt,
        truncation_psi=config.truncation_psi,
        noise_mode=config.noise_mode,
    )
    generator = scoring.Model.from_generator(
        fns.generate,
        (module.z_dim,),
        num_classes=module.c_dim,
        mapping=fns.mapping,
        description=f"StyleGAN2-ADA {config.network} (w.r.t. {config.wrt})",
    )
    columns = [scoring.JacobianRank(spectrum=True, chunk_size=config.chunk_size), scoring.Pixels()]
    devices = jax.device_count()
    start = time.perf_counter()
    try:
        done = scoring.score(
            generator,
            columns,
            source,
            str(out / "scores"),
            seed=config.seed,
            batch_size=-(-config.batch_size // devices) * devices,
            chunk_size=config.part_size,
            labels="class" if module.c_dim else None,
            record={
                "model_sha256": fingerprint,
                "network": config.network,
                "wrt": config.wrt,
                "truncation_psi": config.truncation_psi,
                "noise_mode": config.noise_mode,
                "dtype": config.dtype,
            },
            console=err_console if config.progress else None,
        )
    except scoring.RunMismatch as err:
        raise DemoInputError(
            f"{str(out / 'scores')!r} holds a run with other settings ({err}); choose another --out"
        ) from None
    timings["spectra_s"] = time.perf_counter() - start
    timings["scored_now"] = done.scored

    merged = scoring.merge(out / "scores")
    require(merged.errors.num_rows == 0, f"samples not scored: {merged.errors.to_pylist()}")
    scores = merged.scores
    spectra = scoring.vectors(scores, "jacobian_singular_values").astype(np.float32)
    size, channels = module.img_resolution, module.img_channels
    images = scoring.vectors(scores, "pixels").reshape(len(scores), size, size, channels)
    png_bytes = png_length(images, level=9).astype(np.float64)
    threshold = float(percentile_threshold(spectra, q=config.percentile))  # the pooled rule
    lid = np.asarray(lid_from_singular_values(spectra, threshold=threshold, space="tangent"))
    table = {
        "index": scores["index"].to_numpy(),
        "seed": scores["seed"].to_numpy(),
        "class": scores["class"].to_numpy(),
        "lid": lid,
        "sv_max": spectra[:, 0],
        "sv_min": spectra[:, -1],
        "png_bytes": png_bytes,
        "lid_per_png_kb": lid / (png_bytes / 1000),
    }
    if labels is not None:
        table["label"] = labels.astype(str)
    files = [write_parquet(table, out / "results.parquet"), write_csv(table, out / "results.csv")]
    with atomic_path(out / "spectra.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, spectra)
    files.append(out / "spectra.npy")
    summary = _summarise(table, threshold, config, timings)
    if config.figure:
        files.append(save_figure(_histogram(table, threshold, config), out / "lid_histogram.png"))
        files.append(save_figure(_extremes(table, config, images), out / "lid_extremes.png"))
    _print_summary(console, summary, config, files)
    return table, summary, files


def write_latents(path: Path, *, num_samples: int, seed: int, z_dim: int, c_dim: int) -> Path:
    """The scoring engine's input for samples ``0 .. num_samples - 1`` of a StyleGAN2: an
    ``.npz`` with ``z`` ``[n, z_dim]`` (:func:`sample_latents`), each sample's ``class`` and its
    official ``seed`` (read it with ``scoring.ArrayFile(path, key="z", ids_key=None,
    metadata=("class", "seed"))``). Derived from the settings alone: rewritten on every run."""
    indices = np.arange(num_samples)
    z, classes = sample_latents(indices, seed=seed, z_dim=z_dim, c_dim=c_dim)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, z=z, **{"class": classes, "seed": seed + indices})
    return path


def latent_source(path: Path, module: Any, *, num_samples: int, seed: int):
    """The scoring engine's source of samples ``0 .. num_samples - 1`` of a StyleGAN2 generator:
    their latents written to ``path`` (:func:`write_latents`, for ``module``'s ``z_dim`` and
    ``c_dim``) and read back as a :class:`~mmh_jax.scoring.ArrayFile` whose items carry their
    ``class`` and ``seed``."""
    from mmh_jax import scoring

    write_latents(path, num_samples=num_samples, seed=seed, z_dim=module.z_dim, c_dim=module.c_dim)
    return scoring.ArrayFile(path, key="z", ids_key=None, metadata=("class", "seed"))


def _summarise(table: dict, threshold: float, config: GanLidConfig, timings: dict) -> dict:
    lid = table["lid"]
    summary = {
        "samples": len(lid),
        "threshold": threshold,
        "percentile": config.percentile,
        "lid": {
            "mean": float(lid.mean()),
            "median": float(np.median(lid)),
            "min": int(lid.min()),
            "max": int(lid.max()),
        },
        "per_class": {
            int(c): float(np.median(lid[table["class"] == c]))
            for c in np.unique(table["class"])
            if c >= 0
        },
        "per_label": {},
        "timings": timings,
    }
    if "label" in table:
        from mmh_jax.evaluation import auroc

        labels = table["label"]
        not_mem = labels == NOT_MEMORIZED
        for name in sorted(set(labels.tolist()) - {""}):
            mask = labels == name
            both = mask | not_mem
            score = (
                auroc(lid[both], mask[both], higher_is_positive=False)
                if name != NOT_MEMORIZED and not_mem.any()
                else float("nan")
            )
            summary["per_label"][name] = (int(mask.sum()), float(np.median(lid[mask])), score)
    return summary


def _print_summary(console: Console, s: dict, config: GanLidConfig, files: list) -> None:
    lid = s["lid"]
    t = s["timings"]
    rows = [
        (
            "threshold",
            f"{s['threshold']:.4g} (the {s['percentile']:g}th percentile of all singular values)",
        ),
        ("LID mean / median", f"{lid['mean']:.1f} / {lid['median']:.0f}"),
        ("LID min / max", f"{lid['min']} / {lid['max']}"),
    ]
    if s["per_class"]:
        rows.append(
            ("median LID per class", ", ".join(f"{c}: {v:.0f}" for c, v in s["per_class"].items()))
        )
    for name, (count, median, auroc) in s["per_label"].items():
        rows.append(
            (
                f"label {name!r} ({count})",
                f"median LID {median:.0f}"
                + ("" if np.isnan(auroc) else f", AUROC of -LID vs 'not' {auroc:.3f}"),
            )
        )
    rate = t["scored_now"] / t["spectra_s"] if t["scored_now"] and t["spectra_s"] else 0.0
    rows += [
        ("samples now / resumed", f"{t['scored_now']} / {s['samples'] - t['scored_now']}"),
        (
            "time",
            f"load {t['load_s']:.1f} s, spectra {t['spectra_s']:.1f} s "
            f"({rate:.2f} samples/s, with compilation)",
        ),
    ]
    console.print(
        key_value_table(
            rows, title=f"Jacobian-rank LID of {s['samples']} samples (w.r.t. {config.wrt})"
        )
    )
    console.print(f"wrote {', '.join(str(f) for f in files)}")


def _histogram(table: dict, threshold: float, config: GanLidConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lid = table["lid"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bins = np.arange(lid.min(), lid.max() + 2) - 0.5
    if len(bins) > 60:
        bins = np.histogram_bin_edges(lid, bins=60)
    groups = [("all", np.ones(len(lid), bool))]
    if "label" in table:
        groups = [
            (name, table["label"] == name) for name in sorted(set(table["label"].tolist()) - {""})
        ]
    for name, mask in groups:
        ax.hist(lid[mask], bins=bins, density=True, alpha=0.55, label=f"{name} ({mask.sum()})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"LID estimate (rank of dG/d{config.wrt}, threshold {threshold:.3g})")
    ax.set_ylabel("density")
    ax.set_title("Figure 5b: Jacobian-rank LID of GAN samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _extremes(table: dict, config: GanLidConfig, images: np.ndarray):
    """Figure 5a: the ``--num-extremes`` samples of lowest and of highest LID (uint8 NHWC
    ``images``, as the engine wrote them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(table["lid"], kind="stable")
    k = min(config.num_extremes, len(order) // 2 or 1)
    rows = [("lowest LID", order[:k]), ("highest LID", order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.2), squeeze=False)
    for r, (title, chosen) in enumerate(rows):
        for j, ax in enumerate(axes[r]):
            ax.axis("off")
            if j < len(chosen):
                image = images[chosen[j]]
                ax.imshow(
                    image[..., 0] if image.shape[-1] == 1 else image,
                    cmap="gray" if image.shape[-1] == 1 else None,
                )
                ax.set_title(f"#{chosen[j]}: {table['lid'][chosen[j]]}", fontsize=7)
        axes[r][0].text(
            -0.1,
            0.5,
            title,
            transform=axes[r][0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle("Figure 5a: samples with the lowest and highest LID estimates", fontsize=9)
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``gan lid``'s arguments and flags to ``parser``."""
    d = GanLidConfig(model=Path("."))
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="an official StyleGAN2-ADA .pkl (read without running its code), "
        "or a file written by `mmh-jax convert stylegan2`",
    )
    add_out_flag(parser, d.out)
    parser.add_argument(
        "--network",
        choices=("G", "G_ema"),
        default=d.network,
        help="which generator of a training snapshot (default %(default)s)",
    )
    parser.add_argument(
        "-n",
        "--num-samples",
        type=int,
        metavar="N",
        default=d.num_samples,
        help="samples, class-balanced (default %(default)s; the paper: 50000)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=d.seed,
        help="sample i is the official generate.py's seed SEED + i (default %(default)s)",
    )
    parser.add_argument(
        "--wrt",
        choices=("z", "w"),
        default=d.wrt,
        help="the latent the Jacobian is taken with respect to (default %(default)s, the paper's)",
    )
    parser.add_argument(
        "--truncation-psi",
        type=finite_float,
        metavar="PSI",
        default=d.truncation_psi,
        help="truncation (default %(default)s: none)",
    )
    parser.add_argument(
        "--noise-mode",
        choices=("const", "none"),
        default=d.noise_mode,
        help="the synthesis noise (default %(default)s, as generate.py)",
    )
    add_percentile_flag(parser, d.percentile, of="the Jacobian rank")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=d.batch_size,
        help="samples per compiled batch (default %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        default=d.chunk_size,
        help="latent directions per batched jvp (default %(default)s)",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help="labels of samples: a CSV with columns index and label (e.g. "
        "exact, reconstructive, not)",
    )
    parser.add_argument(
        "--num-extremes",
        type=int,
        metavar="K",
        default=d.num_extremes,
        help="samples per row of lid_extremes.png (default %(default)s)",
    )
    add_dtype_flag(parser, d.dtype, of="the generator")
    add_display_flags(parser)


def config_from_args(args: argparse.Namespace) -> GanLidConfig:
    """Build a :class:`GanLidConfig` from parsed flags."""
    return config_from_flags(GanLidConfig, args)
