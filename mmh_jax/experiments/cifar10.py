"""The paper's CIFAR-10 memorization analysis (Section 4 "CIFAR10 Memorization", Figure 5,
Appendix C.2 Figure 8, Appendix F) on user-supplied training images and checkpoints.

``mmh-jax cifar10 run --train DATA --model CKPT --arch {iddpm,unet2d,stylegan2}``:

1. reads the training images (a folder of PNG/JPEG files, sorted by name, or an ``.npz`` with a
   uint8 array ``x`` in NHWC or NCHW), all of one size;
2. generates ``-n`` samples: DDIM (eta = 0, :func:`mmh_jax.sampling.ddim_sample`, ``--steps``)
   for a diffusion model (``iddpm``: a file written by ``mmh-jax convert iddpm``; ``unet2d``: a
   diffusers folder or a file written by ``mmh-jax convert unet2d``), sample ``i`` from the
   noise of index ``i`` under ``--seed`` (:mod:`mmh_jax._src.noise`, the rule of every sampler
   of the library), rounded to uint8; class-balanced latents
   (:func:`mmh_jax.experiments.cifar10_gan.sample_latents`) for StyleGAN2-ADA;
3. LID_theta of every sample: FLIPD (Hutchinson, one probe, ``t0`` = 0.05 as the paper and the
   library's demos) or the normal bundle (``t0`` = 0.1, singular values thresholded at their
   pooled 10th percentile, Appendix C.1) for diffusion models; the rank of the generator's
   Jacobian with the pooled 10th-percentile threshold for StyleGAN2-ADA;
4. the nearest training image of every sample by Carlini et al.'s calibrated l2 (pixels in
   [-1, 1]) and, with ``--sscd FILE``, by SSCD cosine similarity;
5. LID_* of each sample's nearest training image: local PCA, ``lpca(method="paper")``, on the
   training set;
6. the PNG length of each sample (and of its nearest training image) and the complexity
   normalised LIDs (LID / PNG bytes, Appendix C.2);
7. writes ``results.parquet``/``.csv``, ``pairs_<distance>.png`` (the ``--top-k`` closest pairs
   by each distance) and ``to_label.csv`` for hand labelling (exact / reconstructive / not).

Steps 2-3 are a run of :func:`mmh_jax.scoring.score` into ``OUT/scores/`` (every sample's LID
or spectrum and its uint8 image, sharded over the devices, written exactly once, so an
interrupted run resumes where it stopped; StyleGAN latents go to ``OUT/latents.npz``, the
engine's input); steps 4-7 read its Parquet. A rerun into the same folder with other model
settings or another number of samples is refused; one with other training images or
``--percentile`` reuses the scored samples.

``mmh-jax cifar10 report OUT --labels LABELS.csv`` joins the hand labels (columns ``id`` and
``label``) with ``OUT/results.parquet`` and writes ``histograms.png`` (Figure 5 / 8 style),
``roc.png`` and ``detection.csv`` (AUROC, TPR at 1% FPR, AP with bootstrap 95% CIs; memorized =
exact or reconstructive, a small value flags memorization).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Console

from mmh_jax._src.files import atomic_path, sha256_file
from mmh_jax._src.images import to_model_range
from mmh_jax.experiments.common import (
    DemoInputError,
    add_percentile_flag,
    check_percentile,
    check_seed_range,
    config_from_flags,
    finite_float,
    input_errors,
    int_field,
    key_value_table,
    output_console,
    prepare_outputs,
    read_csv_rows,
    require,
    require_at_least,
    results_table,
    write_csv,
    write_parquet,
)

__all__ = [
    "Cifar10Config",
    "ReportConfig",
    "load_training_images",
    "run",
    "report",
    "add_run_arguments",
    "add_report_arguments",
    "run_config_from_args",
    "report_config_from_args",
]

ARCHS = ("iddpm", "unet2d", "stylegan2")
LID_METHODS = ("flipd", "normal_bundle", "jacobian_rank")
LABELS = ("exact", "reconstructive", "not")
MEMORIZED = ("exact", "reconstructive")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DEFAULT_T0 = {"flipd": 0.05, "normal_bundle": 0.1}
_SSCD_ARCHS = ("resnext101_32x4d", "resnet50")


@dataclasses.dataclass(frozen=True)
class Cifar10Config:
    """Settings of ``mmh-jax cifar10 run`` (the CLI flags map one to one onto these)."""

    train: Path
    model: Path
    arch: Literal["iddpm", "unet2d", "stylegan2"]
    out: Path = Path("mmh-cifar10")
    num_samples: int = 1000
    lid: Literal["flipd", "normal_bundle", "jacobian_rank"] | None = None
    t0: float | None = None
    nb_scores: int | None = None
    steps: int = 50
    sscd: Path | None = None
    top_k: int = 64
    seed: int = 0
    batch_size: int = 32
    percentile: float = 10.0
    lpca_k: int = 100
    calibration_n: int = 50
    progress: bool = True
    part_size: int = 1024
    """Samples per Parquet part of ``OUT/scores/`` (the unit of resumption; not a flag)."""

    @property
    def lid_method(self) -> str:
        if self.lid is not None:
            return self.lid
        return "jacobian_rank" if self.arch == "stylegan2" else "flipd"

    @property
    def lid_t0(self) -> float | None:
        if self.lid_method == "jacobian_rank":
            return None
        return self.t0 if self.t0 is not None else _DEFAULT_T0[self.lid_method]

    def validate(self) -> None:
        """Raise :class:`DemoInputError` naming the first bad setting."""
        require(self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        require(
            self.lid is None or self.lid in LID_METHODS,
            f"--lid must be one of {', '.join(LID_METHODS)}, got {self.lid!r}",
        )
        gan = self.arch == "stylegan2"
        require(
            gan == (self.lid_method == "jacobian_rank"),
            f"--lid {self.lid_method} does not apply to --arch {self.arch} (StyleGAN2: "
            "jacobian_rank; diffusion models: flipd or normal_bundle)",
        )
        require_at_least(self, 1, "num_samples", "batch_size", "top_k", "steps", "lpca_k")
        require(self.part_size >= 1, f"part_size must be at least 1, got {self.part_size}")
        require_at_least(self, 1, "calibration_n")
        require(
            self.nb_scores is None or self.nb_scores >= 2,
            f"--nb-scores must be at least 2, got {self.nb_scores}",
        )
        check_seed_range(self.seed, self.num_samples)
        check_percentile(self.percentile)
        require(self.t0 is None or 0 < self.t0 <= 1, f"--t0 must lie in (0, 1], got {self.t0}")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of ``mmh-jax cifar10 report``."""

    out: Path
    labels: Path
    unlabelled: Literal["not", "drop"] = "not"
    n_bootstrap: int = 1000
    seed: int = 0

    def validate(self) -> None:
        require(
            self.unlabelled in ("not", "drop"),
            f"--unlabelled must be not or drop, got {self.unlabelled!r}",
        )
        require(self.n_bootstrap >= 0, f"--bootstrap must be >= 0, got {self.n_bootstrap}")


# --- input --------------------------------------------------------------------------------


def load_training_images(path: Path) -> np.ndarray:
    """Training images as uint8 NHWC (gray images get one channel).

    Args:
        path: a folder of ``.png``/``.jpg``/``.jpeg`` files (read in sorted name order) or an
            ``.npz`` file with a uint8 array ``x`` ``[n, h, w, c]`` or ``[n, c, h, w]``.

    Raises:
        DemoInputError: no such path, no images, another dtype or rank, or an image whose size
            differs from the first one's (naming the file).
    """
    path = Path(path)
    require(path.exists(), f"--train {str(path)!r} does not exist")
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        require(bool(files), f"--train folder {str(path)!r} holds no .png/.jpg/.jpeg files")
        images = []
        for file in files:
            try:
                with Image.open(file) as im:
                    mode = "L" if im.mode in ("L", "I;16", "1") else "RGB"
                    array = np.asarray(im.convert(mode), dtype=np.uint8)
            except OSError as err:
                raise DemoInputError(f"cannot read training image {str(file)!r}: {err}") from None
            array = array[..., None] if array.ndim == 2 else array
            if images and array.shape != images[0].shape:
                raise DemoInputError(
                    f"training image {str(file)!r} has size {_hwc(array.shape)}, but "
                    f"{str(files[0])!r} has {_hwc(images[0].shape)}; all must be the same size"
                )
            images.append(array)
        return np.stack(images)
    require(
        path.suffix == ".npz",
        f"--train must be a folder of images or an .npz file, got {str(path)!r}",
    )
    from mmh_jax.scoring import ArrayFile  # the one .npz reader, and its errors

    try:
        x = ArrayFile(path, key="x", ids_key=None).array
    except ValueError as err:
        raise DemoInputError(f"--train: {err}") from None
    require(x.dtype == np.uint8, f"--train {str(path)!r}: x must be uint8, got {x.dtype}")
    require(
        x.ndim == 4,
        f"--train {str(path)!r}: x must be [n, h, w, c] or [n, c, h, w], got shape {x.shape}",
    )
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    require(
        x.shape[-1] in (1, 3),
        f"--train {str(path)!r}: images need 1 or 3 channels, got shape {x.shape}",
    )
    require(len(x) >= 2, f"--train {str(path)!r}: need at least 2 training images")
    return np.ascontiguousarray(x)


def _hwc(shape: tuple) -> str:
    return "x".join(str(s) for s in shape)


# --- run ----------------------------------------------------------------------------------


def _fingerprint(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return json.dumps([[str(p.relative_to(path)), p.stat().st_size] for p in files])


def _scoring_run(config: Cifar10Config, shape_chw: tuple, out: Path, err_console: Console):
    """Steps 2-3 as a run of :func:`mmh_jax.scoring.score` into ``out/scores``: the model, the
    input (sample numbers, or StyleGAN latents written to ``out/latents.npz``) and the columns
    (LID_theta, or its spectrum, and the uint8 image). Returns the engine's summary."""
    import jax

    from mmh_jax import scoring
    from mmh_jax.convert import ConversionError
    from mmh_jax.sampling import DDIMGrid

    try:
        with err_console.status(f"loading {config.model} ..."):
            from mmh_jax.models import load_model

            if config.arch == "iddpm":
                require(
                    config.model.is_file() and config.model.suffix == ".safetensors",
                    f"--model {str(config.model)!r}: --arch iddpm needs a .safetensors "
                    "file written by `mmh-jax convert iddpm`",
                )
            model = load_model(config.model, kind=config.arch)
    except (ConversionError, ValueError, TypeError, FileNotFoundError) as err:
        raise DemoInputError(f"cannot load --model {str(config.model)!r}: {err}") from None

    method = config.lid_method
    if config.arch == "stylegan2":
        from mmh_jax.experiments.cifar10_gan import latent_source
        from mmh_jax.memorization import stylegan2_fns

        module = model.module
        got = (module.img_channels, module.img_resolution, module.img_resolution)
        require(
            got == tuple(shape_chw),
            f"the generator makes {_hwc(got[1:] + got[:1])} "
            f"images but the training images are {_hwc(shape_chw[1:] + shape_chw[:1])}",
        )
        source = latent_source(
            out / "latents.npz", module, num_samples=config.num_samples, seed=config.seed
        )
        fns = stylegan2_fns(module, model.params)
        scored = scoring.Model.from_generator(
            fns.generate, (module.z_dim,), num_classes=module.c_dim, description="StyleGAN2"
        )
        columns = [scoring.JacobianRank(spectrum=True)]
        labels = "class" if module.c_dim else None
    else:
        schedule = model.schedule
        require(
            config.steps <= schedule.num_timesteps,
            f"--steps must be at most the model's {schedule.num_timesteps} timesteps",
        )
        scored = scoring.Model.from_pretrained(model, description=config.arch)
        require(
            scored.shape == tuple(shape_chw),
            f"samples are {_hwc(scored.shape[1:] + scored.shape[:1])} but training images "
            f"are {_hwc(shape_chw[1:] + shape_chw[:1])}",
        )
        # the DDIM grid of the paper's CIFAR-10 models: timesteps from 0, alpha 1 after the last
        scored = dataclasses.replace(
            scored, ddim_grid=DDIMGrid(steps_offset=0, set_alpha_to_one=True)
        )
        source = scoring.Seeds(config.num_samples)
        columns = [
            scoring.Flipd(t0=config.lid_t0)
            if method == "flipd"
            else scoring.NormalBundle(t0=config.lid_t0, num_scores=config.nb_scores, spectrum=True)
        ]
        labels = None
    devices = jax.device_count()
    try:
        return scoring.score(
            scored,
            [*columns, scoring.Pixels()],
            source,
            str(out / "scores"),
            seed=config.seed,
            batch_size=-(-config.batch_size // devices) * devices,
            chunk_size=config.part_size,
            generation=scoring.Generation(num_steps=config.steps),
            labels=labels,
            record={"model_sha256": _fingerprint(config.model), "arch": config.arch},
            console=err_console if config.progress else None,
        )
    except scoring.RunMismatch as err:
        raise DemoInputError(
            f"{str(out / 'scores')!r} holds a run with other settings ({err}); choose another --out"
        ) from None


def _lid_theta(config: Cifar10Config, scores) -> np.ndarray:
    """LID_theta of every sample from the engine's table: FLIPD as scored, or the spectra
    thresholded at their pooled percentile."""
    from mmh_jax.scoring import vectors

    t0 = f"{config.lid_t0:g}" if config.lid_t0 is not None else ""
    if config.lid_method == "flipd":
        return scores[f"flipd_{t0}"].to_numpy().astype(np.float64)
    name = (
        "jacobian_singular_values"
        if config.lid_method == "jacobian_rank"
        else f"normal_bundle_sv_{t0}"
    )
    spectra = vectors(scores, name).astype(np.float32)
    return _lid_from_spectra(config.lid_method, spectra, config.percentile).astype(np.float64)


def _lid_from_spectra(method: str, spectra: np.ndarray, percentile: float) -> np.ndarray:
    """LID_theta from the spectra of all samples of a run, thresholded at their pooled
    ``percentile`` (Appendix C.1): the Jacobian's rank (StyleGAN2) or ``d`` minus the normal
    bundle's rank."""
    from mmh_jax.lid import lid_from_singular_values, numerical_rank, percentile_threshold

    threshold = percentile_threshold(spectra, q=percentile)
    if method == "jacobian_rank":
        return np.asarray(numerical_rank(spectra, threshold=threshold))
    return np.asarray(lid_from_singular_values(spectra, threshold=threshold, space="normal"))


def run(config: Cifar10Config, *, console: Console | None = None):
    """Run steps 1-7; returns ``(table, files)``.

    Raises:
        DemoInputError: bad settings or input, an unreadable model, an unwritable folder.
    """
    config.validate()
    require(config.model.exists(), f"--model {str(config.model)!r} does not exist")
    require(
        config.sscd is None or config.sscd.is_file(),
        f"--sscd {str(config.sscd)!r} does not exist or is a folder",
    )
    train_u8 = load_training_images(config.train)
    require(
        config.lpca_k < len(train_u8),
        f"--lpca-k ({config.lpca_k}) must be below the number of training images ({len(train_u8)})",
    )
    out, console, err_console = prepare_outputs(config.out, console=console)
    timings = {}

    # 2-3: samples and LID_theta: a run of the scoring engine (resumed after an interruption)
    start = time.perf_counter()
    shape_chw = (train_u8.shape[3], train_u8.shape[1], train_u8.shape[2])
    _scoring_run(config, shape_chw, out, err_console)
    timings["generate_lid_s"] = time.perf_counter() - start

    import jax

    from mmh_jax import scoring
    from mmh_jax.evaluation import normalized_lid, pair_grid, png_length
    from mmh_jax.lid import lpca
    from mmh_jax.retrieval import calibrated_l2, nearest_neighbours
    from mmh_jax.scoring import vectors

    merged = scoring.merge(out / "scores")
    require(merged.errors.num_rows == 0, f"samples not scored: {merged.errors.to_pylist()}")
    lid_theta = _lid_theta(config, merged.scores)
    samples_u8 = vectors(merged.scores, "pixels").reshape(config.num_samples, *train_u8.shape[1:])
    samples_f, train_f = to_model_range(samples_u8), to_model_range(train_u8)

    # 4: retrieval
    start = time.perf_counter()
    with err_console.status("retrieval ..."):
        cal = calibrated_l2(samples_f, train_f, n=min(config.calibration_n, len(train_f)))
    nearest = np.asarray(cal.nearest, np.int64)
    table = {
        "id": np.arange(config.num_samples),
        "train_index": nearest,
        "calibrated_l2": np.asarray(cal.score, np.float64),
        "l2": np.asarray(cal.distances, np.float64)[:, 0],
    }
    if config.sscd is not None:
        from mmh_jax.convert import ConversionError, UnsafePickleError
        from mmh_jax.models import load_sscd, sscd_preprocess

        # A state dict or TorchScript archive does not name its trunk: sscd_disc_large
        # (ResNeXt-101, the memorization papers' choice) is tried first, then sscd_disc_mixup
        # (ResNet-50); a file written by save_sscd carries its own.
        sscd, errors = None, []
        for arch in _SSCD_ARCHS:
            try:
                sscd = load_sscd(config.sscd, arch=arch)
                break
            except UnsafePickleError as err:  # not a matter of architecture
                errors = [str(err)]
                break
            except ConversionError as err:
                errors.append(f"as {arch}: {err}")
            except (ValueError, FileNotFoundError) as err:
                errors = [str(err)]
                break
        if sscd is None:
            raise DemoInputError(
                f"cannot load --sscd {str(config.sscd)!r}: " + "; ".join(errors)
            ) from None

        # Every batch padded (by repetition) to one size: one compilation of the trunk for
        # samples and training images alike.
        sscd_batch = min(64, max(len(samples_u8), len(train_u8)))

        def embed(u8):
            rgb = np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8
            out = []
            for i in range(0, len(rgb), sscd_batch):
                chunk = rgb[i : i + sscd_batch]
                pad = sscd_batch - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                out.append(np.asarray(sscd.embed(sscd_preprocess(chunk)))[: len(chunk) - pad])
            return np.concatenate(out)

        with err_console.status("SSCD embeddings ..."):
            found = nearest_neighbours(embed(samples_u8), embed(train_u8), k=1, metric="cosine")
        table["sscd_train_index"] = np.asarray(found.indices)[:, 0].astype(np.int64)
        table["sscd_similarity"] = 1.0 - np.asarray(found.distances, np.float64)[:, 0]
    timings["retrieval_s"] = time.perf_counter() - start

    # 5: LID_* of the nearest training images (local PCA over the training set, cached)
    start = time.perf_counter()
    star_file = out / "lid_star_train.npy"
    star_settings = {"train_sha256": _fingerprint(config.train), "k": config.lpca_k}
    star_record = out / "lid_star_train.json"
    lid_star_train = None
    if star_file.is_file() and star_record.is_file():
        try:
            if json.loads(star_record.read_text()) == star_settings:
                lid_star_train = np.load(star_file)
        except (json.JSONDecodeError, ValueError):
            lid_star_train = None
    if lid_star_train is None:
        with err_console.status(f"local PCA on {len(train_f)} training images ..."):
            lid_star_train = np.asarray(
                lpca(
                    train_f.reshape(len(train_f), -1),
                    k=config.lpca_k,
                    method="paper",
                    key=jax.random.key(config.seed),
                )
            )
        with atomic_path(star_file) as tmp, open(tmp, "wb") as f:
            np.save(f, lid_star_train)
        with atomic_path(star_record) as tmp:
            tmp.write_text(json.dumps(star_settings) + "\n")
    timings["lpca_s"] = time.perf_counter() - start

    # 6: complexity
    png = png_length(samples_u8)
    train_png = png_length(train_u8[nearest])
    table["lid_theta"] = lid_theta.astype(np.float64)
    table["lid_star"] = lid_star_train[nearest].astype(np.float64)
    table["png_length"] = png
    table["train_png_length"] = train_png
    table["lid_theta_normalised"] = normalized_lid(table["lid_theta"], png)
    table["lid_star_normalised"] = normalized_lid(table["lid_star"], train_png)

    # 7: outputs
    files = [write_parquet(table, out / "results.parquet"), write_csv(table, out / "results.csv")]
    k = min(config.top_k, config.num_samples)
    distances = [
        (
            "calibrated_l2",
            np.argsort(table["calibrated_l2"], kind="stable")[:k],
            table["train_index"],
            table["calibrated_l2"],
        )
    ]
    if "sscd_similarity" in table:
        distances.append(
            (
                "sscd",
                np.argsort(-table["sscd_similarity"], kind="stable")[:k],
                table["sscd_train_index"],
                table["sscd_similarity"],
            )
        )
    to_label = {"id": [], "train_index": [], "distance": [], "value": [], "label": []}
    for name, order, index, value in distances:
        files.append(
            pair_grid(
                samples_u8[order],
                train_u8[index[order]],
                value[order],
                path=out / f"pairs_{name}.png",
                titles=[f"#{i}" for i in order],
            )
        )
        for i in order:
            to_label["id"].append(int(i))
            to_label["train_index"].append(int(index[i]))
            to_label["distance"].append(name)
            to_label["value"].append(float(value[i]))
            to_label["label"].append("")
    files.append(write_csv(to_label, out / "to_label.csv"))
    _print_run(console, table, config, timings, files)
    return table, files


def _print_run(
    console: Console, table: dict, config: Cifar10Config, timings: dict, files: list
) -> None:
    lid_name = config.lid_method + (
        f" (t0 = {config.lid_t0:g})"
        if config.lid_t0
        else f" ({config.percentile:g}th-percentile threshold)"
    )
    rows = [
        ("LID_theta", lid_name),
        ("LID_theta median [min, max]", _spread(table["lid_theta"])),
        ("LID_* (lpca, paper) median [min, max]", _spread(table["lid_star"])),
        ("calibrated l2 median [min, max]", _spread(table["calibrated_l2"])),
        ("PNG bytes median [min, max]", _spread(table["png_length"])),
    ]
    if "sscd_similarity" in table:
        rows.append(("SSCD similarity median [min, max]", _spread(table["sscd_similarity"])))
    rows.append(("time", ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items())))
    console.print(
        key_value_table(
            rows, title=f"CIFAR-10 analysis: {config.num_samples} samples of {config.arch}"
        )
    )
    console.print(f"wrote {', '.join(str(f) for f in files)}")


def _spread(values: np.ndarray) -> str:
    return f"{np.median(values):.4g} [{np.min(values):.4g}, {np.max(values):.4g}]"


# --- report -------------------------------------------------------------------------------

SIGNALS = ("lid_theta", "lid_theta_normalised", "lid_star", "lid_star_normalised")


def _read_results(out: Path) -> dict:
    parquet, text = out / "results.parquet", out / "results.csv"
    require(out.is_dir(), f"{str(out)!r} is not a folder written by `mmh-jax cifar10 run`")
    if parquet.is_file():
        import pyarrow.parquet as pq

        frame = pq.read_table(parquet)
        return {name: np.asarray(frame[name].to_numpy()) for name in frame.column_names}
    require(text.is_file(), f"{str(out)!r} holds no results.parquet or results.csv")
    with open(text, newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: np.array([float(r[name]) for r in rows]) for name in rows[0]}


def _read_labels(path: Path) -> dict[int, str]:
    labels: dict[int, str] = {}
    for line, row in read_csv_rows(path, flag="--labels", columns=("id", "label")):
        label = (row["label"] or "").strip().lower()
        if not label:
            continue
        require(
            label in LABELS,
            f"{path}:{line}: label must be one of {', '.join(LABELS)}, got {row['label']!r}",
        )
        item = int_field(row, "id", where=f"{path}:{line}")
        require(
            labels.get(item, label) == label,
            f"{path}:{line}: id {item} is labelled both {labels.get(item)!r} and {label!r}",
        )
        labels[item] = label
    require(bool(labels), f"--labels {str(path)!r} has no labelled rows")
    return labels


def report(config: ReportConfig, *, console: Console | None = None):
    """Join hand labels with a run's results; write figures and detection metrics.

    Returns:
        ``(metrics, files)``: signal name -> :class:`~mmh_jax.evaluation.DetectionMetrics`.
    """
    config.validate()
    console = console or output_console()
    table = _read_results(config.out)
    labels = _read_labels(config.labels)

    import jax

    from mmh_jax.evaluation import density_histograms, detection_report, label_join, roc_curves

    ids = table["id"].astype(np.int64).tolist()
    try:
        joined = label_join(ids, labels)
    except KeyError as err:
        raise DemoInputError(f"--labels {str(config.labels)!r}: {err.args[0]}") from None
    names = np.full(len(ids), "not" if config.unlabelled == "not" else "", dtype=object)
    names[joined.rows] = joined.labels
    rows = np.flatnonzero(names != "")
    names = names[rows].astype(str)
    memorized = np.isin(names, MEMORIZED)
    require(
        memorized.any() and not memorized.all(),
        f"need both memorized (exact/reconstructive) and not-memorized samples, got "
        f"{int(memorized.sum())} and {int((~memorized).sum())}",
    )
    signals = [s for s in SIGNALS if s in table]
    scores = {s: np.asarray(table[s], np.float64)[rows] for s in signals}
    orientation = {s: False for s in signals}
    with input_errors(ValueError):
        metrics = detection_report(
            scores,
            memorized,
            higher_is_positive=orientation,
            n_bootstrap=config.n_bootstrap,
            key=jax.random.key(config.seed),
        )
    out = config.out
    detection = {
        "signal": list(metrics),
        **{
            k: []
            for k in (
                "auroc",
                "auroc_low",
                "auroc_high",
                "tpr_at_1pct_fpr",
                "tpr_low",
                "tpr_high",
                "ap",
                "ap_low",
                "ap_high",
                "n_memorized",
                "n_not",
            )
        },
    }
    for m in metrics.values():
        for key, value in (
            ("auroc", m.auroc),
            ("auroc_low", m.auroc_ci[0]),
            ("auroc_high", m.auroc_ci[1]),
            ("tpr_at_1pct_fpr", m.tpr),
            ("tpr_low", m.tpr_ci[0]),
            ("tpr_high", m.tpr_ci[1]),
            ("ap", m.ap),
            ("ap_low", m.ap_ci[0]),
            ("ap_high", m.ap_ci[1]),
            ("n_memorized", m.n_positive),
            ("n_not", m.n_negative),
        ):
            detection[key].append(value)
    files = [write_csv(detection, out / "detection.csv")]
    columns = [
        c
        for c in (
            "lid_theta",
            "lid_star",
            "lid_theta_normalised",
            "calibrated_l2",
            "sscd_similarity",
        )
        if c in table
    ]
    files.append(
        density_histograms(
            {c: np.asarray(table[c], np.float64)[rows] for c in columns},
            columns,
            names,
            path=out / "histograms.png",
        )
    )
    files.append(
        roc_curves(
            scores,
            memorized,
            higher_is_positive=orientation,
            path=out / "roc.png",
            title="memorized (exact or reconstructive)",
        )
    )
    t = results_table(
        ("signal", "AUROC [95% CI]", "TPR@1%FPR [95% CI]", "AP [95% CI]"),
        title=f"Detecting memorized samples ({int(memorized.sum())} memorized, "
        f"{int((~memorized).sum())} not; small value = memorized)",
    )
    for name, m in metrics.items():
        t.add_row(
            name,
            *(
                f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
                for v, (lo, hi) in ((m.auroc, m.auroc_ci), (m.tpr, m.tpr_ci), (m.ap, m.ap_ci))
            ),
        )
    console.print(t)
    console.print(f"wrote {', '.join(str(f) for f in files)}")
    return metrics, files


# --- command line -------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``cifar10 run``'s flags to ``parser``."""
    d = Cifar10Config(train=Path("."), model=Path("."), arch="stylegan2")
    parser.add_argument(
        "--train",
        type=Path,
        required=True,
        metavar="DATA",
        help="training images: a folder of PNG/JPEG files (sorted by name; the "
        "index is the position) or an .npz with a uint8 array x (NHWC or NCHW)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="CKPT",
        help="iddpm: a .safetensors written by `mmh-jax convert iddpm` (it "
        "carries its flags); unet2d: a diffusers folder or a file written by "
        "`mmh-jax convert unet2d`; stylegan2: an official .pkl or a file "
        "written by `mmh-jax convert stylegan2`",
    )
    parser.add_argument("--arch", choices=ARCHS, required=True, help="the model's architecture")
    parser.add_argument(
        "-n",
        "--num-samples",
        type=int,
        metavar="N",
        default=d.num_samples,
        help="samples to generate (default %(default)s; the paper: 50000)",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=d.out,
        help="output folder (default ./%(default)s/); samples and LIDs are "
        "reused by a rerun with the same settings",
    )
    parser.add_argument(
        "--lid",
        choices=LID_METHODS,
        help="LID_theta estimator (default: flipd for diffusion models, "
        "jacobian_rank for stylegan2)",
    )
    parser.add_argument(
        "--t0",
        type=finite_float,
        help="diffusion time of FLIPD (default 0.05) or the normal bundle "
        "(default 0.1), as in the paper (Appendix C.1)",
    )
    parser.add_argument(
        "--nb-scores",
        type=int,
        metavar="K",
        help="normal bundle: perturbed copies per sample (default 4 d)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=d.steps,
        help="DDIM steps of diffusion models (default %(default)s)",
    )
    parser.add_argument(
        "--sscd",
        type=Path,
        metavar="FILE",
        help="an SSCD checkpoint (see `mmh_jax.models.load_sscd`; a state dict "
        "or TorchScript archive is read as sscd_disc_large, ResNeXt-101, or "
        "else as sscd_disc_mixup, ResNet-50): also retrieve by SSCD cosine "
        "similarity",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        default=d.top_k,
        help="closest pairs per distance in pairs_*.png and to_label.csv "
        "(default %(default)s; the paper: 250-300)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="sampling seed (StyleGAN: sample i is generate.py's seed SEED + i, "
        "class i mod c_dim; default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        default=d.batch_size,
        help="samples per compiled batch (default %(default)s)",
    )
    add_percentile_flag(parser, d.percentile, of="the Jacobian rank and the normal bundle")
    parser.add_argument(
        "--lpca-k",
        type=int,
        metavar="K",
        default=d.lpca_k,
        help="neighbours of local PCA for LID_* (default %(default)s)",
    )
    parser.add_argument(
        "--calibration-n",
        type=int,
        metavar="N",
        default=d.calibration_n,
        help="neighbours averaged by the calibrated l2 (default %(default)s, Carlini et al.)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``cifar10 report``'s arguments to ``parser``."""
    parser.add_argument("out", type=Path, metavar="OUT", help="the folder of `cifar10 run`")
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="LABELS.csv",
        help="hand labels: a CSV with columns id and label (exact, "
        "reconstructive, not; empty labels are skipped), e.g. a filled-in "
        "to_label.csv",
    )
    parser.add_argument(
        "--unlabelled",
        choices=("not", "drop"),
        default="not",
        help="samples without a label: count them as not memorized (default, "
        "as the paper: they have a low chance of being memorized) or drop them",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        metavar="N",
        default=1000,
        help="bootstrap resamples of the 95%% CIs (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_config_from_args(args: argparse.Namespace) -> Cifar10Config:
    """The config of parsed ``cifar10 run`` flags."""
    return config_from_flags(Cifar10Config, args)


def report_config_from_args(args: argparse.Namespace) -> ReportConfig:
    """The config of parsed ``cifar10 report`` flags."""
    return config_from_flags(ReportConfig, args, n_bootstrap=args.bootstrap)
