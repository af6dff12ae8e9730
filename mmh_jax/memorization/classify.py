"""Per-point memorization labels from model and data LID (paper, Section 3).

The manifold memorization hypothesis (MMH) says memorization happens where the
model manifold has lower dimension than it should:

* **OD-Mem** (overfitting-driven): ``LID_theta(x) < LID_*(x)`` -- the model collapsed
  onto a point or thin set where the data manifold is larger (paper, Definition of
  OD-Mem; Figure 4, the isolated training point).
* **DD-Mem** (data-driven): ``LID_theta(x) ~= LID_*(x)`` and both are small -- the
  model faithfully reproduces a low-dimensional piece of the data distribution,
  e.g. a duplicated training point, for which ``LID_* = 0`` (Proposition 3.1;
  Figure 4, the point mass at the origin).
* otherwise **not memorized**.

Estimates are real-valued and noisy, so "below" and "small" are decided with
explicit thresholds: :func:`classify` calls a point OD-Mem when
``LID_* - LID_theta >= od_gap`` and DD-Mem when it is not OD-Mem and both
``LID_*`` and ``LID_theta`` are at most ``dd_max_lid``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = [
    "NOT_MEMORIZED",
    "OD_MEM",
    "DD_MEM",
    "LABEL_NAMES",
    "Classification",
    "classify",
    "label_names",
]

NOT_MEMORIZED = 0
"""Label of :func:`classify`: the point is not memorized."""
OD_MEM = 1
"""Label of :func:`classify`: overfitting-driven memorization (``LID_theta`` well below
``LID_*``)."""
DD_MEM = 2
"""Label of :func:`classify`: data-driven memorization (``LID_*`` itself low)."""
LABEL_NAMES: tuple[str, str, str] = ("not-memorized", "od-mem", "dd-mem")
"""The names of the labels, indexed by label: ``LABEL_NAMES[OD_MEM] == "od-mem"``."""


class Classification(NamedTuple):
    """Result of :func:`classify`; all fields have shape ``[m]``.

    Attributes:
        labels: integer codes, ``NOT_MEMORIZED`` (0), ``OD_MEM`` (1), ``DD_MEM`` (2);
            :func:`label_names` turns them into ``"not-memorized"``, ``"od-mem"``,
            ``"dd-mem"``.
        gap: ``LID_* - LID_theta``; positive where the model's manifold is thinner
            than the data's.
        od_margin: ``gap - od_gap``; ``>= 0`` exactly where the OD-Mem condition holds,
            and its size says how clearly.
        dd_margin: ``dd_max_lid - max(LID_*, LID_theta)``; ``>= 0`` exactly where both
            dimensions are low enough for DD-Mem.
    """

    labels: Int[Array, " m"]
    gap: Float[Array, " m"]
    od_margin: Float[Array, " m"]
    dd_margin: Float[Array, " m"]


def classify(
    lid_model: Float[ArrayLike, " m"],
    lid_data: Float[ArrayLike, " m"],
    *,
    od_gap: float = 0.5,
    dd_max_lid: float = 0.5,
) -> Classification:
    """Label points OD-Mem, DD-Mem or not memorized from ``LID_theta`` and ``LID_*``.

    A point is **OD-Mem** when ``LID_*(x) - LID_theta(x) >= od_gap`` (the MMH's
    ``LID_theta < LID_*``, paper Section 3.1); otherwise it is **DD-Mem** when
    ``max(LID_*(x), LID_theta(x)) <= dd_max_lid`` (``LID_theta = LID_*`` and small,
    e.g. ``LID_* = 0`` at a duplicated point, Proposition 3.1); otherwise it is
    **not memorized**. OD-Mem takes precedence, so a point whose model LID is far
    below an already small data LID is OD-Mem.

    Args:
        lid_model: estimates of ``LID_theta`` (e.g. FLIPD, paper Eq. 6, or the normal
            bundle, Eq. 8) at each point, shape ``[m]``.
        lid_data: estimates of ``LID_*`` at the same points (e.g. local PCA of the
            nearest training point), shape ``[m]``.
        od_gap: how far ``LID_theta`` must lie below ``LID_*`` to count as OD-Mem;
            must be positive.
        dd_max_lid: the largest dimension that still counts as "low" for DD-Mem;
            must be non-negative.

    Returns:
        :class:`Classification` with the labels and the margins behind them.

    Raises:
        ValueError: if shapes differ or thresholds are out of range.
    """
    if not od_gap > 0:
        raise ValueError(f"od_gap must be positive, got {od_gap}")
    if not dd_max_lid >= 0:
        raise ValueError(f"dd_max_lid must be non-negative, got {dd_max_lid}")
    lid_model = jnp.asarray(lid_model, dtype=jnp.result_type(float))
    lid_data = jnp.asarray(lid_data, dtype=jnp.result_type(float))
    if lid_model.shape != lid_data.shape or lid_model.ndim != 1:
        raise ValueError(
            f"lid_model and lid_data must be 1-D of equal length, got {lid_model.shape} and {lid_data.shape}"
        )
    gap = lid_data - lid_model
    od_margin = gap - od_gap
    dd_margin = dd_max_lid - jnp.maximum(lid_data, lid_model)
    labels = jnp.where(od_margin >= 0, OD_MEM, jnp.where(dd_margin >= 0, DD_MEM, NOT_MEMORIZED))
    return Classification(labels.astype(jnp.int32), gap, od_margin, dd_margin)


def label_names(labels: Int[ArrayLike, " m"]) -> list[str]:
    """Turn integer codes from :func:`classify` into ``"not-memorized"`` / ``"od-mem"`` / ``"dd-mem"``."""
    return [LABEL_NAMES[int(c)] for c in np.asarray(labels)]
