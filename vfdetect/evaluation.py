"""The metrics of a cohort from matched records (pure; no files): what ``vfdetect evaluate`` reports.

:func:`evaluate_records` takes one :class:`VertebraRecord` per graded, scored vertebra and one
:class:`PatientRecord` per case and returns the JSON-friendly metrics and the numpy curves:

* **Vertebra level**: the per-vertebra fracture score (Gaussian-weighted mean of p(fracture) in a
  cube around the centroid) against the reference "fractured" (Genant grade >= ``min_grade``,
  default 1; with ``min_grade=2`` mild fractures count as negatives). Ordinary ROC and AUC; with
  centroid noise (paper section 4), the ROC of all noise draws pooled is the main result.
* **Patient level**: the convex hull of all (probability threshold, noise threshold) classifiers
  (:func:`vfdetect.metrics.patient_roc`), the decision stored in the reports, and a threshold on
  the patient score chosen without the evaluated cases when one is given.
* **Intervals**: point estimates on all cases with a percentile interval over case resamples
  (:func:`vfdetect.metrics.bootstrap_roc`), and the mean ROC with a band on a common FPR grid.

:mod:`vfdetect.evaluate` reads the records from prediction folders and writes these metrics out;
:func:`metrics_markdown` is their readable summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.jsonutil import format_value
from vfdetect.metrics import (
    DEFAULT_FPR_GRID_POINTS,
    BootstrapResult,
    RocCurve,
    best_operating_point,
    bootstrap_case_indices,
    bootstrap_roc,
    decision_summary,
    fixed_classifier_curve_for_resample,
    has_both_classes,
    hull_corner_calls,
    patient_calls,
    patient_curve_for_resample,
    patient_operating_points,
    patient_roc,
    roc_auc,
    roc_curve,
    vertebra_curve_for_resample,
)

PATIENT_OPERATING_NOISE_THRESHOLDS_MM3: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                                             1000.0, 2500.0, 5000.0, 10000.0)
"""Noise thresholds of the readable operating-point table (the hull itself uses every distinct size)."""
PERCENTILE_INTERVAL = "percentile interval: 2.5 % and 97.5 % of the AUCs over the case resamples"
FIXED_HULL_METHOD = ("the classifiers at the corners of the hull fitted once on all cases, re-evaluated on every "
                     "case resample (no refitting)")
REFITTED_HULL_LABEL = ("secondary: mean AUC of hulls refitted on every resample; each resample picks its own best "
                       "classifiers, so this is higher than the all-case hull AUC by construction")
FIXED_RULE_NOTE = "threshold fixed before seeing these cases (stored in each report by the prediction)"


# ----------------------------------------------------------------------------------------------
# Records
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
