"""Figures of memorization signals: per-label score densities (the paper's Figures 5, 6 and
8), ROC curves of several signals, and grids of generated images over their retrieved
training images.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no display)
and written as PNG atomically (:func:`mmh_jax._src.files.atomic_path`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmh_jax._src.files import atomic_path
from mmh_jax.evaluation.complexity import to_uint8_nhwc
from mmh_jax.evaluation.detection import auroc, roc_points

__all__ = ["density_histograms", "roc_curves", "pair_grid"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _column(table: Any, name: str) -> np.ndarray:
    """One column of a mapping, pandas DataFrame or pyarrow Table as a numpy array."""
    try:
        col = table[name]
    except (KeyError, IndexError) as err:
        names = list(getattr(table, "column_names", None) or list(table.keys()))
        raise KeyError(f"no column {name!r}; columns are {names}") from err
    return np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col)


def density_histograms(
    table_or_columns: Any,
    columns: Sequence[str],
    labels: Any,
    *,
    path: str | os.PathLike,
    bins: int = 40,
    titles: Sequence[str] | None = None,
    dpi: int = 130,
) -> Path:
    """One panel per score column with the score's density split by label.

    Args:
        table_or_columns: A mapping of column name -> values, a pandas DataFrame or a
            pyarrow Table.
        columns: The score columns to draw, one panel each.
        labels: One label per row (bool, or hand labels such as ``"exact"``/``"not"``);
            each distinct label gets its own density, in sorted order.
        path: The PNG to write.
        bins: Histogram bins per panel (shared by the labels of a panel).
        titles: Panel titles; default the column names.
        dpi: The PNG's resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        KeyError: A column not in the table.
        ValueError: No columns, titles of the wrong length, or labels whose length differs
            from a column's.
    """
    if not columns:
        raise ValueError("no columns to plot")
    if titles is not None and len(titles) != len(columns):
        raise ValueError(f"{len(titles)} titles for {len(columns)} columns")
    y = np.asarray(labels)
    classes = np.unique(y)
    fig = _figure(4.0 * len(columns), 3.2)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for i, (ax, name) in enumerate(zip(axes, columns)):
        values = _column(table_or_columns, name).astype(np.float64)
        if values.shape != y.shape:
            raise ValueError(
                f"column {name!r} has {values.shape[0]} values but labels has {y.shape[0]}"
            )
        finite = np.isfinite(values)
        edges = np.histogram_bin_edges(values[finite], bins=bins) if finite.any() else bins
        for cls in classes:
            v = values[finite & (y == cls)]
            if v.size:
                ax.hist(v, bins=edges, density=True, alpha=0.5, label=f"{cls} (n={v.size})")
        ax.set_title(titles[i] if titles is not None else name)
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path, dpi)


def roc_curves(
    scores: Mapping[str, Any],
    labels: Any,
    *,
    path: str | os.PathLike,
    higher_is_positive: Mapping[str, bool] | None = None,
    log_x: bool = False,
    title: str | None = None,
    dpi: int = 130,
) -> Path:
    """The ROC curves of several signals on one axis, with each AUROC in the legend.

    Args:
        scores: Signal name -> one score per item, shape ``[n]``.
        labels: Bool or 0/1 labels, shape ``[n]``.
        path: The PNG to write.
        higher_is_positive: Signal name -> orientation (default ``True``).
        log_x: A logarithmic FPR axis (to read off TPR at low FPR); it starts at the
            smallest non-zero FPR, ``1 / n_negative``.
        title: The axis title.
        dpi: The PNG's resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: No signals, or bad scores/labels as for :func:`~.detection.auroc`.
    """
    if not scores:
        raise ValueError("no signals to plot")
    orientation = dict(higher_is_positive or {})
    fig = _figure(4.5, 4.0)
    ax = fig.subplots()
    for name, values in scores.items():
        up = orientation.get(name, True)
        try:
            fpr, tpr = roc_points(values, labels, higher_is_positive=up)
            area = auroc(values, labels, higher_is_positive=up)
        except ValueError as err:
            raise ValueError(f"signal {name!r}: {err}") from err
        ax.step(fpr, tpr, where="post", label=f"{name} (AUROC {area:.3f})")
    if log_x:
        n_negative = int(np.sum(~(np.asarray(labels) == 1)))
        ax.set_xscale("log")
        ax.set_xlim(1.0 / n_negative, 1.0)
    else:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return _save(fig, path, dpi)


def _images(images: Any, what: str) -> list[np.ndarray]:
    """A batch array or a sequence of single images as a list of uint8 ``[h, w, c]``."""
    if not isinstance(images, (list, tuple)):
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise ValueError(
                f"{what} images must be a batch [n, ...] or a sequence of "
                f"images, got shape {arr.shape}"
            )
        try:
            return list(to_uint8_nhwc(arr))
        except ValueError as err:
            raise ValueError(f"{what} images: {err}") from err
    out = []
    for i, img in enumerate(images):
        try:
            out.append(to_uint8_nhwc(np.asarray(img)[None])[0])
        except ValueError as err:
            raise ValueError(f"{what} {i}: {err}") from err
    return out


def pair_grid(
    queries: Any,
    matches: Any,
    distances: Any,
    *,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    dpi: int = 130,
) -> Path:
    """A grid of generated images (top) over their retrieved training images (bottom).

    Each match is captioned with its distance to the query above it.

    Args:
        queries: Generated images, uint8 ``[n, h, w, c]`` or float ``[n, c, h, w]`` in
            ``[-1, 1]`` (or a sequence of single images of either kind).
        matches: The retrieved training image of each query, in the same formats.
        distances: The distance of each pair, shape ``[n]``.
        path: The PNG to write.
        titles: A caption per query (e.g. its id); default the item's index.
        ncols: Pairs per row of the grid.
        dpi: The PNG's resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: No items, counts of queries, matches, distances or titles that differ,
            or a query whose size differs from its match's (naming the item).
    """
    q = _images(queries, "query")
    m = _images(matches, "match")
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if not q:
        raise ValueError("no images to plot")
    counts = {"queries": len(q), "matches": len(m), "distances": d.size}
    if titles is not None:
        counts["titles"] = len(titles)
    if len(set(counts.values())) != 1:
        raise ValueError("counts differ: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for i, (a, b) in enumerate(zip(q, m)):
        if a.shape != b.shape:
            name = titles[i] if titles is not None else i
            raise ValueError(
                f"item {name}: query is {'x'.join(map(str, a.shape))} but its "
                f"match is {'x'.join(map(str, b.shape))}"
            )
    n = len(q)
    cols = max(1, min(ncols, n))
    rows = -(-n // cols)
    fig = _figure(1.6 * cols, 3.4 * rows)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        for ax, img in ((top, q[i]), (bottom, m[i])):
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray",
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
        top.set_title(str(titles[i] if titles is not None else i), fontsize="small")
        bottom.set_title(f"d={d[i]:.3g}", fontsize="small")
    fig.tight_layout()
    return _save(fig, path, dpi)
