"""``mmh-jax demo prompts``: detection, attribution, mitigation and the guarded sampler on a
text-to-image model that really memorizes, with ground truth (paper, Sections 3.2 and 4.2).

The recipe:

1. the shapes world (:mod:`mmh_jax.worlds.shapes`) and its Stable-Diffusion-shaped model
   (:func:`mmh_jax.worlds.train_world_model`: trained, resumed or reused from ``model/``);
2. the world's judges (:mod:`mmh_jax.worlds.judge`): a generation is a *copy* when its calibrated
   l2 to the nearest distinct training image (all in the VAE's round trip) is below the 1%
   quantile of held-out world images', and its *fidelity* is the fraction of its caption's
   objects (colour and shape) that an attribute classifier finds in it;
3. **detection** (Figures 3, 6): every prompt (memorized: verbatim, template, rare; held-out
   grammar prompts) is sampled ``images_per_prompt`` times with DDIM and CFG; per image the CFG
   norm and the CFG-adjusted score norm of the trajectory, the CFG norm at the prompt's own image
   (the training image; for a held-out prompt the scene it was written for), conditional and
   unconditional FLIPD of the generation, its copy verdict and fidelity: ``sd detect``'s columns
   (:func:`~mmh_jax.experiments.stable_diffusion.detection_columns`) and two host columns
   (:class:`~mmh_jax.scoring.ImageSimilarity` with the copy judge,
   :class:`~mmh_jax.scoring.ClipScore` with the fidelity classifier) in two runs of the scoring
   engine, ``detection/`` (the generations of ``prompts.jsonl``) and ``detection_image/`` (the
   prompts' own images with their captions, ``prompt_images.npz``); AUROC and TPR at 1% FPR
   with bootstrap CIs of prompt means, memorized vs held-out, per kind;
4. **attribution** (Figures 7a, 11): for verbatim and template prompts the token attributions of
   ``A^CFG``, ``A^sCFG`` and ``A^FLIPD`` (the verbatim ones from step 5's first stage, the
   template ones by ``sd attribute``'s recipe in ``attribution_template/``); how often the top-1
   and top-3 tokens hold a trigger word, against choosing tokens uniformly
   (``attribution.parquet``);
5. **mitigation** (Figure 7c, Appendix D): ``sd mitigate``'s recipe
   (:func:`~mmh_jax.experiments.sd_mitigation.run_mitigate`, in ``mitigation/``) over the
   verbatim prompts, with the copy judge and the fidelity classifier as its two scorers: the
   prompts rephrased at the attributed tokens (k = 1, 2, 4; the world's synonym table), at
   uniformly chosen tokens, by random token addition (the world's made-up words), by
   embedding optimisation, by Ren et al.'s attention re-scaling and by NeMo's neuron
   deactivation (against the calibration prompts); copy rate and fidelity before and after
   (``mitigation/results.parquet``, its grids and trade-off figure);
6. **the guarded sampler**: the CFG-norm threshold calibrated at ``target_fpr`` on a separate
   set of held-out prompts (from step 3), then :func:`~mmh_jax.memorization.guarded_generate`
   on the evaluation prompts with attribution-guided rephrasing (k = 1) as its mitigation:
   realised FPR, detection rate, copy rate with and without the guard (``guard.parquet``). The
   guard is a library call, not an engine column: it decides per prompt whether to sample
   again, so its table is one host stage (:func:`~mmh_jax.experiments.common.host_stage`).

Everything random is fixed by ``seed`` and the world's spec; the figures and ``summary.json``
are read back from the stages' results. Steps 3-5 are runs of the scoring engine: they resume
where a killed run stopped (exactly once, per chunk) and refuse an output folder holding other
prompts or settings; the guard's table is reused when it exists for the same settings and
refused when it holds others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mmh_jax._src.images import to_model_range
from mmh_jax.experiments.common import (
    DemoInputError,
    atomic_path,
    finite_float,
    host_stage,
    make_progress,
    prepare_out_dir,
    require,
    save_figure,
    write_parquet,
    write_prompt_file,
)

__all__ = ["PromptWorldConfig", "run", "add_arguments", "config_from_args", "DETECTORS"]

DETECTORS = {
    "CFG norm (generation)": ("cfg_norm", True),
    "CFG norm (training image)": ("cfg_norm_image", True),
    "CFG-adjusted score norm": ("cfg_score", True),
    "conditional FLIPD": ("flipd_cond", False),
    "unconditional FLIPD": ("flipd_uncond", False),
}
"""The demo's detection signals: name -> (column of the per-image detection table, whether
a higher value means memorized)."""
_KINDS = ("verbatim", "template", "rare")
_METRICS = ("cfg", "cfg_score", "flipd")


@dataclasses.dataclass(frozen=True)
class PromptWorldConfig:
    """Settings of ``mmh-jax demo prompts`` (the CLI flags map one to one onto these)."""

    out: Path = Path("mmh-demo-prompts")
    model: Path | None = None
    quick: bool = False
    train_steps: int | None = None
    seed: int = 0
    images_per_prompt: int = 4
    num_steps: int = 50
    guidance: float = 7.5
    num_heldout: int = 64
    num_calibration: int = 64
    flipd_t0: float = 0.05
    ks: tuple[int, ...] = (1, 2, 4)
    repeats: int = 2
    mitigation_images: int = 2
    target_fpr: float = 0.05
    batch_size: int = 32
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`DemoInputError` on nonsensical settings."""
        require(
            self.train_steps is None or self.train_steps >= 1, "--train-steps must be at least 1"
        )
        require(self.images_per_prompt >= 1, "--images-per-prompt must be at least 1")
        require(self.num_steps >= 2, "--num-steps must be at least 2")
        require(self.guidance > 1, f"--guidance must be > 1, got {self.guidance}")
        require(self.num_heldout >= 2, "--num-heldout must be at least 2")
        require(0 < self.target_fpr < 1, f"--target-fpr must lie in (0, 1), got {self.target_fpr}")
        need = math.ceil(1 / self.target_fpr) - 1
        require(
            self.num_calibration >= need,
            f"--num-calibration must be at least {need} for "
            f"--target-fpr {self.target_fpr} (conformal rule)",
        )
        require(0 < self.flipd_t0 <= 1, f"--flipd-t0 must lie in (0, 1], got {self.flipd_t0}")
        require(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "--ks must be positive")
        require(self.repeats >= 1, "--repeats must be at least 1")
        require(self.mitigation_images >= 1, "--mitigation-images must be at least 1")
        require(self.batch_size >= 1, "--batch-size must be at least 1")


def specs(quick: bool, train_steps: int | None = None):
    """The world and training settings of the default run and of ``--quick`` (fixed before
    any result was seen); ``train_steps`` replaces the recipe's UNet and text-encoder steps
    (the learning-rate schedule stretches with it)."""
    from mmh_jax.worlds import TrainSpec, WorldSpec

    if not quick:
        world, train = WorldSpec(), TrainSpec()
    else:
        world = WorldSpec(
            num_normal=400,
            verbatim_counts=(16, 32, 64) * 2,
            num_template=2,
            template_captions=4,
            num_rare=4,
        )
        train = TrainSpec(vae_steps=80, vae_batch=32, steps=160, batch_size=64, chunk=40)
    if train_steps is not None:
        train = dataclasses.replace(train, steps=train_steps)
    return world, train


class _Judges:
    """The copy judge and the fidelity classifier, as the scorers of the engine's host columns
    and of ``mitigate``; fitted on first use (under a lock: the engine calls host columns from
    its threads), so a resumed run whose stages are done fits neither."""

    def __init__(self, sd, world, seed: int, console: Console):
        self._args = (sd, world, seed, console)
        self._lock = threading.Lock()
        self._fitted: tuple | None = None

    def _get(self) -> tuple:
        with self._lock:
            if self._fitted is None:
                self._fitted = _fit_judges(*self._args)
            return self._fitted

    def copies(self, images_u8: np.ndarray, _references: Any = None) -> np.ndarray:
        from mmh_jax.worlds.judge import judge_copies

        return judge_copies(self._get()[0], to_model_range(images_u8)).is_copy.astype(np.float64)

    def fidelity(self, images_u8: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        from mmh_jax.worlds.judge import fidelity

        return fidelity(self._get()[1], to_model_range(images_u8), list(prompts))


def _images_u8(sd, latents, batch: int = 256) -> np.ndarray:
    """Latents decoded by the VAE, as uint8 NHWC images (what the judges and scorers read)."""
    from mmh_jax.evaluation import to_uint8_nhwc

    return np.concatenate(
        [
            to_uint8_nhwc(np.asarray(sd.decode(latents[i : i + batch])))
            for i in range(0, len(latents), batch)
        ]
    )


def _round_trip(sd, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Images through the VAE (encode to the posterior mean, decode) and uint8, as generations
    are: the domain in which copies are judged."""
    latents = np.concatenate(
        [np.asarray(sd.encode_image(images[i : i + batch])) for i in range(0, len(images), batch)]
    )
    return to_model_range(_images_u8(sd, latents, batch))


def _fit_judges(sd, world, seed: int, console: Console) -> tuple:
    import jax

    from mmh_jax.worlds import render
    from mmh_jax.worlds.judge import fit_copy_judge, train_attribute_classifier

    t = time.perf_counter()
    heldout = np.stack(
        [render(s, world.spec.image_size) for s in world.heldout_scenes(512, split=2)]
    )
    judge = fit_copy_judge(_round_trip(sd, world.images), _round_trip(sd, heldout), quantile=0.01)
    # trained on VAE round trips of its renders: the domain of the generations it judges
    classifier = train_attribute_classifier(
        key=jax.random.key(seed), preprocess=lambda x: _round_trip(sd, x)
    )
    console.print(
        f"judges ready in {time.perf_counter() - t:.0f} s (copy threshold "
        f"{judge.threshold:.3f}, calibrated l2)"
    )
    return judge, classifier


# --- detection ---------------------------------------------------------------------------------


class _Prompts:
    """Every prompt of the run with its ground truth, in a fixed order."""

    def __init__(self, world, config: PromptWorldConfig):
        from mmh_jax.worlds import render

        rows: list[dict] = []
        for kind in _KINDS:
            for p in world.memorized_prompts(kind):
                rows.append(
                    dict(
                        prompt=p.caption,
                        kind=kind,
                        count=p.count,
                        triggers=" ".join(p.triggers),
                        image=world.images[p.image_id],
                    )
                )
        for split, kind, n in (
            (1, "heldout", config.num_heldout),
            (0, "calibration", config.num_calibration),
        ):
            for scene, text in zip(
                world.heldout_scenes(n, split=split), world.heldout_prompts(n, split=split)
            ):
                rows.append(
                    dict(
                        prompt=text,
                        kind=kind,
                        count=0,
                        triggers="",
                        image=render(scene, world.spec.image_size),
                    )
                )
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        return [r[name] for r in self.rows]


def _detection(
    sd,
    prompts: _Prompts,
    judges: _Judges,
    config: PromptWorldConfig,
    out: Path,
    record: dict,
    console: Console,
) -> dict[str, np.ndarray]:
    """The detection stage as two runs of ``sd detect``'s columns through the scoring engine
    (each resumed where it stopped): ``detection/``, the generations of every prompt (CFG norms
    of the trajectory, FLIPD, and the host columns judging copies and fidelity), and
    ``detection_image/``, the prompt's own image with its caption (the CFG norm at the training
    image). Returns the per-image table (prompt order) read back from their Parquet."""
    from mmh_jax import scoring
    from mmh_jax.experiments.stable_diffusion import detection_columns, score_pipeline

    texts = prompts.column("prompt")
    write_prompt_file(out / "prompts.jsonl", [str(i) for i in range(len(texts))], texts)
    with atomic_path(out / "prompt_images.npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            images=np.stack(prompts.column("image")).astype(np.float32),
            captions=np.asarray(texts),
            ids=np.asarray([str(i) for i in range(len(texts))]),
        )
    columns = detection_columns(guidance=config.guidance, flipd_t0=config.flipd_t0)
    host = [
        scoring.ImageSimilarity(
            similarity=judges.copies,
            reference=_no_reference,
            label="the world's copy judge (1: a copy)",
        ),
        scoring.ClipScore(
            clip_scorer=judges.fidelity,
            prompt=texts.__getitem__,
            label="the world's fidelity classifier",
        ),
    ]
    engine_console = console if config.progress else None
    n_img = config.images_per_prompt
    score_pipeline(
        sd,
        columns + host,
        scoring.PromptFile(out / "prompts.jsonl"),
        out / "detection",
        seed=config.seed,
        batch_size=config.batch_size * n_img,
        images_per_prompt=n_img,
        guidance=config.guidance,
        num_steps=config.num_steps,
        console=engine_console,
        record=record,
    )
    score_pipeline(
        sd,
        columns[:1],
        scoring.ArrayFile(out / "prompt_images.npz", captions_key="captions"),
        out / "detection_image",
        seed=config.seed,
        batch_size=config.batch_size,
        guidance=config.guidance,
        console=engine_console,
        record=record,
    )
    rows = scoring.merge(out / "detection").scores
    at_image = scoring.merge(out / "detection_image").scores
    image_norm = np.full(len(texts), np.nan)
    image_norm[at_image["index"].to_numpy()] = at_image["cfg_vector_norm"].to_numpy()
    ids, image_index = rows["index"].to_numpy(), rows["image_index"].to_numpy()
    order = np.lexsort((image_index, ids))
    names = {
        "cfg_norm": "cfg_vector_norm",
        "cfg_score": "cfg_score_norm",
        "flipd_uncond": columns[1].names[0],
        "flipd_cond": columns[2].names[0],
        "is_copy": "similarity",
        "fidelity": "clip_score",
    }
    table = {
        "prompt_id": ids[order],
        "image_index": image_index[order],
        "cfg_norm_image": image_norm[ids[order]],
    }
    table.update({k: rows[c].to_numpy()[order] for k, c in names.items()})
    for name in ("prompt", "kind", "count", "triggers"):
        table[name] = np.asarray(prompts.column(name))[ids[order]]
    return table


def _no_reference(_index: int, _image_index: int) -> None:
    """No reference image: the copy judge compares with the whole training set."""
    return None


def _prompt_means(table: dict) -> dict[str, np.ndarray]:
    """Per-prompt means of the per-image columns (prompt order)."""
    ids = np.asarray(table["prompt_id"])
    order = np.unique(ids)
    out = {"prompt_id": order}
    first = np.searchsorted(ids, order)
    for name in ("prompt", "kind", "count", "triggers"):
        out[name] = np.asarray(table[name])[first]
    counts = np.bincount(ids)[order]
    for name in (
        "cfg_norm",
        "cfg_score",
        "cfg_norm_image",
        "flipd_cond",
        "flipd_uncond",
        "is_copy",
        "fidelity",
    ):
        out[name] = np.bincount(ids, weights=np.asarray(table[name], np.float64))[order] / counts
    return out


def _detection_reports(means: dict, seed: int) -> dict[str, dict]:
    """``{group: {detector: DetectionMetrics}}`` for each memorized kind and all of them,
    against the held-out prompts."""
    import jax

    from mmh_jax.evaluation import detection_report

    kind = np.asarray(means["kind"])
    reports = {}
    for group, members in (
        ("verbatim", ("verbatim",)),
        ("template", ("template",)),
        ("rare", ("rare",)),
        ("all memorized", _KINDS),
    ):
        keep = np.isin(kind, members + ("heldout",))
        if not np.any(np.isin(kind, members)):
            continue
        labels = np.isin(kind[keep], members)
        reports[group] = detection_report(
            {name: np.asarray(means[col])[keep] for name, (col, _) in DETECTORS.items()},
            labels,
            higher_is_positive={n: hi for n, (_, hi) in DETECTORS.items()},
            fpr=0.01,
            key=jax.random.key(seed),
        )
    return reports


# --- attribution -------------------------------------------------------------------------------


def _hits(
    scores: np.ndarray, words: Sequence[str], triggers: set[str], k: int
) -> tuple[float, float]:
    """Whether one of the top-``k`` tokens is a trigger word, and the chance of that for ``k``
    tokens chosen uniformly without replacement."""
    is_trigger = np.asarray([w in triggers for w in words])
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    n, m, kk = len(words), int(is_trigger.sum()), min(k, len(words))
    baseline = 1.0 - math.comb(n - m, kk) / math.comb(n, kk)
    return float(np.any(is_trigger[top])), baseline


def _attribution_rows(attributions, triggers_of: dict[str, str], kind_of: dict[str, str]) -> dict:
    rows: dict[str, list] = {
        c: []
        for c in (
            "prompt",
            "kind",
            "metric",
            "words",
            "scores",
            "top1",
            "top1_uniform",
            "top3",
            "top3_uniform",
        )
    }
    for a in attributions:
        triggers = set(triggers_of[a.prompt].split())
        top1, base1 = _hits(a.scores, a.words, triggers, 1)
        top3, base3 = _hits(a.scores, a.words, triggers, 3)
        for name, value in (
            ("prompt", a.prompt),
            ("kind", kind_of[a.prompt]),
            ("metric", a.metric),
            ("words", " ".join(a.words)),
            ("scores", json.dumps([round(float(s), 6) for s in a.scores])),
            ("top1", top1),
            ("top1_uniform", base1),
            ("top3", top3),
            ("top3_uniform", base3),
        ):
            rows[name].append(value)
    return rows


# --- the run -----------------------------------------------------------------------------------


def _train(config: PromptWorldConfig, console: Console) -> Path:
    from mmh_jax.worlds import train_world_model

    world_spec, train_spec = specs(config.quick, config.train_steps)
    root = config.model if config.model is not None else config.out / "model"
    with make_progress(console, enabled=config.progress) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int, loss: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"training the {stage}", total=total)
            text = f"training the {stage}" + ("" if loss is None else f" (loss {loss:.4f})")
            bar.update(tasks[stage], completed=done, description=text)

        try:
            return train_world_model(root, world_spec, train_spec, progress=progress)
        except ValueError as err:
            raise DemoInputError(str(err)) from None


def _mitigation(pipeline: Path, prompts: _Prompts, judges: _Judges, world, rephraser, config):
    """Steps 4 and 5: ``sd mitigate`` over the verbatim prompts (``mitigation/``, its engine
    stages with the copy judge and the fidelity classifier as its scorers, every method and
    metric, and the two interventions with their public defaults, NeMo's reference being the
    calibration prompts) and ``sd attribute`` over the template prompts (``attribution_template/``); both
    resume where a killed run stopped. Returns the mitigation's result and the template
    prompts' attributions."""
    from mmh_jax.experiments.sd_mitigation import (
        AttributeConfig,
        MitigateConfig,
        Scorers,
        run_attribute,
        run_mitigate,
    )
    from mmh_jax.memorization import INTERVENTIONS, METHODS

    out = config.out
    files = {}
    for kind in ("verbatim", "template", "calibration"):
        chosen = [(str(i), r["prompt"]) for i, r in enumerate(prompts.rows) if r["kind"] == kind]
        files[kind] = write_prompt_file(out / f"{kind}.jsonl", *zip(*chosen))
    common = dict(
        model=pipeline,
        num_steps=config.num_steps,
        guidance=config.guidance,
        seed=config.seed,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    quiet = Console(quiet=True)  # the demo prints its own tables
    result, _, _ = run_mitigate(
        MitigateConfig(
            prompts=files["verbatim"],
            out=out / "mitigation",
            methods=METHODS + INTERVENTIONS,
            metrics=_METRICS,
            ks=config.ks,
            repeats=config.repeats,
            num_images=config.mitigation_images,
            nemo_reference=files["calibration"],
            **common,
        ),
        console=quiet,
        scorers=Scorers(
            judges.copies,
            judges.fidelity,
            "the world's copy judge (1: a copy)",
            "the world's fidelity classifier",
        ),
        rephraser=rephraser,
        vocabulary=world.fresh_words,
    )
    template, _ = run_attribute(
        AttributeConfig(
            prompts=files["template"],
            out=out / "attribution_template",
            metrics=_METRICS,
            **common,
        ),
        console=quiet,
    )
    return result, template


def _guard(sd, means: dict, judges: _Judges, rephraser, config: PromptWorldConfig) -> dict:
    """Step 6, the guarded sampler (a library call, :func:`~mmh_jax.memorization.guarded_generate`,
    not a scoring column: it decides per prompt whether to sample again): its table of the
    evaluation prompts, with the copy rates and fidelity the judges give."""
    import jax

    from mmh_jax.memorization import (
        attribute_prompts,
        calibrate_threshold,
        choose_tokens,
        guarded_generate,
        selected_words,
    )

    key = jax.random.key(config.seed + 1)
    kinds = np.asarray(means["kind"])
    threshold = calibrate_threshold(
        np.asarray(means["cfg_norm"])[kinds == "calibration"],
        target_fpr=config.target_fpr,
        higher_is_memorized=True,
    )
    chosen = [i for i, k in enumerate(kinds) if k != "calibration"]
    texts = [str(means["prompt"][i]) for i in chosen]

    def mitigate_one(prompt: str) -> str:
        k = jax.random.fold_in(key, 20_000 + texts.index(prompt))
        a = attribute_prompts(
            sd,
            prompt,
            metrics=["cfg"],
            key=k,
            num_images=1,
            num_steps=config.num_steps,
            guidance=config.guidance,
        )[0]
        words = selected_words(a.tokens, choose_tokens(a.scores, k=1, key=k))
        return rephraser(prompt, words)

    report = guarded_generate(
        sd,
        texts,
        key=jax.random.key(config.seed),
        threshold=threshold,
        mitigate=mitigate_one,
        images_per_prompt=config.images_per_prompt,
        guidance=config.guidance,
        num_steps=config.num_steps,
        batch_size=config.batch_size,
    )
    n_img = config.images_per_prompt
    before = _images_u8(sd, report.initial_latents)
    after = _images_u8(sd, report.latents)
    return {
        "prompt": np.asarray(texts),
        "kind": kinds[chosen],
        "signal": np.asarray([o.signal for o in report.outcomes]),
        "threshold": np.full(len(texts), report.threshold),
        "flagged": report.flagged,
        "final_prompt": np.asarray([o.final_prompt for o in report.outcomes]),
        "resampled": np.asarray([o.resampled for o in report.outcomes]),
        "copy_rate_unguarded": judges.copies(before).reshape(-1, n_img).mean(1),
        "copy_rate_guarded": judges.copies(after).reshape(-1, n_img).mean(1),
        "fidelity_guarded": judges.fidelity(after, np.repeat(texts, n_img))
        .reshape(-1, n_img)
        .mean(1),
    }


def run(config: PromptWorldConfig, *, console: Console | None = None) -> dict:
    """Run the demo; returns the summary (also written to ``summary.json``)."""
    import jax

    from mmh_jax.memorization import (
        SynonymRephraser,
    )
    from mmh_jax.models import load_stable_diffusion
    from mmh_jax.worlds import ShapesWorld, synonym_table

    config.validate()
    from mmh_jax.experiments.common import output_console

    console = console or output_console()
    out = prepare_out_dir(config.out)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pipeline = _train(config, console)
    timings["training (or loading the cache)"] = time.perf_counter() - t
    world_spec, train_spec = specs(config.quick, config.train_steps)
    world = ShapesWorld(world_spec)
    sd = load_stable_diffusion(pipeline)
    settings = {
        "world": world_spec.to_dict(),
        "train": train_spec.to_dict(),
        **{
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(config).items()
            if k not in ("out", "model", "progress")
        },
    }
    prompts = _Prompts(world, config)
    judges = _Judges(sd, world, config.seed, console)

    t = time.perf_counter()
    record = {"demo prompts": {k: settings[k] for k in ("world", "train")}}
    means = _prompt_means(_detection(sd, prompts, judges, config, out, record, console))
    timings["detection"] = time.perf_counter() - t
    reports = _detection_reports(means, config.seed)

    triggers_of = dict(zip(prompts.column("prompt"), prompts.column("triggers")))
    kind_of = dict(zip(prompts.column("prompt"), prompts.column("kind")))
    rephraser = SynonymRephraser(table=synonym_table(world), key=jax.random.key(config.seed))

    t = time.perf_counter()
    mitigation, template = _mitigation(pipeline, prompts, judges, world, rephraser, config)
    attribution = _attribution_rows([*mitigation.attributions, *template], triggers_of, kind_of)
    write_parquet(attribution, out / "attribution.parquet")
    timings["attribution and mitigation"] = time.perf_counter() - t

    t = time.perf_counter()
    guard = host_stage(
        out / "guard.parquet",
        settings,
        lambda: _guard(sd, means, judges, rephraser, config),
        what="the guarded sampler's results",
    )
    timings["guarded sampler"] = time.perf_counter() - t

    guard = {c: guard[c].to_numpy(zero_copy_only=False) for c in guard.column_names}
    summary = _summarise(means, reports, attribution, mitigation, guard, config, timings)
    files = _figures(out, means, summary)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(summary))
    files += [out / "summary.json", out / "results.md"]
    _print_summary(console, summary, files)
    return summary


def _binomial_ci(successes: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    z, p = 1.959964, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _summarise(
    means: dict,
    reports: dict,
    att: dict,
    mitigation: Any,
    guard: dict,
    config: PromptWorldConfig,
    timings: dict,
) -> dict:
    kind = np.asarray(means["kind"])
    summary: dict[str, Any] = {"quick": config.quick, "timings_s": timings}
    summary["copy_rate"] = {
        k: float(np.mean(means["is_copy"][kind == k]))
        for k in (*_KINDS, "heldout", "calibration")
        if np.any(kind == k)
    }
    summary["fidelity"] = {
        k: float(np.mean(means["fidelity"][kind == k]))
        for k in (*_KINDS, "heldout")
        if np.any(kind == k)
    }
    summary["detection"] = {
        group: {
            name: {
                "auroc": m.auroc,
                "auroc_ci": list(m.auroc_ci),
                "tpr_at_1pct_fpr": m.tpr,
                "tpr_ci": list(m.tpr_ci),
                "n_memorized": m.n_positive,
                "n_heldout": m.n_negative,
            }
            for name, m in rep.items()
        }
        for group, rep in reports.items()
    }
    counts = np.asarray(means["count"])
    summary["by_count"] = {
        int(c): {
            "cfg_norm": float(np.mean(means["cfg_norm"][(kind == "verbatim") & (counts == c)])),
            "flipd_cond": float(np.mean(means["flipd_cond"][(kind == "verbatim") & (counts == c)])),
            "copy_rate": float(np.mean(means["is_copy"][(kind == "verbatim") & (counts == c)])),
        }
        for c in np.unique(counts[kind == "verbatim"])
    }
    att = {k: np.asarray(v) for k, v in att.items()}
    summary["attribution"] = {}
    for metric in _METRICS:
        for group in ("verbatim", "template"):
            keep = (att["metric"] == metric) & (att["kind"] == group)
            if not np.any(keep):
                continue
            n = int(keep.sum())
            summary["attribution"][f"{metric}/{group}"] = {
                "top1": float(np.mean(att["top1"][keep])),
                "top1_ci": list(_binomial_ci(float(np.sum(att["top1"][keep])), n)),
                "top1_uniform": float(np.mean(att["top1_uniform"][keep])),
                "top3": float(np.mean(att["top3"][keep])),
                "top3_uniform": float(np.mean(att["top3_uniform"][keep])),
                "n": n,
            }
    mit = {k: np.asarray([r[k] for r in mitigation.rows]) for k in mitigation.rows[0]}
    orig = {k: np.asarray([r[k] for r in mitigation.originals]) for k in mitigation.originals[0]}
    summary["mitigation"] = {
        "unmitigated": {
            "copy_rate": float(np.mean(orig["similarity"])),
            "fidelity": float(np.mean(orig["clip_score"])),
        }
    }
    label = np.asarray(
        [f"{m} ({x})" if x else str(m) for m, x in zip(mit["method"], mit["metric"])]
    )
    for name in dict.fromkeys(label):
        for k in np.unique(mit["k"][label == name]):
            keep = (label == name) & (mit["k"] == k)
            summary["mitigation"][f"{name}, k={int(k)}" if k else name] = {
                "copy_rate": float(np.mean(mit["similarity"][keep])),
                "fidelity": float(np.mean(mit["clip_score"][keep])),
                "changed": float(np.mean(mit["changed"][keep])),
            }
    held = guard["kind"] == "heldout"
    memorized = np.isin(guard["kind"], _KINDS)
    summary["guard"] = {
        "target_fpr": config.target_fpr,
        "threshold": float(guard["threshold"][0]),
        "realised_fpr": float(np.mean(guard["flagged"][held])),
        "realised_fpr_ci": list(
            _binomial_ci(float(np.sum(guard["flagged"][held])), int(held.sum()))
        ),
        "detection_rate": {
            k: float(np.mean(guard["flagged"][guard["kind"] == k]))
            for k in _KINDS
            if np.any(guard["kind"] == k)
        },
        "copy_rate_unguarded": {
            k: float(np.mean(guard["copy_rate_unguarded"][guard["kind"] == k]))
            for k in (*_KINDS, "heldout")
            if np.any(guard["kind"] == k)
        },
        "copy_rate_guarded": {
            k: float(np.mean(guard["copy_rate_guarded"][guard["kind"] == k]))
            for k in (*_KINDS, "heldout")
            if np.any(guard["kind"] == k)
        },
        "n_heldout": int(held.sum()),
        "n_memorized": int(memorized.sum()),
    }
    return summary


def _ci(v: dict, key: str) -> str:
    lo, hi = v[key]
    return f"[{lo:.2f}, {hi:.2f}]"


def results_markdown(s: dict) -> str:
    """The tables of ``summary.json`` in Markdown (what ``benchmarks/RESULTS.md`` shows)."""
    lines = [
        "Detection, memorized vs held-out prompts: AUROC [95% CI] / TPR at 1% FPR [95% CI] "
        "(prompt means)",
        "",
    ]
    groups = list(s["detection"])
    lines += ["| detector | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
    for name in DETECTORS:
        cells = [
            f"{s['detection'][g][name]['auroc']:.3f} {_ci(s['detection'][g][name], 'auroc_ci')}"
            f" / {s['detection'][g][name]['tpr_at_1pct_fpr']:.2f} "
            f"{_ci(s['detection'][g][name], 'tpr_ci')}"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = {
        g: (
            s["detection"][g][next(iter(DETECTORS))]["n_memorized"],
            s["detection"][g][next(iter(DETECTORS))]["n_heldout"],
        )
        for g in groups
    }
    lines += [
        "",
        "Prompts (memorized / held-out): " + ", ".join(f"{g} {a} / {b}" for g, (a, b) in n.items()),
        "",
    ]
    lines += [
        "Copy rate and fidelity per kind (generations of the prompt):",
        "",
        "| kind | copy rate | fidelity |",
        "| --- | --- | --- |",
    ]
    for k, v in s["copy_rate"].items():
        lines.append(f"| {k} | {v:.3f} | {s['fidelity'].get(k, float('nan')):.3f} |")
    lines += [
        "",
        "Verbatim prompts by duplicate count:",
        "",
        "| count | CFG norm | conditional FLIPD | copy rate |",
        "| --- | --- | --- | --- |",
    ]
    for c, v in s["by_count"].items():
        lines.append(
            f"| {c} | {v['cfg_norm']:.3f} | {v['flipd_cond']:.1f} | {v['copy_rate']:.2f} |"
        )
    lines += [
        "",
        "Attribution: the top-ranked token is a trigger word (95% CI), against a uniform choice:",
        "",
        "| metric / prompts | n | top-1 | uniform | top-3 | uniform |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in s["attribution"].items():
        lines.append(
            f"| {name} | {v['n']} | {v['top1']:.2f} {_ci(v, 'top1_ci')} | "
            f"{v['top1_uniform']:.2f} | {v['top3']:.2f} | {v['top3_uniform']:.2f} |"
        )
    lines += [
        "",
        "Mitigation of verbatim prompts (copy rate, fidelity against the original caption):",
        "",
        "| method | copy rate | fidelity |",
        "| --- | --- | --- |",
    ]
    for name, v in s["mitigation"].items():
        lines.append(f"| {name} | {v['copy_rate']:.3f} | {v['fidelity']:.3f} |")
    g = s["guard"]
    lines += [
        "",
        f"Guarded sampler (CFG norm, threshold {g['threshold']:.4f} calibrated at "
        f"{g['target_fpr']:.0%} FPR): realised FPR {g['realised_fpr']:.3f} "
        f"{_ci(g, 'realised_fpr_ci')} on {g['n_heldout']} held-out prompts; detection "
        "rate " + ", ".join(f"{k} {v:.2f}" for k, v in g["detection_rate"].items()),
        "",
        "| kind | copy rate without the guard | with the guard |",
        "| --- | --- | --- |",
    ]
    for k in g["copy_rate_unguarded"]:
        lines.append(
            f"| {k} | {g['copy_rate_unguarded'][k]:.3f} | {g['copy_rate_guarded'][k]:.3f} |"
        )
    lines += [
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


# --- figures and printing ----------------------------------------------------------------------


def _figures(out: Path, means: dict, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmh_jax.evaluation import roc_curves

    kind = np.asarray(means["kind"])
    keep = np.isin(kind, ("verbatim", "heldout"))
    files = [
        roc_curves(
            {n: np.asarray(means[c])[keep] for n, (c, _) in DETECTORS.items()},
            kind[keep] == "verbatim",
            path=out / "roc_verbatim.png",
            higher_is_positive={n: h for n, (_, h) in DETECTORS.items()},
            title="verbatim vs held-out prompts",
        )
    ]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.2), width_ratios=(1, 1, 1, 1.3))
    ax = axes[0]
    colours = {"verbatim": "C3", "template": "C1", "rare": "C2", "heldout": "C0"}
    counts = np.asarray(means["count"], np.float64)
    for k, c in colours.items():
        sel = kind == k
        x = (
            counts[sel]
            if k == "verbatim"
            else np.full(sel.sum(), {"template": 96, "rare": 1, "heldout": 0.5}[k])
        )
        ax.scatter(x, means["cfg_norm"][sel], s=14, c=c, label=k, alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("duplicate count (held-out at 1/2, template at 96)")
    ax.set_ylabel("CFG norm of the generations")
    ax.set_title("(a) CFG norm against duplicate count")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k, c in colours.items():
        sel = kind == k
        ax.scatter(
            means["flipd_cond"][sel],
            means["is_copy"][sel] + np.random.default_rng(0).uniform(-0.03, 0.03, sel.sum()),
            s=14,
            c=c,
            label=k,
            alpha=0.8,
        )
    ax.set_xlabel("conditional FLIPD of the generations")
    ax.set_ylabel("copy rate of the prompt (jittered)")
    ax.set_title("(b) copy rate against conditional FLIPD")
    ax = axes[2]
    names = [k for k in summary["attribution"] if k.endswith("verbatim")] + [
        k for k in summary["attribution"] if k.endswith("template")
    ]
    top1 = [summary["attribution"][n]["top1"] for n in names]
    base = [summary["attribution"][n]["top1_uniform"] for n in names]
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, top1, 0.4, label="top-1 attribution")
    ax.bar(pos + 0.2, base, 0.4, label="uniform choice")
    ax.set_xticks(pos, [n.replace("/", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("P(top token is a trigger)")
    ax.set_title("(c) is the top attributed token a trigger?")
    ax.legend(fontsize=8)
    ax = axes[3]
    mit = summary["mitigation"]
    names = list(mit)[::-1]  # unmitigated on top
    rates = [mit[n]["copy_rate"] for n in names]
    pos = np.arange(len(names))
    ax.barh(pos, rates, color=["grey" if n == "unmitigated" else "C0" for n in names])
    for y, n in zip(pos, names):
        ax.text(
            mit[n]["copy_rate"] + 0.005,
            y,
            f"fidelity {mit[n]['fidelity']:.2f}",
            va="center",
            fontsize=6,
        )
    ax.set_yticks(pos, names, fontsize=7)
    ax.axvline(mit["unmitigated"]["copy_rate"] / 2, ls="--", c="grey", lw=1)
    ax.set_xlim(0, max(rates + [0.05]) * 1.35)
    ax.set_xlabel(
        "copy rate (dashed: half the unmitigated rate); held-out fidelity "
        f"{summary['fidelity'].get('heldout', float('nan')):.2f}"
    )
    ax.set_title("(d) mitigation of verbatim prompts")
    fig.tight_layout()
    files.append(save_figure(fig, out / "prompt_world.png"))
    plt.close(fig)
    return files


def _print_summary(console: Console, s: dict, files: list[Path]) -> None:
    table = Table(
        title="Detection: memorized prompts vs held-out prompts (AUROC [95% CI], TPR at 1% FPR)"
    )
    table.add_column("detector")
    groups = list(s["detection"])
    for g in groups:
        table.add_column(g)
    for name in DETECTORS:
        cells = []
        for g in groups:
            m = s["detection"][g][name]
            cells.append(
                f"{m['auroc']:.3f} [{m['auroc_ci'][0]:.2f}, {m['auroc_ci'][1]:.2f}]"
                f"  {m['tpr_at_1pct_fpr']:.2f}"
            )
        table.add_row(name, *cells)
    console.print(table)
    console.print(
        "copy rate per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in s["copy_rate"].items())
    )
    att = Table(title="Attribution: the top token is a trigger word")
    for c in ("metric / prompts", "top-1", "uniform", "top-3", "uniform "):
        att.add_column(c)
    for name, v in s["attribution"].items():
        att.add_row(
            name,
            f"{v['top1']:.2f}",
            f"{v['top1_uniform']:.2f}",
            f"{v['top3']:.2f}",
            f"{v['top3_uniform']:.2f}",
        )
    console.print(att)
    mit = Table(title="Mitigation of verbatim prompts")
    for c in ("method", "copy rate", "fidelity"):
        mit.add_column(c)
    for name, v in s["mitigation"].items():
        mit.add_row(name, f"{v['copy_rate']:.2f}", f"{v['fidelity']:.2f}")
    console.print(mit)
    g = s["guard"]
    console.print(
        f"guarded sampler: target FPR {g['target_fpr']:.2f}, realised "
        f"{g['realised_fpr']:.3f} [{g['realised_fpr_ci'][0]:.3f}, "
        f"{g['realised_fpr_ci'][1]:.3f}] on {g['n_heldout']} held-out prompts; "
        "detection rate " + ", ".join(f"{k} {v:.2f}" for k, v in g["detection_rate"].items())
    )
    console.print(
        "copy rate without / with the guard: "
        + ", ".join(
            f"{k} {g['copy_rate_unguarded'][k]:.2f} / {g['copy_rate_guarded'][k]:.2f}"
            for k in g["copy_rate_unguarded"]
        )
    )
    console.print("wrote " + ", ".join(str(f) for f in files))


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mmh-jax demo prompts``."""
    d = PromptWorldConfig()
    parser.add_argument("--out", type=Path, default=d.out, help="output folder (%(default)s)")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="the world model's folder (default OUT/model; trained there on the "
        "first run, resumed if interrupted, reused afterwards)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small world and model (about a minute of training) for a smoke "
        "test; its numbers are not the demo's",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        metavar="N",
        help="UNet and text-encoder training steps (default: the recipe's); "
        "another value is another model, so give it its own --out or "
        "--model",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the sampling noise, probes and token draws (%(default)s)",
    )
    parser.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt, metavar="N")
    parser.add_argument(
        "--num-steps", type=int, default=d.num_steps, metavar="N", help="DDIM steps (%(default)s)"
    )
    parser.add_argument("--guidance", type=finite_float, default=d.guidance, metavar="W")
    parser.add_argument(
        "--num-heldout",
        type=int,
        default=d.num_heldout,
        metavar="N",
        help="held-out prompts of the detection and guard evaluation",
    )
    parser.add_argument(
        "--num-calibration",
        type=int,
        default=d.num_calibration,
        metavar="N",
        help="held-out prompts that calibrate the guard's threshold",
    )
    parser.add_argument("--flipd-t0", type=finite_float, default=d.flipd_t0, metavar="T")
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=list(d.ks),
        metavar="K",
        help="tokens changed by the text mitigations (%(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=d.repeats, metavar="N")
    parser.add_argument("--mitigation-images", type=int, default=d.mitigation_images, metavar="N")
    parser.add_argument(
        "--target-fpr",
        type=finite_float,
        default=d.target_fpr,
        metavar="P",
        help="the guard's false-positive rate (%(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> PromptWorldConfig:
    """The config of parsed ``demo prompts`` flags."""
    return PromptWorldConfig(
        out=args.out,
        model=args.model,
        quick=args.quick,
        train_steps=args.train_steps,
        seed=args.seed,
        images_per_prompt=args.images_per_prompt,
        num_steps=args.num_steps,
        guidance=args.guidance,
        num_heldout=args.num_heldout,
        num_calibration=args.num_calibration,
        flipd_t0=args.flipd_t0,
        ks=tuple(args.ks),
        repeats=args.repeats,
        mitigation_images=args.mitigation_images,
        target_fpr=args.target_fpr,
        batch_size=args.batch_size,
        progress=args.progress,
    )
