"""Evaluating memorization signals: detection metrics with bootstrap confidence intervals,
figures, and image complexity (PNG length) for complexity-normalised LID."""

from mmh_jax.evaluation.clip_score import CLIP, clip_preprocess, clip_score, load_clip
from mmh_jax.evaluation.complexity import normalized_lid, png_length, to_uint8_nhwc
from mmh_jax.evaluation.detection import (
    DetectionMetrics,
    JoinedLabels,
    auroc,
    average_precision,
    detection_report,
    label_join,
    roc_points,
    tpr_at_fpr,
)
from mmh_jax.evaluation.plots import density_histograms, pair_grid, roc_curves

__all__ = [
    # CLIP score
    "CLIP",
    "clip_preprocess",
    "clip_score",
    "load_clip",
    # detection
    "auroc",
    "tpr_at_fpr",
    "average_precision",
    "roc_points",
    "DetectionMetrics",
    "detection_report",
    "JoinedLabels",
    "label_join",
    # plots
    "density_histograms",
    "roc_curves",
    "pair_grid",
    # complexity
    "png_length",
    "normalized_lid",
    "to_uint8_nhwc",
]
