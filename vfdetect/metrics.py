"""Evaluation metrics as pure functions: ROC, trapezoid AUC, ROC convex hull, patient-level
operating points, case bootstrap and decisions at a threshold.

Plain numpy on scores and truth; no files, no plotting. The paper's protocol (Nicolaes et al.
2019, section 4):

* **Vertebra level**: the per-vertebra fracture score against the reference "fractured";
  ordinary ROC and AUC (:func:`roc_curve`, :func:`roc_auc`).
* **Patient level**: a patient is called positive by the classifier (probability threshold ``p``,
  noise threshold ``n``) when the largest connected component of voxels with p(fracture) >= ``p``
  measures at least ``n`` mm³ (and is not empty). Every pair is a classifier; the ROC is the
  convex hull of their (FPR, TPR) points together with the trivial classifiers (0, 0) and (1, 1)
  (Provost & Fawcett's ROC convex hull), and the AUC is the area under that hull
  (:func:`patient_roc`). Every noise threshold that changes a decision is used, so the hull is
  exact for the saved probability-threshold grid. A hull picks the best classifier on the
  evaluated cases themselves, as in the paper, so it is an optimistic summary.
* **Bootstrap**: cases are resampled with replacement (a case's vertebrae stay together), every
  ROC is recomputed (:func:`bootstrap_roc`); resamples holding a single class have no ROC and are
  skipped and counted.

:mod:`vfdetect.evaluation` assembles these into the metrics of a cohort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfdetect.errors import VfdetectError

DEFAULT_FPR_GRID_POINTS = 101


# ----------------------------------------------------------------------------------------------
# ROC basics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RocCurve:
    """An ROC curve: one point per distinct score threshold, from (0, 0) to (1, 1).

    ``thresholds[i]`` is the score cut giving ``(fpr[i], tpr[i])`` when "score >= threshold" is
    called positive; ``thresholds[0]`` is ``inf`` (nothing positive).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @property
    def auc(self) -> float:
        return trapezoid_area(self.fpr, self.tpr)


def _as_truth(truth: Sequence[bool] | np.ndarray) -> np.ndarray:
    array = np.asarray(truth)
    if array.ndim != 1:
        raise VfdetectError(f"truth must be one-dimensional, got shape {array.shape}")
    return array.astype(bool)


def _as_scores(scores: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.shape != (size,):
        raise VfdetectError(f"scores have shape {array.shape}, expected ({size},) like the truth")
    if not np.all(np.isfinite(array)):
        raise VfdetectError("scores must be finite")
    return array


def has_both_classes(truth: Sequence[bool] | np.ndarray) -> bool:
    """True when ``truth`` holds at least one positive and one negative."""
    truth = _as_truth(truth)
    return bool(truth.any() and (~truth).any())


def roc_curve(truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> RocCurve:
    """ROC curve of ``scores`` against boolean ``truth`` (higher score = more likely positive).

    Tied scores form one point, so ties give a diagonal segment (counted half in the AUC). Same
    points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``. Raises
    :class:`VfdetectError` when ``truth`` holds a single class (no ROC exists).
    """
    truth = _as_truth(truth)
    scores = _as_scores(scores, truth.size)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        raise VfdetectError(
            f"an ROC needs positives and negatives; got {positives} positive and {negatives} negative"
        )
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_truth = truth[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), truth.size - 1]
    true_positives = np.cumsum(sorted_truth)[last_of_each_score]
    false_positives = last_of_each_score + 1 - true_positives
    return RocCurve(
        fpr=np.r_[0.0, false_positives / negatives],
        tpr=np.r_[0.0, true_positives / positives],
        thresholds=np.r_[np.inf, sorted_scores[last_of_each_score]],
    )


def trapezoid_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a piecewise-linear curve through the points ``(fpr, tpr)`` (fpr non-decreasing)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise VfdetectError("fpr and tpr must be one-dimensional arrays of the same length")
    if np.any(np.diff(fpr) < 0):
        raise VfdetectError("fpr must be non-decreasing")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def roc_auc(truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count half); ``nan`` when ``truth`` holds a single class."""
    truth = _as_truth(truth)
    if not has_both_classes(truth):
        return math.nan
    return roc_curve(truth, scores).auc


def convex_hull_roc(fpr: Sequence[float] | np.ndarray, tpr: Sequence[float] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper convex hull of ROC points, from (0, 0) to (1, 1) (the ROC convex hull).

    The trivial classifiers (0, 0) ("all negative") and (1, 1) ("all positive") are always
    available and always included. Points on a hull edge but not at a corner are dropped. Returns
    ``(hull_fpr, hull_tpr, vertex_index)`` where ``vertex_index[i]`` is the index of the input point
    at hull corner ``i``, or -1 for an added trivial corner.
    """
    fpr = np.asarray(fpr, dtype=np.float64).ravel()
    tpr = np.asarray(tpr, dtype=np.float64).ravel()
    if fpr.shape != tpr.shape:
        raise VfdetectError("fpr and tpr must have the same length")
    if np.any((fpr < 0) | (fpr > 1) | (tpr < 0) | (tpr > 1)) or not np.all(np.isfinite(fpr + tpr)):
        raise VfdetectError("ROC points must lie in [0, 1] x [0, 1]")
    xs = np.r_[0.0, fpr, 1.0]
    ys = np.r_[0.0, tpr, 1.0]
    index = np.r_[-1, np.arange(fpr.size), -1]
    # Sort by fpr, then tpr; for identical points keep the first input (trivial corners first).
    order = np.lexsort((np.arange(xs.size), ys, xs))
    hull: list[int] = []
    for point in order:
        if hull and xs[hull[-1]] == xs[point] and ys[hull[-1]] == ys[point]:
            continue  # duplicate point: keep the first
        while len(hull) >= 2:
            origin, middle = hull[-2], hull[-1]
            cross = (xs[middle] - xs[origin]) * (ys[point] - ys[origin]) - (ys[middle] - ys[origin]) * (
                xs[point] - xs[origin]
            )
            if cross >= -1e-12:  # not a clockwise turn: middle is under or on the chord
                hull.pop()
            else:
                break
        hull.append(int(point))
    return xs[hull], ys[hull], index[hull]


def interpolate_roc(fpr: np.ndarray, tpr: np.ndarray, fpr_grid: np.ndarray) -> np.ndarray:
    """TPR of a piecewise-linear ROC at each value of ``fpr_grid``.

    Where the curve is vertical (several points at one FPR) the highest TPR is used, so the value
    at FPR 0 is the height of the curve's first vertical step.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    unique_fpr, inverse = np.unique(fpr, return_inverse=True)
    top_tpr = np.full(unique_fpr.size, -np.inf)
    np.maximum.at(top_tpr, inverse, tpr)
    return np.interp(np.asarray(fpr_grid, dtype=np.float64), unique_fpr, top_tpr)


# ----------------------------------------------------------------------------------------------
# Patient level: grid of (probability threshold, noise threshold) classifiers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OperatingPoints:
    """Patient-level classifiers, one per (probability threshold, noise threshold) pair."""

    probability_threshold: np.ndarray
    noise_threshold_mm3: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    positives: int
    negatives: int

    @property
    def tpr(self) -> np.ndarray:
        return self.true_positives / max(self.positives, 1)

    @property
    def fpr(self) -> np.ndarray:
        return self.false_positives / max(self.negatives, 1)

    @property
    def specificity(self) -> np.ndarray:
        return 1.0 - self.fpr

    def rows(self) -> list[dict[str, float]]:
        """One dict per classifier (JSON/CSV friendly)."""
        return [
            {
                "probability_threshold": float(p),
                "noise_threshold_mm3": float(n),
                "true_positives": int(tp),
                "false_positives": int(fp),
                "false_negatives": int(self.positives - tp),
                "true_negatives": int(self.negatives - fp),
                "recall": float(r),
                "specificity": float(s),
            }
            for p, n, tp, fp, r, s in zip(
                self.probability_threshold,
                self.noise_threshold_mm3,
                self.true_positives,
                self.false_positives,
                self.tpr,
                self.specificity,
                strict=True,
            )
        ]


def _check_component_table(truth: np.ndarray, largest_mm3: np.ndarray, probability_thresholds: np.ndarray) -> None:
    if largest_mm3.ndim != 2 or largest_mm3.shape != (truth.size, probability_thresholds.size):
        raise VfdetectError(
            f"largest component table has shape {largest_mm3.shape}, expected "
            f"({truth.size} cases, {probability_thresholds.size} probability thresholds)"
        )
    if np.any(largest_mm3 < 0) or not np.all(np.isfinite(largest_mm3)):
        raise VfdetectError("largest component sizes must be finite and >= 0")


def patient_calls(largest_mm3: np.ndarray, noise_threshold_mm3: float) -> np.ndarray:
    """Patient-level decision: positive iff the largest component is non-empty and >= the noise threshold."""
    largest_mm3 = np.asarray(largest_mm3, dtype=np.float64)
    return (largest_mm3 > 0) & (largest_mm3 >= noise_threshold_mm3)


def patient_operating_points(
    truth: Sequence[bool] | np.ndarray,
    largest_mm3: np.ndarray,
    probability_thresholds: Sequence[float] | np.ndarray,
    noise_thresholds_mm3: Sequence[float] | np.ndarray | None = None,
) -> OperatingPoints:
    """Counts of every (probability threshold, noise threshold) classifier.

    ``largest_mm3[i, j]`` is case ``i``'s largest component (mm³) at ``probability_thresholds[j]``
    (0 when no voxel reaches it). Without ``noise_thresholds_mm3`` every distinct non-zero size of
    each column is used (all classifiers that differ), plus ``inf`` (nothing positive).
    """
    truth = _as_truth(truth)
    largest = np.asarray(largest_mm3, dtype=np.float64)
    thresholds = np.asarray(probability_thresholds, dtype=np.float64).ravel()
    _check_component_table(truth, largest, thresholds)
    probability_column: list[np.ndarray] = []
    noise_column: list[np.ndarray] = []
    tp_column: list[np.ndarray] = []
    fp_column: list[np.ndarray] = []
    for j, threshold in enumerate(thresholds):
        sizes = largest[:, j]
        if noise_thresholds_mm3 is None:
            noise = np.r_[np.unique(sizes[sizes > 0]), np.inf]
        else:
            noise = np.asarray(noise_thresholds_mm3, dtype=np.float64).ravel()
        calls = (sizes[None, :] > 0) & (sizes[None, :] >= noise[:, None])  # (noise, cases)
        probability_column.append(np.full(noise.size, threshold))
        noise_column.append(noise)
        tp_column.append((calls & truth[None, :]).sum(axis=1))
        fp_column.append((calls & ~truth[None, :]).sum(axis=1))
    positives = int(truth.sum())
    return OperatingPoints(
        probability_threshold=np.concatenate(probability_column),
        noise_threshold_mm3=np.concatenate(noise_column),
        true_positives=np.concatenate(tp_column).astype(np.int64),
        false_positives=np.concatenate(fp_column).astype(np.int64),
        positives=positives,
        negatives=truth.size - positives,
    )


@dataclass(frozen=True, eq=False)
class PatientRoc:
    """Patient-level ROC convex hull and the classifiers at its corners."""

    points: OperatingPoints          # every classifier of the grid
    hull_fpr: np.ndarray
    hull_tpr: np.ndarray
    hull_point_index: np.ndarray     # index into ``points`` per hull corner (-1: trivial corner)
    auc: float

    def hull_rows(self) -> list[dict[str, Any]]:
        """Hull corners with the (probability, noise) pair realising each (trivial corners: None)."""
        rows = self.points.rows()
        out: list[dict[str, Any]] = []
        for fpr, tpr, index in zip(self.hull_fpr, self.hull_tpr, self.hull_point_index, strict=True):
            row: dict[str, Any] = {"fpr": float(fpr), "tpr": float(tpr)}
            if index >= 0:
                row.update({k: rows[index][k] for k in ("probability_threshold", "noise_threshold_mm3")})
            else:
                row.update({"probability_threshold": None, "noise_threshold_mm3": None})
            out.append(row)
        return out


def patient_roc(
    truth: Sequence[bool] | np.ndarray,
    largest_mm3: np.ndarray,
    probability_thresholds: Sequence[float] | np.ndarray,
) -> PatientRoc:
    """The paper's patient-level ROC: convex hull over all (probability, noise) threshold pairs."""
    truth = _as_truth(truth)
    if not has_both_classes(truth):
        raise VfdetectError("a patient-level ROC needs positive and negative patients")
    points = patient_operating_points(truth, largest_mm3, probability_thresholds)
    hull_fpr, hull_tpr, index = convex_hull_roc(points.fpr, points.tpr)
    return PatientRoc(points, hull_fpr, hull_tpr, index, trapezoid_area(hull_fpr, hull_tpr))


def best_operating_point(points: OperatingPoints) -> int:
    """Index of the classifier maximising Youden's J (recall + specificity - 1).

    Ties go to the higher specificity, then the lower probability threshold, then the lower noise
    threshold.
    """
    youden = points.tpr - points.fpr
    order = np.lexsort((points.noise_threshold_mm3, points.probability_threshold, points.fpr, -youden))
    return int(order[0])


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BootstrapResult:
    """AUCs of the valid resamples and the mean ROC on a common FPR grid."""

    aucs: np.ndarray              # one per valid resample
    n_resamples: int              # resamples drawn
    n_single_class: int           # resamples skipped because they held one class only
    fpr_grid: np.ndarray
    tpr_mean: np.ndarray
    tpr_sd: np.ndarray
    tpr_low: np.ndarray           # pointwise 2.5 % percentile of the resampled curves
    tpr_high: np.ndarray          # pointwise 97.5 % percentile

    @property
    def n_valid(self) -> int:
        return int(self.aucs.size)

    @property
    def auc_mean(self) -> float:
        return float(self.aucs.mean()) if self.aucs.size else math.nan

    @property
    def auc_sd(self) -> float:
        return float(self.aucs.std(ddof=1)) if self.aucs.size > 1 else math.nan

    @property
    def auc_interval95(self) -> tuple[float, float]:
        if not self.aucs.size:
            return (math.nan, math.nan)
        low, high = np.percentile(self.aucs, [2.5, 97.5])
        return (float(low), float(high))

    def summary(self) -> dict[str, Any]:
        return {
            "auc_mean": self.auc_mean,
            "auc_sd": self.auc_sd,
            "auc_interval95": list(self.auc_interval95),
            "n_resamples": self.n_resamples,
            "n_valid": self.n_valid,
            "n_single_class": self.n_single_class,
        }


def bootstrap_case_indices(n_cases: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_cases) case indices drawn with replacement."""
    if n_cases < 1:
        raise VfdetectError("bootstrap needs at least one case")
    if n_resamples < 0:
        raise VfdetectError("the number of bootstrap resamples must be >= 0")
    return rng.integers(0, n_cases, size=(n_resamples, n_cases))


def bootstrap_roc(
    resamples: np.ndarray,
    curve: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None],
    fpr_grid: np.ndarray | None = None,
) -> BootstrapResult:
    """Recompute an ROC for each resample of case indices.

    ``curve(case_indices)`` returns ``(fpr, tpr)`` of the resample, or None when the resample holds
    a single class (such resamples are skipped and counted). The area of each returned curve is its
    AUC; the curves are averaged on ``fpr_grid`` (default 101 points from 0 to 1).
    """
    grid = np.linspace(0.0, 1.0, DEFAULT_FPR_GRID_POINTS) if fpr_grid is None else np.asarray(fpr_grid, float)
    aucs: list[float] = []
    tprs: list[np.ndarray] = []
    single_class = 0
    for indices in resamples:
        result = curve(indices)
        if result is None:
            single_class += 1
            continue
        fpr, tpr = result
        aucs.append(trapezoid_area(fpr, tpr))
        tprs.append(interpolate_roc(fpr, tpr, grid))
    if tprs:
        stack = np.vstack(tprs)
        tpr_mean = stack.mean(axis=0)
        tpr_sd = stack.std(axis=0, ddof=1) if len(tprs) > 1 else np.zeros(grid.size)
        tpr_low, tpr_high = np.percentile(stack, [2.5, 97.5], axis=0)
    else:
        tpr_mean = tpr_sd = tpr_low = tpr_high = np.full(grid.size, np.nan)
    return BootstrapResult(np.asarray(aucs), len(resamples), single_class, grid, tpr_mean, tpr_sd, tpr_low, tpr_high)


def vertebra_curve_for_resample(
    truth: np.ndarray, scores: np.ndarray, case_index: np.ndarray
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Curve function for :func:`bootstrap_roc` resampling cases with all their vertebrae.

    ``case_index[k]`` is the case (0..n_cases-1) of vertebra ``k``.
    """
    truth = _as_truth(truth)
    scores = _as_scores(scores, truth.size)
    case_index = np.asarray(case_index, dtype=np.int64)
    order = np.argsort(case_index, kind="mergesort")
    n_cases = int(case_index.max()) + 1 if case_index.size else 0
    starts = np.searchsorted(case_index[order], np.arange(n_cases + 1))
    members = [order[starts[i]:starts[i + 1]] for i in range(n_cases)]

    def curve(cases: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        chosen = np.concatenate([members[i] for i in cases]) if len(cases) else np.empty(0, np.int64)
        sample_truth = truth[chosen]
        if not has_both_classes(sample_truth):
            return None
        roc = roc_curve(sample_truth, scores[chosen])
        return roc.fpr, roc.tpr

    return curve


def fixed_classifier_curve_for_resample(
    truth: np.ndarray, calls: np.ndarray
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Curve function for :func:`bootstrap_roc` that re-evaluates fixed classifiers on each resample.

    ``calls[k, i]`` is classifier ``k``'s decision on case ``i`` (for the patient level: the
    classifiers at the corners of the hull fitted once on all cases). Per resample each classifier
    gets its (FPR, TPR); the curve runs through these points and the trivial corners (0, 0) and
    (1, 1), ordered by FPR (then TPR). Nothing is chosen on the resample: no hull is refitted, so
    a classifier that does worse on a resample pulls its curve down.
    """
    truth = _as_truth(truth)
    calls = np.asarray(calls, dtype=bool).reshape(-1, truth.size)

    def curve(cases: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        sample_truth = truth[cases]
        positives = int(sample_truth.sum())
        negatives = sample_truth.size - positives
        if positives == 0 or negatives == 0:
            return None
        sample_calls = calls[:, cases]
        tpr = np.r_[0.0, (sample_calls & sample_truth).sum(axis=1) / positives, 1.0]
        fpr = np.r_[0.0, (sample_calls & ~sample_truth).sum(axis=1) / negatives, 1.0]
        order = np.lexsort((tpr, fpr))
        return fpr[order], tpr[order]

    return curve


def hull_corner_calls(proc: PatientRoc, largest_mm3: np.ndarray, probability_thresholds: np.ndarray) -> np.ndarray:
    """(corners, cases) decisions of the classifiers at the non-trivial corners of a patient hull."""
    largest = np.asarray(largest_mm3, dtype=np.float64)
    thresholds = [float(t) for t in np.asarray(probability_thresholds, dtype=np.float64)]
    rows = []
    for index in proc.hull_point_index:
        if index < 0:
            continue
        column = thresholds.index(float(proc.points.probability_threshold[index]))
        rows.append(patient_calls(largest[:, column], float(proc.points.noise_threshold_mm3[index])))
    return np.array(rows, dtype=bool).reshape(len(rows), largest.shape[0])


def patient_curve_for_resample(
    truth: np.ndarray, largest_mm3: np.ndarray, probability_thresholds: np.ndarray
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Curve function for :func:`bootstrap_roc`: the convex hull refitted on each resample.

    Refitting picks the best classifiers of every resample, so the mean of these AUCs is higher
    than the hull AUC on all cases by construction; :func:`evaluate_records` reports it only as a
    secondary figure (the interval comes from :func:`fixed_classifier_curve_for_resample`).
    """
    truth = _as_truth(truth)
    largest = np.asarray(largest_mm3, dtype=np.float64)

    def curve(cases: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        sample_truth = truth[cases]
        if not has_both_classes(sample_truth):
            return None
        roc = patient_roc(sample_truth, largest[cases], probability_thresholds)
        return roc.hull_fpr, roc.hull_tpr

    return curve


# ----------------------------------------------------------------------------------------------
# Decisions at a threshold
# ----------------------------------------------------------------------------------------------


def decision_summary(truth: Sequence[bool] | np.ndarray, calls: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Recall, specificity and the four counts of yes/no ``calls`` against ``truth``."""
    truth = _as_truth(truth)
    calls = np.asarray(calls, dtype=bool)
    if calls.shape != truth.shape:
        raise VfdetectError(f"calls have shape {calls.shape}, expected {truth.shape} like the truth")
    tp, fp = int((calls & truth).sum()), int((calls & ~truth).sum())
    fn, tn = int((~calls & truth).sum()), int((~calls & ~truth).sum())
    return {"recall": tp / (tp + fn) if tp + fn else None, "specificity": tn / (tn + fp) if tn + fp else None,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn, "true_negatives": tn,
            "cases": int(truth.size)}


def youden_threshold(truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Cut on ``scores`` ("score >= cut" is positive) maximising Youden's J = recall + specificity - 1.

    The cut lies midway between the lowest score called positive and the next lower score, so it
    does not sit on a case of the data it was chosen on; when everything is called positive it is
    the lowest score, when nothing is, just above the highest. Ties of J go to the higher cut
    (higher specificity). Raises :class:`VfdetectError` when ``truth`` holds a single class.
    """
    roc = roc_curve(truth, scores)
    best = int(np.argmax(roc.tpr - roc.fpr))  # first maximum: the highest cut
    cuts = roc.thresholds
    if best == 0:
        return float(np.nextafter(cuts[1], np.inf))
    if best + 1 < cuts.size:
        return float((cuts[best] + cuts[best + 1]) / 2.0)
    return float(cuts[best])
