"""Local intrinsic dimension (LID) estimators.

Model LID (LID_theta): :func:`flipd`, :func:`normal_bundle` (diffusion models),
:func:`jacobian_rank` (decoders and GAN generators). Data LID (LID_*): :func:`lpca`,
:func:`mle`, :func:`twonn`. Thresholding helpers for
singular-value spectra: :func:`numerical_rank`, :func:`percentile_threshold`,
:func:`lid_from_singular_values`.
"""

from mmh_jax.lid.data import mle, twonn
from mmh_jax.lid.flipd import FlipdKnee, flipd, flipd_curve, flipd_knee
from mmh_jax.lid.jacobian import JacobianRankResult, jacobian_rank
from mmh_jax.lid.lpca import lpca
from mmh_jax.lid.normal_bundle import NormalBundleResult, normal_bundle
from mmh_jax.lid.rank import lid_from_singular_values, numerical_rank, percentile_threshold

__all__ = [
    "FlipdKnee",
    "JacobianRankResult",
    "NormalBundleResult",
    "flipd",
    "flipd_curve",
    "flipd_knee",
    "jacobian_rank",
    "lid_from_singular_values",
    "lpca",
    "mle",
    "normal_bundle",
    "numerical_rank",
    "percentile_threshold",
    "twonn",
]
