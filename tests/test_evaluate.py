"""Tests of the evaluation: vfdetect.metrics (ROC, convex hull, patient grid, bootstrap), vfdetect.evaluation
(metrics of matched records) and vfdetect.evaluate (predictions read, files written)."""

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
from vfdetect import evaluation, metrics
from vfdetect.errors import VfdetectError
from vfdetect.jsonutil import json_safe

# ----------------------------------------------------------------------------------------------
# ROC basics
# ----------------------------------------------------------------------------------------------


def test_roc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * truth, 1)  # rounding makes many ties
    ours = metrics.roc_curve(truth, scores)
    fpr, tpr, thresholds = sklearn_roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_allclose(ours.thresholds[1:], thresholds[1:])
    assert ours.auc == pytest.approx(roc_auc_score(truth, scores))


def test_roc_hand_computed_perfect_inverted_tied() -> None:
    truth = [True, False, True, False]
    # pairs (pos, neg): 0.9>0.8, 0.9>0.3, 0.4<0.8, 0.4>0.3 -> 3/4
    assert metrics.roc_auc(truth, [0.9, 0.8, 0.4, 0.3]) == pytest.approx(0.75)
    assert metrics.roc_auc(truth, [1.0, 0.0, 0.9, 0.1]) == pytest.approx(1.0)
    assert metrics.roc_auc(truth, [0.0, 1.0, 0.1, 0.9]) == pytest.approx(0.0)
    tied = metrics.roc_curve(truth, [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(tied.fpr, [0, 1])
    np.testing.assert_allclose(tied.tpr, [0, 1])
    assert tied.auc == pytest.approx(0.5)
    # one tie between a positive and a negative counts half: (1 + 0.5 + 1 + 1) / 4
    assert metrics.roc_auc(truth, [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)


def test_single_class_has_no_roc() -> None:
    assert math.isnan(metrics.roc_auc([True, True], [0.1, 0.2]))
    with pytest.raises(VfdetectError, match="positives and negatives"):
        metrics.roc_curve([False, False, False], [0.1, 0.2, 0.3])


def test_convex_hull_hand_made_points() -> None:
    fpr = [0.0, 0.2, 0.1, 0.5, 0.4, 0.35, 0.5]
    tpr = [0.4, 0.7, 0.5, 0.9, 0.75, 0.8, 0.6]
    hull_fpr, hull_tpr, index = metrics.convex_hull_roc(fpr, tpr)
    np.testing.assert_allclose(hull_fpr, [0, 0, 0.2, 0.5, 1])
    np.testing.assert_allclose(hull_tpr, [0, 0.4, 0.7, 0.9, 1])
    assert index.tolist() == [-1, 0, 1, 3, -1]  # (0.35, 0.8) is on the edge, not a corner
    assert metrics.trapezoid_area(hull_fpr, hull_tpr) == pytest.approx(0.11 + 0.24 + 0.475)


def test_convex_hull_of_an_roc_curve_dominates_it() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(80) < 0.4
    roc = metrics.roc_curve(truth, rng.random(80) + truth * 0.2)
    hull_fpr, hull_tpr, _ = metrics.convex_hull_roc(roc.fpr, roc.tpr)
    assert metrics.trapezoid_area(hull_fpr, hull_tpr) >= roc.auc
    assert np.all(metrics.interpolate_roc(hull_fpr, hull_tpr, roc.fpr) >= roc.tpr - 1e-12)
    assert np.all(np.diff(hull_tpr) >= 0)


def test_interpolate_roc_uses_top_of_vertical_steps() -> None:
    values = metrics.interpolate_roc(np.array([0, 0, 0.5, 1]), np.array([0, 0.6, 1, 1]), np.array([0, 0.25, 1]))
    np.testing.assert_allclose(values, [0.6, 0.8, 1.0])


# ----------------------------------------------------------------------------------------------
# Patient level
# ----------------------------------------------------------------------------------------------

PATIENT_TRUTH = np.array([True, True, False, False])
PATIENT_THRESHOLDS = np.array([0.3, 0.7])
PATIENT_LARGEST = np.array([[800, 400], [300, 0], [500, 0], [100, 50]], dtype=float)


def test_patient_roc_hull_by_hand() -> None:
    roc = metrics.patient_roc(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS)
    # column 0.3 gives (0, .5) (.5, .5) (.5, 1) (1, 1); column 0.7 gives (0, .5) (.5, .5)
    np.testing.assert_allclose(roc.hull_fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(roc.hull_tpr, [0, 0.5, 1, 1])
    assert roc.auc == pytest.approx(0.875)
    corners = roc.hull_rows()
    assert (corners[1]["probability_threshold"], corners[1]["noise_threshold_mm3"]) == (0.3, 800)
    assert (corners[2]["probability_threshold"], corners[2]["noise_threshold_mm3"]) == (0.3, 300)
    assert corners[0]["probability_threshold"] is None
    best = roc.points.rows()[metrics.best_operating_point(roc.points)]
    assert (best["probability_threshold"], best["noise_threshold_mm3"], best["specificity"]) == (0.3, 800, 1.0)
    # a single column's hull is at least the ROC of its largest-component score
    assert roc.auc >= metrics.roc_auc(PATIENT_TRUTH, PATIENT_LARGEST[:, 0])


def test_patient_operating_table_counts() -> None:
    points = metrics.patient_operating_points(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS, [0, 350])
    rows = points.rows()
    # noise 0 at p 0.3: all four non-empty -> positive; at p 0.7 case 1 and 2 have nothing
    # at p 0.3 and 350 mm³: 800 (positive) and 500 (negative) survive; at p 0.7 only 400 (positive)
    assert [(r["true_positives"], r["false_positives"]) for r in rows] == [(2, 2), (1, 1), (1, 1), (1, 0)]
    assert rows[3]["recall"] == 0.5 and rows[3]["specificity"] == 1.0
    assert metrics.patient_calls(np.array([0.0, 10.0, 20.0]), 0).tolist() == [False, True, True]


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def test_bootstrap_counts_single_class_resamples_and_clusters_cases() -> None:
    truth = np.array([True, False, False, False, False, False])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    case_of_vertebra = np.array([0, 0, 1, 1, 2, 2])
    curve = metrics.vertebra_curve_for_resample(truth, scores, case_of_vertebra)
    resamples = metrics.bootstrap_case_indices(3, 300, np.random.default_rng(1))
    result = metrics.bootstrap_roc(resamples, curve)
    without_case0 = int(np.sum(~np.any(resamples == 0, axis=1)))
    assert without_case0 > 0
    assert result.n_single_class == without_case0
    assert result.n_valid == 300 - without_case0
    assert np.all(result.aucs == 1.0) and result.auc_sd == 0.0
    # clustered: drawing case 2 twice repeats both of its vertebrae
    fpr, tpr = curve(np.array([0, 2, 2]))  # type: ignore[misc]
    direct = metrics.roc_curve(truth[[0, 1, 4, 5, 4, 5]], scores[[0, 1, 4, 5, 4, 5]])
    np.testing.assert_allclose(fpr, direct.fpr)
    np.testing.assert_allclose(tpr, direct.tpr)


def test_bootstrap_is_seeded_and_spreads() -> None:
    rng = np.random.default_rng(5)
    truth = rng.random(60) < 0.3
    scores = rng.random(60) + 0.4 * truth
    cases = np.arange(60) // 3
    curve = metrics.vertebra_curve_for_resample(truth, scores, cases)
    first = metrics.bootstrap_roc(metrics.bootstrap_case_indices(20, 200, np.random.default_rng(9)), curve)
    again = metrics.bootstrap_roc(metrics.bootstrap_case_indices(20, 200, np.random.default_rng(9)), curve)
    np.testing.assert_array_equal(first.aucs, again.aucs)
    assert 0 < first.auc_sd < 0.3
    low, high = first.auc_interval95
    assert low < metrics.roc_auc(truth, scores) < high
    assert np.all(np.diff(first.tpr_mean) >= -1e-12) and first.tpr_mean[-1] == pytest.approx(1.0)


def test_jitter_centroids_sd_and_zero() -> None:
    points = np.zeros((20000, 3))
    jittered = evaluation.jitter_centroids(points, 3.0, np.random.default_rng(0))
    assert jittered.std(axis=0) == pytest.approx([3, 3, 3], rel=0.03)
    np.testing.assert_array_equal(evaluation.jitter_centroids(points[:5], 0.0, np.random.default_rng(0)), points[:5])


def test_detection_by_grade_and_level() -> None:
    grades = np.array([0, 0, 1, 2, 3, 3])
    detected = np.array([True, False, False, True, True, True])
    rows = {r["grade"]: r for r in evaluation.detection_by_grade(grades, detected)}
    assert rows[0]["rate"] == 0.5 and rows[1]["rate"] == 0.0 and rows[3]["rate"] == 1.0
    levels = evaluation.detection_by_level(np.array([20, 20, 20, 19, 19, 21]), grades >= 1, detected)
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
    for key in ("vertebra_auc", "vertebra_auc_sd", "vertebra_auc_interval95", "patient_auc", "patient_auc_sd",
                "patient_auc_interval95", "patient_hull_best_point", "patient_auc_refitted_hull_mean",
                "patient_operating_points", "vertebra_by_grade", "vertebra_by_level"):
        assert key in saved
    assert "patient_fixed_rule" not in saved  # these (old) reports state no decision
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
    markdown = (out / "metrics.md").read_text()
    assert "| patient |" in markdown and "Secondary, not a headline" in markdown
    outcomes = (out / "vertebrae.csv").read_text().splitlines()
    assert len(outcomes) == 25 and outcomes[0].startswith("case,label,name,grade")
    # min_grade 2: grade-1 vertebrae become negatives
    strict = ev.evaluate_predictions(cases, pred_dir, tmp_path / "eval2", n_bootstrap=0, min_grade=2)
    assert strict["vertebra_counts"]["fractured"] == saved["vertebra_counts"]["per_grade"]["2"]


def test_centroid_noise_rescoring_is_seeded(tmp_path: Path) -> None:
    cases, pred_dir = _toy_cohort(tmp_path, with_map=True)
    options = {"cube_edge_mm": 6.0, "sigma_mm": None}
    clean = ev.evaluate_predictions(cases, pred_dir, tmp_path / "a", n_bootstrap=0, centroid_noise_mm=0.0)
    noisy = ev.evaluate_predictions(cases, pred_dir, tmp_path / "b", n_bootstrap=20, centroid_noise_mm=3.0,
                                    noise_draws=4, seed=1, score_options=options)
    again = ev.evaluate_predictions(cases, pred_dir, tmp_path / "c", n_bootstrap=20, centroid_noise_mm=3.0,
                                    noise_draws=4, seed=1, score_options=options)
    assert noisy["vertebra_auc"] == again["vertebra_auc"]
    assert noisy["vertebra_centroid_noise"]["auc_per_draw"] == again["vertebra_centroid_noise"]["auc_per_draw"]
    assert (tmp_path / "b" / "vertebrae.csv").read_text() == (tmp_path / "c" / "vertebrae.csv").read_text()
    # main = noisy (4 draws pooled), secondary = noise-free from the same maps
    assert noisy["vertebra_centroid_noise"]["draws"] == 4 and noisy["vertebra_scores_from"] == "probabilities.nii.gz"
    assert clean["vertebra_scores_from"] == "report.json"
    arrays = np.load(tmp_path / "b" / "roc.npz")
    assert arrays["vertebra_auc_per_draw"].shape == (4,) and "vertebra_noise_free_fpr" in arrays
    # the maps hold round(score * 255) in 17-voxel blobs: a 6 mm cube at the centroid reads the score back
    assert noisy["vertebra_map_vs_report_max_abs_difference"] <= 0.5 / 255 + 1e-6
    assert noisy["vertebra_noise_free"]["auc"] == pytest.approx(clean["vertebra_auc"], abs=1e-9)
    assert noisy["vertebra_auc"] == pytest.approx(clean["vertebra_auc"], abs=0.15)
    assert noisy["centroid_noise_mm"] == 3.0
    assert "same maps" in (tmp_path / "b" / "metrics.md").read_text()


def test_map_scores_without_noise_reproduce_report_scores(tmp_path: Path) -> None:
    """When the report was scored on the map that was saved, noise 0 gives back its scores exactly."""
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.vertebrae import Vertebra
    from vfdetect.volume import Volume

    rng = np.random.default_rng(4)
    steps = rng.integers(0, 256, size=(24, 26, 40)).astype(np.uint8)
    stored = steps.astype(np.float32) * np.float32(1 / 255)  # what a uint8 map with slope 1/255 holds
    vertebrae = [Vertebra(label, (11.3, 12.7, 8.0 + 9.5 * k)) for k, label in enumerate((18, 19, 20))]
    options = {"cube_edge_mm": 8.0, "sigma_mm": 3.0}
    scores = vertebra_scores(Volume(stored, np.eye(4)), vertebrae, **options)
    folder = tmp_path / "pred" / "case0"
    folder.mkdir(parents=True)
    image = nib.Nifti1Image(np.stack([steps, steps], axis=-1), np.eye(4))
    image.header.set_slope_inter(1 / 255, 0)
    nib.save(image, folder / "probabilities.nii.gz")
    (folder / "report.json").write_text(json.dumps({
        "case": "case0", "patient_score": max(v["fracture_probability"] for v in scores),
        "thresholds": {"cube_edge_mm": 8.0, "sigma_mm": 3.0},
        "vertebrae": [{"label": v["label"], "fracture_probability": v["fracture_probability"],
                       "centroid_mm": v["centroid_mm"]} for v in scores],
        "component_sizes": {"probability_thresholds": [0.5], "largest_component_mm3": [10.0]},
    }))
    loaded = ev.load_predictions([_Case("case0", {18: 0, 19: 1, 20: 0})], tmp_path / "pred")
    rescored = ev.map_vertebra_scores(loaded.vertebrae, loaded.report_dirs, 0.0, 2, None, loaded.score_options)
    report_scores = np.array([r.fracture_probability for r in loaded.vertebrae])
    np.testing.assert_allclose(rescored.clean, report_scores, rtol=0, atol=1e-6)
    assert rescored.sources == {"case0": "probabilities.nii.gz"}  # no scores map: the input-grid map
    np.testing.assert_array_equal(rescored.noisy, np.vstack([rescored.clean, rescored.clean]))
    jittered = ev.map_vertebra_scores(loaded.vertebrae, loaded.report_dirs, 3.0, 2, np.random.default_rng(0),
                                      loaded.score_options)
    np.testing.assert_array_equal(jittered.clean, rescored.clean)  # same map, same scoring
    assert not np.allclose(jittered.noisy, rescored.noisy)


def _bone_stand_in(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """A stand-in network: p(vertebra) rises with the intensity at the output voxel, split 0.7 / 0.3."""
    from vfdetect.geometry import geometry_for

    geometry = geometry_for("3d")
    margin, field = geometry.margin()[0][0], geometry.receptive_field[0]
    out = [n - field + 1 for n in hr.shape[1:4]]
    centre = hr[:, margin : margin + out[0], margin : margin + out[1], margin : margin + out[2], 0]
    vertebra = 1.0 / (1.0 + np.exp(-4.0 * (centre - 1.5)))
    return np.stack([1.0 - vertebra, 0.7 * vertebra, 0.3 * vertebra], axis=-1)


def test_noise_free_rescoring_of_a_prediction_gives_back_its_report_scores(tmp_path: Path) -> None:
    """Re-scoring reads scores_map.nii.gz, the internal-grid map predict_case scored: noise 0 gives
    report.json's scores, and noisy centroids read what the full internal map holds (zero outside the
    saved crop); without the scores map, probabilities.nii.gz is read and metrics.json says so."""
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.phantom import PhantomConfig, generate_phantom
    from vfdetect.predict import PredictConfig, predict_case
    from vfdetect.predictor import Predictor
    from vfdetect.vertebrae import Vertebra
    from vfdetect.volume import Volume

    phantom = generate_phantom("p5", np.random.default_rng(5), PhantomConfig.small())
    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=_bone_stand_in)
    pred_dir = tmp_path / "pred"
    config = PredictConfig(write_overlay=False, keep_maps=True, sigma_mm=4.0)  # float16 map, as by default
    given = phantom.vertebrae[1:3]  # the region (and the saved crop) covers these two only
    labels = [v.label for v in given]
    cases, results = [], {}
    for name, fractured in (("a", None), ("b", labels[1])):
        results[name] = predict_case(predictor, phantom.image, given, case=name, out_dir=pred_dir, config=config)
        cases.append(_Case(name, {label: 2 if label == fractured else 0 for label in labels}))
    loaded = ev.load_predictions(cases, pred_dir)
    report_scores = np.array([r.fracture_probability for r in loaded.vertebrae])
    saved = json.loads((pred_dir / "a" / "report.json").read_text())
    assert saved["thresholds"]["sigma_mm"] == 4.0 and loaded.score_options["a"]["sigma_mm"] == 4.0

    rescored = ev.map_vertebra_scores(loaded.vertebrae, loaded.report_dirs, 0.0, 1, None, loaded.score_options)
    assert rescored.sources == {"a": "scores_map.nii.gz", "b": "scores_map.nii.gz"}
    np.testing.assert_allclose(rescored.clean, report_scores, rtol=0, atol=1e-6)

    # Noise large enough (30 mm) for cubes to leave the saved crop: the values read are the full internal map's.
    sd = 30.0
    noisy = ev.map_vertebra_scores(loaded.vertebrae, loaded.report_dirs, sd, 3, np.random.default_rng(7),
                                   loaded.score_options)
    noise = np.random.default_rng(7).normal(0.0, sd, size=(3, len(loaded.vertebrae), 3))
    full = results["a"].probabilities
    fracture = Volume(np.asarray(full.array)[..., 2], full.affine)
    members = [k for k, r in enumerate(loaded.vertebrae) if r.case == "a"]
    for draw in range(3):
        moved = [Vertebra(v.label, tuple(np.asarray(v.position_mm) + noise[draw, k]))
                 for v, k in zip(given, members, strict=True)]
        expected = [s["fracture_probability"] for s in vertebra_scores(fracture, moved, sigma_mm=4.0)]
        np.testing.assert_allclose(noisy.noisy[draw, members], np.nan_to_num(expected, nan=0.0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(noisy.clean, rescored.clean)

    metrics = ev.evaluate_predictions(cases, pred_dir, tmp_path / "eval", n_bootstrap=0, centroid_noise_mm=3.0,
                                      noise_draws=2)
    assert metrics["vertebra_scores_from"] == "scores_map.nii.gz"
    assert metrics["vertebra_map_vs_report_max_abs_difference"] <= 1e-6
    assert "vertebra_scores_from_probabilities_cases" not in metrics

    # An older prediction (no scores map) falls back to the quantised input-grid map, and says so.
    (pred_dir / "b" / "scores_map.nii.gz").unlink()
    fallback = ev.map_vertebra_scores(loaded.vertebrae, loaded.report_dirs, 0.0, 0, None, loaded.score_options)
    assert fallback.sources == {"a": "scores_map.nii.gz", "b": "probabilities.nii.gz"}
    in_b = np.array([r.case == "b" for r in loaded.vertebrae])
    np.testing.assert_allclose(fallback.clean[~in_b], report_scores[~in_b], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fallback.clean[in_b], report_scores[in_b], rtol=0, atol=0.02)
    mixed = ev.evaluate_predictions(cases, pred_dir, tmp_path / "eval_mixed", n_bootstrap=0, centroid_noise_mm=3.0,
                                    noise_draws=2)
    assert mixed["vertebra_scores_from"] == "scores_map.nii.gz + probabilities.nii.gz"
    assert mixed["vertebra_scores_from_probabilities_cases"] == ["b"]
    written = json.loads((tmp_path / "eval_mixed" / "metrics.json").read_text())
    assert written["vertebra_scores_from_probabilities_cases"] == ["b"] and "older predictions" in written[
        "vertebra_scores_note"]


# ----------------------------------------------------------------------------------------------
# Honest intervals and decisions not tuned on the test cases
# ----------------------------------------------------------------------------------------------


def _records(n_cases: int = 30, seed: int = 0) -> tuple[list[evaluation.VertebraRecord], list[evaluation.PatientRecord]]:
    rng = np.random.default_rng(seed)
    vertebrae, patients = [], []
    for i in range(n_cases):
        grades = [int(rng.random() < 0.2) * 2 for _ in range(4)] if i % 3 else [0, 0, 0, 0]
        for k, grade in enumerate(grades):
            vertebrae.append(evaluation.VertebraRecord(f"c{i}", 18 + k, grade,
                                               float(np.clip(0.3 + 0.3 * (grade > 0) + rng.normal(0, 0.2), 0, 1))))
        size = 150.0 * (max(grades) > 0) + rng.normal(200, 150)
        largest = (max(size, 0.0) * 2, max(size, 0.0), max(size - 150, 0.0))
        patients.append(evaluation.PatientRecord(f"c{i}", max(grades), (0.3, 0.5, 0.7), largest,
                                         patient_score=max(v.fracture_probability for v in vertebrae[-4:]),
                                         patient_fracture=bool(size > 300), patient_threshold=0.5,
                                         patient_rule="patient_score >= patient_threshold"))
    return vertebrae, patients


def test_headline_auc_has_percentile_interval_from_resamples() -> None:
    vertebrae, patients = _records()
    result = evaluation.evaluate_records(vertebrae, patients, n_bootstrap=300, seed=2)
    metrics, arrays = result["metrics"], result["arrays"]
    for level in ("vertebra", "patient"):
        aucs = arrays[f"{level}_bootstrap_aucs"]
        assert aucs.size == metrics[f"{level}_bootstrap"]["n_valid"] > 250
        np.testing.assert_allclose(metrics[f"{level}_auc_interval95"], np.percentile(aucs, [2.5, 97.5]))
        assert metrics[f"{level}_auc_sd"] == pytest.approx(aucs.std(ddof=1))
        low, high = metrics[f"{level}_auc_interval95"]
        assert low <= metrics[f"{level}_auc"] <= high
        assert "percentile" in metrics[f"{level}_bootstrap"]["interval"]
    # refitting the hull per resample can only raise each resample's AUC: it is labelled secondary
    refitted = arrays["patient_refitted_bootstrap_aucs"]
    assert refitted.shape == arrays["patient_bootstrap_aucs"].shape
    assert np.all(refitted >= arrays["patient_bootstrap_aucs"] - 1e-12)
    assert metrics["patient_auc_refitted_hull_mean"] > np.mean(arrays["patient_bootstrap_aucs"])
    assert metrics["patient_refitted_hull_bootstrap"]["label"].startswith("secondary")
    assert "optimistic" in metrics["patient_hull_best_point"]["note"]
    assert "patient_auc_mean" not in metrics and "vertebra_auc_mean" not in metrics
    json.dumps(json_safe(metrics), allow_nan=False)


def test_fixed_hull_classifiers_on_all_cases_give_the_hull_auc() -> None:
    roc = metrics.patient_roc(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS)
    calls = metrics.hull_corner_calls(roc, PATIENT_LARGEST, PATIENT_THRESHOLDS)
    assert calls.shape == (3, 4)  # (0, .5), (.5, 1) and the real classifier at (1, 1)
    curve = metrics.fixed_classifier_curve_for_resample(PATIENT_TRUTH, calls)
    fpr, tpr = curve(np.arange(4))  # type: ignore[misc]
    assert metrics.trapezoid_area(fpr, tpr) == pytest.approx(roc.auc)
    # the false positive drawn three times: (0, .5), (.75, 1), (1, 1) -> 0.8125; refitting never does worse
    resample = np.array([0, 1, 2, 2, 2, 3])
    fpr, tpr = curve(resample)  # type: ignore[misc]
    assert metrics.trapezoid_area(fpr, tpr) == pytest.approx(0.8125)
    refit_fpr, refit_tpr = metrics.patient_curve_for_resample(PATIENT_TRUTH, PATIENT_LARGEST, PATIENT_THRESHOLDS)(
        resample)  # type: ignore[misc]
    assert metrics.trapezoid_area(refit_fpr, refit_tpr) >= 0.8125
    assert curve(np.array([0, 1])) is None


def test_report_decision_and_preset_thresholds_are_summarised() -> None:
    vertebrae, patients = _records()
    truth = np.array([p.max_grade >= 1 for p in patients])
    calls = np.array([bool(p.patient_fracture) for p in patients])
    cuts = {p.case: 0.55 for p in patients}
    result = evaluation.evaluate_records(vertebrae, patients, n_bootstrap=0, patient_score_thresholds=cuts,
                                 patient_threshold_note="chosen elsewhere")
    rule = result["metrics"]["patient_fixed_rule"]
    assert rule["recall"] == pytest.approx((calls & truth).sum() / truth.sum())
    assert rule["specificity"] == pytest.approx((~calls & ~truth).sum() / (~truth).sum())
    assert rule["thresholds"] == [0.5] and "fixed before seeing these cases" in rule["note"]
    chosen = result["metrics"]["patient_training_threshold"]
    scores = np.array([p.patient_score for p in patients])
    assert chosen["true_positives"] == int(((scores >= 0.55) & truth).sum())
    assert chosen["note"] == "chosen elsewhere"
    assert result["metrics"]["patient_by_max_grade_calls"].startswith("report decision")
    markdown = evaluation.metrics_markdown({**result["metrics"], "seed": 0})
    assert "fixed before seeing these cases" in markdown and "chosen elsewhere" in markdown
    with pytest.raises(VfdetectError, match="no patient score or no threshold"):
        evaluation.evaluate_records(vertebrae, patients, n_bootstrap=0, patient_score_thresholds={})


def test_youden_threshold_by_hand() -> None:
    truth = [True, True, False, False, True]
    # cut between 0.6 and 0.4: recall 2/3, specificity 1 (J 0.67); at 0.3: recall 1, specificity 0.5 (J 0.5)
    assert metrics.youden_threshold(truth, [0.9, 0.6, 0.4, 0.1, 0.3]) == pytest.approx(0.5)
    assert metrics.youden_threshold([True, False], [0.2, 0.8]) > 0.8  # nothing positive is best
    assert metrics.youden_threshold([True, False], [0.8, 0.2]) == pytest.approx(0.5)


def test_old_and_new_report_keys_load(tmp_path: Path) -> None:
    cases, pred_dir = _toy_cohort(tmp_path)  # older reports: patient_fracture_probability only
    old = ev.load_predictions(cases, pred_dir).patients[0]
    report = json.loads((pred_dir / "case0" / "report.json").read_text())
    assert old.patient_score == report["patient_fracture_probability"] and old.patient_fracture is None
    report.update(patient_score=0.61, patient_threshold=0.4, patient_rule="patient_score >= patient_threshold",
                  patient_fracture=True)
    del report["patient_fracture_probability"]
    (pred_dir / "case0" / "report.json").write_text(json.dumps(report))
    new = ev.load_predictions(cases, pred_dir).patients[0]
    assert (new.patient_score, new.patient_threshold, new.patient_fracture) == (0.61, 0.4, True)
    assert new.patient_rule == "patient_score >= patient_threshold"
    report["patient_score"] = "a description, as older reports wrote"
    report["patient_fracture_probability"] = 0.7
    (pred_dir / "case0" / "report.json").write_text(json.dumps(report))
    assert ev.load_predictions(cases, pred_dir).patients[0].patient_score == 0.7


def test_min_grade_applies_to_vertebrae_and_patients() -> None:
    vertebrae = [evaluation.VertebraRecord("a", 18, 1, 0.9), evaluation.VertebraRecord("a", 19, 0, 0.1),
                 evaluation.VertebraRecord("b", 18, 2, 0.8), evaluation.VertebraRecord("b", 19, 0, 0.2),
                 evaluation.VertebraRecord("c", 18, 0, 0.3)]
    patients = [evaluation.PatientRecord(name, grade, (0.5,), (size,)) for name, grade, size in
                (("a", 1, 100.0), ("b", 2, 200.0), ("c", 0, 0.0))]
    strict = evaluation.evaluate_records(vertebrae, patients, n_bootstrap=0, min_grade=2)["metrics"]
    assert strict["vertebra_counts"]["fractured"] == 1 and strict["patient_counts"]["positive"] == 1
    loose = evaluation.evaluate_records(vertebrae, patients, n_bootstrap=0, min_grade=1)["metrics"]
    assert loose["vertebra_counts"]["fractured"] == 2 and loose["patient_counts"]["positive"] == 2
