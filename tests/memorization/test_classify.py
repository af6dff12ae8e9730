"""Tests for mmh_jax.memorization.classify."""

import numpy as np
import pytest

from mmh_jax.memorization import DD_MEM, LABEL_NAMES, NOT_MEMORIZED, OD_MEM, classify, label_names


def test_three_regimes_of_figure_4():
    # origin (LID_* = 0, model ~0), isolated point (LID_* = 1, model ~0), circle (1, ~1)
    res = classify(np.array([0.05, 0.04, 1.02]), np.array([0.0, 1.0, 1.0]))
    assert list(np.asarray(res.labels)) == [DD_MEM, OD_MEM, NOT_MEMORIZED]
    assert label_names(res.labels) == ["dd-mem", "od-mem", "not-memorized"]


def test_margins_are_consistent_with_labels():
    lid_model = np.array([0.0, 0.6, 2.0, 0.3, 5.0])
    lid_data = np.array([0.0, 1.0, 2.0, 3.0, 0.0])
    res = classify(lid_model, lid_data, od_gap=0.5, dd_max_lid=0.5)
    np.testing.assert_allclose(res.gap, lid_data - lid_model, atol=1e-6)
    np.testing.assert_allclose(res.od_margin, lid_data - lid_model - 0.5, atol=1e-6)
    np.testing.assert_allclose(res.dd_margin, 0.5 - np.maximum(lid_data, lid_model), atol=1e-6)
    labels = np.asarray(res.labels)
    assert np.all((labels == OD_MEM) == (np.asarray(res.od_margin) >= 0))
    assert np.all(
        (labels == DD_MEM) == ((np.asarray(res.od_margin) < 0) & (np.asarray(res.dd_margin) >= 0))
    )
    # gap 0.4 < 0.5 is not OD-Mem; a model far above a zero data LID is not DD-Mem
    assert labels[1] == NOT_MEMORIZED and labels[4] == NOT_MEMORIZED
    assert labels[3] == OD_MEM


def test_thresholds_are_respected():
    lid_model, lid_data = np.array([0.7]), np.array([1.0])
    assert int(classify(lid_model, lid_data, od_gap=0.5).labels[0]) == NOT_MEMORIZED
    assert int(classify(lid_model, lid_data, od_gap=0.25).labels[0]) == OD_MEM
    assert (
        int(classify(np.array([0.8]), np.array([0.8]), dd_max_lid=0.5).labels[0]) == NOT_MEMORIZED
    )
    assert int(classify(np.array([0.8]), np.array([0.8]), dd_max_lid=1.0).labels[0]) == DD_MEM


def test_od_takes_precedence_over_dd():
    # model LID far below an already-small data LID
    res = classify(np.array([-0.8]), np.array([0.0]), od_gap=0.5, dd_max_lid=0.5)
    assert int(res.labels[0]) == OD_MEM


def test_bad_inputs():
    with pytest.raises(ValueError):
        classify(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        classify(np.zeros(3), np.zeros(3), od_gap=0.0)
    with pytest.raises(ValueError):
        classify(np.zeros(3), np.zeros(3), dd_max_lid=-1.0)


def test_jittable():
    import jax

    f = jax.jit(lambda a, b: classify(a, b).labels)
    assert list(np.asarray(f(np.array([0.0, 0.0]), np.array([0.0, 2.0])))) == [DD_MEM, OD_MEM]
    assert LABEL_NAMES[OD_MEM] == "od-mem"
