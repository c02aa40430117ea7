"""The per-case prediction report: one record type, read and written here only.

A :class:`CaseReport` is what ``vfdetect predict`` writes as ``<out>/<case>/report.json`` and
what evaluation, cross-validation and the figures read back. The JSON layout (schema version 2)::

    {"schema_version": 2, "case": ..., "patient_score": s, "patient_fracture": bool (s >= t),
     "patient_threshold": t, "patient_rule": "...",
     "thresholds": {"vertebra": .., "patient": .., "component_probability": .., "cube_edge_mm": .., "sigma_mm": ..},
     "vertebrae": [{"label": L, "name": "L1", "centroid_voxel": [...], "centroid_mm": [...],
                    "fracture_probability": p, "normal_probability": p_n, "predicted": "fracture"|"normal",
                    "source": "given"|"localised", "grade": g or null}],
     "largest_component_mm3": v,
     "component_sizes": {"probability_thresholds": [...], "largest_component_mm3": [...]},
     "region": {...}, "warnings": [...], "input": ..., "model": {...}, "version": ..., "timings": {...}}

``patient_score`` is the highest vertebra fracture score (not a calibrated probability).
Reports without ``schema_version`` (version 1) still load: they carry the patient score as
``patient_fracture_probability`` (and a text description under ``patient_score``), and their
decision rule is written from their ``thresholds`` (largest fracture component against a noise
threshold). ``component_sizes`` feed the paper's component-based patient-level ROC.
``centroid_voxel`` is in the input scan's own voxel grid, ``centroid_mm`` in world RAS mm. NaN
(a vertebra not scored, no patient score) is written as null and read back as NaN / None. Keys a
reader does not know are kept (``extra``) and written back.

Also here: the per-vertebra CSV rows of ``report.csv`` and ``summary.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic, write_text_atomic
from vfdetect.jsonutil import format_value, json_safe

SCHEMA_VERSION = 2
"""Version of the report.json layout written now; reports without ``schema_version`` are version 1."""

CSV_COLUMNS: tuple[str, ...] = (
    "case", "label", "name", "fracture_probability", "normal_probability", "predicted", "source", "grade",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "centroid_i", "centroid_j", "centroid_k", "edge_distance_mm",
    "patient_score", "patient_threshold", "patient_rule", "patient_fracture",
)
"""Columns of report.csv and summary.csv: one row per vertebra."""

_VERTEBRA_KEYS = ("label", "name", "centroid_voxel", "centroid_mm", "fracture_probability", "normal_probability",
                  "predicted", "source", "grade")
_REPORT_KEYS = ("schema_version", "case", "patient_score", "patient_fracture", "patient_threshold", "patient_rule",
                "thresholds", "vertebrae", "largest_component_mm3", "component_sizes", "region", "warnings", "input",
                "model", "version", "timings")
_OLD_PATIENT_SCORE_KEY = "patient_fracture_probability"


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number (not a bool), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        return float(value)
    return None


def _point(value: Any, what: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        x, y, z = (float(c) for c in value)
    except (TypeError, ValueError):
        raise VfdetectError(f"{what} must be three numbers, got {value!r}") from None
    return (x, y, z)


def patient_score_of(report: Mapping[str, Any]) -> float | None:
    """The case's patient score: ``patient_score`` when it is a number, else the older key
    ``patient_fracture_probability`` (same quantity); None when neither is given."""
    for key in ("patient_score", _OLD_PATIENT_SCORE_KEY):
        value = _number(report.get(key))
        if value is not None:
            return value
    return None


def patient_threshold_of(report: Mapping[str, Any]) -> float | None:
    """The threshold on the patient score behind ``patient_fracture`` (None in older reports)."""
    return _number(report.get("patient_threshold"))


def patient_rule_of(report: Mapping[str, Any]) -> str | None:
    """The stated rule behind ``patient_fracture``.

    ``patient_rule`` when the report has it; for older reports, which called a patient positive
    when the largest fracture component reached the noise threshold, that rule written from the
    report's ``thresholds``; None when neither is known.
    """
    rule = report.get("patient_rule")
    if isinstance(rule, str) and rule:
        return rule
    thresholds = report.get("thresholds") or {}
    if "probability" in thresholds and "noise_mm3" in thresholds:
        return (f"largest component of p(fracture) >= {format_value(thresholds['probability'], 'g')} "
                f"is at least {format_value(thresholds['noise_mm3'], 'g')} mm3")
    return None


@dataclass(frozen=True)
class VertebraScore:
    """One vertebra of a case report. ``fracture_probability`` is NaN when it was not scored."""

    label: int
    fracture_probability: float
    name: str | None = None
    centroid_mm: tuple[float, float, float] | None = None
    centroid_voxel: tuple[float, float, float] | None = None
    normal_probability: float | None = None
    predicted: str | None = None
    source: str | None = None
    grade: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def scored(self) -> bool:
        return math.isfinite(self.fracture_probability)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> VertebraScore:
        """A vertebra entry of report.json; raises :class:`VfdetectError` when it is malformed."""
        if not isinstance(entry, Mapping) or "label" not in entry or "fracture_probability" not in entry:
            raise VfdetectError("a vertebra entry lacks 'label' or 'fracture_probability'")
        try:
            label = int(entry["label"])
            score = entry["fracture_probability"]
            fracture_probability = math.nan if score is None else float(score)
        except (TypeError, ValueError):
            raise VfdetectError("a vertebra entry has a non-numeric 'label' or 'fracture_probability'") from None
        grade = entry.get("grade")
        return cls(
            label=label,
            fracture_probability=fracture_probability,
            name=None if entry.get("name") is None else str(entry["name"]),
            centroid_mm=_point(entry.get("centroid_mm"), "centroid_mm"),
            centroid_voxel=_point(entry.get("centroid_voxel"), "centroid_voxel"),
            normal_probability=_number(entry.get("normal_probability")),
            predicted=entry.get("predicted"),
            source=entry.get("source"),
            grade=None if grade is None else int(grade),
            extra={key: value for key, value in entry.items() if key not in _VERTEBRA_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The report.json entry (NaN kept; :func:`write_case_report` writes it as null)."""
        return {
            "label": self.label,
            "name": self.name,
            "centroid_voxel": None if self.centroid_voxel is None else list(self.centroid_voxel),
            "centroid_mm": None if self.centroid_mm is None else list(self.centroid_mm),
            "fracture_probability": self.fracture_probability,
            "normal_probability": self.normal_probability,
            "predicted": self.predicted,
            "source": self.source,
            "grade": self.grade,
            **self.extra,
        }


@dataclass(frozen=True)
class ComponentSizes:
    """Largest connected component (mm³) of p(fracture) >= each probability threshold."""

    probability_thresholds: tuple[float, ...]
    largest_component_mm3: tuple[float, ...]

    @classmethod
    def from_dict(cls, value: Any) -> ComponentSizes:
        try:
            thresholds = tuple(float(t) for t in value["probability_thresholds"])
            largest = tuple(float(s) for s in value["largest_component_mm3"])
        except (KeyError, TypeError, ValueError):
            raise VfdetectError("no 'component_sizes' with probability_thresholds and largest_component_mm3") from None
        if len(thresholds) != len(largest) or not thresholds:
            raise VfdetectError("component_sizes: thresholds and sizes differ in length or are empty")
        return cls(thresholds, largest)

    def to_dict(self) -> dict[str, list[float]]:
        return {"probability_thresholds": list(self.probability_thresholds),
                "largest_component_mm3": list(self.largest_component_mm3)}


@dataclass(frozen=True)
class CaseReport:
    """A case's prediction report (see the module doc for the JSON layout)."""

    case: str | None
    vertebrae: tuple[VertebraScore, ...] = ()
    patient_score: float | None = None
    patient_fracture: bool | None = None
    patient_threshold: float | None = None
    patient_rule: str | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    largest_component_mm3: float | None = None
    component_sizes: ComponentSizes | None = None
    region: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    input: str | None = None
    model: dict[str, Any] | None = None
    version: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def score_options(self) -> dict[str, Any]:
        """The vertebra scoring options the prediction used (``cube_edge_mm``, ``sigma_mm``) that it states."""
        return {key: self.thresholds[key] for key in ("cube_edge_mm", "sigma_mm") if key in self.thresholds}

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> CaseReport:
        """A report from its JSON content, of this schema version or an older one.

        Raises :class:`VfdetectError` when it is not a prediction report (no ``vertebrae`` list,
        a malformed vertebra entry or component table) or comes from a newer schema.
        """
        if not isinstance(report, Mapping) or not isinstance(report.get("vertebrae"), list):
            raise VfdetectError("not a prediction report (no 'vertebrae' list)")
        version = report.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
            raise VfdetectError(f"report schema version {version!r} is newer than this vfdetect reads "
                                f"({SCHEMA_VERSION}); update vfdetect")
        sizes = report.get("component_sizes")
        decision = report.get("patient_fracture")
        case = report.get("case")
        warnings = report.get("warnings") or []
        return cls(
            case=None if case is None else str(case),
            vertebrae=tuple(VertebraScore.from_dict(entry) for entry in report["vertebrae"]),
            patient_score=patient_score_of(report),
            patient_fracture=bool(decision) if isinstance(decision, bool | np.bool_) else None,
            patient_threshold=patient_threshold_of(report),
            patient_rule=patient_rule_of(report),
            thresholds=dict(report.get("thresholds") or {}),
            largest_component_mm3=_number(report.get("largest_component_mm3")),
            component_sizes=None if sizes is None else ComponentSizes.from_dict(sizes),
            region=report.get("region"),
            warnings=tuple(str(w) for w in warnings),
            input=None if report.get("input") is None else str(report["input"]),
            model=report.get("model"),
            version=None if report.get("version") is None else str(report["version"]),
            timings=dict(report.get("timings") or {}),
            schema_version=version,
            extra={key: value for key, value in report.items()
                   if key not in _REPORT_KEYS and key != _OLD_PATIENT_SCORE_KEY},
        )

    def to_dict(self) -> dict[str, Any]:
        """The report.json content in the current schema (NaN kept; written as null)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "case": self.case,
            "patient_score": self.patient_score,
            "patient_fracture": self.patient_fracture,
            "patient_threshold": self.patient_threshold,
            "patient_rule": self.patient_rule,
            "thresholds": dict(self.thresholds),
            "vertebrae": [vertebra.to_dict() for vertebra in self.vertebrae],
            "largest_component_mm3": self.largest_component_mm3,
            "component_sizes": None if self.component_sizes is None else self.component_sizes.to_dict(),
            "region": self.region,
            "warnings": list(self.warnings),
            "input": self.input,
            "model": self.model,
            "version": self.version,
            "timings": dict(self.timings),
            **self.extra,
        }


def as_case_report(report: CaseReport | Mapping[str, Any]) -> CaseReport:
    """``report`` itself, or the :class:`CaseReport` of a report.json content."""
    return report if isinstance(report, CaseReport) else CaseReport.from_dict(report)


def read_case_report(path: str | Path) -> CaseReport:
    """Read a report.json; an unreadable or malformed file is an :class:`InputError` naming it."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the prediction report ({error})") from None
    try:
        return CaseReport.from_dict(content)
    except VfdetectError as error:
        raise InputError(path, str(error)) from None


def write_case_report(path: str | Path, report: CaseReport | Mapping[str, Any]) -> None:
    """Write a case report as JSON in the current schema (atomic; NaN written as null)."""
    write_json_atomic(path, json_safe(as_case_report(report).to_dict()))


# ----------------------------------------------------------------------------------------------
# CSV rows
# ----------------------------------------------------------------------------------------------


def report_rows(report: CaseReport | Mapping[str, Any]) -> list[dict[str, str]]:
    """One CSV row (column -> text) per vertebra of a case report."""
    record = as_case_report(report)
    rows = []
    for vertebra in record.vertebrae:
        centroid_mm = vertebra.centroid_mm or (None, None, None)
        centroid_voxel = vertebra.centroid_voxel or (None, None, None)
        values = {
            "case": record.case,
            "label": vertebra.label,
            "name": vertebra.name,
            "fracture_probability": vertebra.fracture_probability,
            "normal_probability": vertebra.normal_probability,
            "predicted": vertebra.predicted,
            "source": vertebra.source,
            "grade": vertebra.grade,
            "centroid_x_mm": centroid_mm[0],
            "centroid_y_mm": centroid_mm[1],
            "centroid_z_mm": centroid_mm[2],
            "centroid_i": centroid_voxel[0],
            "centroid_j": centroid_voxel[1],
            "centroid_k": centroid_voxel[2],
            "edge_distance_mm": vertebra.extra.get("edge_distance_mm"),
            "patient_score": record.patient_score,
            "patient_threshold": record.patient_threshold,
            "patient_rule": record.patient_rule,
            "patient_fracture": record.patient_fracture,
        }
        rows.append({column: format_value(values[column], ".6g", missing="") for column in CSV_COLUMNS})
    return rows


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]]) -> str:
    """CSV text with a header line; rows are sequences of values or dicts keyed by the header."""
    buffer = io.StringIO()
    if rows and isinstance(rows[0], Mapping):
        writer: Any = csv.DictWriter(buffer, fieldnames=list(header), lineterminator="\n")
        writer.writeheader()
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_report_csv(path: str | Path, report: CaseReport | Mapping[str, Any]) -> None:
    """Write a case's vertebra table (:data:`CSV_COLUMNS`), atomically."""
    write_text_atomic(path, csv_text(CSV_COLUMNS, report_rows(report)))


def write_summary_csv(path: str | Path, reports: Sequence[CaseReport | Mapping[str, Any]]) -> None:
    """Cohort table: one row per vertebra over all case reports, atomically."""
    write_text_atomic(path, csv_text(CSV_COLUMNS, [row for report in reports for row in report_rows(report)]))
