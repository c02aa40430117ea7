"""The paper's figures, drawn from saved outputs only (nothing here trains or predicts).

* Figure 1 — fractures per Genant grade along the spine (stacked bars per level), for any set of
  graded cases (a manifest, or the cases of an evaluation).
* Figure 3 — the three variants' hard labels on one validation case, side by side (mid-sagittal
  and coronal sections instead of the paper's 3D rendering), from a model-selection folder.
* Figures 4 and 5 — patient- and vertebra-level ROC from an evaluation folder (``roc.npz``,
  ``metrics.json``): the curve on all cases with its AUC and 95 % percentile bootstrap interval,
  and the pointwise 2.5-97.5 % band of the resampled curves. Figure 4's resampled curves
  re-evaluate the all-case hull's classifiers; the mean of hulls refitted per resample is drawn
  dotted and labelled secondary. Figure 4 marks the decision rule fixed before the cases were seen
  (and the fold-chosen threshold of a cross-validation), the best hull point only as optimistic.
  Figure 5's main curve is the one with centroid noise when the evaluation has it (paper: 3 mm),
  the noise-free curve from the same maps is drawn dashed as secondary.
* Figures 6 and 7 — mid-sagittal sections with the fracture probability map (values < 0.05 hidden)
  of cases whose vertebrae are all called correctly, and of cases with errors; every vertebra is
  marked TP / TN / FP / FN (from ``vertebrae.csv`` and the saved probability maps).

Each figure is written as PNG and PDF. Only :class:`matplotlib.figure.Figure` is used (no pyplot
state), so drawing works headless and in threads.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import atomic_path
from vfdetect.jsonutil import format_value
from vfdetect.layout import CaseFolder, CvFolder, EvaluationFolder, ModelSelectionFolder, figures_dir
from vfdetect.records import read_case_report

GRADE_NAMES = {1: "mild", 2: "moderate", 3: "severe"}
GRADE_COLOURS = {1: "#f2c14e", 2: "#f08a24", 3: "#c0392b"}
LABEL_COLOURS = {1: (0.15, 0.75, 0.25), 2: (0.9, 0.1, 0.1)}  # normal green, fracture red (paper Fig. 3)
OUTCOME_COLOURS = {"TP": "#2ecc71", "TN": "#d0d0d0", "FP": "#f39c12", "FN": "#e74c3c"}
PROBABILITY_FLOOR = 0.05
BONE_WINDOW_HU = (-250.0, 1250.0)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def save_figure(figure: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.pdf`` atomically; return both paths."""
    written = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=150, bbox_inches="tight", format=suffix[1:])
        written.append(path)
    return written


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def load_internal(path: Path, kind: str = "scan") -> Any:
    """An image in the internal frame (canonical RAS, axis-aligned, 1 mm), as a :class:`vfdetect.volume.Volume`.

    ``kind`` is ``"scan"`` (a CT, trilinear), ``"labels"`` (a label image, nearest neighbour) or
    ``"probability"`` (channel 0, p(fracture), of a saved probability map; trilinear, 0 outside).
    Images saved on one grid (a scan, its maps and its label images) land on one internal grid.
    """
    from vfdetect.evaluate import read_probability_map
    from vfdetect.volume import load_label_image, load_scan, to_internal

    if kind == "scan":
        return to_internal(load_scan(path)[0], order=1)
    if kind == "labels":
        return to_internal(load_label_image(path)[0], order=0)
    if kind == "probability":
        return to_internal(read_probability_map(path, channel=0), order=1, fill_value=0.0)
    raise VfdetectError(f"unknown image kind {kind!r}")


def _voxels(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    from vfdetect.volume import world_to_voxel

    return world_to_voxel(affine, np.atleast_2d(np.asarray(points_mm, dtype=np.float64)))


def _sagittal(volume: np.ndarray, x_index: int) -> np.ndarray:
    """Section at left-right index ``x_index`` as (z, y) rows for imshow(origin='lower')."""
    return volume[int(np.clip(x_index, 0, volume.shape[0] - 1)), :, :].T


def _coronal(volume: np.ndarray, y_index: int) -> np.ndarray:
    return volume[:, int(np.clip(y_index, 0, volume.shape[1] - 1)), :].T


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError as error:
        raise InputError(path, f"cannot read ({error})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read ({error})") from None


# ----------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------


def figure1_fractures_per_level(grades: Mapping[str, Mapping[int, int]], out_stem: Path,
                                title: str = "Fractures per Genant grade along the spine") -> list[Path]:
    """Stacked bars of mild / moderate / severe fractures per vertebra level (paper Fig. 1).

    ``grades``: case -> {VerSe label: Genant grade}. Levels run cranio-caudally over the paper's
    range (T1-S2) plus any other level present; each segment is labelled with its count.
    """
    from vfdetect.vertebrae import PAPER_LEVELS, spine_rank, vertebra_name

    counts: dict[int, dict[int, int]] = {}
    totals: dict[int, int] = {}
    for case_grades in grades.values():
        for label, grade in case_grades.items():
            label, grade = int(label), int(grade)
            totals[label] = totals.get(label, 0) + 1
            if grade >= 1:
                counts.setdefault(label, {}).setdefault(grade, 0)
                counts[label][grade] += 1
    if not totals:
        raise VfdetectError("no graded vertebra to draw")
    levels = sorted(set(PAPER_LEVELS) | set(totals), key=spine_rank)
    names = [vertebra_name(label) for label in levels]
    figure = _new_figure(max(6.0, 0.42 * len(levels)), 4.2)
    axis = figure.add_subplot()
    bottom = np.zeros(len(levels))
    positions = np.arange(len(levels))
    for grade in (1, 2, 3):
        values = np.array([counts.get(label, {}).get(grade, 0) for label in levels], dtype=float)
        n_grade = int(values.sum())
        bars = axis.bar(positions, values, bottom=bottom, color=GRADE_COLOURS[grade], edgecolor="white",
                        linewidth=0.5, label=f"{GRADE_NAMES[grade]} (n={n_grade})")
        for bar, value in zip(bars, values, strict=True):
            if value > 0:
                axis.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, f"{int(value)}",
                          ha="center", va="center", fontsize=7)
        bottom += values
    axis.set_xticks(positions, names, rotation=90 if len(levels) > 20 else 0, fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("fractured vertebrae")
    axis.set_xlabel("vertebra level (cranial -> caudal)")
    n_vertebrae = sum(totals.values())
    n_fractured = sum(sum(v.values()) for v in counts.values())
    axis.set_title(f"{title}\n{len(grades)} cases, {n_vertebrae} graded vertebrae, {n_fractured} fractured "
                   f"({100 * n_fractured / n_vertebrae:.0f} %)", fontsize=10)
    axis.legend(frameon=False, fontsize=8)
    axis.spines[["top", "right"]].set_visible(False)
    return save_figure(figure, out_stem)


def grades_from_vertebrae_csv(path: Path) -> dict[str, dict[int, int]]:
    """case -> {label: grade} from an evaluation's ``vertebrae.csv``."""
    grades: dict[str, dict[int, int]] = {}
    for row in _read_csv(path):
        grades.setdefault(row["case"], {})[int(row["label"])] = int(row["grade"])
    return grades


# ----------------------------------------------------------------------------------------------
# Figures 4 and 5
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return format_value(value, ".2f")


def _auc_text(auc: Any, interval: Any) -> str:
    low, high = interval if isinstance(interval, list | tuple) and len(interval) == 2 else (None, None)
    return f"AUC = {_fmt(auc)} (95 % interval {_fmt(low)}-{_fmt(high)})"


def _decision_marker(axis: Any, summary: Mapping[str, Any] | None, label: str, **style: Any) -> None:
    if summary and summary.get("recall") is not None and summary.get("specificity") is not None:
        axis.scatter([1 - summary["specificity"]], [summary["recall"]], zorder=4,
                     label=f"{label}: recall {_fmt(summary['recall'])}, specificity {_fmt(summary['specificity'])}",
                     **style)


def figure_roc(evaluation_dir: Path, level: str, out_stem: Path, title: str | None = None) -> list[Path]:
    """Patient-level (``level="patient"``, paper Fig. 4) or vertebra-level (Fig. 5) ROC figure."""
    if level not in ("patient", "vertebra"):
        raise VfdetectError(f"level must be 'patient' or 'vertebra', got {level!r}")
    evaluation_dir = Path(evaluation_dir)
    folder = EvaluationFolder(evaluation_dir)
    metrics = _read_json(folder.metrics)
    try:
        arrays = dict(np.load(folder.roc_arrays))
    except (OSError, ValueError) as error:
        raise InputError(folder.roc_arrays, f"cannot read ({error})") from None
    noise = metrics.get("vertebra_centroid_noise") if level == "vertebra" else None
    if level == "patient":
        curve_key = ("patient_hull_fpr", "patient_hull_tpr")
        curve_label = "convex hull, all cases"
    else:
        curve_key = ("vertebra_fpr", "vertebra_tpr")
        curve_label = (f"centroid noise {noise['sd_mm']:g} mm ({noise['draws']} draws), all vertebrae" if noise
                       else "ROC, all vertebrae")
    if curve_key[0] not in arrays:
        raise VfdetectError(f"{evaluation_dir}: no {level}-level ROC saved (one class only?)")
    figure = _new_figure(4.8, 4.6)
    axis = figure.add_subplot()
    grid = np.r_[0.0, arrays["fpr_grid"]]
    boot = metrics.get(f"{level}_bootstrap") or {}
    low_key, high_key = f"{level}_tpr_low", f"{level}_tpr_high"
    if low_key in arrays and np.all(np.isfinite(arrays[low_key])) and boot.get("n_valid", 0) > 1:
        what = "hull classifiers re-evaluated" if level == "patient" else "ROC"
        axis.fill_between(grid, np.r_[0.0, arrays[low_key]], np.r_[0.0, arrays[high_key]], color="#1f77b4",
                          alpha=0.2, linewidth=0,
                          label=f"2.5-97.5 % of {boot.get('n_valid')} case resamples ({what})")
    axis.plot(arrays[curve_key[0]], arrays[curve_key[1]], color="#1f77b4", linewidth=2,
              label=f"{curve_label}, {_auc_text(metrics.get(f'{level}_auc'), metrics.get(f'{level}_auc_interval95'))}")
    if noise and "vertebra_noise_free_fpr" in arrays:
        clean = metrics.get("vertebra_noise_free") or {}
        axis.plot(arrays["vertebra_noise_free_fpr"], arrays["vertebra_noise_free_tpr"], color="#555555", linewidth=1,
                  linestyle="--", label=f"secondary: no centroid noise (same maps), AUC = {_fmt(clean.get('auc'))}")
    if level == "patient":
        axis.scatter(arrays["patient_points_fpr"], arrays["patient_points_tpr"], s=6, color="#999999", alpha=0.5,
                     label="(probability, noise) threshold pairs", zorder=1)
        if "patient_refitted_tpr_mean" in arrays and np.all(np.isfinite(arrays["patient_refitted_tpr_mean"])):
            axis.plot(grid, np.r_[0.0, arrays["patient_refitted_tpr_mean"]], color="#777777", linewidth=1,
                      linestyle=":", label=f"secondary: mean of hulls refitted per resample, AUC = "
                                           f"{_fmt(metrics.get('patient_auc_refitted_hull_mean'))} (higher by "
                                           "construction)")
        _decision_marker(axis, metrics.get("patient_fixed_rule"), "rule fixed before these cases", s=45,
                         color="#d62728", marker="o")
        _decision_marker(axis, metrics.get("patient_training_threshold"), "threshold chosen on training folds",
                         s=45, color="#2ca02c", marker="s")
        _decision_marker(axis, metrics.get("patient_hull_best_point"), "best hull point on these cases (optimistic)",
                         s=45, facecolors="none", edgecolors="#d62728", marker="o")
    axis.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle=":")
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_aspect("equal")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    counts = metrics.get(f"{level}_counts", {})
    if level == "patient":
        what = f"{counts.get('patients')} patients ({counts.get('positive')} with a fracture)"
    else:
        what = f"{counts.get('vertebrae')} vertebrae ({counts.get('fractured')} fractured)"
    suffix = f", centroid noise {noise['sd_mm']:g} mm" if noise else ""
    axis.set_title(title or f"{level.capitalize()}-level fracture detection\n{what}{suffix}", fontsize=10)
    axis.legend(loc="lower right", fontsize=5.5, frameon=False)
    return save_figure(figure, out_stem)


# ----------------------------------------------------------------------------------------------
# Figures 6 and 7
# ----------------------------------------------------------------------------------------------


def _case_rows(evaluation_dir: Path) -> dict[str, list[dict[str, str]]]:
    by_case: dict[str, list[dict[str, str]]] = {}
    for row in _read_csv(EvaluationFolder(Path(evaluation_dir)).vertebrae_csv):
        by_case.setdefault(row["case"], []).append(row)
    return by_case


def choose_overlay_cases(by_case: Mapping[str, Sequence[Mapping[str, str]]], count: int
                         ) -> tuple[list[str], list[str]]:
    """Correct cases (most true positives first, then most vertebrae) and cases with errors (most first)."""
    correct, wrong = [], []
    for case, rows in by_case.items():
        outcomes = [row["outcome"] for row in rows]
        errors = sum(o in ("FP", "FN") for o in outcomes)
        if errors:
            wrong.append((-errors, -len(rows), case))
        else:
            correct.append((-outcomes.count("TP"), -len(rows), case))
    return [c for *_, c in sorted(correct)[:count]], [c for *_, c in sorted(wrong)[:count]]


def _draw_case_panel(axis: Any, image_path: Path, probability_path: Path, rows: Sequence[Mapping[str, str]],
                     title: str) -> Any:
    """Mid-sagittal CT section with p(fracture) >= 0.05 over it and each vertebra marked."""
    from matplotlib import colormaps

    scan = load_internal(image_path, "scan")
    probability_map = load_internal(probability_path, "probability")
    ct, ct_affine, probability = scan.array, scan.affine, probability_map.array
    if ct.shape != probability.shape:
        raise InputError(probability_path, f"grid {probability.shape} differs from the scan's {ct.shape}")
    centroids = np.array([[float(row["x_mm"]), float(row["y_mm"]), float(row["z_mm"])] for row in rows
                          if row.get("x_mm") not in (None, "")])
    voxels = _voxels(ct_affine, centroids) if len(centroids) else np.empty((0, 3))
    x_index = int(round(float(np.median(voxels[:, 0])))) if len(voxels) else ct.shape[0] // 2
    spacing = scan.spacing
    extent = (0, ct.shape[1] * spacing[1], 0, ct.shape[2] * spacing[2])
    axis.imshow(_sagittal(ct, x_index), cmap="gray", vmin=BONE_WINDOW_HU[0], vmax=BONE_WINDOW_HU[1],
                origin="lower", extent=extent, interpolation="bilinear")
    section = _sagittal(probability, x_index)
    masked = np.ma.masked_less(section, PROBABILITY_FLOOR)
    shown = axis.imshow(masked, cmap=colormaps["jet"], vmin=0, vmax=1, alpha=0.55, origin="lower", extent=extent,
                        interpolation="nearest")
    for row, voxel in zip(rows, voxels, strict=False):
        outcome = row["outcome"]
        y_mm, z_mm = (voxel[1] + 0.5) * spacing[1], (voxel[2] + 0.5) * spacing[2]
        colour = OUTCOME_COLOURS.get(outcome, "white")
        axis.plot([y_mm], [z_mm], marker="o", markersize=3, color=colour)
        grade = int(row["grade"])
        text = f"{row['name']} {outcome}" + (f" g{grade}" if grade else "")
        axis.text(y_mm - 18, z_mm, text, color=colour, fontsize=6, ha="right", va="center",
                  fontweight="bold" if outcome in ("FP", "FN") else "normal",
                  bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.6, "linewidth": 0})
    axis.invert_xaxis()  # anterior on the left, as sagittal views are usually shown
    axis.set_title(title, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])
    return shown


def figure_overlays(evaluation_dir: Path, cases: Sequence[str], out_stem: Path, title: str) -> list[Path]:
    """One mid-sagittal panel per case (paper Figs. 6 and 7)."""
    evaluation_dir = Path(evaluation_dir)
    metrics = _read_json(EvaluationFolder(evaluation_dir).metrics)
    by_case = _case_rows(evaluation_dir)
    images = metrics.get("case_images", {})
    case_dirs = metrics.get("case_dirs", {})
    if not cases:
        raise VfdetectError("no case to draw")
    figure = _new_figure(2.9 * len(cases) + 0.6, 5.4)
    axes = figure.subplots(1, len(cases), squeeze=False)[0]
    shown = None
    for axis, case in zip(axes, cases, strict=True):
        if case not in images or case not in case_dirs:
            raise VfdetectError(f"{evaluation_dir}: metrics.json does not say where case {case}'s files are")
        rows = by_case[case]
        counts = {o: sum(r["outcome"] == o for r in rows) for o in ("TP", "FP", "FN")}
        panel_title = f"{case}\nTP {counts['TP']}  FP {counts['FP']}  FN {counts['FN']}"
        shown = _draw_case_panel(axis, Path(images[case]), CaseFolder(Path(case_dirs[case])).probabilities, rows,
                                 panel_title)
    if shown is not None:
        figure.colorbar(shown, ax=list(axes), shrink=0.6, label="p(fracture) (< 0.05 hidden)")
    threshold = metrics.get("vertebra_operating_point", {}).get("threshold")
    figure.suptitle(f"{title} (vertebra score threshold {threshold})", fontsize=9)
    return save_figure(figure, out_stem)


# ----------------------------------------------------------------------------------------------
# Figure 3
# ----------------------------------------------------------------------------------------------


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for value, colour in LABEL_COLOURS.items():
        rgba[labels == value] = (*colour, 0.75)
    return rgba


def figure3_variants(selection_dir: Path, out_stem: Path) -> list[Path]:
    """Each variant's hard labels on the Figure 3 case (mid-sagittal row and coronal row)."""
    selection_dir = Path(selection_dir)
    selection = ModelSelectionFolder(selection_dir)
    document = _read_json(selection.summary)
    case = document["figure3_case"]
    image_path = document.get("figure3_image")
    if not image_path:
        raise VfdetectError(f"{selection_dir}: model_selection.json does not name the Figure 3 image")
    scan = load_internal(Path(image_path), "scan")
    ct, affine = scan.array, scan.affine
    panels: list[tuple[str, np.ndarray]] = []
    reference = selection.labels.image(case)
    if reference.is_file():
        panels.append(("reference label image", load_internal(reference, "labels").array))
    centroids = []
    for row in document["variants"]:
        variant = row["variant"]
        prediction = selection.variant(variant).predictions.case(case)
        panels.append((variant, load_internal(prediction.labels, "labels").array))
        report = read_case_report(prediction.report)
        centroids += [list(v.centroid_mm) for v in report.vertebrae if v.centroid_mm is not None]
    voxels = _voxels(affine, np.array(centroids)) if centroids else np.empty((0, 3))
    x_index = int(round(float(np.median(voxels[:, 0])))) if len(voxels) else ct.shape[0] // 2
    y_index = int(round(float(np.median(voxels[:, 1])))) if len(voxels) else ct.shape[1] // 2
    spacing = scan.spacing
    figure = _new_figure(2.6 * len(panels), 7.0)
    axes = figure.subplots(2, len(panels), squeeze=False)
    for column, (name, labels) in enumerate(panels):
        for row, (cut, extent) in enumerate((
            (lambda v: _sagittal(v, x_index), (0, ct.shape[1] * spacing[1], 0, ct.shape[2] * spacing[2])),
            (lambda v: _coronal(v, y_index), (0, ct.shape[0] * spacing[0], 0, ct.shape[2] * spacing[2])),
        )):
            axis = axes[row][column]
            axis.imshow(cut(ct), cmap="gray", vmin=BONE_WINDOW_HU[0], vmax=BONE_WINDOW_HU[1], origin="lower",
                        extent=extent)
            axis.imshow(_label_rgba(np.rint(cut(labels)).astype(np.int64)), origin="lower", extent=extent,
                        interpolation="nearest")
            if row == 0:
                axis.invert_xaxis()
                axis.set_title(name, fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0][0].set_ylabel("mid-sagittal", fontsize=8)
        axes[1][0].set_ylabel("coronal", fontsize=8)
    figure.suptitle(f"Hard labels on validation case {case} (green normal, red fracture)", fontsize=9)
    return save_figure(figure, out_stem)


# ----------------------------------------------------------------------------------------------
# Everything a folder allows
# ----------------------------------------------------------------------------------------------


def draw_figures(directory: Path, out_dir: Path | None = None, manifest_cases: Sequence[Any] | None = None,
                 cases_per_figure: int = 3) -> list[Path]:
    """Draw every figure the saved outputs in ``directory`` allow; return the files written.

    ``directory`` may be an evaluation folder (``metrics.json``), a cross-validation folder
    (``cv.json``; its ``evaluation/`` and, if present, ``evaluation_centroid_noise/``, which then
    gives Figure 5) or a model selection folder (``model_selection.json``). With ``manifest_cases``, Figure 1 is drawn for
    them as ``figure1_manifest``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "folder not found")
    out_dir = Path(out_dir) if out_dir is not None else figures_dir(directory)
    written: list[Path] = []
    evaluation: Path | None = None
    noisy_evaluation: Path | None = None
    experiment = CvFolder(directory)
    if EvaluationFolder(directory).metrics.is_file():
        evaluation = directory
    elif experiment.evaluation.metrics.is_file():
        evaluation = experiment.evaluation.path
    if experiment.evaluation_centroid_noise.metrics.is_file():
        noisy_evaluation = experiment.evaluation_centroid_noise.path
    selection = ModelSelectionFolder(directory).summary.is_file()
    if evaluation is None and noisy_evaluation is None and not selection and manifest_cases is None:
        raise InputError(directory, "holds no metrics.json, cv.json or model_selection.json to draw from")
    if evaluation is not None:
        written += figure1_fractures_per_level(grades_from_vertebrae_csv(EvaluationFolder(evaluation).vertebrae_csv),
                                               out_dir / "figure1_fractures_per_level",
                                               "Evaluated cases: fractures per Genant grade along the spine")
        try:
            written += figure_roc(evaluation, "patient", out_dir / "figure4_patient_roc")
        except VfdetectError:
            pass  # single-class evaluation: no patient-level ROC
    # Figure 5: the evaluation with centroid noise when there is one (its noise-free curve is secondary).
    figure5_source = noisy_evaluation if noisy_evaluation is not None else evaluation
    if figure5_source is not None:
        try:
            written += figure_roc(figure5_source, "vertebra", out_dir / "figure5_vertebra_roc")
        except VfdetectError:
            pass
    if evaluation is not None:
        correct, wrong = choose_overlay_cases(_case_rows(evaluation), cases_per_figure)
        if correct:
            written += figure_overlays(evaluation, correct, out_dir / "figure6_correct_cases",
                                       "Cases with only correct vertebra-level calls")
        if wrong:
            written += figure_overlays(evaluation, wrong, out_dir / "figure7_cases_with_errors",
                                       "Cases with vertebra-level errors")
    if selection:
        written += figure3_variants(directory, out_dir / "figure3_variants")
    if manifest_cases is not None:
        written += figure1_fractures_per_level({c.case: c.grades for c in manifest_cases if c.grades},
                                               out_dir / "figure1_manifest")
    return written
