"""The files of one predicted case: probability and label maps on the input grid, overlay, report.csv.

File names come from :class:`vfdetect.layout.CaseFolder`; the report's CSV from :mod:`vfdetect.records`.
``report.json`` is written last by :func:`vfdetect.predict.predict_case`, once its timings are complete.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.layout import CaseFolder


def patient_summary(report: Mapping[str, Any]) -> str:
    """One line with the patient verdict, its score against the threshold, and the vertebra count."""
    score = report.get("patient_score")
    threshold = float(report.get("patient_threshold", 0.5))
    count = len(report.get("vertebrae", []))
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return f"no spine found (no patient score); {count} vertebrae"
    verdict = "fracture" if float(score) >= threshold else "no fracture"
    return f"{verdict} (score {float(score):.3f} {'>=' if verdict == 'fracture' else '<'} {threshold:g}); {count} vertebrae"


def write_case_files(
    folder: CaseFolder,
    report: dict[str, Any],
    probabilities: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    grid: Any,
    vertebrae: Sequence[Any],
    overlay_hu: np.ndarray | None,
) -> dict[str, Path]:
    """Maps on the input grid, the overlay and report.csv (report.json is written by the caller)."""
    from vfdetect.records import write_report_csv
    from vfdetect.report import render_overlay
    from vfdetect.volume import save_on_grid, to_source, world_to_voxel

    Path(folder.path).mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    vertebra_map = probabilities[..., 1] + probabilities[..., 2]
    stacked = np.stack([probabilities[..., 2], vertebra_map], axis=-1)
    on_grid = to_source(stacked, affine, grid, order=1)
    del stacked
    paths["probabilities"] = folder.probabilities
    save_on_grid(np.clip(on_grid, 0.0, 1.0), grid, paths["probabilities"], scale=1.0 / 255.0)
    del on_grid
    labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    paths["labels"] = folder.labels
    save_on_grid(to_source(labels, affine, grid, order=0).astype(np.uint8), grid, paths["labels"], dtype=np.uint8)
    del labels
    if overlay_hu is not None:
        paths["overlay"] = folder.overlay
        centres = np.array(
            [world_to_voxel(affine, np.asarray(v.position_mm)) for v in vertebrae], dtype=np.float64
        ).reshape(-1, 3)
        render_overlay(
            paths["overlay"], overlay_hu, probabilities[..., 2], spacing, report["vertebrae"], centres,
            f"{report['case']}: {patient_summary(report)}", vertebra_probability=vertebra_map,
        )
    paths["report_csv"] = folder.report_csv
    write_report_csv(paths["report_csv"], report)
    return paths
