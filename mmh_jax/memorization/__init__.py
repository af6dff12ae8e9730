"""Memorization labels from LID estimates (the manifold memorization hypothesis)."""

from mmh_jax.memorization.classify import (
    DD_MEM,
    LABEL_NAMES,
    NOT_MEMORIZED,
    OD_MEM,
    Classification,
    classify,
    label_names,
)

__all__ = [
    "classify",
    "Classification",
    "label_names",
    "LABEL_NAMES",
    "NOT_MEMORIZED",
    "OD_MEM",
    "DD_MEM",
]
