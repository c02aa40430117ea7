"""Whole-scan prediction: the inference region, then vertebra and patient scores and the case outputs.

The sliding window itself, :func:`vfdetect.tiling.predict_volume` (re-exported here), takes any
callable ``predictor(hr, lr)``; its tiles start on multiples of the subsampling factor, so the
stitched map does not depend on the tile size or the batch size and has no seams (see
:mod:`vfdetect.tiling`).

Whole cases: :func:`predict_case` takes a NIfTI path, a DICOM folder or an in-memory nibabel image,
prepares it exactly as training did (:func:`vfdetect.preprocess.prepare_scan`: internal frame, z-score
over the body mask, LR fill = corner mean), predicts inside the inference region
(:func:`vfdetect.region.inference_region`), scores the vertebrae (given centroids or
:func:`vfdetect.localise.localise_vertebrae`) and the patient (one rule: the highest vertebra score
against the patient threshold), and writes the case folder (:class:`vfdetect.layout.CaseFolder`);
:func:`predict_cases` runs a list of cases, skipping failures, and writes ``summary.csv``.

Modules around it: :mod:`vfdetect.tiling` (tile shapes, plans, windows and the sliding window),
:mod:`vfdetect.predictor` (model resolution and loading, precision), :mod:`vfdetect.region` (the
spine region) and :mod:`vfdetect.case_outputs` (the case files); their public names are re-exported
here.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.case_outputs import patient_summary, write_case_files
from vfdetect.errors import VfdetectError
from vfdetect.layout import PredictionFolder
from vfdetect.predictor import (
    BF16_CPU_FLAGS,
    PRECISIONS,
    ModelLoadError,
    PendingPredictor,
    Predictor,
    Predictor_fn,
    configure_threads,
    cpu_flags,
    keras_predictor,
    load_predictor,
    load_predictor_in_background,
    ready,
    resolve_model,
    resolve_precision,
)
from vfdetect.region import (
    REGION_MODES,
    InferenceRegion,
    SpineRegionConfig,
    centroid_region,
    chain_extension,
    inference_region,
    region_growth,
    spine_region,
)
from vfdetect.tiling import (
    ACTIVATION_BYTES_PER_HR_VOXEL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TILE_OUTPUT,
    DEFAULT_MEMORY_BUDGET_BYTES,
    GIB,
    RUNTIME_OVERHEAD_BYTES,
    Tile,
    choose_tile_shape,
    plan_tiles,
    predict_volume,
    tile_output_shape,
    tile_starts,
)

# ----------------------------------------------------------------------------------------------
# One case, many cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictConfig:
    """Settings of :func:`predict_case` (scores, thresholds, region, tiling, outputs).

    ``patient_threshold``: the patient is called "fracture" when its score (the highest vertebra
    score) reaches it; None takes the model's own (``patient_threshold`` in its configuration), else
    0.5 (:data:`vfdetect.aggregate.DEFAULT_PATIENT_THRESHOLD`). ``probability_threshold`` and
    ``component_thresholds`` only set where the report's secondary connected-component sizes are
    measured. ``region``: ``"spine"`` (default) runs the network only where a vertebra can be
    (:func:`inference_region`, tuned by ``spine_region``), ``"whole"`` over the whole volume
    (skipping air tiles with ``skip_air``). ``map_dtype`` is the dtype of the internal probability
    map (float16 halves its memory; the scores and the scores map use the values of this map).
    ``memory_budget_bytes`` covers the map, the normalised scan, the body mask and the overlay's
    copy of the scan.
    """

    cube_edge_mm: float = 10.0
    sigma_mm: float | None = 5.0
    vertebra_threshold: float = 0.5
    patient_threshold: float | None = None
    probability_threshold: float = 0.5
    component_thresholds: tuple[float, ...] = ()
    anchor_level: str | None = None
    region: str = "spine"
    spine_region: SpineRegionConfig = SpineRegionConfig()
    tile_shape: tuple[int, int, int] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    skip_air: bool = True
    write_overlay: bool = True
    keep_maps: bool = False
    map_dtype: str = "float16"

    def __post_init__(self) -> None:
        from vfdetect.aggregate import COMPONENT_THRESHOLDS

        if not self.component_thresholds:
            object.__setattr__(self, "component_thresholds", COMPONENT_THRESHOLDS)
        if isinstance(self.spine_region, Mapping):
            object.__setattr__(self, "spine_region", SpineRegionConfig(**self.spine_region))
        if not 0.0 < self.probability_threshold <= 1.0:
            raise VfdetectError("the probability threshold must lie in (0, 1]")
        if self.patient_threshold is not None and not 0.0 < self.patient_threshold <= 1.0:
            raise VfdetectError("the patient threshold must lie in (0, 1]")
        if self.region not in REGION_MODES:
            raise VfdetectError(f"unknown region {self.region!r}; choose one of {', '.join(REGION_MODES)}")
        if self.cube_edge_mm <= 0:
            raise VfdetectError("the cube edge must be positive")
        if self.batch_size < 1:
            raise VfdetectError("batch_size must be >= 1")

    def resolved_patient_threshold(self, predictor: Predictor | None = None) -> float:
        """This config's patient threshold, else the model's, else the default 0.5."""
        from vfdetect.aggregate import DEFAULT_PATIENT_THRESHOLD

        if self.patient_threshold is not None:
            return float(self.patient_threshold)
        if predictor is not None and predictor.patient_threshold is not None:
            return predictor.patient_threshold
        return DEFAULT_PATIENT_THRESHOLD

    def thresholds(self, patient_threshold: float | None = None) -> dict[str, Any]:
        return {
            "vertebra": self.vertebra_threshold,
            "patient": self.patient_threshold if patient_threshold is None else patient_threshold,
            "component_probability": self.probability_threshold,
            "cube_edge_mm": self.cube_edge_mm,
            "sigma_mm": self.sigma_mm,
        }


NO_SPINE_WARNING = "no spine found: no vertebra given or localised, so there is no patient score or decision"


@dataclass
class CaseResult:
    """What :func:`predict_case` found for one scan.

    ``vertebrae``: one dict per vertebra (see :mod:`vfdetect.report`); ``patient_score``: the
    highest vertebra score (NaN without vertebrae); ``patient_fracture``: ``patient_score >=
    patient_threshold`` (None without vertebrae); ``report``: the report.json content; ``paths``:
    output name -> file (empty without an output folder); with ``PredictConfig(keep_maps=True)``,
    ``probabilities`` holds the internal-frame (X, Y, Z, 3) map (a :class:`vfdetect.volume.Volume`).
    """

    case: str
    vertebrae: list[dict[str, Any]]
    patient_score: float
    patient_fracture: bool | None
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    probabilities: Any = None
    patient_threshold: float = 0.5
    warnings: list[str] = field(default_factory=list)


def _case_name(image: Any, case: str | None) -> str:
    if case:
        return str(case)
    if isinstance(image, (str, Path)):
        name = Path(image).name
        for suffix in (".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        for suffix in ("_ct",):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return name or "case"
    return "case"


def _resolve_vertebrae(
    centroids: Any, scan: Any, grades: Mapping[int, int] | None, label_scheme: str
) -> list[Any] | None:
    from vfdetect.vertebrae import Vertebra, attach_grades, load_centroids

    if centroids is None:
        return None
    if isinstance(centroids, (str, Path)):
        vertebrae = load_centroids(centroids, scan.affine, scan.shape, label_scheme)
    else:
        vertebrae = list(centroids)
        if not all(isinstance(v, Vertebra) for v in vertebrae):
            raise VfdetectError("centroids must be a file (JSON or mask) or a list of Vertebra")
    if grades:
        vertebrae = attach_grades(vertebrae, grades)
    return vertebrae


def _predict_region(
    normalised: np.ndarray,
    predictor: Predictor,
    region: InferenceRegion,
    body: np.ndarray | None,
    affine: np.ndarray,
    config: PredictConfig,
    budget: int,
    quiet: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The probability map of ``region`` (:func:`predict_volume`) on the grid of ``affine``; when
    ``region.grows``, grown where the network finds a vertebra at the region's edge
    (:func:`vfdetect.region.region_growth`) and beyond the ends of the chain of bodies found
    (:func:`vfdetect.region.chain_extension`), within ``body``; outside the final region every
    voxel is background when ``region.restrict``. ``region.mask`` is updated in place to the final
    region."""
    from vfdetect.localise import find_vertebral_bodies, order_along_spine
    from vfdetect.volume import Volume

    spacing = float(np.sqrt(np.sum(np.asarray(affine)[:3, 0] ** 2)))
    stats: dict[str, Any] = {}
    computed = np.zeros(normalised.shape, dtype=bool) if region.grows else None
    run = functools.partial(
        predict_volume, normalised, predictor.fn, predictor.geometry,  # type: ignore[arg-type]
        tile_shape=config.tile_shape, batch_size=config.batch_size, memory_budget_bytes=budget, quiet=quiet,
        dtype=config.map_dtype,
    )
    probabilities = run(mask=region.mask, stats=stats, computed=computed)
    stats["growth_rounds"] = 0
    if region.grows and region.mask is not None and computed is not None:
        extended = False
        for _ in range(config.spine_region.grow_rounds):
            add = region_growth(region.mask, probabilities[..., 0], spacing, body, config.spine_region)
            if add is None and not extended:  # once: one body beyond each end of the chain found
                extended = True
                # Where the chain ends is all that matters here: localise on a lattice of about 2 mm.
                step = max(1, int(round(2.0 / spacing)))
                sampled = Volume(1.0 - np.asarray(probabilities[::step, ::step, ::step, 0], dtype=np.float32),
                                 affine @ np.diag([step, step, step, 1.0]))
                bodies = order_along_spine(find_vertebral_bodies(sampled))
                add = chain_extension(bodies, region.mask, affine, body, config.spine_region)
            if add is None:
                break
            np.logical_or(region.mask, add, out=region.mask)
            stats["growth_rounds"] += 1
            more: dict[str, Any] = {}
            np.greater(add, computed, out=add)  # add & ~computed, in place (a full-size array less)
            run(mask=add, stats=more, out=probabilities, computed=computed)
            del add
            stats["tiles"] += more["tiles"]
            stats["executed_hr_voxels"] += more["executed_hr_voxels"]
        stats["computed_voxels"] = int(np.count_nonzero(computed))
    if region.restrict and region.mask is not None:
        for start in range(0, probabilities.shape[0], 16):  # slabs: no full-size temporary
            outside = ~region.mask[start : start + 16]
            for channel, value in enumerate((1.0, 0.0, 0.0)):
                probabilities[start : start + 16, ..., channel][outside] = value
    return probabilities, stats


def predict_case(
    predictor: Predictor | PendingPredictor,
    image: str | Path | Any,
    centroids: str | Path | Sequence[Any] | None = None,
    case: str | None = None,
    out_dir: str | Path | None = None,
    config: PredictConfig = PredictConfig(),
    quiet: bool = True,
    grades: Mapping[int, int] | None = None,
    label_scheme: str = "verse",
) -> CaseResult:
    """Predict one scan (NIfTI path, DICOM folder or in-memory nibabel image) and score it.

    Centroids come from a VerSe JSON or a vertebra mask (``centroids`` path), a list of
    :class:`vfdetect.vertebrae.Vertebra` (world mm, grades kept in the report; ``grades`` by label
    are attached when given; ``label_scheme`` is the numbering of a mask), or, when None, are
    localised from the probability map (:func:`vfdetect.aggregate.localise_vertebrae`, named from
    ``config.anchor_level`` if given). The network runs over ``config.region`` (see
    :func:`inference_region`); outside the spine region every voxel is background. The patient
    score is the highest vertebra score and the patient is "fracture" when it reaches the patient
    threshold (:meth:`PredictConfig.resolved_patient_threshold`); with no vertebra the score is NaN,
    the decision None, and the report carries the warning "no spine found".

    With ``out_dir``, writes ``out_dir/<case>/``: ``scores_map.nii.gz`` (the internal-grid map the
    vertebrae were scored on, float32 p(fracture) and p(normal), cropped to the computed voxels; see
    :func:`vfdetect.case_outputs.write_scores_map`), ``probabilities.nii.gz`` (input grid; uint8
    scaled 1/255; channel 0 p(fracture), channel 1 p(normal) + p(fracture)), ``labels.nii.gz``
    (argmax 0/1/2), ``report.json``, ``report.csv`` and ``overlay.png``, each atomically
    (report.json last).
    """
    from vfdetect import __version__
    from vfdetect.aggregate import score_case
    from vfdetect.preprocess import prepare_scan
    from vfdetect.records import write_case_report
    from vfdetect.volume import Volume

    timings: dict[str, float] = {}
    started = time.perf_counter()
    name = _case_name(image, case)
    prepared = prepare_scan(image, spacing=predictor.spacing)  # the same arrays training sees
    grid, affine, spacing = prepared.grid, prepared.affine, prepared.spacing
    hu, mask, normalised = prepared.hu, prepared.body_mask, prepared.image
    del prepared
    given = _resolve_vertebrae(centroids, grid, grades, label_scheme)
    timings["load_s"] = time.perf_counter() - started

    tick = time.perf_counter()
    region = inference_region(
        config.region, hu, affine, mask, None if given is None else [v.position_mm for v in given],
        skip_air=config.skip_air, config=config.spine_region,
    )
    timings["region_s"] = time.perf_counter() - tick
    predictor = ready(predictor)  # a model loading in the background is needed from here on
    overlay_hu = None
    if config.write_overlay and out_dir is not None:
        overlay_hu = np.clip(hu, -1024, 3071).astype(np.int16)
    del hu
    body = mask if region.grows and mask.any() else None
    del mask
    held = sum(0 if array is None else array.nbytes for array in (region.mask, overlay_hu, body))
    if region.grows:
        held += normalised.size  # the bool array of computed voxels

    tick = time.perf_counter()
    probabilities, stats = _predict_region(
        normalised, predictor, region, body, affine, config, config.memory_budget_bytes - held, quiet
    )
    del normalised, body
    timings["inference_s"] = time.perf_counter() - tick
    region_info = region.describe(stats["computed_voxels"], int(np.prod(probabilities.shape[:3])))
    region_info["tiles"] = stats["tiles"]
    if region.mode == "spine":
        region_info["growth_rounds"] = stats["growth_rounds"]
    del region

    tick = time.perf_counter()
    threshold = config.resolved_patient_threshold(predictor)
    vertebrae, scores, patient = score_case(
        probabilities, affine, grid, given, threshold, cube_edge_mm=config.cube_edge_mm, sigma_mm=config.sigma_mm,
        vertebra_threshold=config.vertebra_threshold, anchor_level=config.anchor_level,
        component_thresholds=config.component_thresholds, probability_threshold=config.probability_threshold,
    )
    warnings = [] if scores and not math.isnan(patient["patient_score"]) else [NO_SPINE_WARNING]
    timings["aggregation_s"] = time.perf_counter() - tick

    report: dict[str, Any] = {
        "case": name,
        **{key: patient[key] for key in ("patient_score", "patient_fracture", "patient_threshold", "patient_rule")},
        "thresholds": config.thresholds(threshold),
        "vertebrae": scores,
        "largest_component_mm3": patient["largest_component_mm3"],
        "component_sizes": patient["component_sizes"],
        "region": region_info,
        "warnings": warnings,
        "input": grid.source,
        "model": predictor.describe(),
        "version": __version__,
        "timings": timings,
    }
    paths: dict[str, Path] = {}
    if out_dir is not None:
        tick = time.perf_counter()
        folder = PredictionFolder(Path(out_dir)).case(name)
        paths = write_case_files(folder, report, probabilities, affine, spacing, grid, vertebrae, overlay_hu,
                                 cube_edge_mm=config.cube_edge_mm)
        timings["writing_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        paths["report"] = folder.report
        write_case_report(paths["report"], report)
    else:
        timings["total_s"] = time.perf_counter() - started

    return CaseResult(
        case=name,
        vertebrae=scores,
        patient_score=patient["patient_score"],
        patient_fracture=patient["patient_fracture"],
        report=report,
        paths=paths,
        probabilities=Volume(probabilities, affine) if config.keep_maps else None,
        patient_threshold=threshold,
        warnings=warnings,
    )


@dataclass
class CaseFailure:
    """A case that could not be predicted, and why."""

    case: str
    error: str


def predict_cases(
    run_dir: str | Path | Predictor | PendingPredictor | None,
    cases: Sequence[Any],
    out_dir: str | Path,
    config: PredictConfig = PredictConfig(),
    quiet: bool = False,
    failures: list[CaseFailure] | None = None,
    precision: str = "auto",
) -> list[CaseResult]:
    """Predict many cases (:class:`vfdetect.vertebrae.Case`, or paths / nibabel images) into ``out_dir``
    with ``run_dir``: a :class:`Predictor`, or anything :func:`load_predictor` takes (None: the bundled model).

    With ``failures`` (a list), a case that raises is recorded there and skipped and the others go
    on; without it the first error propagates. Writes
    ``out_dir/summary.csv`` (one row per vertebra over the successful cases) at the end.
    Manifest cases use their centroids file when they have one (grades go into the reports).
    """
    from tqdm import tqdm

    from vfdetect.records import write_summary_csv
    from vfdetect.vertebrae import Case

    predictor = run_dir if isinstance(run_dir, (Predictor, PendingPredictor)) else load_predictor(run_dir,
                                                                                                  precision=precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for item in tqdm(cases, desc="cases", unit="case", disable=quiet):
        if isinstance(item, Case):
            name, image = item.case, item.image
        else:
            name, image = _case_name(item, None), item
        try:
            if isinstance(item, Case):
                result = predict_case(
                    predictor, image, item.centroids, case=name, out_dir=out_dir, config=config,
                    grades=item.grades, label_scheme=item.label_scheme, quiet=quiet,
                )
            else:
                result = predict_case(predictor, image, None, case=name, out_dir=out_dir, config=config, quiet=quiet)
            results.append(result)
        except ModelLoadError:
            raise  # not the scan's fault: every case would fail the same way
        except Exception as error:  # one bad scan must not stop a batch; the caller gets the reason
            if failures is None:
                raise
            message = str(error) if isinstance(error, VfdetectError) else f"{type(error).__name__}: {error}"
            failures.append(CaseFailure(name, message))
    write_summary_csv(PredictionFolder(out_dir).summary_csv, [result.report for result in results])
    return results


__all__ = [
    "ACTIVATION_BYTES_PER_HR_VOXEL",
    "BF16_CPU_FLAGS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_TILE_OUTPUT",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "GIB",
    "NO_SPINE_WARNING",
    "PRECISIONS",
    "REGION_MODES",
    "RUNTIME_OVERHEAD_BYTES",
    "CaseFailure",
    "CaseResult",
    "InferenceRegion",
    "ModelLoadError",
    "PendingPredictor",
    "PredictConfig",
    "Predictor",
    "Predictor_fn",
    "SpineRegionConfig",
    "Tile",
    "centroid_region",
    "choose_tile_shape",
    "configure_threads",
    "cpu_flags",
    "inference_region",
    "keras_predictor",
    "load_predictor",
    "load_predictor_in_background",
    "patient_summary",
    "plan_tiles",
    "predict_case",
    "predict_cases",
    "predict_volume",
    "ready",
    "resolve_model",
    "resolve_precision",
    "spine_region",
    "tile_output_shape",
    "tile_starts",
]
