"""Which way each memorization signal points."""

from __future__ import annotations

from typing import Literal

from mmh_jax._src.checks import check_option

__all__ = ["memorized_when_high"]

_HIGH = ("cfg", "cfg_score", "cfg_norm")
_LOW = ("flipd",)


def memorized_when_high(signal: Literal["cfg", "cfg_score", "cfg_norm", "flipd"]) -> bool:
    """Whether large values of ``signal`` flag memorization.

    The CFG norms point up: a memorized prompt pulls the conditional prediction far from the
    unconditional one (``"cfg"``: Wen et al.'s ``||eps_c - eps_u||^2``, paper Eq. 15;
    ``"cfg_score"``: the norm of the CFG-adjusted score, Eq. 2; ``"cfg_norm"``: the guarded
    sampler's per-step CFG norm). FLIPD points down (``"flipd"``: a low model LID is
    memorization, the manifold memorization hypothesis).

    Args:
        signal: the name of a prompt metric (:mod:`mmh_jax.memorization.prompt`) or a guard
            signal (:mod:`mmh_jax.memorization.guard`).

    Returns:
        ``True`` for the CFG norms, ``False`` for FLIPD.
    """
    check_option(signal, "signal", _HIGH + _LOW)
    return signal in _HIGH
