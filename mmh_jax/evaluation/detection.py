"""Detection metrics of memorization signals: AUROC, TPR at a fixed FPR and average precision,
with stratified percentile-bootstrap confidence intervals.

All three are computed here with numpy (sorting and tie handling) and agree with
scikit-learn's ``roc_auc_score``, ``roc_curve`` and ``average_precision_score`` to floating
point, ties included. Scores are oriented so that *higher means positive* (memorized); pass
``higher_is_positive=False`` for signals where a low value flags memorization (LID).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from mmh_jax._src.rng import numpy_generator

__all__ = [
    "auroc",
    "tpr_at_fpr",
    "average_precision",
    "roc_points",
    "DetectionMetrics",
    "detection_report",
    "JoinedLabels",
    "label_join",
]


def _check_labels(labels: Any, n: int | None = None, *, name: str = "scores") -> np.ndarray:
    """Labels as a bool array; refuse values other than 0/1/True/False and a length mismatch."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.dtype != bool:
        if y.dtype.kind not in "iuf" or not np.all((y == 0) | (y == 1)):
            bad = y[0] if y.dtype.kind not in "iuf" else y[~((y == 0) | (y == 1))][0]
            raise ValueError(f"labels must be bool or 0/1, found {bad!r}")
        y = y == 1
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {n} values but labels has {y.shape[0]}")
    if y.all() or not y.any():
        raise ValueError(
            f"labels have a single class ({int(y.sum())} positive, {int((~y).sum())} negative);"
            " detection metrics need both"
        )
    return y


def _check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Scores as a 1-D float64 array; refuse NaN naming the signal."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {s.shape}")
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(
            f"{name} has {int(nan.sum())} NaN value(s) (first at index {int(np.argmax(nan))})"
        )
    return s


def _prepare(
    scores: Any, labels: Any, higher_is_positive: bool, name: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    s = _check_scores(scores, name)
    y = _check_labels(labels, s.shape[0], name=name)
    return (s if higher_is_positive else -s), y


def _counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest first.

    The same construction as scikit-learn's ``_binary_clf_curve``: sort the scores in
    descending order, and keep only the last index of each run of tied scores, so that tied
    items enter the positive set together.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, s_sorted[last]


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    return _auroc_counts(*_counts(s, y)[:2])


def _auroc_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _tpr_at_fpr(s: np.ndarray, y: np.ndarray, fpr: float) -> float:
    return _tpr_counts(*_counts(s, y)[:2], fpr)


def _tpr_counts(tps: np.ndarray, fps: np.ndarray, fpr: float) -> float:
    ok = fps / fps[-1] <= fpr
    return float(tps[ok][-1] / tps[-1]) if ok.any() else 0.0


def _average_precision(s: np.ndarray, y: np.ndarray) -> float:
    return _ap_counts(*_counts(s, y)[:2])


def _ap_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _check_fpr(fpr: float) -> float:
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    return float(fpr)


def auroc(scores: Any, labels: Any, *, higher_is_positive: bool = True) -> float:
    """Area under the ROC curve (ties counted as half, as ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: One score per item, shape ``[n]``; no NaN.
        labels: Bool or 0/1 labels, shape ``[n]``; ``True`` marks a positive (memorized) item.
        higher_is_positive: Whether a higher score means positive; ``False`` negates scores.

    Returns:
        The AUROC in ``[0, 1]``.

    Raises:
        ValueError: NaN scores, labels that are not 0/1, mismatched lengths, a single class.
    """
    return _auroc(*_prepare(scores, labels, higher_is_positive))


def tpr_at_fpr(
    scores: Any, labels: Any, *, fpr: float = 0.01, higher_is_positive: bool = True
) -> float:
    """The largest TPR on the ROC curve at a false-positive rate of at most ``fpr``.

    No interpolation (the step convention of Wen et al.): the value is the TPR of the
    best threshold whose FPR does not exceed ``fpr``, read from every point of the empirical
    ROC curve (scikit-learn's ``roc_curve(..., drop_intermediate=False)``; its default
    ``drop_intermediate=True`` removes collinear points and can then report a lower value).
    With no threshold at FPR ``<= fpr`` other than "accept nothing" the result is 0.

    Args:
        scores: One score per item, shape ``[n]``; no NaN.
        labels: Bool or 0/1 labels, shape ``[n]``.
        fpr: The false-positive-rate budget in ``[0, 1]``.
        higher_is_positive: Whether a higher score means positive.

    Returns:
        The TPR in ``[0, 1]``.

    Raises:
        ValueError: Bad inputs as for :func:`auroc`, or ``fpr`` outside ``[0, 1]``.
    """
    fpr = _check_fpr(fpr)
    return _tpr_at_fpr(*_prepare(scores, labels, higher_is_positive), fpr)


def average_precision(scores: Any, labels: Any, *, higher_is_positive: bool = True) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds.

    The same (non-interpolated) definition as ``sklearn.metrics.average_precision_score``.

    Args:
        scores: One score per item, shape ``[n]``; no NaN.
        labels: Bool or 0/1 labels, shape ``[n]``.
        higher_is_positive: Whether a higher score means positive.

    Returns:
        The average precision in ``[0, 1]``.

    Raises:
        ValueError: Bad inputs as for :func:`auroc`.
    """
    return _average_precision(*_prepare(scores, labels, higher_is_positive))


def roc_points(
    scores: Any, labels: Any, *, higher_is_positive: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Every point of the empirical ROC curve, starting at ``(0, 0)``.

    Args:
        scores: One score per item, shape ``[n]``; no NaN.
        labels: Bool or 0/1 labels, shape ``[n]``.
        higher_is_positive: Whether a higher score means positive.

    Returns:
        ``(fpr, tpr)``, each of shape ``[k + 1]`` for ``k`` distinct scores.

    Raises:
        ValueError: Bad inputs as for :func:`auroc`.
    """
    tps, fps, _ = _counts(*_prepare(scores, labels, higher_is_positive))
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


class DetectionMetrics(NamedTuple):
    """One signal's detection metrics with percentile-bootstrap confidence intervals."""

    auroc: float
    auroc_ci: tuple[float, float]
    tpr: float
    """TPR at the report's FPR (see :func:`tpr_at_fpr`)."""
    tpr_ci: tuple[float, float]
    ap: float
    """Average precision."""
    ap_ci: tuple[float, float]
    n_positive: int
    n_negative: int


def detection_report(
    scores: Mapping[str, Any],
    labels: Any,
    *,
    higher_is_positive: Mapping[str, bool] | None = None,
    fpr: float = 0.01,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    key: jax.Array | None = None,
) -> dict[str, DetectionMetrics]:
    """AUROC, TPR at ``fpr`` and average precision of several signals, with bootstrap CIs.

    The intervals are percentile-bootstrap intervals over items, stratified by label: each
    resample draws ``n_positive`` positives and ``n_negative`` negatives with replacement
    from their own class, so every resample has both classes. The resamples come from
    one NumPy generator made from ``key`` and are the same for every signal, so the signals'
    intervals are comparable (and the report is deterministic for a given ``key``).

    Args:
        scores: Signal name -> one score per item, each of shape ``[n]``; no NaN.
        labels: Bool or 0/1 labels, shape ``[n]``, shared by all signals.
        higher_is_positive: Signal name -> orientation; signals not named default to
            ``True`` (a higher score flags memorization).
        fpr: The false-positive-rate budget of the TPR.
        n_bootstrap: The number of bootstrap resamples; 0 gives degenerate intervals at
            the point estimate.
        confidence: The intervals' coverage, in ``(0, 1)``.
        key: PRNG key of the resamples; required when ``n_bootstrap > 0``.

    Returns:
        Signal name -> :class:`DetectionMetrics`, in the order of ``scores``.

    Raises:
        ValueError: No signals, a signal with NaN scores or of the wrong length (naming it),
            labels that are not 0/1 or of a single class, an orientation for an unknown
            signal, ``fpr``/``n_bootstrap``/``confidence`` out of range, or no ``key`` for
            the resamples.
    """
    if not scores:
        raise ValueError("no signals to evaluate")
    orientation = dict(higher_is_positive or {})
    unknown = sorted(set(orientation) - set(scores))
    if unknown:
        raise ValueError(
            f"higher_is_positive names unknown signal(s) {unknown}; signals are {list(scores)}"
        )
    fpr = _check_fpr(fpr)
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if n_bootstrap and key is None:
        raise ValueError(
            "key is required for the bootstrap resamples: pass "
            "key=jax.random.key(seed), or n_bootstrap=0"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    oriented: dict[str, np.ndarray] = {}
    y: np.ndarray | None = None
    for name, values in scores.items():
        s, y = _prepare(values, labels, orientation.get(name, True), name=f"signal {name!r}")
        oriented[name] = s
    assert y is not None
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)

    def metrics(s: np.ndarray, yy: np.ndarray) -> tuple[float, float, float]:
        tps, fps, _ = _counts(s, yy)
        return _auroc_counts(tps, fps), _tpr_counts(tps, fps, fpr), _ap_counts(tps, fps)

    point = {name: metrics(s, y) for name, s in oriented.items()}
    boot = {name: np.empty((n_bootstrap, 3)) for name in oriented}
    rng = numpy_generator(key) if n_bootstrap else None
    y_boot = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    for b in range(n_bootstrap):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        for name, s in oriented.items():
            boot[name][b] = metrics(s[idx], y_boot)

    alpha = (1.0 - confidence) / 2.0
    report = {}
    for name, (a, t, ap) in point.items():
        if n_bootstrap:
            low, high = np.quantile(boot[name], [alpha, 1.0 - alpha], axis=0)
        else:
            low = high = np.array([a, t, ap])
        report[name] = DetectionMetrics(
            auroc=a,
            auroc_ci=(float(low[0]), float(high[0])),
            tpr=t,
            tpr_ci=(float(low[1]), float(high[1])),
            ap=ap,
            ap_ci=(float(low[2]), float(high[2])),
            n_positive=int(pos.size),
            n_negative=int(neg.size),
        )
    return report


class JoinedLabels(NamedTuple):
    """Hand labels aligned to a table's rows."""

    rows: np.ndarray
    """The table rows (int indices, ascending) that carry a label."""
    labels: np.ndarray
    """The label of each of those rows (bool when ``positive`` was given)."""


def label_join(
    table_ids: Sequence[Hashable] | np.ndarray,
    labels: Mapping[Hashable, Any],
    *,
    positive: Sequence[Any] | None = None,
) -> JoinedLabels:
    """Align hand labels (e.g. ``"exact"``, ``"reconstructive"``, ``"not"``) to a table's ids.

    Args:
        table_ids: The table's id column, one id per row; ids must be unique.
        labels: Id -> label for the labelled items (a subset of the table's ids).
        positive: Label values that count as positive; when given the returned labels are
            bool (``True`` for those values), ready for :func:`detection_report`.

    Returns:
        :class:`JoinedLabels` with the labelled rows in table order and their labels; select
        a score column's labelled values with ``column[joined.rows]``.

    Raises:
        KeyError: A labelled id not in the table (the first one is named).
        ValueError: Duplicate ids in the table, or no labels.
    """
    ids = list(
        np.asarray(table_ids, dtype=object).tolist()
        if isinstance(table_ids, np.ndarray)
        else table_ids
    )
    row_of: dict[Hashable, int] = {}
    for row, item in enumerate(ids):
        if item in row_of:
            raise ValueError(f"table id {item!r} appears twice (rows {row_of[item]} and {row})")
        row_of[item] = row
    if not labels:
        raise ValueError("no labels to join")
    for item in labels:
        if item not in row_of:
            raise KeyError(
                f"labelled id {item!r} is not in the table's ids "
                f"({len(row_of)} ids, e.g. {ids[:3]!r})"
            )
    rows = np.sort(np.array([row_of[item] for item in labels], dtype=np.int64))
    values = np.array([labels[ids[r]] for r in rows], dtype=object)
    if positive is not None:
        wanted = set(positive)
        return JoinedLabels(rows, np.array([v in wanted for v in values], dtype=bool))
    try:
        values = np.array(values.tolist())
    except (ValueError, TypeError):  # pragma: no cover - ragged label values stay objects
        pass
    return JoinedLabels(rows, values)
