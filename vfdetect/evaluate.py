"""Evaluation of saved predictions: vertebra- and patient-level ROC, convex hull, bootstrap.

Everything here is plain numpy on scores that the prediction step has already written; nothing
trains or runs a network. The paper's protocol (Nicolaes et al. 2019, section 4):

* **Vertebra level**: the per-vertebra fracture score (Gaussian-weighted mean of p(fracture) in a
  cube around the centroid) against the reference "fractured" (Genant grade >= ``min_grade``,
  default 1; with ``min_grade=2`` mild fractures count as negatives). Ordinary ROC and AUC.
* **Patient level**: a patient is called positive by the classifier (probability threshold ``p``,
  noise threshold ``n``) when the largest connected component of voxels with p(fracture) >= ``p``
  measures at least ``n`` mm³ (and is not empty). Every pair is a classifier; the ROC is the
  convex hull of their (FPR, TPR) points together with the trivial classifiers (0, 0) and (1, 1)
  (Provost & Fawcett's ROC convex hull), and the AUC is the area under that hull. Because the
  largest component sizes per probability threshold are saved, every noise threshold that changes
  a decision is used, so the hull is exact for the saved probability-threshold grid. Note that a
  hull picks the best classifier on the evaluated cases themselves, as in the paper, so it is an
  optimistic summary.
* **Bootstrap**: cases are resampled with replacement (a case's vertebrae stay together), every ROC
  is recomputed; AUC mean, sd and a percentile 95 % interval, and the mean ROC with a +-1 sd band on
  a common FPR grid. Resamples holding a single class have no ROC; they are skipped and counted.
* **Centroid noise** (section 4): Gaussian noise of a given sd per axis is added to the centroids
  and the vertebrae are re-scored from the saved probability maps (:func:`vfdetect.aggregate.vertebra_scores`).

The files written by :func:`evaluate_predictions` are listed in its docstring; :mod:`vfdetect.figures`
draws the paper's figures from them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import atomic_path, write_json_atomic, write_text_atomic
from vfdetect.jsonutil import format_value, json_safe
from vfdetect.report import patient_rule_of, patient_score_of, patient_threshold_of

DEFAULT_FPR_GRID_POINTS = 101
REPORT_NAME = "report.json"
PROBABILITIES_NAME = "probabilities.nii.gz"
METRICS_NAME = "metrics.json"
DEFAULT_NOISE_DRAWS = 10
"""Draws of centroid noise pooled into the vertebra-level ROC when noise is asked for."""
PATIENT_OPERATING_NOISE_THRESHOLDS_MM3: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                                             1000.0, 2500.0, 5000.0, 10000.0)
"""Noise thresholds of the readable operating-point table (the hull itself uses every distinct size)."""


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
# Centroid noise and breakdowns
# ----------------------------------------------------------------------------------------------


def jitter_centroids(centroids_mm: np.ndarray, sd_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Centroids plus independent Gaussian noise of ``sd_mm`` per axis (paper: 3 mm)."""
    centroids = np.asarray(centroids_mm, dtype=np.float64)
    if centroids.ndim != 2 or centroids.shape[1] != 3:
        raise VfdetectError(f"centroids must have shape (N, 3), got {centroids.shape}")
    if sd_mm < 0 or not math.isfinite(sd_mm):
        raise VfdetectError(f"centroid noise sd must be finite and >= 0, got {sd_mm}")
    if sd_mm == 0:
        return centroids.copy()
    return centroids + rng.normal(0.0, sd_mm, size=centroids.shape)


def detection_by_grade(grades: np.ndarray, detected: np.ndarray) -> list[dict[str, Any]]:
    """Per Genant grade 0..3: count and detected count; rate = sensitivity (grade >= 1) or FPR (grade 0)."""
    grades = np.asarray(grades, dtype=np.int64)
    detected = np.asarray(detected, dtype=bool)
    rows = []
    for grade in (0, 1, 2, 3):
        members = grades == grade
        count = int(members.sum())
        hits = int((detected & members).sum())
        rows.append({"grade": grade, "count": count, "called_fracture": hits,
                     "rate": hits / count if count else None})
    return rows


def detection_by_level(labels: np.ndarray, fractured: np.ndarray, detected: np.ndarray) -> list[dict[str, Any]]:
    """Per vertebra label (cranio-caudal order): sensitivity on fractured, specificity on normal ones."""
    from vfdetect.vertebrae import spine_rank, vertebra_name

    labels = np.asarray(labels, dtype=np.int64)
    fractured = np.asarray(fractured, dtype=bool)
    detected = np.asarray(detected, dtype=bool)
    rows = []
    for label in sorted({int(x) for x in labels}, key=spine_rank):
        members = labels == label
        n_fractured = int((members & fractured).sum())
        n_normal = int((members & ~fractured).sum())
        true_positives = int((members & fractured & detected).sum())
        true_negatives = int((members & ~fractured & ~detected).sum())
        rows.append({
            "label": label,
            "name": vertebra_name(label),
            "fractured": n_fractured,
            "detected": true_positives,
            "sensitivity": true_positives / n_fractured if n_fractured else None,
            "normal": n_normal,
            "true_negatives": true_negatives,
            "specificity": true_negatives / n_normal if n_normal else None,
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Reading predictions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VertebraRecord:
    """One graded vertebra with its predicted fracture score."""

    case: str
    label: int
    grade: int
    fracture_probability: float
    centroid_mm: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class PatientRecord:
    """One case: highest reference grade, its saved component sizes and the report's decision.

    ``patient_score`` is the report's patient score (highest vertebra score; ``None`` when the
    report has none); ``patient_fracture`` the decision the report states, made by
    ``patient_rule`` with ``patient_threshold`` (fixed when the model was saved, before these
    cases were seen).
    """

    case: str
    max_grade: int
    probability_thresholds: tuple[float, ...]
    largest_component_mm3: tuple[float, ...]
    patient_score: float | None = None
    patient_fracture: bool | None = None
    patient_threshold: float | None = None
    patient_rule: str | None = None


@dataclass
class LoadedPredictions:
    """Records read from prediction folders, and what could not be used."""

    vertebrae: list[VertebraRecord] = field(default_factory=list)
    patients: list[PatientRecord] = field(default_factory=list)
    report_dirs: dict[str, Path] = field(default_factory=dict)
    score_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # cube/sigma used per case
    missing_predictions: list[str] = field(default_factory=list)       # cases without report.json
    ungraded_cases: list[str] = field(default_factory=list)            # cases without any grade
    unpredicted_vertebrae: list[tuple[str, int]] = field(default_factory=list)  # graded, not in report
    ungraded_vertebrae: list[tuple[str, int]] = field(default_factory=list)     # in report, no grade


def find_report(case: str, pred_dirs: Sequence[Path]) -> Path | None:
    """``<pred_dir>/<case>/report.json`` in the first of ``pred_dirs`` that has it."""
    for pred_dir in pred_dirs:
        candidate = Path(pred_dir) / case / REPORT_NAME
        if candidate.is_file():
            return candidate
    return None


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the prediction report ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("vertebrae"), list):
        raise InputError(path, "not a prediction report (no 'vertebrae' list)")
    return report


def load_predictions(cases: Sequence[Any], pred_dirs: Path | Sequence[Path]) -> LoadedPredictions:
    """Match each case's saved report to its reference grades.

    ``cases`` are :class:`vfdetect.vertebrae.Case` (only ``.case`` and ``.grades`` are used).
    Vertebrae are matched by label; a vertebra graded but absent from the report (or the reverse)
    is listed, not scored. A case without a report, or without grades, is listed and left out.
    """
    dirs = [Path(pred_dirs)] if isinstance(pred_dirs, str | Path) else [Path(p) for p in pred_dirs]
    loaded = LoadedPredictions()
    for case in cases:
        name = case.case
        grades = {int(label): int(grade) for label, grade in case.grades.items()}
        report_path = find_report(name, dirs)
        if report_path is None:
            loaded.missing_predictions.append(name)
            continue
        if not grades:
            loaded.ungraded_cases.append(name)
            continue
        report = _read_report(report_path)
        loaded.report_dirs[name] = report_path.parent
        saved_thresholds = report.get("thresholds") or {}
        loaded.score_options[name] = {key: saved_thresholds[key] for key in ("cube_edge_mm", "sigma_mm")
                                      if key in saved_thresholds}
        seen: set[int] = set()
        for entry in report["vertebrae"]:
            try:
                label = int(entry["label"])
                score = float(entry["fracture_probability"])
            except (KeyError, TypeError, ValueError):
                raise InputError(report_path, "a vertebra entry lacks 'label' or 'fracture_probability'") from None
            if label in seen:
                raise InputError(report_path, f"vertebra label {label} appears twice")
            if not math.isfinite(score):
                continue  # not scored (centroid outside the map): listed as graded without prediction
            seen.add(label)
            if label not in grades:
                loaded.ungraded_vertebrae.append((name, label))
                continue
            centroid = entry.get("centroid_mm")
            loaded.vertebrae.append(VertebraRecord(
                name, label, grades[label], score,
                tuple(float(c) for c in centroid) if centroid is not None else None,  # type: ignore[arg-type]
            ))
        loaded.unpredicted_vertebrae.extend((name, label) for label in sorted(grades) if label not in seen)
        components = report.get("component_sizes") or {}
        try:
            thresholds = tuple(float(t) for t in components["probability_thresholds"])
            largest = tuple(float(s) for s in components["largest_component_mm3"])
        except (KeyError, TypeError, ValueError):
            raise InputError(report_path, "no 'component_sizes' with probability_thresholds and "
                                          "largest_component_mm3 (needed for the patient-level ROC)") from None
        if len(thresholds) != len(largest) or not thresholds:
            raise InputError(report_path, "component_sizes: thresholds and sizes differ in length or are empty")
        decision = report.get("patient_fracture")
        loaded.patients.append(PatientRecord(
            name, max(grades.values()), thresholds, largest,
            patient_score=patient_score_of(report),
            patient_fracture=decision if isinstance(decision, bool) else None,
            patient_threshold=patient_threshold_of(report),
            patient_rule=patient_rule_of(report),
        ))
    return loaded


def read_fracture_map(path: Path) -> Any:
    """Channel 0 (p(fracture)) of a saved ``probabilities.nii.gz`` as a :class:`vfdetect.volume.Volume`.

    The file stores probabilities as uint8 with ``scl_slope`` 1/255 on the input scan's grid; the
    values read are these stored steps (not the float map the prediction scored on).
    """
    import nibabel as nib

    from vfdetect.volume import Volume

    if not Path(path).is_file():
        raise InputError(path, "probability map not found (re-scoring the vertebrae needs it)")
    try:
        image: Any = nib.load(str(path))
        # Slicing the data object applies scl_slope/scl_inter.
        data = np.asarray(image.dataobj[..., 0] if len(image.shape) == 4 else image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many kinds
        raise InputError(path, f"cannot read the probability map ({error})") from None
    return Volume(data, np.asarray(image.affine, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class MapScores:
    """Vertebra scores re-computed from the saved probability maps, in the order of the records.

    ``clean[k]`` scores vertebra ``k`` at its own centroid; ``noisy[d, k]`` after noise draw ``d``
    (``noisy`` has no rows without noise). Both come from the same map, the same grid and the same
    scoring options, so their difference is the centroid noise alone.
    """

    clean: np.ndarray
    noisy: np.ndarray
    sd_mm: float

    @property
    def n_draws(self) -> int:
        return int(self.noisy.shape[0])


def map_vertebra_scores(
    records: Sequence[VertebraRecord],
    report_dirs: Mapping[str, Path],
    sd_mm: float = 0.0,
    n_draws: int = 0,
    rng: np.random.Generator | None = None,
    case_score_options: Mapping[str, Mapping[str, Any]] | None = None,
    **score_options: Any,
) -> MapScores:
    """Score every vertebra from its case's saved ``probabilities.nii.gz``, at its centroid and after
    ``n_draws`` draws of Gaussian centroid noise (sd ``sd_mm`` per axis, paper: 3 mm).

    All noise is drawn at once from ``rng``, shape ``(n_draws, vertebrae, 3)`` in the order of
    ``records``. A centroid whose cube lies wholly outside the map scores 0 (no evidence of a
    fracture). The scoring options of each case (``cube_edge_mm``, ``sigma_mm``) come from
    ``case_score_options[case]`` (what the prediction used), overridden by ``score_options``; they
    go to :func:`vfdetect.aggregate.vertebra_scores`.
    """
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.vertebrae import Vertebra

    if sd_mm < 0 or not math.isfinite(sd_mm):
        raise VfdetectError(f"centroid noise sd must be finite and >= 0, got {sd_mm}")
    if n_draws < 0:
        raise VfdetectError("the number of noise draws must be >= 0")
    centroids = np.zeros((len(records), 3))
    by_case: dict[str, list[int]] = {}
    for k, record in enumerate(records):
        if record.centroid_mm is None:
            raise VfdetectError(f"case {record.case}: vertebra {record.label} has no centroid_mm in its report; "
                                "re-scoring from the map needs it")
        centroids[k] = record.centroid_mm
        by_case.setdefault(record.case, []).append(k)
    generator = rng if rng is not None else np.random.default_rng(0)
    noise = generator.normal(0.0, sd_mm, size=(n_draws, len(records), 3)) if sd_mm > 0 else np.zeros(
        (n_draws, len(records), 3))
    clean = np.zeros(len(records))
    noisy = np.zeros((n_draws, len(records)))
    for case, members in by_case.items():
        volume = read_fracture_map(Path(report_dirs[case]) / PROBABILITIES_NAME)
        options = {**dict((case_score_options or {}).get(case, {})), **score_options}

        def score(points: np.ndarray, members: list[int] = members, volume: Any = volume,
                  options: dict[str, Any] = options) -> np.ndarray:
            vertebrae = [Vertebra(records[k].label, (float(p[0]), float(p[1]), float(p[2])))
                         for k, p in zip(members, points, strict=True)]
            values = np.array([float(v["fracture_probability"]) for v in vertebra_scores(volume, vertebrae, **options)])
            return np.where(np.isfinite(values), values, 0.0)

        clean[members] = score(centroids[members])
        for draw in range(n_draws):
            noisy[draw, members] = score(centroids[members] + noise[draw, members])
    return MapScores(clean, noisy, float(sd_mm))


def rescore_with_centroid_noise(
    records: Sequence[VertebraRecord],
    report_dirs: Mapping[str, Path],
    sd_mm: float,
    rng: np.random.Generator,
    case_score_options: Mapping[str, Mapping[str, Any]] | None = None,
    **score_options: Any,
) -> list[VertebraRecord]:
    """The records with scores from one draw of centroid noise (:func:`map_vertebra_scores`)."""
    scores = map_vertebra_scores(records, report_dirs, sd_mm, 1, rng, case_score_options, **score_options)
    return [VertebraRecord(r.case, r.label, r.grade, float(value), r.centroid_mm)
            for r, value in zip(records, scores.noisy[0], strict=True)]


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------


def _common_thresholds(patients: Sequence[PatientRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Probability thresholds shared by all cases, and the (cases, thresholds) size table."""
    if not patients:
        return np.empty(0), np.empty((0, 0))
    shared = set(patients[0].probability_thresholds)
    for patient in patients[1:]:
        shared &= set(patient.probability_thresholds)
    thresholds = np.array(sorted(shared), dtype=np.float64)
    if not thresholds.size:
        raise VfdetectError("the prediction reports share no probability threshold; re-run predict with one grid")
    table = np.empty((len(patients), thresholds.size))
    for i, patient in enumerate(patients):
        lookup = dict(zip(patient.probability_thresholds, patient.largest_component_mm3, strict=True))
        table[i] = [lookup[t] for t in thresholds]
    return thresholds, table


PERCENTILE_INTERVAL = "percentile interval: 2.5 % and 97.5 % of the AUCs over the case resamples"
FIXED_HULL_METHOD = ("the classifiers at the corners of the hull fitted once on all cases, re-evaluated on every "
                     "case resample (no refitting)")
REFITTED_HULL_LABEL = ("secondary: mean AUC of hulls refitted on every resample; each resample picks its own best "
                       "classifiers, so this is higher than the all-case hull AUC by construction")
FIXED_RULE_NOTE = "threshold fixed before seeing these cases (stored in each report by the prediction)"


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


def _bootstrap_fields(prefix: str, boot: BootstrapResult, method: str) -> dict[str, Any]:
    return {f"{prefix}_auc_interval95": list(boot.auc_interval95), f"{prefix}_auc_sd": boot.auc_sd,
            f"{prefix}_bootstrap": {**boot.summary(), "interval": PERCENTILE_INTERVAL, "method": method}}


def _vertebra_roc(truth: np.ndarray, score_rows: np.ndarray, case_index: np.ndarray, resamples: np.ndarray,
                  grid: np.ndarray) -> tuple[RocCurve, BootstrapResult]:
    """ROC of all rows of ``score_rows`` (draws, vertebrae) pooled, and its case bootstrap."""
    draws = score_rows.shape[0]
    pooled_truth = np.tile(truth, draws)
    pooled_scores = score_rows.reshape(-1)
    pooled_cases = np.tile(case_index, draws)
    roc = roc_curve(pooled_truth, pooled_scores)
    boot = bootstrap_roc(resamples, vertebra_curve_for_resample(pooled_truth, pooled_scores, pooled_cases), grid)
    return roc, boot


def evaluate_records(
    vertebrae: Sequence[VertebraRecord],
    patients: Sequence[PatientRecord],
    *,
    min_grade: int = 1,
    n_bootstrap: int = 1000,
    seed: int = 0,
    vertebra_threshold: float = 0.5,
    fpr_grid: np.ndarray | None = None,
    noisy_scores: np.ndarray | None = None,
    centroid_noise_mm: float = 0.0,
    patient_score_thresholds: Mapping[str, float] | None = None,
    patient_threshold_note: str = "",
) -> dict[str, Any]:
    """All metrics from matched records (pure; no files).

    Headline figures are point estimates on all cases with a percentile bootstrap interval (2.5 %
    and 97.5 % of the AUCs over ``n_bootstrap`` case resamples; a case's vertebrae stay together)
    and the bootstrap sd. The patient-level interval re-evaluates the classifiers at the corners of
    the all-case hull on every resample; the mean of hulls refitted per resample is kept as a
    labelled secondary figure (optimistic by construction).

    ``noisy_scores`` (draws, vertebrae), when given, are the vertebra scores after that many draws
    of centroid noise of sd ``centroid_noise_mm``; the main vertebra ROC is then the ROC of all draws
    pooled (TPR and FPR at each score cut averaged over the draws) and the ROC of the records' own
    scores (noise-free, from the same map) is secondary. Tables per grade and level always use the
    records' scores, one row per vertebra.

    ``patient_score_thresholds`` (case -> cut on the patient score, chosen without the case, e.g.
    on a cross-validation fold's training side) adds the decisions ``patient_score >= cut``,
    described by ``patient_threshold_note``. The decision stored in the reports
    (``patient_fracture``) is always summarised when every report has one.

    Returns a dict with the JSON-friendly ``metrics`` and the numpy ``arrays`` (ROC curves, hull,
    bootstrap means and bands) that :func:`write_evaluation` saves.
    """
    if min_grade not in (1, 2, 3):
        raise VfdetectError(f"min_grade must be 1, 2 or 3, got {min_grade}")
    if not vertebrae and not patients:
        raise VfdetectError("nothing to evaluate: no graded vertebra has a prediction")
    grid = np.linspace(0.0, 1.0, DEFAULT_FPR_GRID_POINTS) if fpr_grid is None else np.asarray(fpr_grid, float)
    case_names = sorted({p.case for p in patients} | {v.case for v in vertebrae})
    case_position = {name: i for i, name in enumerate(case_names)}
    resamples = bootstrap_case_indices(len(case_names), n_bootstrap, np.random.default_rng(seed))
    metrics: dict[str, Any] = {"min_grade": min_grade, "n_bootstrap": n_bootstrap, "seed": seed,
                               "cases": len(case_names)}
    arrays: dict[str, np.ndarray] = {"fpr_grid": grid}

    # Vertebra level
    grades = np.array([v.grade for v in vertebrae], dtype=np.int64)
    scores = np.array([v.fracture_probability for v in vertebrae], dtype=np.float64)
    truth = grades >= min_grade
    metrics["vertebra_counts"] = {"vertebrae": int(truth.size), "fractured": int(truth.sum()),
                                  "normal": int((~truth).sum()),
                                  "per_grade": {str(g): int((grades == g).sum()) for g in range(4)}}
    if noisy_scores is not None:
        noisy_scores = np.asarray(noisy_scores, dtype=np.float64).reshape(-1, truth.size)
        if noisy_scores.shape[0] < 1:
            raise VfdetectError("noisy_scores needs at least one draw")
    main_rows = noisy_scores if noisy_scores is not None else scores[None, :]
    if has_both_classes(truth):
        vertebra_case = np.array([case_position[v.case] for v in vertebrae], dtype=np.int64)
        roc, boot = _vertebra_roc(truth, main_rows, vertebra_case, resamples, grid)
        arrays.update(vertebra_fpr=roc.fpr, vertebra_tpr=roc.tpr, vertebra_thresholds=roc.thresholds,
                      vertebra_tpr_mean=boot.tpr_mean, vertebra_tpr_sd=boot.tpr_sd,
                      vertebra_tpr_low=boot.tpr_low, vertebra_tpr_high=boot.tpr_high,
                      vertebra_bootstrap_aucs=boot.aucs)
        youden = int(np.argmax(roc.tpr - roc.fpr))
        metrics["vertebra_auc"] = roc.auc
        metrics.update(_bootstrap_fields("vertebra", boot, "vertebrae resampled with their cases"))
        metrics["vertebra_youden_point"] = {"threshold": float(roc.thresholds[youden]),
                                            "recall": float(roc.tpr[youden]),
                                            "specificity": float(1 - roc.fpr[youden]),
                                            "note": "chosen on these cases (optimistic)"}
        if noisy_scores is not None:
            per_draw = np.array([roc_auc(truth, row) for row in noisy_scores])
            clean_roc, clean_boot = _vertebra_roc(truth, scores[None, :], vertebra_case, resamples, grid)
            arrays.update(vertebra_noise_free_fpr=clean_roc.fpr, vertebra_noise_free_tpr=clean_roc.tpr,
                          vertebra_noise_free_tpr_mean=clean_boot.tpr_mean,
                          vertebra_noise_free_bootstrap_aucs=clean_boot.aucs, vertebra_auc_per_draw=per_draw)
            metrics["vertebra_centroid_noise"] = {
                "sd_mm": centroid_noise_mm, "draws": int(noisy_scores.shape[0]),
                "roc": "all draws pooled: TPR and FPR at each score cut averaged over the draws",
                "auc_per_draw": per_draw.tolist(), "auc_per_draw_mean": float(per_draw.mean()),
                "auc_per_draw_range": [float(per_draw.min()), float(per_draw.max())],
            }
            metrics["vertebra_noise_free"] = {
                "auc": clean_roc.auc, "auc_interval95": list(clean_boot.auc_interval95), "auc_sd": clean_boot.auc_sd,
                "note": "secondary: the same probability maps and scoring at the annotated centroids",
            }
    else:
        metrics.update(vertebra_auc=math.nan, vertebra_auc_sd=math.nan, vertebra_auc_interval95=[math.nan, math.nan],
                       vertebra_note="vertebra-level ROC undefined: a single class among the vertebrae")
    detected = scores >= vertebra_threshold
    metrics["vertebra_operating_point"] = {"threshold": vertebra_threshold, **decision_summary(truth, detected)}
    del metrics["vertebra_operating_point"]["cases"]
    metrics["vertebra_by_grade"] = detection_by_grade(grades, detected)
    metrics["vertebra_by_level"] = detection_by_level(np.array([v.label for v in vertebrae], np.int64),
                                                      truth, detected)

    # Patient level
    patient_truth = np.array([p.max_grade >= min_grade for p in patients], dtype=bool)
    metrics["patient_counts"] = {"patients": int(patient_truth.size), "positive": int(patient_truth.sum()),
                                 "negative": int((~patient_truth).sum())}
    report_calls = [p.patient_fracture for p in patients]
    fixed_calls: np.ndarray | None = None
    if patients and all(call is not None for call in report_calls):
        fixed_calls = np.array(report_calls, dtype=bool)
        metrics["patient_fixed_rule"] = {
            **decision_summary(patient_truth, fixed_calls),
            "rules": sorted({p.patient_rule for p in patients if p.patient_rule}),
            "thresholds": sorted({p.patient_threshold for p in patients if p.patient_threshold is not None}),
            "note": FIXED_RULE_NOTE,
        }
    patient_scores = [p.patient_score for p in patients]
    if patient_score_thresholds is not None:
        missing = [p.case for p in patients if p.case not in patient_score_thresholds or p.patient_score is None]
        if missing:
            raise VfdetectError(f"no patient score or no threshold for case(s) {', '.join(missing[:5])}")
        cuts = np.array([float(patient_score_thresholds[p.case]) for p in patients])
        calls = np.array(patient_scores, dtype=np.float64) >= cuts
        metrics["patient_training_threshold"] = {**decision_summary(patient_truth, calls),
                                                 "thresholds": sorted({float(c) for c in cuts}),
                                                 "note": patient_threshold_note}
    thresholds, largest = _common_thresholds(patients)
    if has_both_classes(patient_truth):
        proc = patient_roc(patient_truth, largest, thresholds)
        patient_rows = np.array([case_position[p.case] for p in patients], dtype=np.int64)
        # Resample the same case draws as the vertebra level; map case positions to patient rows.
        row_of_case = np.full(len(case_names), -1, dtype=np.int64)
        row_of_case[patient_rows] = np.arange(patient_rows.size)

        def on_patients(
            curve: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None],
        ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
            def resampled(cases: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
                rows = row_of_case[cases]
                return curve(rows[rows >= 0])
            return resampled

        boot = bootstrap_roc(resamples, on_patients(fixed_classifier_curve_for_resample(
            patient_truth, hull_corner_calls(proc, largest, thresholds))), grid)
        refitted = bootstrap_roc(resamples, on_patients(patient_curve_for_resample(patient_truth, largest, thresholds)),
                                 grid)
        best = best_operating_point(proc.points)
        best_row = proc.points.rows()[best]
        table = patient_operating_points(patient_truth, largest, thresholds, PATIENT_OPERATING_NOISE_THRESHOLDS_MM3)
        arrays.update(patient_hull_fpr=proc.hull_fpr, patient_hull_tpr=proc.hull_tpr,
                      patient_points_fpr=proc.points.fpr, patient_points_tpr=proc.points.tpr,
                      patient_points_probability=proc.points.probability_threshold,
                      patient_points_noise_mm3=proc.points.noise_threshold_mm3,
                      patient_tpr_mean=boot.tpr_mean, patient_tpr_sd=boot.tpr_sd,
                      patient_tpr_low=boot.tpr_low, patient_tpr_high=boot.tpr_high, patient_bootstrap_aucs=boot.aucs,
                      patient_refitted_tpr_mean=refitted.tpr_mean, patient_refitted_bootstrap_aucs=refitted.aucs)
        hull_calls = patient_calls(largest[:, list(thresholds).index(best_row["probability_threshold"])],
                                   best_row["noise_threshold_mm3"])
        calls_used = fixed_calls if fixed_calls is not None else hull_calls
        max_grades = np.array([p.max_grade for p in patients], dtype=np.int64)
        metrics["patient_auc"] = proc.auc
        metrics.update(_bootstrap_fields("patient", boot, FIXED_HULL_METHOD))
        metrics.update(
            patient_auc_refitted_hull_mean=refitted.auc_mean,
            patient_refitted_hull_bootstrap={**refitted.summary(), "label": REFITTED_HULL_LABEL},
            patient_probability_thresholds=thresholds.tolist(),
            patient_hull_best_point={**best_row, "note": "best recall + specificity on the hull, chosen on these "
                                                        "cases (optimistic)"},
            patient_hull=proc.hull_rows(),
            patient_operating_points=table.rows(),
            patient_by_max_grade=detection_by_grade(max_grades, calls_used),
            patient_by_max_grade_calls="report decision (patient_fracture)" if fixed_calls is not None
            else "hull best point",
            patient_calls={p.case: bool(c) for p, c in zip(patients, calls_used, strict=True)},
        )
        if all(value is not None for value in patient_scores):
            values = np.array(patient_scores, dtype=np.float64)
            score_boot = bootstrap_roc(resamples, on_patients(vertebra_curve_for_resample(
                patient_truth, values, np.arange(values.size))), grid)
            metrics["patient_score_auc"] = roc_auc(patient_truth, values)
            metrics["patient_score_auc_interval95"] = list(score_boot.auc_interval95)
    else:
        metrics.update(patient_auc=math.nan, patient_auc_sd=math.nan, patient_auc_interval95=[math.nan, math.nan],
                       patient_note="patient-level ROC undefined: all patients are of one class")
    return {"metrics": metrics, "arrays": arrays}


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _decision_line(summary: Mapping[str, Any]) -> str:
    f = format_value
    return (f"recall {f(summary['recall'])}, specificity {f(summary['specificity'])} (TP {summary['true_positives']}, "
            f"FP {summary['false_positives']}, FN {summary['false_negatives']}, TN {summary['true_negatives']})")


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A readable summary of :func:`evaluate_records` metrics."""
    m = metrics
    f = format_value
    vc, pc = m["vertebra_counts"], m["patient_counts"]
    noise = m.get("vertebra_centroid_noise")
    lines = [
        "# Fracture detection: evaluation",
        "",
        f"Reference: fractured = Genant grade >= {m['min_grade']}; vertebrae without a grade are left out of the "
        f"vertebra level (listed below). AUC on all cases; 95 % interval = 2.5 % and 97.5 % percentiles of the AUC "
        f"over {m['n_bootstrap']} bootstrap resamples of the {m['cases']} cases (seed {m['seed']}; a case's "
        "vertebrae are resampled together); sd = bootstrap standard deviation.",
    ]
    if noise:
        lines.append(f"Vertebra level: Gaussian centroid noise, sd {f(noise['sd_mm'], 'g')} mm per axis, "
                     f"{noise['draws']} draws pooled (seed {m['seed']}); scores re-computed from the saved "
                     "probability maps.")
    lines += [
        "",
        "| level | cases / vertebrae | positives | negatives | AUC (all cases) | 95 % interval | sd | "
        "resamples used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, counts, n_key, pos_key, neg_key in (
        ("patient", pc, "patients", "positive", "negative"),
        ("vertebra", vc, "vertebrae", "fractured", "normal"),
    ):
        boot = m.get(f"{level}_bootstrap", {})
        interval = m.get(f"{level}_auc_interval95") or [None, None]
        lines.append(
            f"| {level} | {counts[n_key]} | {counts[pos_key]} | {counts[neg_key]} | {f(m.get(f'{level}_auc'))} | "
            f"{f(interval[0])} - {f(interval[1])} | {f(m.get(f'{level}_auc_sd'))} | "
            f"{boot.get('n_valid', 'n/a')} of {boot.get('n_resamples', 'n/a')} |"
        )
    lines += ["", "Patient level: convex hull over all (probability threshold, noise threshold) classifiers, fitted on "
              "all cases (picks the best classifiers on these cases, as in the paper). Its interval re-evaluates the "
              "classifiers at the hull's corners on every resample without refitting."]
    if "patient_auc_refitted_hull_mean" in m:
        lines.append(f"Secondary, not a headline: mean AUC of hulls refitted on each resample "
                     f"{f(m['patient_auc_refitted_hull_mean'])} (higher by construction: every resample picks its "
                     "own best classifiers).")
    if "patient_score_auc" in m:
        interval = m.get("patient_score_auc_interval95") or [None, None]
        lines.append(f"Patient score (highest vertebra score) AUC: {f(m['patient_score_auc'])} "
                     f"({f(interval[0])} - {f(interval[1])}).")
    if noise and "vertebra_noise_free" in m:
        clean = m["vertebra_noise_free"]
        lines.append(f"Vertebra level without centroid noise (secondary; same maps): AUC {f(clean['auc'])} "
                     f"({f(clean['auc_interval95'][0])} - {f(clean['auc_interval95'][1])}); AUC per noise draw "
                     f"{f(noise['auc_per_draw_range'][0])} - {f(noise['auc_per_draw_range'][1])}.")
        if m.get("vertebra_map_vs_report_max_abs_difference") is not None:
            lines.append(f"Noise-free scores from the saved maps differ from report.json by at most "
                         f"{f(m['vertebra_map_vs_report_max_abs_difference'], '.4f')} (uint8 maps on the scan's grid "
                         "vs. the float map predict scored on).")
    lines += ["", "## Patient level: decisions", ""]
    rule = m.get("patient_fixed_rule")
    if rule:
        rules = "; ".join(rule["rules"]) or "not stated"
        cut = ", ".join(f(t, "g") for t in rule["thresholds"]) or "n/a"
        lines.append(f"- Rule stored in the reports ({rules}; threshold {cut}), {rule['note']}: "
                     f"{_decision_line(rule)}.")
    chosen = m.get("patient_training_threshold")
    if chosen:
        cut = ", ".join(f(t, ".4g") for t in chosen["thresholds"])
        lines.append(f"- patient score >= threshold chosen without the test cases ({chosen['note']}; thresholds {cut}): "
                     f"{_decision_line(chosen)}.")
    if "patient_hull_best_point" in m:
        op = m["patient_hull_best_point"]
        lines += [
            f"- Best hull point on these cases (optimistic, not a test result): probability threshold "
            f"{f(op['probability_threshold'], '.2f')}, noise threshold {f(op['noise_threshold_mm3'], '.0f')} mm³: "
            f"{_decision_line(op)}.",
            "",
            "Convex hull corners (each an optimal classifier on these cases):",
            "",
            "| probability threshold | noise threshold (mm³) | recall | specificity |",
            "|---|---|---|---|",
        ]
        for row in m["patient_hull"]:
            lines.append(f"| {f(row['probability_threshold'], '.2f')} | {f(row['noise_threshold_mm3'], '.0f')} | "
                         f"{f(row['tpr'])} | {f(1 - row['fpr'])} |")
        lines += ["", f"Patients called positive ({m['patient_by_max_grade_calls']}), by highest reference grade:", "",
                  "| highest grade | patients | called positive | rate |", "|---|---|---|---|"]
        for row in m["patient_by_max_grade"]:
            lines.append(f"| {row['grade']} | {row['count']} | {row['called_fracture']} | {f(row['rate'])} |")
    op = m["vertebra_operating_point"]
    lines += [
        "",
        f"## Vertebra level at score threshold {f(op['threshold'], '.2f')}" + (" (noise-free scores)" if noise else ""),
        "",
        f"At this threshold: {_decision_line(op)}.",
    ]
    if "vertebra_youden_point" in m:
        y = m["vertebra_youden_point"]
        lines.append(f"Best threshold on these data (max recall + specificity, optimistic): {f(y['threshold'])} "
                     f"(recall {f(y['recall'])}, specificity {f(y['specificity'])}).")
    lines += ["", "| Genant grade | vertebrae | called fracture | rate |", "|---|---|---|---|"]
    for row in m["vertebra_by_grade"]:
        lines.append(f"| {row['grade']} | {row['count']} | {row['called_fracture']} | {f(row['rate'])} |")
    lines += ["", "Grade 0 rate = false-positive rate; grades 1-3 rate = sensitivity.", "",
              "| level | fractured | detected | sensitivity | normal | specificity |", "|---|---|---|---|---|---|"]
    for row in m["vertebra_by_level"]:
        lines.append(f"| {row['name']} | {row['fractured']} | {row['detected']} | {f(row['sensitivity'])} | "
                     f"{row['normal']} | {f(row['specificity'])} |")
    excluded = m.get("excluded", {})
    if any(excluded.values()):
        lines += ["", "## Left out", ""]
        for key, values in excluded.items():
            if values:
                shown = ", ".join(str(v) for v in values[:20])
                more = f" ... ({len(values)} in all)" if len(values) > 20 else ""
                lines.append(f"- {key.replace('_', ' ')}: {shown}{more}")
    return "\n".join(lines) + "\n"


def write_evaluation(out_dir: Path, result: Mapping[str, Any], vertebrae: Sequence[VertebraRecord]) -> None:
    """Write metrics.json, metrics.md, roc.npz and the CSV tables into ``out_dir`` (atomic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = result["metrics"]
    arrays = result["arrays"]
    with atomic_path(out_dir / "roc.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    if "vertebra_fpr" in arrays:
        write_text_atomic(out_dir / "roc_vertebra.csv", _csv_text(
            ("fpr", "tpr", "threshold"),
            [(f, t, th) for f, t, th in zip(arrays["vertebra_fpr"], arrays["vertebra_tpr"],
                                            arrays["vertebra_thresholds"], strict=True)]))
    if "patient_hull_fpr" in arrays:
        write_text_atomic(out_dir / "roc_patient_hull.csv", _csv_text(
            ("fpr", "tpr", "probability_threshold", "noise_threshold_mm3"),
            [(r["fpr"], r["tpr"], r["probability_threshold"], r["noise_threshold_mm3"]) for r in metrics["patient_hull"]]))
        write_text_atomic(out_dir / "patient_operating_points.csv", _csv_text(
            list(metrics["patient_operating_points"][0]), [list(r.values()) for r in metrics["patient_operating_points"]]))
    grid_columns = ["fpr"] + [k for k in ("vertebra_tpr_mean", "vertebra_tpr_sd", "vertebra_tpr_low", "vertebra_tpr_high",
                                          "patient_tpr_mean", "patient_tpr_sd", "patient_tpr_low", "patient_tpr_high")
                              if k in arrays]
    write_text_atomic(out_dir / "roc_bootstrap_mean.csv", _csv_text(
        grid_columns, np.column_stack([arrays["fpr_grid"], *(arrays[k] for k in grid_columns[1:])]).tolist()))
    threshold = metrics["vertebra_operating_point"]["threshold"]
    min_grade = metrics["min_grade"]
    rows = []
    for v in vertebrae:
        fractured = v.grade >= min_grade
        called = v.fracture_probability >= threshold
        outcome = {(True, True): "TP", (False, True): "FP", (True, False): "FN", (False, False): "TN"}[(fractured, called)]
        centroid = v.centroid_mm if v.centroid_mm is not None else (None, None, None)
        rows.append((v.case, v.label, _vertebra_name(v.label), v.grade, f"{v.fracture_probability:.6f}", outcome,
                     *centroid))
    write_text_atomic(out_dir / "vertebrae.csv", _csv_text(
        ("case", "label", "name", "grade", "fracture_probability", "outcome", "x_mm", "y_mm", "z_mm"), rows))
    write_json_atomic(out_dir / METRICS_NAME, json_safe(metrics))
    write_text_atomic(out_dir / "metrics.md", metrics_markdown(metrics))


def _vertebra_name(label: int) -> str:
    from vfdetect.vertebrae import vertebra_name

    try:
        return vertebra_name(label)
    except VfdetectError:
        return str(label)


def evaluate_predictions(
    cases: Sequence[Any],
    pred_dir: Path | Sequence[Path],
    out_dir: Path,
    *,
    min_grade: int = 1,
    n_bootstrap: int = 1000,
    seed: int = 0,
    centroid_noise_mm: float = 0.0,
    noise_draws: int = DEFAULT_NOISE_DRAWS,
    vertebra_threshold: float = 0.5,
    score_options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    patient_score_thresholds: Mapping[str, float] | None = None,
    patient_threshold_note: str = "",
) -> dict[str, Any]:
    """Evaluate saved predictions of ``cases`` and write the results into ``out_dir``.

    ``pred_dir`` is a prediction folder (``<pred_dir>/<case>/report.json``) or several, searched in
    order (the pooled out-of-fold evaluation of :mod:`vfdetect.cv`).

    With ``centroid_noise_mm > 0`` (paper: 3) every vertebra is scored from the saved
    ``probabilities.nii.gz`` twice over: at its centroid and after ``noise_draws`` draws of Gaussian
    centroid noise (seeded by ``seed``; the bootstrap uses an independent stream of the same seed).
    The noisy ROC (draws pooled) is the main vertebra-level result, the noise-free one from the same
    maps is secondary, and the largest difference between the noise-free map scores and the scores
    in report.json is reported (``vertebra_map_vs_report_max_abs_difference``). Without noise the
    scores of report.json are used as they are. ``patient_score_thresholds`` and
    ``patient_threshold_note`` go to :func:`evaluate_records`.

    Writes ``metrics.json`` (``vertebra_auc``, ``vertebra_auc_sd``, ``patient_auc``,
    ``patient_auc_sd``, counts, operating points, breakdowns per grade and level, what was left
    out), ``metrics.md``, ``roc.npz`` (all curves and bootstrap bands), ``roc_vertebra.csv``,
    ``roc_patient_hull.csv``, ``patient_operating_points.csv``, ``roc_bootstrap_mean.csv`` and
    ``vertebrae.csv`` (per vertebra noise-free score and TP/FP/FN/TN at the operating threshold).
    Returns the metrics dict.
    """
    loaded = load_predictions(cases, pred_dir)
    if not loaded.patients:
        where = pred_dir if isinstance(pred_dir, str | Path) else ", ".join(str(p) for p in pred_dir)
        raise InputError(where, f"no graded case has a prediction report ({len(loaded.missing_predictions)} "
                                f"without report.json, {len(loaded.ungraded_cases)} without grades)")
    vertebrae = loaded.vertebrae
    noise_seed, bootstrap_seed = np.random.SeedSequence(seed).spawn(2)
    noisy: np.ndarray | None = None
    differences: np.ndarray | None = None
    if centroid_noise_mm > 0:
        if noise_draws < 1:
            raise VfdetectError("centroid noise needs at least one noise draw")
        rescored = map_vertebra_scores(vertebrae, loaded.report_dirs, centroid_noise_mm, noise_draws,
                                       np.random.default_rng(noise_seed), loaded.score_options,
                                       **dict(score_options or {}))
        differences = np.abs(rescored.clean - np.array([v.fracture_probability for v in vertebrae]))
        vertebrae = [replace(v, fracture_probability=float(value)) for v, value in zip(vertebrae, rescored.clean,
                                                                                         strict=True)]
        noisy = rescored.noisy
    result = evaluate_records(vertebrae, loaded.patients, min_grade=min_grade, n_bootstrap=n_bootstrap,
                              seed=int(bootstrap_seed.generate_state(1)[0]), vertebra_threshold=vertebra_threshold,
                              noisy_scores=noisy, centroid_noise_mm=centroid_noise_mm,
                              patient_score_thresholds=patient_score_thresholds,
                              patient_threshold_note=patient_threshold_note)
    metrics = result["metrics"]
    metrics["seed"] = seed
    metrics["centroid_noise_mm"] = centroid_noise_mm
    metrics["vertebra_scores_from"] = "report.json" if noisy is None else PROBABILITIES_NAME
    if differences is not None:
        metrics["vertebra_map_vs_report_max_abs_difference"] = float(differences.max()) if differences.size else None
        metrics["vertebra_map_vs_report_mean_abs_difference"] = float(differences.mean()) if differences.size else None
    metrics["prediction_dirs"] = [str(p) for p in ([pred_dir] if isinstance(pred_dir, str | Path) else pred_dir)]
    metrics["case_dirs"] = {name: str(path) for name, path in loaded.report_dirs.items()}
    metrics["case_images"] = {c.case: str(c.image) for c in cases if c.case in loaded.report_dirs}
    metrics["excluded"] = {
        "cases_without_prediction": loaded.missing_predictions,
        "cases_without_grades": loaded.ungraded_cases,
        "graded_vertebrae_without_prediction": [f"{c}:{_vertebra_name(label)}" for c, label in loaded.unpredicted_vertebrae],
        "predicted_vertebrae_without_grade": [f"{c}:{_vertebra_name(label)}" for c, label in loaded.ungraded_vertebrae],
    }
    if provenance:
        metrics["provenance"] = dict(provenance)
    write_evaluation(Path(out_dir), result, vertebrae)
    return metrics
