"""The overlay PNG, and the report writers importable from vfdetect.report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from vfdetect.records import CSV_COLUMNS, patient_score_of
from vfdetect.report import render_overlay, write_report_csv, write_report_json, write_summary_csv


def _report(case: str, scores: list[float]) -> dict:  # type: ignore[type-arg]
    return {
        "case": case,
        "patient_score": max(scores),
        "patient_threshold": 0.5,
        "patient_rule": "patient_score >= patient_threshold",
        "patient_fracture": max(scores) >= 0.5,
        "thresholds": {"probability": 0.5, "noise_mm3": 500.0},
        "vertebrae": [
            {"label": 20 + i, "name": f"L{i + 1}", "centroid_voxel": [1.0, 2.0, 3.0 + i],
             "centroid_mm": [4.0, 5.0, 6.0 + i], "fracture_probability": score, "normal_probability": 1 - score,
             "predicted": "fracture" if score >= 0.5 else "normal", "source": "given", "grade": None}
            for i, score in enumerate(scores)
        ],
    }


def test_csv_and_summary_have_one_row_per_vertebra(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first, second = _report("a", [0.1, 0.8]), _report("b", [float("nan")])
    write_report_csv(tmp_path / "a.csv", first)
    rows = list(csv.DictReader((tmp_path / "a.csv").open()))
    assert [r["name"] for r in rows] == ["L1", "L2"]
    assert rows[1]["predicted"] == "fracture" and rows[1]["patient_fracture"] == "true"
    assert float(rows[0]["fracture_probability"]) == pytest.approx(0.1)
    write_summary_csv(tmp_path / "summary.csv", [first, second])
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(summary) == 3 and tuple(summary[0]) == CSV_COLUMNS
    assert summary[2]["case"] == "b" and summary[2]["fracture_probability"] == ""
    assert rows[0]["patient_score"] == "0.8" and rows[0]["patient_threshold"] == "0.5"
    assert rows[0]["patient_rule"] == "patient_score >= patient_threshold"


def test_older_reports_fill_the_new_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    older = _report("a", [0.1, 0.8])
    for key in ("patient_score", "patient_threshold", "patient_rule"):
        del older[key]
    older["patient_fracture_probability"] = 0.8
    older["patient_score"] = "max vertebra fracture_probability"  # older reports described it in words
    assert patient_score_of(older) == 0.8
    write_report_csv(tmp_path / "a.csv", older)
    row = next(csv.DictReader((tmp_path / "a.csv").open()))
    assert row["patient_score"] == "0.8" and row["patient_threshold"] == ""
    assert row["patient_rule"] == "largest component of p(fracture) >= 0.5 is at least 500 mm3"
    assert patient_score_of({"patient_score": True}) is None


def test_json_report_writes_nan_as_null(tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = _report("b", [float("nan")])
    report["timings"] = {"total_s": np.float64(1.5)}
    write_report_json(tmp_path / "report.json", report)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["vertebrae"][0]["fracture_probability"] is None
    assert loaded["timings"]["total_s"] == 1.5
    assert math.isnan(report["vertebrae"][0]["fracture_probability"])  # the input is not modified


def test_overlay_png_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.image as mpimg

    shape = (50, 60, 90)
    hu = np.full(shape, -900.0, np.float32)
    hu[10:40, 10:50, :] = 40.0
    hu[20:30, 25:35, :] = 600.0
    probability = np.zeros(shape, np.float32)
    probability[20:30, 25:35, 50:60] = 0.9
    probability[20:30, 25:35, 20:30] = 0.02  # below the display threshold
    centres = np.array([[25.0, 30.0, 55.0], [25.0, 30.0, 25.0]])
    vertebrae = [
        {"name": "L1", "fracture_probability": 0.9, "predicted": "fracture"},
        {"name": "L2", "fracture_probability": 0.02, "predicted": "normal"},
    ]
    path = tmp_path / "overlay.png"
    render_overlay(path, hu, probability, (1.0, 1.0, 1.0), vertebrae, centres, "test case")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 600 and image.shape[1] > image.shape[0]
    # Some clearly red (fracture overlay / flag) pixels exist.
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    assert red.sum() > 100
    assert not list(tmp_path.glob(".overlay*"))  # no temporary file left behind


@pytest.mark.parametrize("axis", [0, 1])
def test_curved_slice_interpolates_linearly_along_the_path_like_map_coordinates(axis: int) -> None:
    from scipy import ndimage

    from vfdetect.report import _curved_slice

    rng = np.random.default_rng(axis)
    volume = rng.integers(-1000, 2000, (9, 11, 13)).astype(np.int16)
    path = rng.uniform(-2.0, volume.shape[axis] + 1.0, volume.shape[2])  # beyond both ends too
    other = 1 - axis
    grid_other, grid_z = np.meshgrid(np.arange(volume.shape[other]), np.arange(volume.shape[2]), indexing="ij")
    coords = [grid_other, grid_other, grid_z]
    coords[axis] = np.broadcast_to(np.clip(path, 0, volume.shape[axis] - 1)[None, :], grid_other.shape)
    expected = ndimage.map_coordinates(volume.astype(np.float32), np.stack(coords), order=1, mode="nearest")
    result = _curved_slice(volume, path, axis)
    assert result.dtype == np.float32 and result.shape == expected.shape
    np.testing.assert_allclose(result, expected, atol=1e-3)
