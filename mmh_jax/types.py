"""The callables the library passes around, as protocols.

Every estimator, sampler and metric takes its model as one of these. A small model's function
may close over its parameters; a large model's should be a :class:`jax.tree_util.Partial` over
them (the loaders return one), so that jitted functions take the weights as arguments.
Times ``t`` are continuous, shape ``[b]``, in ``(0, 1]``; points ``x_t`` are ``[b, *event]``;
samples are treated independently (no batch statistics).
"""

from __future__ import annotations

from typing import Protocol

from jaxtyping import Array, PyTree

__all__ = ["ScoreFn", "EpsFn", "CondEpsFn", "EpsApply", "GeneratorFn"]


class ScoreFn(Protocol):
    """``score_fn(x_t, t) -> grad log p_t(x_t)``, shaped like ``x_t`` (paper, Eq. 5)."""

    def __call__(self, x_t: Array, t: Array, /) -> Array: ...


class EpsFn(Protocol):
    """``eps_fn(x_t, t) -> eps``: a noise predictor, ``score = -eps / sigma(t)`` (paper, Eq. 10)."""

    def __call__(self, x_t: Array, t: Array, /) -> Array: ...


class CondEpsFn(Protocol):
    """``eps_fn(x_t, t, context) -> eps``: a conditional noise predictor; ``context [1 or b, ...]``
    is a conditioning array (e.g. a CLIP text embedding ``[b, 77, 768]``)."""

    def __call__(self, x_t: Array, t: Array, context: Array, /) -> Array: ...


class EpsApply(Protocol):
    """``apply(params, x_t, t) -> eps``: a noise-prediction network with explicit parameters."""

    def __call__(self, params: PyTree, x_t: Array, t: Array, /) -> Array: ...


class GeneratorFn(Protocol):
    """``fn(z [b, *latent]) -> x [b, *event]``: a decoder or GAN generator, sample by sample."""

    def __call__(self, z: Array, /) -> Array: ...
