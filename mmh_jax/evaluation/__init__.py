"""Evaluating memorization signals: detection metrics with bootstrap confidence intervals,
figures, and image complexity (PNG length) for complexity-normalised LID."""

# The modules first: `clip_score` is then rebound to the function of that name.
import mmh_jax.evaluation.clip_score as _clip_score
import mmh_jax.evaluation.complexity as _complexity
import mmh_jax.evaluation.detection as _detection
import mmh_jax.evaluation.plots as _plots
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

__all__ = [*_clip_score.__all__, *_detection.__all__, *_plots.__all__, *_complexity.__all__]
