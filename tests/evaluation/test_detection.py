"""Tests of mmh_jax.evaluation.detection: the metrics against scikit-learn (ties included),
the stratified, seeded bootstrap, and the label checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from mmh_jax.evaluation import (
    DetectionMetrics,
    auroc,
    average_precision,
    detection_report,
    label_join,
    roc_points,
    tpr_at_fpr,
)

KEY = jax.random.key(0)


def _data(n, seed, *, ties, frac=0.3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < frac
    y[:2] = [True, False]
    s = rng.standard_normal(n) + 0.8 * y
    if ties:
        s = np.round(s * 2) / 2  # few distinct values: many ties across classes
    return s, y


def _sk_tpr(s, y, fpr):
    f, t, _ = roc_curve(y, s, drop_intermediate=False)
    return t[f <= fpr].max()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_sklearn(seed, ties):
    s, y = _data(300 + 37 * seed, seed, ties=ties)
    assert abs(auroc(s, y) - roc_auc_score(y, s)) < 1e-9
    assert abs(average_precision(s, y) - average_precision_score(y, s)) < 1e-9
    for fpr in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0):
        assert abs(tpr_at_fpr(s, y, fpr=fpr) - _sk_tpr(s, y, fpr)) < 1e-9
    # the orientation flag is negation; 0/1 ints are labels too
    assert abs(auroc(s, y.astype(int), higher_is_positive=False) - roc_auc_score(y, -s)) < 1e-9
    assert (
        abs(average_precision(s, y, higher_is_positive=False) - average_precision_score(y, -s))
        < 1e-9
    )
    f, t = roc_points(s, y)
    sk_f, sk_t, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(f, sk_f, atol=1e-12)
    np.testing.assert_allclose(t, sk_t, atol=1e-12)


def test_all_tied_scores():
    y = np.array([1, 0, 1, 0, 0], bool)
    s = np.zeros(5)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s)) == pytest.approx(0.5)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y, s))
    assert tpr_at_fpr(s, y, fpr=0.5) == 0.0 and tpr_at_fpr(s, y, fpr=1.0) == 1.0


def test_report_ci_contains_point_and_is_seeded():
    s, y = _data(400, 0, ties=False)
    noise = np.random.default_rng(5).standard_normal(400)
    scores = {"signal": s, "lid": -s + 0.1 * noise, "noise": noise}
    kw = dict(higher_is_positive={"lid": False}, n_bootstrap=200, fpr=0.05)
    report = detection_report(scores, y, key=jax.random.key(3), **kw)
    assert list(report) == ["signal", "lid", "noise"]
    for name, m in report.items():
        assert isinstance(m, DetectionMetrics)
        assert m.n_positive == y.sum() and m.n_negative == (~y).sum()
        for value, (lo, hi) in ((m.auroc, m.auroc_ci), (m.tpr, m.tpr_ci), (m.ap, m.ap_ci)):
            assert lo <= value <= hi, name
            assert hi > lo
    assert report["signal"].auroc == pytest.approx(roc_auc_score(y, s))
    assert report["lid"].auroc > 0.7 and abs(report["noise"].auroc - 0.5) < 0.1
    assert detection_report(scores, y, key=jax.random.key(3), **kw) == report
    assert detection_report(scores, y, key=jax.random.key(4), **kw) != report
    # the same resamples for every signal: a copied signal gets identical intervals
    twin = detection_report({"a": s, "b": s.copy()}, y, n_bootstrap=50, key=KEY)
    assert twin["a"] == twin["b"]
    # a lower confidence gives a nested, narrower interval
    narrow = detection_report(scores, y, key=jax.random.key(3), confidence=0.5, **kw)[
        "signal"
    ].auroc_ci
    wide = report["signal"].auroc_ci
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


def test_bootstrap_is_stratified():
    """With one positive among many negatives, every resample still has that positive: an
    unstratified bootstrap would lose it in ~37% of resamples (a single class, no AUROC)."""
    y = np.zeros(50, bool)
    y[7] = True
    s = np.arange(50.0)  # the positive ranks 8th of 50: AUROC = 7/49
    m = detection_report({"x": s}, y, n_bootstrap=100, key=KEY)["x"]
    assert m.n_positive == 1
    assert m.auroc == pytest.approx(7 / 49)
    assert 0.0 <= m.auroc_ci[0] <= m.auroc_ci[1] <= 1.0


def test_zero_bootstrap_gives_point_intervals():
    s, y = _data(100, 1, ties=True)
    m = detection_report({"s": s}, y, n_bootstrap=0)["s"]
    assert m.auroc_ci == (m.auroc, m.auroc) and m.ap_ci == (m.ap, m.ap)


def test_errors():
    s, y = _data(50, 0, ties=False)
    bad = s.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"signal 'flipd'.*NaN"):
        detection_report({"ok": s, "flipd": bad}, y, key=KEY)
    with pytest.raises(ValueError, match=r"50 values but labels has 49"):
        detection_report({"s": s}, y[:-1], key=KEY)
    with pytest.raises(ValueError, match=r"50 values but labels has 51"):
        auroc(s, np.r_[y, True])
    with pytest.raises(ValueError, match="single class"):
        detection_report({"s": s}, np.ones(50, bool), key=KEY)
    with pytest.raises(ValueError, match="single class"):
        tpr_at_fpr(s, np.zeros(50))
    with pytest.raises(ValueError, match="bool or 0/1"):
        auroc(s, np.where(y, 2, 0))
    with pytest.raises(ValueError, match="bool or 0/1"):
        auroc(s, np.where(y, "exact", "not"))
    with pytest.raises(ValueError, match="unknown signal"):
        detection_report({"s": s}, y, higher_is_positive={"lid": False}, key=KEY)
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(s, y, fpr=1.5)
    with pytest.raises(ValueError, match="confidence"):
        detection_report({"s": s}, y, confidence=1.0, key=KEY)
    with pytest.raises(ValueError, match="no signals"):
        detection_report({}, y, key=KEY)
    with pytest.raises(ValueError, match="key is required"):
        detection_report({"s": s}, y)


def test_label_join():
    ids = ["a", "b", "c", "d", "e"]
    hand = {"d": "exact", "b": "not", "e": "reconstructive"}
    joined = label_join(ids, hand)
    np.testing.assert_array_equal(joined.rows, [1, 3, 4])
    np.testing.assert_array_equal(joined.labels, ["not", "exact", "reconstructive"])
    binary = label_join(np.array(ids), hand, positive=["exact", "reconstructive"])
    np.testing.assert_array_equal(binary.labels, [False, True, True])
    assert binary.labels.dtype == bool
    with pytest.raises(KeyError, match="'zz' is not in the table"):
        label_join(ids, {"a": "not", "zz": "exact", "yy": "not"})
    with pytest.raises(ValueError, match="appears twice"):
        label_join(["a", "b", "a"], {"a": "not"})
    with pytest.raises(ValueError, match="no labels"):
        label_join(ids, {})
    # integer ids from a numpy column match plain int keys
    assert label_join(np.arange(4), {2: "exact"}).rows.tolist() == [2]
