"""Tests of vfdetect.records: the case report round trip, older reports, CSV rows and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from vfdetect.errors import InputError, VfdetectError
from vfdetect.records import (
    CSV_COLUMNS,
    SCHEMA_VERSION,
    CaseReport,
    VertebraScore,
    read_case_report,
    report_rows,
    write_case_report,
    write_report_csv,
)


def predicted_report() -> dict:  # type: ignore[type-arg]
    """A report as predict_case builds it (every key, numpy values, one vertebra not scored)."""
    return {
        "case": "verse004",
        "patient_score": 0.81,
        "patient_fracture": np.bool_(True),
        "patient_threshold": 0.5,
        "patient_rule": "patient_score >= patient_threshold",
        "thresholds": {"vertebra": 0.5, "patient": 0.5, "component_probability": 0.5, "cube_edge_mm": 20.0,
                       "sigma_mm": None},
        "vertebrae": [
            {"label": 20, "name": "L1", "centroid_voxel": [10.5, 11.0, 40.25], "centroid_mm": [1.0, -2.5, 30.0],
             "fracture_probability": np.float32(0.81), "normal_probability": np.float32(0.1),
             "predicted": "fracture", "source": "given", "grade": 2},
            {"label": 21, "name": "L2", "centroid_voxel": [10.0, 11.0, 20.0], "centroid_mm": [1.0, -2.5, 10.0],
             "fracture_probability": float("nan"), "normal_probability": float("nan"), "predicted": "normal",
             "source": "given", "grade": None},
        ],
        "largest_component_mm3": np.float64(812.0),
        "component_sizes": {"probability_thresholds": [0.3, 0.5], "largest_component_mm3": [900.0, 812.0]},
        "region": {"mode": "spine"},
        "warnings": [],
        "input": "/data/verse004.nii.gz",
        "model": {"name": "bundled"},
        "version": "0.1.0",
        "timings": {"total_s": 1.5},
    }


def test_round_trip_keeps_every_key_and_adds_the_schema_version(tmp_path: Path) -> None:
    original = predicted_report()
    write_case_report(tmp_path / "report.json", original)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION
    assert list(saved)[1:] == list(original)  # same keys, same order, after the version
    assert list(saved["vertebrae"][0]) == list(original["vertebrae"][0])
    assert saved["vertebrae"][1]["fracture_probability"] is None  # NaN written as null
    assert saved["patient_fracture"] is True and saved["largest_component_mm3"] == 812.0
    report = read_case_report(tmp_path / "report.json")
    assert report.case == "verse004" and report.patient_fracture is True
    assert report.vertebrae[0].fracture_probability == pytest.approx(0.81)
    assert report.vertebrae[0].centroid_mm == (1.0, -2.5, 30.0)
    assert not report.vertebrae[1].scored and math.isnan(report.vertebrae[1].fracture_probability)
    assert report.component_sizes is not None and report.component_sizes.largest_component_mm3 == (900.0, 812.0)
    assert report.score_options == {"cube_edge_mm": 20.0, "sigma_mm": None}
    write_case_report(tmp_path / "again.json", report)
    assert (tmp_path / "again.json").read_text() == (tmp_path / "report.json").read_text()


def test_older_reports_load() -> None:
    older = {
        "case": "a",
        "patient_fracture_probability": 0.7,
        "patient_score": "max vertebra fracture_probability",  # older reports described it in words
        "thresholds": {"probability": 0.5, "noise_mm3": 500.0},
        "vertebrae": [{"label": 20, "fracture_probability": 0.7}],
        "something_else": [1, 2],
    }
    report = CaseReport.from_dict(older)
    assert report.schema_version == 1
    assert report.patient_score == 0.7 and report.patient_threshold is None and report.patient_fracture is None
    assert report.patient_rule == "largest component of p(fracture) >= 0.5 is at least 500 mm3"
    assert report.component_sizes is None and report.vertebrae[0].name is None
    written = report.to_dict()
    assert written["patient_score"] == 0.7 and "patient_fracture_probability" not in written
    assert written["something_else"] == [1, 2]  # unknown keys are kept


def test_csv_rows_format_numbers_and_gaps(tmp_path: Path) -> None:
    write_report_csv(tmp_path / "report.csv", predicted_report())
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2
    assert rows[0]["fracture_probability"] == "0.81" and rows[0]["centroid_k"] == "40.25"
    assert rows[0]["patient_fracture"] == "true" and rows[0]["grade"] == "2"
    assert rows[1]["fracture_probability"] == "" and rows[1]["grade"] == ""
    assert report_rows(CaseReport.from_dict(predicted_report())) == rows


@pytest.mark.parametrize("content, problem", [
    ("not json", "cannot read the prediction report"),
    ('{"case": "a"}', "no 'vertebrae' list"),
    ('{"vertebrae": [{"label": 20}]}', "lacks 'label' or 'fracture_probability'"),
    ('{"vertebrae": [], "component_sizes": {"probability_thresholds": [0.5]}}', "component_sizes"),
    ('{"vertebrae": [], "schema_version": 99}', "newer than this vfdetect reads"),
])
def test_bad_reports_name_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as caught:
        read_case_report(path)
    assert str(path) in str(caught.value)


def test_vertebra_entry_needs_numbers() -> None:
    with pytest.raises(VfdetectError, match="non-numeric"):
        VertebraScore.from_dict({"label": "L1", "fracture_probability": 0.2})
