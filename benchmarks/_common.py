"""Helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda out: out) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` after one warm-up (compiling) call;
    ``sync`` waits for the result (``jax.block_until_ready`` for JAX)."""
    sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                sync: Callable[[Any], Any] = lambda out: out) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds in which every ``fns[name]()`` runs once, in turn (after
    one warm-up call each): load drift on a shared machine then hits all sides alike, and their
    ratios are taken round by round. ``sync`` waits for a result (``jax.block_until_ready``)."""
    for fn in fns.values():
        sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    return times


def ratio_summary(numerator: list[float], denominator: list[float]) -> str:
    """``median (min-max)`` of the round-by-round ratios of two :func:`interleaved` series."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
