"""The columns the scoring engine computes: each a small pytree of settings (and reference data).

A device column is called inside the engine's jitted, sharded step on one device's share of the
batch, ``column(model, inputs, keys) -> {name: [b]}``, with one PRNG key per item (already
specific to the column), so its values depend only on the item and the seed. A host column
(``on_host = True``) is computed in the input pipeline's threads from the decoded image.

| column | values | paper |
| --- | --- | --- |
| :class:`Flipd` | ``flipd_<t0>`` (``flipd_cond_<t0>`` under the caption's CFG score) | Eq. 6, Eq. 26 |
| :class:`NormalBundle` | ``normal_bundle_<t0>`` (and its spectrum) | Eqs. 7-8, App. C.1 |
| :class:`CFGNorms` | ``cfg_vector_norm``, ``cfg_score_norm`` of image-caption pairs | Sec. 3.2, App. C |
| :class:`JacobianRank` | ``jacobian_rank`` of a generator at the latent (and its spectrum) | App. B.3, C.1 |
| :class:`Pixels` | ``pixels``: the item's (generated) image, uint8 ``h*w*c`` | Sec. 4 |
| :class:`NearestNeighbour` | ``nn_l2``, ``nn_index``: the closest reference item | Sec. 4 |
| :class:`PngSize` | ``png_bytes``: PNG length at compression level 9 (image complexity) | App. E |
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import ClassVar, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, Float, Int

from mmh_jax._src.images import to_uint8
from mmh_jax._src.knn import knn_in_blocks
from mmh_jax.guidance import cfg_score_fn
from mmh_jax.lid import flipd, jacobian_rank, normal_bundle
from mmh_jax.memorization.conditional import generation_cfg_norms, image_cfg_norms
from mmh_jax.sampling import DDIMResult
from mmh_jax.scoring.model import Model

__all__ = [
    "Inputs",
    "Column",
    "Flipd",
    "NormalBundle",
    "CFGNorms",
    "JacobianRank",
    "NearestNeighbour",
    "PngSize",
    "Pixels",
]


class Inputs(NamedTuple):
    """One device's share of a batch, as the columns see it."""

    points: Float[Array, "b *shape"]
    """Items in the model's space (pixels in ``[-1, 1]``, latents)."""
    images: Float[Array, "b c h w"] | None
    """The images in ``[-1, 1]`` before encoding (``None`` for array items)."""
    context: Float[Array, "b n dim"] | None
    """The captions' embeddings (``None`` without captions)."""
    trajectory: DDIMResult | None = None
    """For items generated from prompts: the DDIM trajectory that made ``points``."""
    labels: Int[Array, " b"] | None = None
    """The items' classes, for a class-conditional generator (``None`` otherwise)."""
    tokens: Int[Array, "b n"] | None = None
    """The captions' token ids (``None`` without captions)."""
    noise: Float[Array, "b *shape"] | None = None
    """For items generated from prompts: each image's starting noise (image ``j`` of every
    prompt starts from the same noise, :mod:`mmh_jax._src.noise`), for a column that generates
    again from it (``makes_points``)."""


class Column(Protocol):
    """What the engine asks of a column.

    A device column of images generated from prompts may set ``makes_points = True``: it then
    returns, besides its values, ``"points"`` (``[b, *shape]``), which replace
    :attr:`Inputs.points` for the columns after it and for the images the host columns read
    (e.g. the image of a mitigated prompt embedding, from the same starting noise).
    """

    on_host: ClassVar[bool]
    needs_text: ClassVar[bool]

    @property
    def names(self) -> tuple[str, ...]:
        """The output columns, in order."""

    def check(self, model: Model) -> None:
        """Raise ``ValueError`` if ``model`` lacks what the column needs."""


def _column(*data_fields: str):
    """A frozen dataclass registered as a pytree: ``data_fields`` are arrays (replicated on
    the devices), every other field is a static setting."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        meta = [f.name for f in dataclasses.fields(cls) if f.name not in data_fields]
        return jax.tree_util.register_dataclass(
            cls, data_fields=list(data_fields), meta_fields=meta
        )

    return wrap


def _times(t0: float | tuple[float, ...], name: str) -> tuple[float, ...]:
    values = (t0,) if isinstance(t0, (int, float)) else tuple(t0)
    if not values or not all(isinstance(t, (int, float)) and 0 < t <= 1 for t in values):
        raise ValueError(f"{name} must be a time in (0, 1] or a non-empty list of them, got {t0!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a time twice: {t0!r}")
    return tuple(float(t) for t in values)


def _require(condition: bool, column: str, what: str) -> None:
    if not condition:
        raise ValueError(f"column {column!r} needs {what}")


def _text_model(
    model: Model, column: str, what: str = "a text-conditional model (Stable Diffusion)"
) -> None:
    _require(model.eps_fn is not None and model.embed is not None, column, what)


def _caption_score_fn(model: Model, inputs: Inputs, guidance: float) -> Partial:
    """The CFG-adjusted score given each item's caption (paper, Eq. 2)."""
    return cfg_score_fn(
        model.eps_fn, inputs.context, model.uncond, schedule=model.schedule, guidance=guidance
    )


class _PromptColumn:
    """What a device column of text-conditional items declares: it needs the captions, and
    of images generated from prompts it reads the generation's DDIM trajectory."""

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = True
    reads_trajectory: ClassVar[bool] = True


def _generated(inputs: Inputs, column: str, *fields: str) -> DDIMResult:
    """The DDIM trajectory of images generated from prompts (which also carry the ``fields``
    of ``inputs`` named), else a ValueError naming the column."""
    if inputs.trajectory is None or any(getattr(inputs, f) is None for f in fields):
        raise ValueError(f"{column} needs images generated from prompts")
    return inputs.trajectory


@_column()
class Flipd:
    """FLIPD at one or several ``t0`` (paper, Eq. 6), the same Hutchinson probes at each.

    With ``conditional=True`` the score is Stable Diffusion's CFG score given the item's
    caption at ``guidance`` (``LID_theta(x | c)``, Eq. 26); otherwise the unconditional score.
    """

    t0: float | tuple[float, ...] = (0.05,)
    num_probes: int = 1
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    conditional: bool = False
    guidance: float = 7.5

    on_host: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "t0", _times(self.t0, "flipd t0"))
        if (
            isinstance(self.num_probes, bool)
            or not isinstance(self.num_probes, int)
            or self.num_probes < 1
        ):
            raise ValueError(f"flipd num_probes must be an integer >= 1, got {self.num_probes!r}")

    @property
    def needs_text(self) -> bool:
        return self.conditional

    @property
    def names(self) -> tuple[str, ...]:
        prefix = "flipd_cond" if self.conditional else "flipd"
        return tuple(f"{prefix}_{t:g}" for t in self.t0)

    def check(self, model: Model) -> None:
        _require(model.score_fn is not None, "flipd", "a diffusion model's score function")
        if self.conditional:
            _text_model(model, "flipd", "a text-conditional model for conditional=true")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        score_fn = model.score_fn
        if self.conditional:
            score_fn = _caption_score_fn(model, inputs, self.guidance)
        return {
            name: flipd(
                score_fn,
                inputs.points,
                t0=t,
                schedule=model.schedule,
                key=keys,
                num_probes=self.num_probes,
                probe=self.probe,
            )
            for name, t in zip(self.names, self.t0)
        }


@_column()
class NormalBundle:
    """The normal-bundle LID (paper, Eqs. 7-8) at each ``t0``; with ``spectrum=True`` also its
    singular values per item (``normal_bundle_sv_<t0>``, descending), for a threshold pooled
    over all items afterwards (App. C.1, :func:`mmh_jax.lid.percentile_threshold`)."""

    t0: float | tuple[float, ...] = (0.05,)
    num_scores: int | None = None
    threshold: Literal["gap"] | float = "gap"
    spectrum: bool = False

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "t0", _times(self.t0, "normal_bundle t0"))

    @property
    def names(self) -> tuple[str, ...]:
        names = tuple(f"normal_bundle_{t:g}" for t in self.t0)
        if self.spectrum:
            names += tuple(f"normal_bundle_sv_{t:g}" for t in self.t0)
        return names

    def check(self, model: Model) -> None:
        _require(model.score_fn is not None, "normal_bundle", "a diffusion model's score function")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        out = {}
        for t in self.t0:
            result = normal_bundle(
                model.score_fn,
                inputs.points,
                t0=t,
                schedule=model.schedule,
                key=keys,
                num_scores=self.num_scores,
                threshold=self.threshold,
            )
            out[f"normal_bundle_{t:g}"] = result.lid
            if self.spectrum:
                out[f"normal_bundle_sv_{t:g}"] = result.singular_values
        return out


@_column()
class CFGNorms(_PromptColumn):
    """Wen et al.'s CFG vector norm and the CFG-adjusted score norm (paper, Sec. 3.2).

    Of image-caption pairs: read at ``t0`` after ``num_steps`` Euler steps of the conditional
    PF-ODE (App. C). Of images generated from prompts: averaged over the sampler's own steps
    (``t0`` and ``num_steps`` do not apply).
    """

    guidance: float = 7.5
    t0: float = 0.01
    num_steps: int = 3

    names: ClassVar[tuple[str, ...]] = ("cfg_vector_norm", "cfg_score_norm")

    def check(self, model: Model) -> None:
        _text_model(model, "cfg_norms")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        if inputs.trajectory is not None:
            norms = generation_cfg_norms(
                inputs.trajectory, schedule=model.schedule, guidance=self.guidance
            )
            return dict(zip(self.names, norms))
        norms = image_cfg_norms(
            model.eps_fn,
            inputs.points,
            inputs.context,
            model.uncond,
            schedule=model.schedule,
            guidance=self.guidance,
            t0=self.t0,
            num_steps=self.num_steps,
        )
        return dict(zip(self.names, norms))


@_column()
class JacobianRank:
    """LID of a generator at the latent: the numerical rank of its Jacobian (App. B.3), with
    respect to the latent only (a class-conditional generator's class is held fixed); with
    ``spectrum=True`` also the singular values per item (``jacobian_singular_values``,
    descending), for a threshold pooled over all items afterwards (App. C.1,
    :func:`mmh_jax.lid.percentile_threshold`)."""

    threshold: float = 1e-3
    spectrum: bool = False
    chunk_size: int | None = None
    """Latent directions per batched ``jvp`` (:func:`mmh_jax.lid.jacobian_rank`)."""

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False

    @property
    def names(self) -> tuple[str, ...]:
        return (
            ("jacobian_rank", "jacobian_singular_values") if self.spectrum else ("jacobian_rank",)
        )

    def check(self, model: Model) -> None:
        _require(model.generator is not None, "jacobian_rank", "a generator (Model.from_generator)")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        fn, latent = _generator_at(model, inputs)
        result = jacobian_rank(fn, latent, threshold=self.threshold, chunk_size=self.chunk_size)
        out = {"jacobian_rank": result.lid}
        if self.spectrum:
            out["jacobian_singular_values"] = result.singular_values
        return out


def _labelled(generator, labels: Array, latent: Array) -> Array:
    return generator(latent, labels)


def _generator_at(model: Model, inputs: Inputs) -> tuple[Partial, Array]:
    """``(fn, latent)``: the model's generator as a function of the latent alone (the items'
    classes held fixed) and the latent it is evaluated at (``mapping(z, labels)``, or ``z``)."""
    latent = inputs.points
    if model.mapping is not None:
        latent = model.mapping(inputs.points, inputs.labels)
    if model.num_classes:
        return Partial(_labelled, model.generator, inputs.labels), latent
    return model.generator, latent


@_column()
class Pixels:
    """The item's image as uint8 ``[h, w, c]``, flattened to a vector (``pixels``): a
    generator's output at the item's latent, or the item's (generated) pixel image, each
    converted from ``[-1, 1]`` by the one rule ``clip(round((x + 1) 127.5), 0, 255)``
    (``mmh_jax._src.images.to_uint8``). Later stages (retrieval, PNG length, figures) read the
    images from the Parquet instead of generating them again."""

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    names: ClassVar[tuple[str, ...]] = ("pixels",)

    def check(self, model: Model) -> None:
        _require(
            model.generator is not None or (model.encode is None and len(model.shape) == 3),
            "pixels",
            "a generator or a pixel-space model",
        )

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        if model.generator is not None:
            fn, latent = _generator_at(model, inputs)
            x = fn(latent)
        else:
            x = inputs.images if inputs.images is not None else inputs.points
        return {"pixels": to_uint8(x.astype(jnp.float32)).reshape(x.shape[0], -1)}


@_column("reference")
class NearestNeighbour:
    """Euclidean distance to the closest item of a reference set (e.g. the training set) and its
    index: a verbatim copy has distance 0. Compared in the items' input space: images in
    ``[-1, 1]`` (before any encoder) or the array items themselves."""

    reference: Float[Array, "n *shape"]
    chunk_size: int = 4096

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    names: ClassVar[tuple[str, ...]] = ("nn_l2", "nn_index")

    def check(self, model: Model) -> None:
        shape = tuple(self.reference.shape[1:])
        _require(
            self.reference.ndim >= 2 and self.reference.shape[0] >= 1,
            "nearest_neighbour",
            f"a reference set [n, ...] with n >= 1, got shape {self.reference.shape}",
        )
        _require(
            shape in (model.image_shape, model.shape),
            "nearest_neighbour",
            f"reference items shaped like the items ({model.image_shape or model.shape}), "
            f"got {shape}",
        )

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        x = inputs.images if inputs.images is not None else inputs.points
        reference = self.reference.reshape(self.reference.shape[0], -1).astype(jnp.float32)
        sq, index = knn_in_blocks(
            reference, x.reshape(x.shape[0], -1).astype(jnp.float32), k=1, block=self.chunk_size
        )
        return {"nn_l2": jnp.sqrt(sq[:, 0]), "nn_index": index[:, 0]}


@_column()
class PngSize:
    """The length in bytes of the image as a PNG at compression level 9, encoded by OpenCV as
    the paper did (:func:`mmh_jax.evaluation.png_length`): the image-complexity proxy by which
    the paper normalises LID (Appendix C.2, after Kamkari et al. 2024b)."""

    on_host: ClassVar[bool] = True
    needs_text: ClassVar[bool] = False
    names: ClassVar[tuple[str, ...]] = ("png_bytes",)

    def check(self, model: Model) -> None:
        _require(model.image_shape is not None or len(model.shape) == 3, "png_size", "image items")

    def host(self, image: np.ndarray) -> dict[str, float]:
        """``image``: uint8 ``[h, w, c]``."""
        from mmh_jax.evaluation import png_length

        return {"png_bytes": float(png_length(image[None], level=9)[0])}


@functools.cache
def name_hash(name: str) -> int:
    """A stable 31-bit integer for a column's name (its PRNG stream)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def column_keys(keys: Array, column: Column) -> Array:
    """The column's own per-item keys: ``fold_in(item_key, hash(first name))``, so adding or
    reordering columns does not change any value."""
    return jax.vmap(lambda k: jax.random.fold_in(k, name_hash(column.names[0])))(keys)
