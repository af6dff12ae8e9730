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
