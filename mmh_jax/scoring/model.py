"""What the scoring engine needs of a model: the space items are scored in, and its functions.

:class:`Model` is a pytree: its functions are :class:`jax.tree_util.Partial`\\ s over their
parameters (the leaves, replicated on every device of the mesh), its shapes and its host-side
tokenizer are static. Build one from any loader's result with :meth:`Model.from_pretrained`
(UNet2D, iDDPM), :meth:`Model.from_stable_diffusion`, or from a user's functions with
:meth:`Model.from_score_fn` and :meth:`Model.from_generator`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, PyTree

from mmh_jax.models.stable_diffusion import decode_latents, encode_image, encode_text
from mmh_jax.sampling import DDIMGrid
from mmh_jax.schedules import Schedule

__all__ = ["Model"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "score_fn",
        "schedule",
        "encode",
        "eps_fn",
        "embed",
        "uncond",
        "generator",
        "mapping",
        "decode",
    ],
    meta_fields=["shape", "image_shape", "tokenize", "ddim_grid", "description", "num_classes"],
)
@dataclasses.dataclass(frozen=True)
class Model:
    """A model as the scoring engine sees it.

    Items are scored as *points* of shape ``shape`` (pixels ``[c, h, w]`` in ``[-1, 1]`` for a
    pixel-space diffusion model, latents for Stable Diffusion, latents for a generator). An
    image item (uint8) is brought to ``image_shape`` on the host and, when ``encode`` is set,
    encoded on the device; a float array item of shape ``shape`` is taken as a point as is.

    Attributes:
        shape: the shape of one point.
        image_shape: ``(c, h, w)`` of the images the model takes (``None``: points only).
        score_fn: the unconditional score ``score_fn(x_t [b, *shape], t [b])`` (diffusion).
        schedule: its noise schedule.
        encode: ``encode(images [b, *image_shape] in [-1, 1]) -> points`` (a VAE encoder);
            ``None`` when images are the points.
        eps_fn: the conditional noise predictor ``eps_fn(x_t, t, context)`` (text-conditional).
        embed: ``embed(token_ids [b, n]) -> context [b, n, dim]`` (the text encoder).
        uncond: the empty prompt's context ``[1, n, dim]``.
        generator: ``generator(z [b, *shape]) -> x`` (a GAN or decoder, for the Jacobian rank);
            with ``num_classes``, ``generator(latent, labels [b]) -> x``.
        decode: ``decode(points) -> images [b, *image_shape]`` in ``[-1, 1]`` (a VAE decoder):
            images generated from prompts are decoded for the host columns.
        tokenize: host-side ``tokenize(list of str) -> int token ids [b, n]``.
        ddim_grid: the model's DDIM timestep grid (:class:`~mmh_jax.sampling.DDIMGrid`), for
            generating from prompts (text-conditional models) or with DDIM (``None``: the
            default grid).
        description: one line naming the model, for the run record and the plan.
        num_classes: classes of a class-conditional generator (``0``: unconditional); each
            item's integer class reaches it from the source's metadata (``score(labels=...)``)
            and the Jacobian is taken with respect to the latent only.
        mapping: ``mapping(z, labels) -> latent`` (e.g. StyleGAN's ``w``): the generator then
            maps that latent and its Jacobian is taken there; ``None``: at ``z`` itself.
    """

    shape: tuple[int, ...]
    image_shape: tuple[int, int, int] | None = None
    score_fn: Partial | None = None
    schedule: Schedule | None = None
    encode: Partial | None = None
    eps_fn: Partial | None = None
    embed: Partial | None = None
    uncond: Array | None = None
    generator: Partial | None = None
    decode: Partial | None = None
    tokenize: Callable[[Sequence[str]], np.ndarray] | None = None
    ddim_grid: DDIMGrid | None = None
    description: str = "model"
    num_classes: int = 0
    mapping: Partial | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {self.shape}")
        object.__setattr__(self, "shape", shape)
        if self.image_shape is not None:
            image_shape = tuple(int(s) for s in self.image_shape)
            if len(image_shape) != 3 or image_shape[0] not in (1, 3):
                raise ValueError(
                    f"image_shape must be (channels 1 or 3, height, width), got {self.image_shape}"
                )
            object.__setattr__(self, "image_shape", image_shape)
            if self.encode is None and image_shape != shape:
                raise ValueError(
                    f"without encode, images are the points: image_shape "
                    f"{image_shape} must equal shape {shape}"
                )
        if (self.score_fn is None) != (self.schedule is None):
            raise ValueError("score_fn and schedule go together: give both or neither")
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 0
        ):
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if (self.num_classes or self.mapping is not None) and self.generator is None:
            raise ValueError("num_classes and mapping apply to a generator")

    @classmethod
    def from_score_fn(
        cls,
        score_fn: Callable,
        schedule: Schedule,
        shape: Sequence[int],
        *,
        images: bool | None = None,
        description: str = "score function",
    ) -> Model:
        """A diffusion model given by its score function on points of ``shape``.

        Args:
            score_fn: ``score_fn(x_t, t)`` (wrapped in a ``Partial`` if it is not one).
            schedule: its schedule.
            shape: one point's shape; image items (read as pixels in ``[-1, 1]``) need
                ``(c, h, w)`` with ``c`` 1 or 3.
            images: whether image items can be scored besides float array items. By default
                (``None``) read off ``shape``: yes for an image shape ``(1 or 3, h, w)``, no
                otherwise (``(6,)``: points only). ``True`` with another shape is an error.
        """
        shape = tuple(shape)
        if images is None:
            images = len(shape) == 3 and shape[0] in (1, 3)
        score_fn = score_fn if isinstance(score_fn, Partial) else Partial(score_fn)
        return cls(
            shape=shape,
            image_shape=shape if images else None,
            score_fn=score_fn,
            schedule=schedule,
            description=description,
        )

    @classmethod
    def from_pretrained(
        cls, model: Any, *, image_size: int | None = None, description: str | None = None
    ) -> Model:
        """A pixel-space diffusion model from a loader's ``Pretrained`` (UNet2D, iDDPM).

        Args:
            model: ``Pretrained(module, params, schedule, score_fn)``.
            image_size: the image side; by default the module's ``sample_size`` or
                ``image_size``.
        """
        module = model.module
        size = (
            image_size
            or getattr(module, "sample_size", None)
            or getattr(module, "image_size", None)
        )
        if size is None:
            raise ValueError("the module does not say its image size: pass image_size=")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(module.in_channels), int(h), int(w))
        return cls(
            shape=shape,
            image_shape=shape,
            score_fn=model.score_fn,
            schedule=model.schedule,
            description=description or f"{type(module).__name__} {shape}",
        )

    @classmethod
    def from_stable_diffusion(cls, sd: Any, *, description: str = "Stable Diffusion") -> Model:
        """Stable Diffusion from :func:`mmh_jax.models.load_stable_diffusion`: points are the
        scaled VAE latents (the posterior mean of each image), captions are embedded by its
        text encoder, and prompts alone are turned into latents by DDIM with guidance."""
        c, h, w = sd.latent_shape
        factor = sd.vae.downscale
        return cls(
            shape=(c, h, w),
            image_shape=(3, h * factor, w * factor),
            score_fn=sd.unet.score_fn,
            schedule=sd.schedule,
            encode=Partial(_VaeEncoder(sd.vae), sd.vae_params),
            decode=Partial(_VaeDecoder(sd.vae), sd.vae_params),
            eps_fn=sd.eps,
            embed=Partial(_TextEncoder(sd.text_encoder), sd.text_encoder_params),
            uncond=sd.uncond_embedding,
            tokenize=sd.tokenize,
            ddim_grid=sd.ddim_grid,
            description=f"{description}, latents {(c, h, w)}",
        )

    @classmethod
    def from_generator(
        cls,
        generator: Callable,
        latent_shape: Sequence[int],
        *,
        num_classes: int = 0,
        mapping: Callable | None = None,
        description: str = "generator",
    ) -> Model:
        """A generator (GAN, decoder) ``x = generator(z)``: items are latents ``z``.

        Args:
            generator: ``generator(z)``; with ``num_classes``, ``generator(latent, labels)``
                with integer labels ``[b]``.
            latent_shape: the shape of one item's latent ``z``.
            num_classes: a class-conditional generator's number of classes (``0``: none).
            mapping: ``mapping(z, labels) -> latent`` at which the generator is differentiated
                (e.g. StyleGAN's ``w``); ``None``: at ``z``.
        """
        generator = generator if isinstance(generator, Partial) else Partial(generator)
        if mapping is not None and not isinstance(mapping, Partial):
            mapping = Partial(mapping)
        return cls(
            shape=tuple(latent_shape),
            generator=generator,
            num_classes=num_classes,
            mapping=mapping,
            description=description,
        )


@dataclasses.dataclass(frozen=True)
class _VaeEncoder:
    """Images in ``[-1, 1]`` -> scaled latents (the posterior mean), float32: the computation of
    ``StableDiffusion.encode_image``, as a hashable function for a ``Partial`` over the weights."""

    module: Any

    def __call__(self, params: PyTree, images: Array) -> Array:
        return encode_image(self.module, params, images, None)


@dataclasses.dataclass(frozen=True)
class _VaeDecoder:
    """Scaled latents -> images in about ``[-1, 1]``, float32: ``StableDiffusion.decode``'s
    computation, as a hashable function for a ``Partial`` over the weights."""

    module: Any

    def __call__(self, params: PyTree, latents: Array) -> Array:
        return decode_latents(self.module, params, latents)


@dataclasses.dataclass(frozen=True)
class _TextEncoder:
    """Token ids -> the text encoder's last hidden state, float32: the computation of
    ``StableDiffusion.encode_prompt``, as a hashable function for a ``Partial``."""

    module: Any

    def __call__(self, params: PyTree, ids: Array) -> Array:
        return encode_text(self.module, params, ids)
