"""The figures of Stable Diffusion prompt attribution and mitigation (paper, Figures 7a, 7c,
10 and 11): prompts' tokens coloured by their attributions, the images before and after
mitigation, and the trade-off curve of CLIP score against similarity to the memorized image.

They draw what :mod:`mmh_jax.memorization.attribution` and :mod:`mmh_jax.memorization.mitigation`
return, with matplotlib (Agg), and write PNG files atomically.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmh_jax.experiments.common import save_figure
from mmh_jax.memorization import PromptAttribution, metric_label, summarise_mitigation

__all__ = ["plot_attributions", "plot_mitigation_grid", "plot_tradeoff"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attributions(
    attributions: Sequence[PromptAttribution],
    path: str | os.PathLike,
    *,
    line_chars: int = 64,
    cmap: str = "Reds",
    dpi: int = 130,
) -> Path:
    """The prompts' tokens laid out as text, each on a background coloured by its attribution
    normalised by the row's largest (paper, Figures 7a and 11); one row per attribution, grouped
    by prompt (a prompt's metrics one under the other, headed by the prompt).

    Args:
        attributions: from :func:`~mmh_jax.memorization.attribute_prompt` /
            :func:`~mmh_jax.memorization.attribute_prompts`.
        path: the PNG to write (atomically).
        line_chars: characters per text line before wrapping.
        cmap: matplotlib colormap of the normalised attribution (0 .. 1).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not attributions:
        raise ValueError("no attributions to plot")
    plt = _pyplot()
    colours = plt.get_cmap(cmap)
    label_chars = 16
    # lay out first (monospace: one data unit per character), then size the figure
    items: list[tuple[str, float, float, str, float]] = []  # (kind, x, line, text, value)
    line = 0.0
    previous = None
    for a in attributions:
        if a.prompt != previous:
            if previous is not None:
                line += 0.5
            shown = a.prompt if len(a.prompt) <= 110 else a.prompt[:107] + "..."
            items.append(("header", -label_chars, line, shown, 0.0))
            line += 1
            previous = a.prompt
        top = float(np.max(a.scores)) if len(a.scores) else 0.0
        norm = a.scores / top if top > 0 else np.zeros_like(a.scores)
        items.append(("label", -label_chars, line, f"{metric_label(a.metric)} {a.value:.3g}", 0.0))
        x = 0.0
        for token, word, v in zip(a.tokens, a.words, norm):
            width = max(1, len(word))
            if x > 0 and x + width > line_chars:
                x, line = 0.0, line + 1
            items.append(("token", x, line, word, float(v)))
            x += width + (1 if token.endswith("</w>") else 0)
        line += 1
    char_in, line_in = 0.095, 0.3
    fig = plt.figure(figsize=((label_chars + line_chars + 1) * char_in, (line + 0.8) * line_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-label_chars - 0.5, line_chars + 0.5)
    ax.set_ylim(line + 0.3, -0.7)
    ax.axis("off")
    for kind, x, y, text, colour in items:
        if kind == "header":
            ax.text(x, y, text, ha="left", va="center", fontsize=9, fontweight="bold")
        elif kind == "label":
            ax.text(
                x, y, text, ha="left", va="center", fontsize=8, family="monospace", color="0.25"
            )
        else:  # colour holds the normalised attribution; light text on dark backgrounds
            ax.text(
                x,
                y,
                text,
                ha="left",
                va="center",
                fontsize=11,
                family="monospace",
                color="white" if colour > 0.6 else "black",
                bbox=dict(
                    boxstyle="square,pad=0.12",
                    facecolor=colours(0.05 + 0.9 * colour),
                    edgecolor="none",
                ),
            )
    ax.text(
        -label_chars,
        line + 0.1,
        "colour: attribution / largest attribution of the row "
        "(gradient norm of the metric per token)",
        fontsize=7,
        color="0.4",
        va="center",
    )
    return save_figure(fig, path, dpi=dpi)


def plot_mitigation_grid(
    images: dict[str, list[np.ndarray]],
    new_prompts: dict[str, list[str]],
    path: str | os.PathLike,
    *,
    dpi: int = 130,
    wrap: int = 30,
) -> Path:
    """Images before and after mitigation (paper, Figure 10): one row per prompt, columns the
    original generation and each method, every image titled with its prompt.

    Args:
        images: :attr:`~mmh_jax.memorization.MitigationResult.images` (``"original"`` first).
        new_prompts: :attr:`~mmh_jax.memorization.MitigationResult.new_prompts`.
        path: the PNG to write (atomically).
        dpi: resolution.
        wrap: characters per title line.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    columns = list(images)
    if not columns or not images[columns[0]]:
        raise ValueError("no images to plot")
    n = len(images[columns[0]])
    plt = _pyplot()
    fig, axes = plt.subplots(n, len(columns), figsize=(2.3 * len(columns), 2.9 * n), squeeze=False)
    for c, name in enumerate(columns):
        for r in range(n):
            ax = axes[r, c]
            ax.imshow(images[name][r])
            ax.set_xticks([])
            ax.set_yticks([])
            text = new_prompts[name][r]
            text = text if len(text) <= 3 * wrap else text[: 3 * wrap - 3] + "..."
            ax.set_xlabel(textwrap.fill(text, wrap), fontsize=6)
            if r == 0:
                ax.set_title(
                    name if name != "original" else "original prompt", fontsize=8, fontweight="bold"
                )
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def plot_tradeoff(
    rows: Sequence[dict],
    path: str | os.PathLike,
    *,
    originals: Sequence[dict] | None = None,
    x_label: str = "SSCD similarity to the memorized image (lower is better)",
    y_label: str = "CLIP score with the original prompt (higher is better)",
    dpi: int = 130,
) -> Path:
    """The paper's Figure 7c: mean CLIP score against mean similarity to the memorized image,
    one line per method (and metric) through its ``k`` values, each point annotated with ``k``
    (means over prompts and repeats); the embedding method is a single point, the original
    prompts a star.

    Args:
        rows: :attr:`~mmh_jax.memorization.MitigationResult.rows` with finite ``similarity``
            and ``clip_score``.
        path: the PNG to write (atomically).
        originals: :attr:`~mmh_jax.memorization.MitigationResult.originals` (the star),
            optional.
        x_label, y_label: axis labels.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no row with both scores.
    """
    points = [
        s
        for s in summarise_mitigation(rows)
        if np.isfinite(s["similarity"]) and np.isfinite(s["clip_score"])
    ]
    if not points:
        raise ValueError("no row has both a similarity and a CLIP score to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    lines: dict[str, list[dict]] = {}
    for s in points:
        lines.setdefault(s["label"], []).append(s)
    for label, members in lines.items():
        members.sort(key=lambda s: s["k"])
        x = [s["similarity"] for s in members]
        y = [s["clip_score"] for s in members]
        marker = "s" if members[0]["method"] == "embedding" else "o"
        ax.plot(x, y, marker=marker, markersize=4, label=label)
        for s in members:
            if s["method"] != "embedding":
                ax.annotate(
                    f"k={s['k']}",
                    (s["similarity"], s["clip_score"]),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    if originals:
        sim = np.array([o["similarity"] for o in originals], np.float64)
        clip = np.array([o["clip_score"] for o in originals], np.float64)
        if np.isfinite(sim).any() and np.isfinite(clip).any():
            ax.plot(
                [np.nanmean(sim)],
                [np.nanmean(clip)],
                marker="*",
                markersize=11,
                color="black",
                linestyle="none",
                label="original prompt",
            )
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(y_label, fontsize=8)
    ax.set_title("Figure 7c: mitigation trade-off (mean over prompts and repeats)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
