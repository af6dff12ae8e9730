"""Splitting ``n`` items into consecutive batches."""

from __future__ import annotations

__all__ = ["spans"]


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive batches of at most ``size`` of ``n`` items."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [(i, min(i + size, n)) for i in range(0, n, size)]
