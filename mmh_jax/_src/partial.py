"""Functions as pytrees, for jitted code that takes a model as an argument."""

from __future__ import annotations

from collections.abc import Callable

from jax.tree_util import Partial

__all__ = ["as_pytree_fn"]


def as_pytree_fn(fn: Callable) -> Partial:
    """``fn`` as a :class:`jax.tree_util.Partial`, so that a jitted estimator takes it as an
    argument: the arrays a ``Partial`` holds (e.g. network weights) are traced inputs, not
    compile-time constants, and a plain function is keyed by identity, as a static argument."""
    return fn if isinstance(fn, Partial) else Partial(fn)
