"""Columns of the memorization detectors of the literature (:mod:`mmh_jax.memorization.detectors`)
on images generated from prompts: each reads the generation's own DDIM trajectory, so a detector
costs only its extra UNet evaluations. The prompt-level tests (Webster's edge agreement across
seeds, Carlini et al.'s clusters, NeMo's z-scores against non-memorized prompts) combine a
prompt's rows afterwards (``mmh-jax sd benchmark-detectors``).

| column | values | paper |
| --- | --- | --- |
| :class:`CrossAttentionStats` | ``ren_entropy``, ``ren_begin``, ``ren_end``, ``bright_ending`` | Ren et al. 2024; Chen et al. 2025 |
| :class:`ValueActivations` | ``value_activations`` (a vector per image: every value neuron) | Hintersdorf et al. 2024 |
| :class:`Sharpness` | ``sharpness``: ``-tr grad s^CFG`` at the starting noise | Jeon et al. 2025 |
| :class:`DetectorImages` | ``one_step_pixels``, ``final_pixels`` (uint8 vectors) | Webster 2023; Carlini et al. 2023 |
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array

from mmh_jax._src.ddim import ddim_x0
from mmh_jax._src.images import to_uint8
from mmh_jax.guidance import eps_pair
from mmh_jax.memorization.detectors import (
    bright_ending_layers,
    cross_attention,
    cross_attention_paths,
    end_positions,
    end_token_map,
    score_jacobian_trace,
    token_attention,
    token_statistics,
)
from mmh_jax.scoring.columns import (
    Inputs,
    _caption_score_fn,
    _column,
    _generated,
    _PromptColumn,
    _require,
    _text_model,
)
from mmh_jax.scoring.model import Model

__all__ = ["CrossAttentionStats", "ValueActivations", "Sharpness", "DetectorImages"]


def _times(model: Model, steps: Array, batch: int) -> Array:
    return jnp.full((batch,), (steps + 1) / model.schedule.num_timesteps, jnp.float32)


@_column()
class CrossAttentionStats(_PromptColumn):
    """Ren et al.'s attention entropy and beginning/end-token attention at the first
    ``early_steps`` steps, and Chen et al.'s bright-ending attention (the mean of the end
    token's map in the layers of :func:`~mmh_jax.memorization.detectors.bright_ending_layers`)
    at the last step, of the conditional branch on the image's own trajectory
    (:func:`~mmh_jax.memorization.detectors.attention_entropy`,
    :func:`~mmh_jax.memorization.detectors.bright_ending`). Costs ``early_steps + 1`` UNet
    evaluations per image."""

    early_steps: int = 1

    names: ClassVar[tuple[str, ...]] = ("ren_entropy", "ren_begin", "ren_end", "bright_ending")

    def __post_init__(self):
        if (
            isinstance(self.early_steps, bool)
            or not isinstance(self.early_steps, int)
            or self.early_steps < 1
        ):
            raise ValueError(
                f"cross_attention early_steps must be an int >= 1, got {self.early_steps!r}"
            )

    def check(self, model: Model) -> None:
        _text_model(model, "cross_attention")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        traj = _generated(inputs, "cross_attention", "tokens")
        n, b = traj.latents.shape[:2]
        if self.early_steps > n:
            raise ValueError(
                f"cross_attention early_steps={self.early_steps} exceeds the {n} generation steps"
            )
        end = end_positions(inputs.tokens)

        def maps(i: int):
            att = cross_attention(
                model.eps_fn, traj.latents[i], _times(model, traj.timesteps[i], b), inputs.context
            )
            return [p.mean(axis=1) for p in att.probs]

        a = jnp.mean(jnp.stack([token_attention(maps(i)) for i in range(self.early_steps)]), axis=0)
        stats = token_statistics(a, end)
        last = maps(n - 1)
        paths = cross_attention_paths(
            model.eps_fn, traj.latents[0], _times(model, traj.timesteps[0], b), inputs.context
        )
        last = [last[i] for i in bright_ending_layers(paths, [m.shape[1] for m in last])]
        bright = end_token_map(last, end, model.shape[1:]).mean(axis=(1, 2))
        return dict(zip(self.names, (*stats, bright)))


@_column()
class ValueActivations:
    """NeMo's neuron activations of the cross-attention value projections, ``mean_j |V_j|``
    over the caption's tokens, one vector per image
    (:func:`~mmh_jax.memorization.detectors.value_activations`); z-scored against
    non-memorized prompts afterwards (:func:`~mmh_jax.memorization.detectors.nemo_outliers`).
    One UNet evaluation per image."""

    on_host: ClassVar[bool] = False
    needs_text: ClassVar[bool] = True
    names: ClassVar[tuple[str, ...]] = ("value_activations",)

    def check(self, model: Model) -> None:
        _text_model(model, "value_activations")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        b = inputs.context.shape[0]
        z = jnp.zeros((b, *model.shape), jnp.float32)
        values = cross_attention(
            model.eps_fn, z, jnp.ones((b,), jnp.float32), inputs.context
        ).values
        return {
            "value_activations": jnp.concatenate(
                [jnp.mean(jnp.abs(v.astype(jnp.float32)), axis=1) for v in values], axis=-1
            )
        }


@_column()
class Sharpness(_PromptColumn):
    """Jeon et al.'s sharpness ``-tr grad s^CFG(x_T, t_T)`` at the image's starting noise and
    the first timestep, Hutchinson with ``num_probes`` Rademacher probes
    (:func:`~mmh_jax.memorization.detectors.sharpness`)."""

    guidance: float = 7.5
    num_probes: int = 1

    names: ClassVar[tuple[str, ...]] = ("sharpness",)

    def __post_init__(self):
        if (
            isinstance(self.num_probes, bool)
            or not isinstance(self.num_probes, int)
            or self.num_probes < 1
        ):
            raise ValueError(
                f"sharpness num_probes must be an integer >= 1, got {self.num_probes!r}"
            )

    def check(self, model: Model) -> None:
        _text_model(model, "sharpness")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        traj = _generated(inputs, "sharpness", "tokens")
        score_fn = _caption_score_fn(model, inputs, self.guidance)
        x = traj.latents[0]
        t = _times(model, traj.timesteps[0], x.shape[0])
        return {
            "sharpness": -score_jacobian_trace(score_fn, x, t, key=keys, num_probes=self.num_probes)
        }


@_column()
class DetectorImages(_PromptColumn):
    """The decoded one-step prediction ``x_0 = (x_T - sqrt(1 - a) eps^CFG) / sqrt(a)`` at the
    first timestep (Webster's test) and the decoded generation (Carlini et al.'s clusters),
    each uint8 ``[h, w, c]`` flattened. The one-step prediction reuses the trajectory's first
    noise predictions: no UNet evaluation, two VAE decodes per image."""

    guidance: float = 7.5

    names: ClassVar[tuple[str, ...]] = ("one_step_pixels", "final_pixels")

    def check(self, model: Model) -> None:
        _text_model(model, "detector_images")
        _require(model.decode is not None, "detector_images", "a decoder (the VAE)")

    def __call__(self, model: Model, inputs: Inputs, keys: Array) -> dict[str, Array]:
        traj = _generated(inputs, "detector_images", "tokens")
        x = traj.latents[0]
        if traj.eps_cond is not None:
            eps_u, eps_c = traj.eps_uncond[0], traj.eps_cond[0]
        else:
            eps_u, eps_c = eps_pair(
                model.eps_fn,
                x,
                _times(model, traj.timesteps[0], x.shape[0]),
                inputs.context,
                model.uncond,
            )
        a = model.schedule.alphas_cumprod[traj.timesteps[0]].astype(x.dtype)
        x0 = ddim_x0(x, eps_u + self.guidance * (eps_c - eps_u), a)

        def pixels(latents):
            images = model.decode(latents).astype(jnp.float32)
            return to_uint8(images).reshape(images.shape[0], -1)

        return {"one_step_pixels": pixels(x0), "final_pixels": pixels(inputs.points)}
