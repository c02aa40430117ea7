"""Evaluation of saved predictions: reading reports and probability maps, writing metrics and tables.

The stage behind ``vfdetect evaluate``. Nothing here trains or runs a network: each case's
``report.json`` (read through :mod:`vfdetect.records`) is matched to its reference grades, the
metrics come from :func:`vfdetect.evaluation.evaluate_records` (pure; the ROC, hull and bootstrap
of :mod:`vfdetect.metrics`), and the results are written as files (listed in
:func:`evaluate_predictions`) that :mod:`vfdetect.figures` draws from.

**Centroid noise** (paper section 4): Gaussian noise of a given sd per axis is added to the
centroids and the vertebrae are re-scored (:func:`vfdetect.aggregate.vertebra_scores`, the
prediction's cube and sigma) from the saved map they were scored on, ``scores_map.nii.gz``
(internal grid; older predictions without it fall back to ``probabilities.nii.gz``), see
:func:`map_vertebra_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.evaluation import PatientRecord, VertebraRecord, evaluate_records, metrics_markdown
from vfdetect.fileio import atomic_path, write_json_atomic, write_text_atomic
from vfdetect.jsonutil import json_safe
from vfdetect.layout import (
    CASE_REPORT_NAME,
    PROBABILITIES_NAME,
    SCORES_MAP_NAME,
    CaseFolder,
    EvaluationFolder,
    find_case_report,
)
from vfdetect.records import csv_text, read_case_report

DEFAULT_NOISE_DRAWS = 10
"""Draws of centroid noise pooled into the vertebra-level ROC when noise is asked for."""

# ----------------------------------------------------------------------------------------------
# Reading predictions
# ----------------------------------------------------------------------------------------------


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


def _as_dirs(pred_dirs: Path | Sequence[Path]) -> list[Path]:
    return [Path(pred_dirs)] if isinstance(pred_dirs, str | Path) else [Path(p) for p in pred_dirs]


def load_predictions(cases: Sequence[Any], pred_dirs: Path | Sequence[Path]) -> LoadedPredictions:
    """Match each case's saved report to its reference grades.

    ``cases`` are :class:`vfdetect.vertebrae.Case` (only ``.case`` and ``.grades`` are used).
    ``pred_dirs`` is a prediction folder (``<pred_dir>/<case>/report.json``) or several, searched
    in order. Vertebrae are matched by label; a vertebra graded but absent from the report or not
    scored there (or the reverse) is listed, not scored. A case without a report, or without
    grades, is listed and left out.
    """
    dirs = _as_dirs(pred_dirs)
    loaded = LoadedPredictions()
    for case in cases:
        name = case.case
        grades = {int(label): int(grade) for label, grade in case.grades.items()}
        report_path = find_case_report(name, dirs)
        if report_path is None:
            loaded.missing_predictions.append(name)
            continue
        if not grades:
            loaded.ungraded_cases.append(name)
            continue
        report = read_case_report(report_path)
        loaded.report_dirs[name] = report_path.parent
        loaded.score_options[name] = report.score_options
        seen: set[int] = set()
        for vertebra in report.vertebrae:
            if vertebra.label in seen:
                raise InputError(report_path, f"vertebra label {vertebra.label} appears twice")
            if not vertebra.scored:
                continue  # not scored (centroid outside the map): listed as graded without prediction
            seen.add(vertebra.label)
            if vertebra.label not in grades:
                loaded.ungraded_vertebrae.append((name, vertebra.label))
                continue
            loaded.vertebrae.append(VertebraRecord(name, vertebra.label, grades[vertebra.label],
                                                   vertebra.fracture_probability, vertebra.centroid_mm))
        loaded.unpredicted_vertebrae.extend((name, label) for label in sorted(grades) if label not in seen)
        if report.component_sizes is None:
            raise InputError(report_path, "no 'component_sizes' with probability_thresholds and "
                                          "largest_component_mm3 (needed for the patient-level ROC)")
        loaded.patients.append(PatientRecord(
            name, max(grades.values()), report.component_sizes.probability_thresholds,
            report.component_sizes.largest_component_mm3, patient_score=report.patient_score,
            patient_fracture=report.patient_fracture, patient_threshold=report.patient_threshold,
            patient_rule=report.patient_rule,
        ))
    return loaded


def read_probability_map(path: Path, channel: int = 0) -> Any:
    """One channel of a saved ``probabilities.nii.gz`` as a :class:`vfdetect.volume.Volume` on its own grid.

    Channel 0 is p(fracture), channel 1 p(vertebra). The file stores probabilities as uint8 with
    ``scl_slope`` 1/255 on the input scan's grid; the values read are these stored steps (not the
    float map the prediction scored on). :func:`vfdetect.volume.to_internal` brings the map into
    the internal frame.
    """
    import nibabel as nib

    from vfdetect.volume import Volume

    if not Path(path).is_file():
        raise InputError(path, "probability map not found")
    try:
        image: Any = nib.load(str(path))
        # Slicing the data object applies scl_slope/scl_inter.
        data = np.asarray(image.dataobj[..., channel] if len(image.shape) == 4 else image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many kinds
        raise InputError(path, f"cannot read the probability map ({error})") from None
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D map or a 4D map with channels last, got shape {image.shape}")
    return Volume(data, np.asarray(image.affine, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class MapScores:
    """Vertebra scores re-computed from the saved maps, in the order of the records.

    ``clean[k]`` scores vertebra ``k`` at its own centroid; ``noisy[d, k]`` after noise draw ``d``
    (``noisy`` has no rows without noise). Both come from the same map, the same grid and the same
    scoring options, so their difference is the centroid noise alone. ``sources`` names, per case,
    the file the scores were read from: ``scores_map.nii.gz`` (the internal-grid map the prediction
    scored, so noise 0 gives back report.json's scores) or, for predictions without it,
    ``probabilities.nii.gz`` (the quantised input-grid map).
    """

    clean: np.ndarray
    noisy: np.ndarray
    sd_mm: float
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def n_draws(self) -> int:
        return int(self.noisy.shape[0])


def _exact_centroids(saved: Any, records: Sequence[VertebraRecord], members: list[int],
                     centroids: np.ndarray) -> np.ndarray:
    """The centroids of ``members`` as the prediction scored them: the scores map's full-precision
    positions where they match the report's (rounded) ``centroid_mm``, else the report's."""
    by_label: dict[int, list[np.ndarray]] = {}
    for label, position in saved.centroids:
        by_label.setdefault(int(label), []).append(np.asarray(position, dtype=np.float64))
    exact = centroids[members].copy()
    for row, k in enumerate(members):
        candidates = by_label.get(records[k].label, [])
        if len(candidates) == 1 and np.all(np.abs(candidates[0] - exact[row]) <= 0.0051):
            exact[row] = candidates[0]
    return exact


def _cube_reach(options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest offsets (mm) of the scoring cube's sample points under ``options``."""
    from vfdetect.aggregate import DEFAULT_CUBE_EDGE_MM, DEFAULT_STEP_MM, cube_offsets

    offsets = cube_offsets(float(options.get("cube_edge_mm", DEFAULT_CUBE_EDGE_MM)),
                           float(options.get("step_mm", DEFAULT_STEP_MM)))
    return offsets.min(axis=0), offsets.max(axis=0)


def map_vertebra_scores(
    records: Sequence[VertebraRecord],
    report_dirs: Mapping[str, Path],
    sd_mm: float = 0.0,
    n_draws: int = 0,
    rng: np.random.Generator | None = None,
    case_score_options: Mapping[str, Mapping[str, Any]] | None = None,
    **score_options: Any,
) -> MapScores:
    """Score every vertebra from its case's saved map, at its centroid and after ``n_draws`` draws
    of Gaussian centroid noise (sd ``sd_mm`` per axis, paper: 3 mm).

    The map is ``scores_map.nii.gz`` when the case folder has it: the internal-grid p(fracture) the
    prediction scored, with the full grid it lay on (zero outside the saved crop) and the exact
    centroids (report.json rounds them to 0.01 mm), so that noise 0 with the prediction's options
    gives back report.json's scores. Older predictions without it are scored from
    ``probabilities.nii.gz`` (input grid, steps of 1/255), which only approximates them;
    :attr:`MapScores.sources` says which file each case used.

    All noise is drawn at once from ``rng``, shape ``(n_draws, vertebrae, 3)`` in the order of
    ``records``. A centroid whose cube lies wholly outside the map scores 0 (no evidence of a
    fracture). The scoring options of each case (``cube_edge_mm``, ``sigma_mm``) come from
    ``case_score_options[case]`` (what the prediction used), overridden by ``score_options``; they
    go to :func:`vfdetect.aggregate.vertebra_scores`.
    """
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.case_outputs import read_scores_map
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
    sources: dict[str, str] = {}
    for case, members in by_case.items():
        folder = CaseFolder(Path(report_dirs[case]))
        options = {**dict((case_score_options or {}).get(case, {})), **score_options}
        at = centroids[members]
        if folder.scores_map.is_file():
            saved = read_scores_map(folder.scores_map)
            at = _exact_centroids(saved, records, members, centroids)
            low, high = _cube_reach(options)
            points = np.concatenate([at[None], at[None] + noise[:, members]], axis=0).reshape(-1, 3)
            box = np.array([points.min(axis=0) + low, points.max(axis=0) + high])
            corners = np.array([[box[i, 0], box[j, 1], box[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
            volume = saved.covering(corners, "fracture")
            sources[case] = SCORES_MAP_NAME
        else:
            volume = read_probability_map(folder.probabilities)
            sources[case] = PROBABILITIES_NAME

        def score(points: np.ndarray, members: list[int] = members, volume: Any = volume,
                  options: dict[str, Any] = options) -> np.ndarray:
            vertebrae = [Vertebra(records[k].label, (float(p[0]), float(p[1]), float(p[2])))
                         for k, p in zip(members, points, strict=True)]
            values = np.array([float(v["fracture_probability"]) for v in vertebra_scores(volume, vertebrae, **options)])
            return np.where(np.isfinite(values), values, 0.0)

        clean[members] = score(at)
        for draw in range(n_draws):
            noisy[draw, members] = score(at + noise[draw, members])
    return MapScores(clean, noisy, float(sd_mm), sources)


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
# Writing the evaluation
# ----------------------------------------------------------------------------------------------


def _vertebra_name(label: int) -> str:
    from vfdetect.vertebrae import vertebra_name

    try:
        return vertebra_name(label)
    except VfdetectError:
        return str(label)


def write_evaluation(out_dir: Path, result: Mapping[str, Any], vertebrae: Sequence[VertebraRecord]) -> None:
    """Write metrics.json, metrics.md, roc.npz and the CSV tables into ``out_dir`` (atomic)."""
    folder = EvaluationFolder(Path(out_dir))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    metrics = result["metrics"]
    arrays = result["arrays"]
    with atomic_path(folder.roc_arrays) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    if "vertebra_fpr" in arrays:
        write_text_atomic(folder.roc_vertebra_csv, csv_text(
            ("fpr", "tpr", "threshold"),
            [(f, t, th) for f, t, th in zip(arrays["vertebra_fpr"], arrays["vertebra_tpr"],
                                            arrays["vertebra_thresholds"], strict=True)]))
    if "patient_hull_fpr" in arrays:
        write_text_atomic(folder.roc_patient_hull_csv, csv_text(
            ("fpr", "tpr", "probability_threshold", "noise_threshold_mm3"),
            [(r["fpr"], r["tpr"], r["probability_threshold"], r["noise_threshold_mm3"]) for r in metrics["patient_hull"]]))
        write_text_atomic(folder.patient_operating_points_csv, csv_text(
            list(metrics["patient_operating_points"][0]), [list(r.values()) for r in metrics["patient_operating_points"]]))
    grid_columns = ["fpr"] + [k for k in ("vertebra_tpr_mean", "vertebra_tpr_sd", "vertebra_tpr_low", "vertebra_tpr_high",
                                          "patient_tpr_mean", "patient_tpr_sd", "patient_tpr_low", "patient_tpr_high")
                              if k in arrays]
    write_text_atomic(folder.roc_bootstrap_mean_csv, csv_text(
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
    write_text_atomic(folder.vertebrae_csv, csv_text(
        ("case", "label", "name", "grade", "fracture_probability", "outcome", "x_mm", "y_mm", "z_mm"), rows))
    write_json_atomic(folder.metrics, json_safe(metrics))
    write_text_atomic(folder.metrics_markdown, metrics_markdown(metrics))


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

    With ``centroid_noise_mm > 0`` (paper: 3) every vertebra is scored from the saved map
    (:func:`map_vertebra_scores`: ``scores_map.nii.gz``, else ``probabilities.nii.gz``) twice over: at its centroid and after ``noise_draws`` draws of Gaussian
    centroid noise (seeded by ``seed``; the bootstrap uses an independent stream of the same seed).
    The noisy ROC (draws pooled) is the main vertebra-level result, the noise-free one from the same
    maps is secondary, and the largest difference between the noise-free map scores and the scores
    in report.json is reported (``vertebra_map_vs_report_max_abs_difference``; 0 up to rounding
    when every case has its scores map and ``score_options`` override nothing);
    ``vertebra_scores_from`` names the file(s) read, and the cases that fell back to
    ``probabilities.nii.gz`` are listed in ``vertebra_scores_from_probabilities_cases``. Without
    noise the scores of report.json are used as they are. ``patient_score_thresholds`` and
    ``patient_threshold_note`` go to :func:`vfdetect.evaluation.evaluate_records`.

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
                                f"without {CASE_REPORT_NAME}, {len(loaded.ungraded_cases)} without grades)")
    vertebrae = loaded.vertebrae
    noise_seed, bootstrap_seed = np.random.SeedSequence(seed).spawn(2)
    noisy: np.ndarray | None = None
    differences: np.ndarray | None = None
    rescored: MapScores | None = None
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
    metrics["vertebra_scores_from"] = CASE_REPORT_NAME
    if rescored is not None:
        files = sorted(set(rescored.sources.values()), key=[SCORES_MAP_NAME, PROBABILITIES_NAME].index)
        metrics["vertebra_scores_from"] = " + ".join(files)
        fallback = sorted(case for case, name in rescored.sources.items() if name == PROBABILITIES_NAME)
        if fallback:
            metrics["vertebra_scores_from_probabilities_cases"] = fallback
            metrics["vertebra_scores_note"] = (
                f"{len(fallback)} case(s) have no {SCORES_MAP_NAME} (older predictions): their vertebrae were "
                f"re-scored from {PROBABILITIES_NAME} (input grid, steps of 1/255), which only approximates "
                "the scores of report.json")
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
