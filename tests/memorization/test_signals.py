"""Tests of mmh_jax.memorization.signals: one direction for every signal name."""

from __future__ import annotations

import pytest

from mmh_jax.memorization import memorized_when_high


def test_cfg_norms_point_up_and_flipd_points_down():
    # the prompt metrics (Wen et al.'s norm, the CFG-adjusted score) and the guard's norm
    assert memorized_when_high("cfg") and memorized_when_high("cfg_score")
    assert memorized_when_high("cfg_norm")
    # a low model LID is memorization (the manifold memorization hypothesis)
    assert not memorized_when_high("flipd")
    with pytest.raises(ValueError, match="signal"):
        memorized_when_high("lid")
