"""What a loader returns: the Flax module, its parameters, its noise schedule and a score function.

Every pretrained-model loader (``load_unet2d``, ``load_iddpm``, ...) returns a
:class:`Pretrained`. Its ``score_fn`` follows the estimators' convention,
``score_fn(x_t [b, *event], t [b]) -> grad log p_t(x_t)`` with continuous ``t`` in ``(0, 1]``
and images in NCHW, and is a :class:`jax.tree_util.Partial` whose arguments are the parameters
and the schedule: jitted estimators then receive the weights as arguments rather than baking
tens of millions of numbers into the compiled program as constants, and a second model of the
same architecture reuses the compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
from jax.tree_util import Partial
from jaxtyping import Array, Float, PyTree

from mmh_jax.schedules import DDPM, broadcast_to_event

__all__ = ["Pretrained", "eps_score_fn"]


class Pretrained(NamedTuple):
    """A loaded diffusion model.

    Attributes:
        module: the Flax module; ``module.apply({"params": params}, x [b, c, h, w], timesteps [b])``
            returns the network output in NCHW.
        params: its parameters (float32).
        schedule: the noise schedule it was trained with.
        score_fn: ``score_fn(x_t, t)`` for the estimators of :mod:`mmh_jax.lid`.
    """

    module: nn.Module
    params: PyTree
    schedule: DDPM
    score_fn: Partial


@dataclasses.dataclass(frozen=True)
class _EpsScore:
    """``score(x_t, t) = -eps / sigma(t)`` (paper, Eq. 10) for a discrete-time noise predictor
    fed the timestep ``(T t - 1) * timestep_scale``, whose output's first ``c`` channels
    (``c`` = input channels) are ``eps`` (learned-variance models append ``c`` variance
    channels)."""

    module: nn.Module
    timestep_scale: float = 1.0

    def __call__(self, params: PyTree, schedule: DDPM, x_t: Float[Array, "b c h w"],
                 t: Float[Array, " b"]) -> Float[Array, "b c h w"]:
        steps = schedule.timestep(t)
        if self.timestep_scale != 1.0:
            steps = steps * self.timestep_scale
        out = self.module.apply({"params": params}, x_t, steps)
        eps = out[:, : x_t.shape[1]].astype(x_t.dtype)
        return -eps / broadcast_to_event(schedule.sigma(t), x_t)


def eps_score_fn(module: nn.Module, params: PyTree, schedule: DDPM, *,
                 timestep_scale: float = 1.0) -> Partial:
    """The score function of a discrete-time epsilon-prediction UNet.

    Args:
        module: Flax module called as ``module.apply({"params": params}, x_t, timesteps)``.
        params: its parameters.
        schedule: the DDPM schedule it was trained with; continuous ``t`` maps to the
            timestep ``T t - 1`` (0-based, as diffusers and improved-diffusion count).
        timestep_scale: factor on the timestep the network sees (``1000 / T`` for
            improved-diffusion models trained with ``rescale_timesteps``).

    Returns:
        ``score_fn(x_t, t)``, a :class:`jax.tree_util.Partial` over ``(params, schedule)``;
        two score functions of equal modules share compiled estimator code.
    """
    return Partial(_EpsScore(module, float(timestep_scale)), params, schedule)
