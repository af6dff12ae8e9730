"""Input validation shared by the estimators.

Checks on shapes always run (shapes are static under ``jit``); checks on values
(finite inputs, ``t0`` in (0, 1]) run whenever the values are concrete, i.e. when
an estimator is called outside ``jit`` or with concrete arguments inside it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from mmh_jax._src.partial import as_pytree_fn
from mmh_jax.schedules import Schedule


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_option(value: Any, name: str, options: Sequence[Any]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_schedule(schedule: Any, name: str = "schedule") -> None:
    """``schedule`` must be a :class:`mmh_jax.schedules.Schedule` (VP, DDPM, VE, EDM, ...)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"{name} must be a mmh_jax.schedules.Schedule (e.g. VP(), DDPM(...), VE(), "
            f"EDM()), the forward process the score belongs to; got "
            f"{type(schedule).__name__}"
        )


def check_batch(x: Any, name: str = "x", *, min_event_dims: int = 1) -> Array:
    """``x`` as a floating array of shape ``[b, *event_shape]`` with finite values."""
    x = jnp.asarray(x)
    if x.ndim < 1 + min_event_dims or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [batch, *event_shape] with a non-empty batch, got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def check_times(t0: Any, batch: int, dtype: Any, name: str = "t0") -> Array:
    """``t0`` (a scalar or ``[batch]``) broadcast to ``[batch]``, checked to lie in (0, 1]."""
    t0 = jnp.asarray(t0, dtype=dtype)
    if t0.shape not in ((), (batch,)):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got shape {t0.shape}")
    if is_concrete(t0):
        values = np.asarray(t0)
        if not np.all(np.isfinite(values) & (values > 0) & (values <= 1)):
            raise ValueError(f"{name} must lie in (0, 1], got {values.min()}..{values.max()}")
    return jnp.broadcast_to(t0, (batch,))


def check_score_fn(score_fn: Callable, x: Array, t: Array, name: str = "score_fn") -> None:
    """The score function must map ``x [b, ...]`` and ``t [b]`` to an array shaped like ``x``.

    The check traces ``score_fn`` abstractly; the answer is cached per function, parameter
    shapes and input shapes, so calling an estimator batch after batch on a large network
    does not re-trace it every call.
    """
    if not callable(score_fn):
        raise TypeError(f"{name} must be callable as {name}(x_t, t), got {type(score_fn).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(as_pytree_fn(score_fn))
    avals = tuple((np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves)
    try:
        hash(treedef)
    except TypeError:  # an unhashable callable: check without the cache
        out = jax.eval_shape(score_fn, x, t)
    else:
        out = _output_aval(treedef, avals, (x.shape, x.dtype), (t.shape, t.dtype))
    if not hasattr(out, "shape") or out.shape != x.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{name}(x_t, t) must return an array of shape {x.shape} like x_t, got {got}"
        )


@functools.lru_cache(maxsize=512)
def _output_aval(treedef, avals, x_aval, t_aval):
    def call(leaves, x, t):
        return jax.tree_util.tree_unflatten(treedef, leaves)(x, t)

    structs = [jax.ShapeDtypeStruct(*a) for a in avals]
    return jax.eval_shape(
        call, structs, jax.ShapeDtypeStruct(*x_aval), jax.ShapeDtypeStruct(*t_aval)
    )


def per_sample_keys(key: Any, batch: int, name: str = "key") -> Array:
    """One PRNG key per sample, ``[batch]`` typed keys.

    ``key`` is either a single key (split into ``batch``) or already one key per
    sample (used as is, so a sample's randomness does not depend on its batch).
    """
    if key is None:
        raise ValueError(
            f"{name} is required for this randomised estimator: pass key=jax.random.key(seed)"
        )
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise TypeError(
                f"{name} must be a JAX PRNG key (jax.random.key), got dtype {key.dtype}"
            )
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, batch)
    if key.shape == (batch,):
        return key
    raise ValueError(
        f"{name} must be a single key or one key per sample, shape ({batch},); got {key.shape}"
    )


def check_strings(
    values: Any, name: str, *, what: str = "strings", allow_empty: bool = False
) -> list:
    """``values`` as a list: a sequence of ``what``, never one string (which would iterate as
    characters), and not empty unless ``allow_empty``. The items are the caller's to check."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {what}, not one string")
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name} is empty")
    return values


def trajectory_steps(steps: Sequence[int] | None, *trajectory: Any) -> np.ndarray:
    """Indices ``steps`` into the ``n`` steps of a DDIM trajectory (``trajectory``: the arrays of
    a ``DDIMResult`` the caller reads, ``[n, ...]`` each), every step when ``None``; negative
    indices count from the end. Host integers, so the check also runs under ``jit``."""
    if any(a is None for a in trajectory):
        raise ValueError(
            "result must hold the trajectory: call ddim_sample(..., return_trajectory=True)"
        )
    n = trajectory[0].shape[0]
    index = np.arange(n) if steps is None else np.asarray(list(steps), np.int64)
    if index.ndim != 1 or index.size == 0 or np.any((index < -n) | (index >= n)):
        raise ValueError(
            f"steps must be a non-empty sequence of step indices in 0..{n - 1}, "
            f"got {None if steps is None else list(steps)}"
        )
    return index
