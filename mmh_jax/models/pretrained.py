"""What a loader returns: the Flax module, its parameters, its noise schedule and a score function.

Every pretrained-model loader (``load_unet2d``, ``load_iddpm``, ``load_stable_diffusion``, ...)
returns a :class:`Pretrained` (Stable Diffusion's holds its UNet). Its ``score_fn`` follows the
estimators' convention, ``score_fn(x_t [b, *event], t [b]) -> grad log p_t(x_t)`` with
continuous ``t`` in ``(0, 1]`` and images in NCHW, and is a :class:`jax.tree_util.Partial` whose
arguments are the parameters, the schedule and any conditioning (a text embedding): jitted
estimators then receive the weights as arguments rather than baking hundreds of millions of
numbers into the compiled program as constants, and a second model (or prompt) of the same
architecture reuses the compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float, PyTree

from mmh_jax.guidance import broadcast_batch
from mmh_jax.schedules import DDPM, broadcast_to_event

__all__ = ["Pretrained", "PretrainedGenerator", "Prediction", "eps_score_fn", "EpsModel"]

Prediction = Literal["epsilon", "v_prediction"]
"""What a network predicts: the noise (``"epsilon"``) or ``v = psi eps - sigma x_0``
(``"v_prediction"``, Salimans & Ho 2022; Stable Diffusion 2.x at 768 px)."""


class Pretrained(NamedTuple):
    """A loaded diffusion model.

    Attributes:
        module: the Flax module; ``module.apply({"params": params}, x [b, c, h, w], timesteps [b],
            *conditioning)`` returns the network output in NCHW.
        params: its parameters (float32).
        schedule: the noise schedule it was trained with.
        score_fn: ``score_fn(x_t, t)`` for the estimators of :mod:`mmh_jax.lid` (for a
            text-conditional model: the unconditional score, i.e. the empty prompt's).
    """

    module: nn.Module
    params: PyTree
    schedule: DDPM
    score_fn: Partial


class PretrainedGenerator(NamedTuple):
    """A loaded GAN generator: the GAN counterpart of :class:`Pretrained` (no schedule; the
    function over the parameters generates instead of scoring).

    Attributes:
        module: the Flax module; ``module.apply({"params": params}, z, c, ...)`` returns images
            in NCHW.
        params: its parameters (float32).
        generate: ``generate(z [b, z_dim], c=None, **settings) -> images [b, c, h, w]``, a
            :class:`jax.tree_util.Partial` over the parameters (the module's ``__call__``
            with its keyword settings, e.g. ``truncation_psi``, ``noise_mode``); two generators
            of equal modules share compiled programs.
    """

    module: nn.Module
    params: PyTree
    generate: Partial


@dataclasses.dataclass(frozen=True)
class EpsModel:
    """A discrete-time diffusion network read as a noise predictor in continuous time.

    The network is fed the timestep ``(T t - 1) * timestep_scale``; the first ``c`` channels
    of its output (``c`` = input channels; learned-variance models append ``c`` more) are
    ``eps``, or ``v`` for ``prediction_type="v_prediction"``, turned into
    ``eps = psi(t) v + sigma(t) x_t``. Conditioning arrays (e.g. a text embedding
    ``[1 or b, n, dim]``) are passed to the network after the timesteps.
    """

    module: nn.Module
    timestep_scale: float = 1.0
    prediction_type: Prediction = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )

    def bound(self, name: Literal["eps", "score"]):
        """The bound method ``name``, one object for all equal models: the function to wrap in
        a :class:`~jax.tree_util.Partial`. (A bound method equals only the methods of its own
        instance, so ``Partial(EpsModel(module).eps, ...)`` of a second, equal model would not
        share the compiled programs of the first.)"""
        return _bound_method(self, name)

    def eps(
        self,
        params: PyTree,
        schedule: DDPM,
        x_t: Float[Array, "b c h w"],
        t: Float[ArrayLike, " b"],
        *conditioning: Array,
    ) -> Float[Array, "b c h w"]:
        """The predicted noise at ``x_t`` and continuous times ``t`` (``[b]`` or a scalar)."""
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), (batch,))
        steps = schedule.timestep(t)
        if self.timestep_scale != 1.0:
            steps = steps * self.timestep_scale
        conditioning = tuple(broadcast_batch(c, batch) for c in conditioning)
        out = self.module.apply({"params": params}, x_t, steps, *conditioning)
        out = out[:, : x_t.shape[1]].astype(x_t.dtype)
        if self.prediction_type == "v_prediction":
            out = (
                broadcast_to_event(schedule.psi(t), x_t) * out
                + broadcast_to_event(schedule.sigma(t), x_t) * x_t
            )
        return out

    def score(
        self, params: PyTree, schedule: DDPM, x_t: Float[Array, "b c h w"], t: Float[Array, " b"]
    ) -> Float[Array, "b c h w"]:
        """``score(x_t, t) = -eps / sigma(t)`` (paper, Eq. 10) of an unconditional network."""
        return -self.eps(params, schedule, x_t, t) / broadcast_to_event(schedule.sigma(t), x_t)


def eps_score_fn(
    module: nn.Module,
    params: PyTree,
    schedule: DDPM,
    *,
    timestep_scale: float = 1.0,
    prediction_type: Prediction = "epsilon",
) -> Partial:
    """The score function of an unconditional discrete-time noise (or v) prediction network.

    (A text-conditional network's noise predictor is ``Partial(EpsModel(module).bound("eps"),
    params, schedule)``; :mod:`mmh_jax.guidance` turns it into conditional and guided score
    functions.)

    Args:
        module: Flax module called as ``module.apply({"params": params}, x_t, timesteps)``.
        params: its parameters.
        schedule: the DDPM schedule it was trained with; continuous ``t`` maps to the
            timestep ``T t - 1`` (0-based, as diffusers and improved-diffusion count).
        timestep_scale: factor on the timestep the network sees (``1000 / T`` for
            improved-diffusion models trained with ``rescale_timesteps``).
        prediction_type: what the network predicts.

    Returns:
        ``score_fn(x_t, t)``, a :class:`jax.tree_util.Partial` over ``(params, schedule)``;
        two score functions of equal modules share compiled estimator code.
    """
    model = EpsModel(module, float(timestep_scale), prediction_type)
    return Partial(model.bound("score"), params, schedule)


@functools.cache
def _bound_method(model: EpsModel, name: str):
    return getattr(model, name)
