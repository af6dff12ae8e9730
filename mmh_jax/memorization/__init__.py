"""Memorization labels from LID estimates (the manifold memorization hypothesis), the
memorization metrics of text-conditional diffusion models, and the Jacobian-rank LID of GAN
samples."""

from mmh_jax.memorization.classify import (
    DD_MEM,
    LABEL_NAMES,
    NOT_MEMORIZED,
    OD_MEM,
    Classification,
    classify,
    label_names,
)
from mmh_jax.memorization.gan import gan_lid
from mmh_jax.memorization.conditional import (
    CFGNorms,
    ConditionalFlipd,
    conditional_flipd,
    generation_cfg_norms,
    image_cfg_norms,
)

__all__ = [
    "classify",
    "Classification",
    "label_names",
    "LABEL_NAMES",
    "NOT_MEMORIZED",
    "OD_MEM",
    "DD_MEM",
    "CFGNorms",
    "ConditionalFlipd",
    "conditional_flipd",
    "generation_cfg_norms",
    "image_cfg_norms",
    "gan_lid",
]
