"""Tests of vfdetect.evaluate: ROC, convex hull, patient grid, bootstrap, files written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from vfdetect import evaluate as ev
from vfdetect.errors import VfdetectError

# ----------------------------------------------------------------------------------------------
# ROC basics
# ----------------------------------------------------------------------------------------------


def test_roc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * truth, 1)  # rounding makes many ties
    ours = ev.roc_curve(truth, scores)
    fpr, tpr, thresholds = sklearn_roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_allclose(ours.thresholds[1:], thresholds[1:])
    assert ours.auc == pytest.approx(roc_auc_score(truth, scores))


def test_roc_hand_computed_perfect_inverted_tied() -> None:
    truth = [True, False, True, False]
    # pairs (pos, neg): 0.9>0.8, 0.9>0.3, 0.4<0.8, 0.4>0.3 -> 3/4
    assert ev.roc_auc(truth, [0.9, 0.8, 0.4, 0.3]) == pytest.approx(0.75)
    assert ev.roc_auc(truth, [1.0, 0.0, 0.9, 0.1]) == pytest.approx(1.0)
    assert ev.roc_auc(truth, [0.0, 1.0, 0.1, 0.9]) == pytest.approx(0.0)
    tied = ev.roc_curve(truth, [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(tied.fpr, [0, 1])
    np.testing.assert_allclose(tied.tpr, [0, 1])
    assert tied.auc == pytest.approx(0.5)
    # one tie between a positive and a negative counts half: (1 + 0.5 + 1 + 1) / 4
    assert ev.roc_auc(truth, [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)


def test_single_class_has_no_roc() -> None:
    assert math.isnan(ev.roc_auc([True, True], [0.1, 0.2]))
    with pytest.raises(VfdetectError, match="positives and negatives"):
        ev.roc_curve([False, False, False], [0.1, 0.2, 0.3])


def test_convex_hull_hand_made_points() -> None:
    fpr = [0.0, 0.2, 0.1, 0.5, 0.4, 0.35, 0.5]
    tpr = [0.4, 0.7, 0.5, 0.9, 0.75, 0.8, 0.6]
    hull_fpr, hull_tpr, index = ev.convex_hull_roc(fpr, tpr)
    np.testing.assert_allclose(hull_fpr, [0, 0, 0.2, 0.5, 1])
    np.testing.assert_allclose(hull_tpr, [0, 0.4, 0.7, 0.9, 1])
    assert index.tolist() == [-1, 0, 1, 3, -1]  # (0.35, 0.8) is on the edge, not a corner
    assert ev.trapezoid_area(hull_fpr, hull_tpr) == pytest.approx(0.11 + 0.24 + 0.475)


def test_convex_hull_of_an_roc_curve_dominates_it() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(80) < 0.4
    roc = ev.roc_curve(truth, rng.random(80) + truth * 0.2)
    hull_fpr, hull_tpr, _ = ev.convex_hull_roc(roc.fpr, roc.tpr)
    assert ev.trapezoid_area(hull_fpr, hull_tpr) >= roc.auc
    assert np.all(ev.interpolate_roc(hull_fpr, hull_tpr, roc.fpr) >= roc.tpr - 1e-12)
    assert np.all(np.diff(hull_tpr) >= 0)


def test_interpolate_roc_uses_top_of_vertical_steps() -> None:
    values = ev.interpolate_roc(np.array([0, 0, 0.5, 1]), np.array([0, 0.6, 1, 1]), np.array([0, 0.25, 1]))
    np.testing.assert_allclose(values, [0.6, 0.8, 1.0])


# ----------------------------------------------------------------------------------------------
# Patient level
# ----------------------------------------------------------------------------------------------

PATIENT_TRUTH = np.array([True, True, False, False])
PATIENT_THRESHOLDS = np.array([0.3, 0.7])
PATIENT_LARGEST = np.array([[800, 400], [300, 0], [500, 0], [100, 50]], dtype=float)


def test_patient_roc_hull_by_hand() -> None:
    roc = ev.patient_roc(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS)
    # column 0.3 gives (0, .5) (.5, .5) (.5, 1) (1, 1); column 0.7 gives (0, .5) (.5, .5)
    np.testing.assert_allclose(roc.hull_fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(roc.hull_tpr, [0, 0.5, 1, 1])
    assert roc.auc == pytest.approx(0.875)
    corners = roc.hull_rows()
    assert (corners[1]["probability_threshold"], corners[1]["noise_threshold_mm3"]) == (0.3, 800)
    assert (corners[2]["probability_threshold"], corners[2]["noise_threshold_mm3"]) == (0.3, 300)
    assert corners[0]["probability_threshold"] is None
    best = roc.points.rows()[ev.best_operating_point(roc.points)]
    assert (best["probability_threshold"], best["noise_threshold_mm3"], best["specificity"]) == (0.3, 800, 1.0)
    # a single column's hull is at least the ROC of its largest-component score
    assert roc.auc >= ev.roc_auc(PATIENT_TRUTH, PATIENT_LARGEST[:, 0])


def test_patient_operating_table_counts() -> None:
    points = ev.patient_operating_points(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS, [0, 350])
    rows = points.rows()
    # noise 0 at p 0.3: all four non-empty -> positive; at p 0.7 case 1 and 2 have nothing
    # at p 0.3 and 350 mm³: 800 (positive) and 500 (negative) survive; at p 0.7 only 400 (positive)
    assert [(r["true_positives"], r["false_positives"]) for r in rows] == [(2, 2), (1, 1), (1, 1), (1, 0)]
    assert rows[3]["recall"] == 0.5 and rows[3]["specificity"] == 1.0
    assert ev.patient_calls(np.array([0.0, 10.0, 20.0]), 0).tolist() == [False, True, True]


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def test_bootstrap_counts_single_class_resamples_and_clusters_cases() -> None:
    truth = np.array([True, False, False, False, False, False])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    case_of_vertebra = np.array([0, 0, 1, 1, 2, 2])
    curve = ev.vertebra_curve_for_resample(truth, scores, case_of_vertebra)
    resamples = ev.bootstrap_case_indices(3, 300, np.random.default_rng(1))
    result = ev.bootstrap_roc(resamples, curve)
    without_case0 = int(np.sum(~np.any(resamples == 0, axis=1)))
    assert without_case0 > 0
    assert result.n_single_class == without_case0
    assert result.n_valid == 300 - without_case0
    assert np.all(result.aucs == 1.0) and result.auc_sd == 0.0
    # clustered: drawing case 2 twice repeats both of its vertebrae
    fpr, tpr = curve(np.array([0, 2, 2]))
    direct = ev.roc_curve(truth[[0, 1, 4, 5, 4, 5]], scores[[0, 1, 4, 5, 4, 5]])
    np.testing.assert_allclose(fpr, direct.fpr)
    np.testing.assert_allclose(tpr, direct.tpr)


def test_bootstrap_is_seeded_and_spreads() -> None:
    rng = np.random.default_rng(5)
    truth = rng.random(60) < 0.3
    scores = rng.random(60) + 0.4 * truth
    cases = np.arange(60) // 3
    curve = ev.vertebra_curve_for_resample(truth, scores, cases)
    first = ev.bootstrap_roc(ev.bootstrap_case_indices(20, 200, np.random.default_rng(9)), curve)
    again = ev.bootstrap_roc(ev.bootstrap_case_indices(20, 200, np.random.default_rng(9)), curve)
    np.testing.assert_array_equal(first.aucs, again.aucs)
    assert 0 < first.auc_sd < 0.3
    low, high = first.auc_interval95
    assert low < ev.roc_auc(truth, scores) < high
    assert np.all(np.diff(first.tpr_mean) >= -1e-12) and first.tpr_mean[-1] == pytest.approx(1.0)


def test_jitter_centroids_sd_and_zero() -> None:
    points = np.zeros((20000, 3))
    jittered = ev.jitter_centroids(points, 3.0, np.random.default_rng(0))
    assert jittered.std(axis=0) == pytest.approx([3, 3, 3], rel=0.03)
    np.testing.assert_array_equal(ev.jitter_centroids(points[:5], 0.0, np.random.default_rng(0)), points[:5])


def test_detection_by_grade_and_level() -> None:
    grades = np.array([0, 0, 1, 2, 3, 3])
    detected = np.array([True, False, False, True, True, True])
    rows = {r["grade"]: r for r in ev.detection_by_grade(grades, detected)}
    assert rows[0]["rate"] == 0.5 and rows[1]["rate"] == 0.0 and rows[3]["rate"] == 1.0
    levels = ev.detection_by_level(np.array([20, 20, 20, 19, 19, 21]), grades >= 1, detected)
    assert [r["name"] for r in levels] == ["T12", "L1", "L2"]  # cranio-caudal
    l1 = levels[1]
    assert (l1["fractured"], l1["detected"], l1["normal"], l1["true_negatives"]) == (1, 0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Whole evaluation from files
# ----------------------------------------------------------------------------------------------


def _write_case(pred_dir: Path, case: str, vertebrae: list[tuple[int, float, tuple[float, float, float]]],
                largest: list[float], with_map: bool = False) -> None:
    folder = pred_dir / case
    folder.mkdir(parents=True)
    report = {
        "case": case,
        "patient_fracture_probability": max(score for _, score, _ in vertebrae),
        "vertebrae": [{"label": label, "name": str(label), "fracture_probability": score,
                       "centroid_mm": list(centroid)} for label, score, centroid in vertebrae],
        "component_sizes": {"probability_thresholds": [0.3, 0.5, 0.7], "largest_component_mm3": largest},
    }
    (folder / "report.json").write_text(json.dumps(report))
    if with_map:
        data = np.zeros((30, 30, 70, 2), dtype=np.uint8)
        for _, score, centroid in vertebrae:
            x, y, z = (int(c) for c in centroid)
            data[x - 8:x + 9, y - 8:y + 9, z - 8:z + 9, 0] = int(round(score * 255))
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_slope_inter(1 / 255, 0)
        nib.save(image, folder / "probabilities.nii.gz")


class _Case:
    def __init__(self, case: str, grades: dict[int, int]) -> None:
        self.case = case
        self.grades = grades
        self.image = Path(f"/nonexistent/{case}.nii.gz")


def _toy_cohort(tmp_path: Path, with_map: bool = False) -> tuple[list[_Case], Path]:
    pred_dir = tmp_path / "pred"
    rng = np.random.default_rng(2)
    cases = []
    for i in range(8):
        grades = {18: 0, 19: int(i % 3 == 0) * 2, 20: int(i % 4 == 1)}
        if i in (2, 6):
            grades = {18: 0, 19: 0, 20: 0}
        vertebrae = []
        for k, (label, grade) in enumerate(grades.items()):
            score = float(np.clip(0.25 + 0.5 * (grade > 0) + rng.normal(0, 0.15), 0, 1))
            vertebrae.append((label, score, (15.0, 15.0, 12.0 + 20 * k)))
        base = 400.0 if max(grades.values()) else 60.0
        largest = [base * 2 + rng.random() * 100, base + rng.random() * 100, base / 2]
        _write_case(pred_dir, f"case{i}", vertebrae, largest, with_map)
        cases.append(_Case(f"case{i}", grades))
    cases.append(_Case("no_prediction", {20: 1}))
    return cases, pred_dir


def test_evaluate_predictions_writes_metrics(tmp_path: Path) -> None:
    cases, pred_dir = _toy_cohort(tmp_path)
    out = tmp_path / "eval"
    metrics = ev.evaluate_predictions(cases, pred_dir, out, n_bootstrap=200, seed=4)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("vertebra_auc", "vertebra_auc_sd", "patient_auc", "patient_auc_sd", "patient_operating_point",
                "patient_operating_points", "vertebra_by_grade", "vertebra_by_level"):
        assert key in saved
    assert saved["vertebra_counts"]["vertebrae"] == 24
    assert saved["patient_counts"] == {"patients": 8, "positive": 4, "negative": 4}
    assert saved["excluded"]["cases_without_prediction"] == ["no_prediction"]
    assert saved["patient_auc"] == pytest.approx(1.0)  # positives have larger components at every threshold
    truth = [r.grade >= 1 for r in ev.load_predictions(cases, pred_dir).vertebrae]
    scores = [r.fracture_probability for r in ev.load_predictions(cases, pred_dir).vertebrae]
    assert saved["vertebra_auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert metrics["vertebra_bootstrap"]["n_resamples"] == 200
    arrays = np.load(out / "roc.npz")
    assert arrays["vertebra_tpr_mean"].shape == arrays["fpr_grid"].shape
    assert "| patient |" in (out / "metrics.md").read_text()
    outcomes = (out / "vertebrae.csv").read_text().splitlines()
    assert len(outcomes) == 25 and outcomes[0].startswith("case,label,name,grade")
    # min_grade 2: grade-1 vertebrae become negatives
    strict = ev.evaluate_predictions(cases, pred_dir, tmp_path / "eval2", n_bootstrap=0, min_grade=2)
    assert strict["vertebra_counts"]["fractured"] == saved["vertebra_counts"]["per_grade"]["2"]


def test_centroid_noise_rescoring_is_seeded(tmp_path: Path) -> None:
    cases, pred_dir = _toy_cohort(tmp_path, with_map=True)
    options = {"cube_edge_mm": 6.0, "sigma_mm": None}
    clean = ev.evaluate_predictions(cases, pred_dir, tmp_path / "a", n_bootstrap=0, centroid_noise_mm=0.0)
    noisy = ev.evaluate_predictions(cases, pred_dir, tmp_path / "b", n_bootstrap=0, centroid_noise_mm=3.0,
                                    seed=1, score_options=options)
    again = ev.evaluate_predictions(cases, pred_dir, tmp_path / "c", n_bootstrap=0, centroid_noise_mm=3.0,
                                    seed=1, score_options=options)
    assert noisy["vertebra_auc"] == again["vertebra_auc"]
    assert (tmp_path / "b" / "vertebrae.csv").read_text() == (tmp_path / "c" / "vertebrae.csv").read_text()
    assert (tmp_path / "a" / "vertebrae.csv").read_text() != (tmp_path / "b" / "vertebrae.csv").read_text()
    # re-scored values come from the map: 17-voxel blobs mostly still cover a 6 mm cube moved by ~3 mm
    assert noisy["vertebra_auc"] == pytest.approx(clean["vertebra_auc"], abs=0.15)
    assert noisy["centroid_noise_mm"] == 3.0
