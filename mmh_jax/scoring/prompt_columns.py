"""Columns of images generated from prompts: token attributions on the generation's own DDIM
trajectory (a device column) and, on the decoded image, a similarity to a reference image, a
CLIP score against a prompt, and the image itself saved as a PNG (host columns, computed by the
engine on every image it generates from a prompt; the model must decode, as
:meth:`~mmh_jax.scoring.Model.from_stable_diffusion`'s does). ``mmh-jax sd mitigate``'s stages
are built from them (paper, Section 4.2, Appendix D.2-D.5).

| column | values | paper |
| --- | --- | --- |
| :class:`TokenAttributions` | ``attribution_<metric>`` (a vector per image: every token position), ``attribution_value_<metric>`` | Sec. 4.2, App. D.2 |
| :class:`ImageSimilarity` | ``similarity`` to the item's reference image | Sec. 4.2, Fig. 7c |
| :class:`ClipScore` | ``clip_score`` against the item's prompt | Sec. 4.2, Fig. 7c |
| :class:`SavedImage` | ``saved``: 1 where the image was written as a PNG | Fig. 10 |
| :class:`EmbeddingMitigation` | ``metric_before``, ``metric_after``, ``updates``; the image becomes the mitigated one | App. D.3, Fig. 9 |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from mmh_jax._src.files import atomic_path
from mmh_jax.memorization.attribution import default_attribution_steps
from mmh_jax.memorization.prompt import (
    optimize_embedding_traced,
    token_attributions,
    trajectory_points,
)
from mmh_jax.sampling import ddim_sample
from mmh_jax.scoring.columns import (
    Inputs,
    _column,
    _generated,
    _PromptColumn,
    _require,
    _text_model,
)
from mmh_jax.scoring.model import Model

__all__ = ["TokenAttributions", "EmbeddingMitigation", "ImageSimilarity", "ClipScore", "SavedImage"]


@_column()
class TokenAttributions(_PromptColumn):
    """Per token position, the norm of the gradient of a memorization metric with respect to
    the token's embedding, averaged over the points of the image's own DDIM trajectory
    (:func:`~mmh_jax.memorization.prompt.token_attributions`; Wen et al.; paper, Section 4.2).

    Computed per generated image: the attribution of a prompt over several images is the mean
    of its images' rows (every image contributes the same number of points). ``steps``: the
    trajectory's step indices (default :func:`~mmh_jax.memorization.default_attribution_steps`).
    """

    metric: Literal["cfg", "cfg_score", "flipd"] = "flipd"
    steps: tuple[int, ...] | None = None
    guidance: float = 7.5
    num_probes: int = 1

    def __post_init__(self):
        if self.metric not in ("cfg", "cfg_score", "flipd"):
            raise ValueError(
                f"token_attributions metric must be cfg, cfg_score or flipd, got {self.metric!r}"
            )
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    @property
    def names(self) -> tuple[str, ...]:
        return (f"attribution_{self.metric}", f"attribution_value_{self.metric}")

    def check(self, model: Model) -> None:
        _text_model(model, "token_attributions")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        trajectory = _generated(inputs, "token_attributions")
        steps = self.steps or default_attribution_steps(self.metric, trajectory.latents.shape[0])

        def one(args):
            latents, cond, key = args
            points = trajectory_points(
                trajectory._replace(latents=latents[:, None]), schedule=model.schedule, steps=steps
            )
            found = token_attributions(
                model.eps_fn,
                cond[None],
                model.uncond,
                points,
                metric=self.metric,
                schedule=model.schedule,
                guidance=self.guidance,
                key=key,
                num_probes=self.num_probes,
            )
            return found.scores, found.value

        scores, values = jax.lax.map(
            one, (jnp.moveaxis(trajectory.latents, 1, 0), inputs.context, keys)
        )
        return dict(zip(self.names, (scores, values)))


@_column()
class EmbeddingMitigation(_PromptColumn):
    """The embedding mitigation of a generated image (Wen et al.; paper, Appendix D.3, Figure
    9): the prompt's embedding optimised by AdamW on ``metric`` at the latents of DDIM step
    ``step`` of the image's own trajectory
    (:func:`~mmh_jax.memorization.prompt.optimize_embedding_traced`, as
    :func:`~mmh_jax.memorization.mitigate` does), then the image sampled again from the same
    starting noise with the optimised embedding. That image replaces the generated one
    (``makes_points``): the columns after it, the host columns included (similarity, CLIP
    score, saved PNG), see the mitigated image.

    Values per image: ``metric_before`` and ``metric_after`` (``A(c)`` before the first update
    and after the last), ``updates`` (AdamW updates made; fewer than ``num_updates`` when
    ``target`` was reached). The settings are
    :class:`~mmh_jax.memorization.EmbeddingSettings`' (default
    :func:`~mmh_jax.memorization.embedding_defaults`); ``guidance`` is the sampler's, used by
    the metric and the new sample. Each image is optimised on its own points, with its own
    probe key: for one image per prompt, :func:`~mmh_jax.memorization.mitigate`'s optimisation.
    """

    metric: Literal["cfg", "cfg_score", "flipd"] = "flipd"
    step: int = 40
    learning_rate: float = 0.05
    num_updates: int = 20
    target: float | None = None
    guidance: float = 7.5
    num_probes: int = 1

    makes_points: ClassVar[bool] = True
    names: ClassVar[tuple[str, ...]] = ("metric_before", "metric_after", "updates")

    def __post_init__(self):
        if self.metric not in ("cfg", "cfg_score", "flipd"):
            raise ValueError(
                f"embedding_mitigation metric must be cfg, cfg_score or flipd, got {self.metric!r}"
            )
        for name in ("num_updates", "num_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"embedding_mitigation {name} must be an integer >= 1, got {value!r}"
                )
        if not self.learning_rate > 0:
            raise ValueError(
                f"embedding_mitigation learning_rate must be > 0, got {self.learning_rate!r}"
            )

    def check(self, model: Model) -> None:
        _text_model(model, "embedding_mitigation")
        _require(
            model.ddim_grid is not None,
            "embedding_mitigation",
            "a text-conditional model (Stable Diffusion)",
        )

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        trajectory = _generated(inputs, "embedding_mitigation", "noise")
        num_steps = trajectory.latents.shape[0]
        if not -num_steps <= self.step < num_steps:
            raise ValueError(
                f"embedding_mitigation step {self.step} out of range for {num_steps} DDIM steps"
            )

        def one(args):
            latents, noise, cond, key = args
            points = trajectory_points(
                trajectory._replace(latents=latents[:, None]),
                schedule=model.schedule,
                steps=[self.step],
            )
            opt = optimize_embedding_traced(
                model.eps_fn,
                cond[None],
                model.uncond,
                points,
                metric=self.metric,
                schedule=model.schedule,
                guidance=self.guidance,
                learning_rate=self.learning_rate,
                num_steps=self.num_updates,
                target=self.target,
                key=key,
                num_probes=self.num_probes,
            )
            sample = ddim_sample(
                model.eps_fn,
                noise[None],
                opt.embedding,
                model.uncond,
                schedule=model.schedule,
                guidance=self.guidance,
                num_steps=num_steps,
                grid=model.ddim_grid,
            ).sample
            return (
                opt.values[0],
                opt.values[opt.steps_taken],
                opt.steps_taken,
                sample[0].astype(inputs.points.dtype),
            )

        before, after, updates, points = jax.lax.map(
            one, (jnp.moveaxis(trajectory.latents, 1, 0), inputs.noise, inputs.context, keys)
        )
        return {
            "metric_before": before,
            "metric_after": after,
            "updates": updates,
            "points": points,
        }


def _one_value(values: Any, name: str) -> float:
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} returned {values.size} values for 1 image")
    return float(values[0])


class _ImageHostColumn:
    """What the host columns of generated images share: one call per image, on the host."""

    on_host: ClassVar[bool] = True
    needs_text: ClassVar[bool] = False
    per_item: ClassVar[bool] = True

    def describe(self) -> dict[str, Any]:
        return {"label": self.label}


@dataclasses.dataclass(frozen=True)
class ImageSimilarity(_ImageHostColumn):
    """``similarity(image, reference)`` of each generated image (uint8 ``[h, w, 3]``) to its
    item's reference: ``reference(index, image_index)``, or the image itself where that gives
    ``None``. ``label`` names the scorer and the references in the run record."""

    similarity: Callable[[np.ndarray, np.ndarray], Any]
    reference: Callable[[int, int], np.ndarray | None]
    label: str

    names: ClassVar[tuple[str, ...]] = ("similarity",)

    def check(self, model: Model) -> None:
        _require(callable(self.similarity), "similarity", "a callable (images_a, images_b) -> [b]")

    def host(self, image: np.ndarray, *, index: int, image_index: int) -> dict[str, float]:
        reference = self.reference(index, image_index)
        reference = image if reference is None else reference
        return {
            "similarity": _one_value(self.similarity(image[None], reference[None]), "similarity")
        }


@dataclasses.dataclass(frozen=True)
class ClipScore(_ImageHostColumn):
    """``clip_scorer(image, prompt)`` of each generated image against its item's prompt
    ``prompt(index)`` (for a mitigated prompt: the original one). ``label`` names the scorer in
    the run record."""

    clip_scorer: Callable[[np.ndarray, list[str]], Any]
    prompt: Callable[[int], str]
    label: str

    names: ClassVar[tuple[str, ...]] = ("clip_score",)

    def check(self, model: Model) -> None:
        _require(callable(self.clip_scorer), "clip_score", "a callable (images, prompts) -> [b]")

    def host(self, image: np.ndarray, *, index: int, image_index: int) -> dict[str, float]:
        return {
            "clip_score": _one_value(
                self.clip_scorer(image[None], [self.prompt(index)]), "clip_scorer"
            )
        }


@dataclasses.dataclass(frozen=True)
class SavedImage(_ImageHostColumn):
    """Writes the generated images that ``keep(index, image_index)`` picks to
    ``folder/{index}-{image_index}.png`` (atomically; a rerun writes the same bytes);
    ``saved`` is 1 for those, else 0. :func:`saved_image_path` names the file."""

    folder: str
    keep: Callable[[int, int], bool]
    label: str = "all"

    names: ClassVar[tuple[str, ...]] = ("saved",)

    def check(self, model: Model) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "keep": self.label}

    def host(self, image: np.ndarray, *, index: int, image_index: int) -> dict[str, float]:
        if not self.keep(index, image_index):
            return {"saved": 0.0}
        from PIL import Image

        with atomic_path(saved_image_path(self.folder, index, image_index)) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return {"saved": 1.0}


def saved_image_path(folder: str | Path, index: int, image_index: int) -> Path:
    """Where :class:`SavedImage` writes image ``image_index`` of item ``index``."""
    return Path(folder) / f"{index}-{image_index}.png"
