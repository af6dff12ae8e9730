"""A closed-form model for the engine's tests (also imported by their subprocesses).

The data are ``N(0, diag(variance))`` with ``variance`` 1 on the first ``rank`` coordinates and 0
elsewhere: a Gaussian on a ``rank``-dimensional subspace, so LID is ``rank``. Its noised score is
``-x / (psi^2 variance + sigma^2)``; the Jacobian of the score is diagonal, so one Rademacher
probe gives FLIPD exactly and :func:`flipd_closed_form` is the truth for every item.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from mmh_jax.schedules import VP
from mmh_jax.scoring import Model


def _score(variance, x, t):
    schedule = VP()
    shape = (-1,) + (1,) * (x.ndim - 1)
    psi, sigma = schedule.psi(t).reshape(shape), schedule.sigma(t).reshape(shape)
    return -x / (psi**2 * variance + sigma**2)


def variance(shape, rank: int) -> np.ndarray:
    v = np.zeros(math.prod(shape), np.float32)
    v[:rank] = 1.0
    return v.reshape(shape)


def make(shape=(6,), rank: int = 2, images: bool = False) -> Model:
    """The model on points of ``shape`` (images ``(c, h, w)`` in [-1, 1] with ``images``)."""
    shape = tuple(shape)
    score_fn = Partial(_score, jnp.asarray(variance(shape, rank)))
    return Model.from_score_fn(
        score_fn,
        VP(),
        shape,
        images=images,
        description=f"diagonal Gaussian of rank {rank} on {shape}",
    )


def points(n: int, shape=(6,), rank: int = 2, seed: int = 0) -> np.ndarray:
    """``n`` draws from the data distribution, float32."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *shape)) * np.sqrt(variance(shape, rank))).astype(np.float32)


def flipd_closed_form(x: np.ndarray, t0: float, shape=(6,), rank: int = 2) -> np.ndarray:
    """FLIPD(x, t0) = d + sigma^2 (tr J + |s|^2) at psi(t0) x, in float64."""
    schedule = VP()
    psi, sigma = float(schedule.psi(t0)), float(schedule.sigma(t0))
    v = variance(shape, rank).reshape(-1).astype(np.float64)
    x = x.reshape(len(x), -1).astype(np.float64)
    denom = psi**2 * v + sigma**2
    trace = -np.sum(1 / denom)
    norm2 = np.sum((psi * x / denom) ** 2, axis=1)
    return x.shape[1] + sigma**2 * (trace + norm2)
