"""Splitting ``n`` items into consecutive batches, and padding the last one."""

from __future__ import annotations

import numpy as np

__all__ = ["spans", "padded"]


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive batches of at most ``size`` of ``n`` items."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def padded(values: np.ndarray, size: int) -> np.ndarray:
    """Pad a batch to ``size`` by repeating its last entry (one compiled shape for all batches)."""
    values = np.asarray(values)
    return np.concatenate([values, np.repeat(values[-1:], size - len(values), axis=0)])
