"""Retrieval of the nearest training items of generated items: exact k nearest neighbours
(:func:`nearest_neighbours`, l2 or cosine, sharded over devices) and Carlini et al. 2023's
calibrated l2 memorization score (:func:`calibrated_l2`)."""

from mmh_jax.retrieval.neighbours import (
    CalibratedL2,
    Neighbours,
    calibrated_l2,
    nearest_neighbours,
)

__all__ = ["CalibratedL2", "Neighbours", "calibrated_l2", "nearest_neighbours"]
