"""From voxel probabilities to vertebra and patient scores.

Paper section 3.3. Everything here is numpy/scipy (no TensorFlow) and works on any grid: a map is
anything with ``.array`` (3D) and ``.affine`` (voxel index -> world RAS mm), such as a
:class:`vfdetect.volume.Volume`; vertebra centroids are in world millimetres.

Vertebra level
    :func:`vertebra_scores`: the mean of p(fracture) over a cube around each centroid (default
    edge 10 mm sampled every 1 mm, i.e. 10 voxels at 1 mm as in the paper), each sample weighted
    by a Gaussian of its distance to the centroid (default sigma 5 mm). The cube is sampled in
    world millimetres with trilinear interpolation, so the score does not depend on the grid the
    map is stored on. Samples outside the map get weight zero. The mean p(normal) is reported too;
    a vertebra is predicted "fracture" when its score reaches ``vertebra_threshold`` (default 0.5).

Patient level
    One rule gives both the score and the decision (:data:`PATIENT_RULE`): the patient score is
    the highest vertebra score (:func:`patient_score`; NaN when no vertebra was scored) among the
    vertebrae whose centroid lies at least ``edge_margin_mm`` (10 mm) inside the scan's field of
    view (a vertebra cut by the edge of the scan looks flattened; its score is still reported,
    with its ``edge_distance_mm``, and counts only when no other vertebra was scored) and that are
    not sacral (S1, S2, coccyx: scored and reported, not counted unless nothing else is), and the
    patient is called "fracture" when it reaches the patient threshold (:func:`patient_decision`;
    default 0.5, a model may carry its own). The score ranks patients; it is not a calibrated
    probability.

    The paper's component rule is kept as secondary information for its patient-level ROC:
    voxels with p(fracture) >= a probability threshold, grouped into connected components
    (26-connectivity); components smaller than a noise threshold (mm^3) are discarded and the
    patient is positive when any remains (:func:`patient_positive`). Because that decision only
    depends on the largest component, :func:`largest_components` stores its size for a grid of
    probability thresholds; any (probability, noise) pair on that grid can be evaluated later
    without the map.

Localisation
    Vertebra localisation when no centroids are given lives in :mod:`vfdetect.localise`; its
    names are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.localise import (
    NAMING_ORDER,
    TYPICAL_GAP_MM,
    LocalisationConfig,
    find_vertebral_bodies,
    identification,
    localise_vertebrae,
    map_array_and_affine,
    name_by_spacing,
    name_from_anchor,
    order_along_spine,
    voxel_volume_mm3,
)
from vfdetect.vertebrae import Vertebra

DEFAULT_CUBE_EDGE_MM = 10.0
DEFAULT_SIGMA_MM = 5.0
DEFAULT_STEP_MM = 1.0
DEFAULT_VERTEBRA_THRESHOLD = 0.5
DEFAULT_PROBABILITY_THRESHOLD = 0.5
DEFAULT_NOISE_THRESHOLD_MM3 = 500.0
DEFAULT_PATIENT_THRESHOLD = 0.5
DEFAULT_EDGE_MARGIN_MM = 10.0
SACRAL_LABELS: frozenset[int] = frozenset({26, 27, 29})
"""S1, coccyx, S2 (VerSe numbering): scored and reported, but not part of the patient score."""
PATIENT_RULE = ("fracture when the highest vertebra score (patient_score; the sacrum, and vertebrae within 10 mm "
                "of the scan's edge, count only when no other was scored) >= {threshold:g}")
"""The patient rule: the decision is the patient score (maximum vertebra score) against one threshold."""
COMPONENT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))
"""Probability thresholds at which the largest fracture component is stored (0.05 ... 0.95)."""


def cube_offsets(cube_edge_mm: float = DEFAULT_CUBE_EDGE_MM, step_mm: float = DEFAULT_STEP_MM) -> np.ndarray:
    """(N, 3) world offsets (mm) of the sample points of a cube of edge ``cube_edge_mm`` centred on 0.

    ``round(edge / step)`` points per axis, symmetric about the centre (10 mm at 1 mm: -4.5 ... 4.5).
    """
    if cube_edge_mm <= 0 or step_mm <= 0:
        raise VfdetectError("cube edge and step must be positive")
    count = max(1, int(round(cube_edge_mm / step_mm)))
    axis = (np.arange(count) - (count - 1) / 2.0) * step_mm
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def _sample(array: np.ndarray, affine: np.ndarray, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear samples of ``array`` at world points, and a mask of the points inside the grid.

    Only the block around the points is read (and cast to float32), so a large map costs nothing.
    """
    inverse = np.linalg.inv(affine)
    voxels = points_mm @ inverse[:3, :3].T + inverse[:3, 3]
    shape = np.asarray(array.shape, dtype=np.float64)
    inside = np.all((voxels >= -0.5) & (voxels <= shape - 0.5), axis=1)
    low = np.clip(np.floor(voxels.min(axis=0)).astype(int) - 1, 0, np.asarray(array.shape) - 1)
    high = np.clip(np.ceil(voxels.max(axis=0)).astype(int) + 2, low + 1, np.asarray(array.shape))
    block = np.asarray(array[low[0] : high[0], low[1] : high[1], low[2] : high[2]], dtype=np.float32)
    values = ndimage.map_coordinates(block, (voxels - low).T, order=1, mode="nearest", prefilter=False)
    return values.astype(np.float64), inside


def _weighted_cube_mean(
    array: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray, offsets: np.ndarray, weights: np.ndarray
) -> float:
    values, inside = _sample(array, affine, centre_mm[None, :] + offsets)
    total = float(np.sum(weights * inside))
    if total <= 0:
        return float("nan")
    return float(np.sum(weights * inside * values) / total)


def vertebra_scores(
    fracture_probability: Any,
    vertebrae: Sequence[Vertebra],
    cube_edge_mm: float = DEFAULT_CUBE_EDGE_MM,
    sigma_mm: float | None = DEFAULT_SIGMA_MM,
    normal_probability: Any | None = None,
    step_mm: float = DEFAULT_STEP_MM,
    vertebra_threshold: float = DEFAULT_VERTEBRA_THRESHOLD,
) -> list[dict[str, Any]]:
    """Score each vertebra: Gaussian-weighted mean p(fracture) in a cube around its centroid.

    Returns one dict per vertebra (input order): ``label``, ``name``, ``centroid_mm``,
    ``fracture_probability``, ``normal_probability`` (None without ``normal_probability``),
    ``predicted`` ("fracture" when the score >= ``vertebra_threshold``, else "normal") and
    ``inside`` (False when the whole cube lies outside the map; the scores are then NaN).
    ``sigma_mm=None`` gives the plain (unweighted) cube mean.
    """
    fracture, affine = map_array_and_affine(fracture_probability)
    normal = None
    normal_affine = affine
    if normal_probability is not None:
        normal, normal_affine = map_array_and_affine(normal_probability)
    offsets = cube_offsets(cube_edge_mm, step_mm)
    if sigma_mm is None:
        weights = np.ones(len(offsets))
    else:
        if sigma_mm <= 0:
            raise VfdetectError("sigma_mm must be positive (or None for a plain mean)")
        weights = np.exp(-np.sum(offsets**2, axis=1) / (2.0 * sigma_mm**2))
    results = []
    for vertebra in vertebrae:
        centre = np.asarray(vertebra.position_mm, dtype=np.float64)
        score = _weighted_cube_mean(fracture, affine, centre, offsets, weights)
        normal_score = None
        if normal is not None:
            normal_score = _weighted_cube_mean(normal, normal_affine, centre, offsets, weights)
        inside = not math.isnan(score)
        results.append(
            {
                "label": int(vertebra.label),
                "name": vertebra.name,
                "centroid_mm": [float(value) for value in centre],
                "fracture_probability": score,
                "normal_probability": normal_score,
                "predicted": "fracture" if inside and score >= vertebra_threshold else "normal",
                "inside": inside,
            }
        )
    return results


def _fracture_candidates(array: np.ndarray, threshold: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Bounding box of ``array >= threshold`` (to label only where it matters)."""
    mask = array >= threshold
    if not mask.any():
        return mask[:0, :0, :0], (slice(0, 0),) * 3
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return mask[box], box


def largest_components(
    fracture_probability: Any, thresholds: Sequence[float] = COMPONENT_THRESHOLDS
) -> list[float]:
    """Size (mm^3) of the largest 26-connected component of ``p(fracture) >= t`` for each threshold t."""
    array, affine = map_array_and_affine(fracture_probability)
    voxel_mm3 = voxel_volume_mm3(affine)
    thresholds = [float(value) for value in thresholds]
    if not thresholds:
        return []
    lowest = min(thresholds)
    _, box = _fracture_candidates(array, lowest)
    region = np.asarray(array[box], dtype=np.float32)
    structure = np.ones((3, 3, 3), dtype=bool)
    # A component at a higher threshold lies inside one component at the lowest: label once at the
    # lowest, then each component in its own box, largest first, skipping a component at a threshold
    # when it has no more voxels above it than the largest component found there so far.
    labels, count = ndimage.label(region >= lowest, structure=structure)
    best = [0] * len(thresholds)
    if count:
        counts = np.bincount(labels.ravel())[1:]
        objects = ndimage.find_objects(labels)
        for index in np.argsort(-counts, kind="stable"):
            own = labels[objects[index]] == index + 1
            values = region[objects[index]]
            inside = values[own]
            for position, threshold in enumerate(thresholds):
                above = int(np.count_nonzero(inside >= threshold))
                if above <= best[position]:
                    continue
                if threshold == lowest:
                    best[position] = above
                    continue
                parts, found = ndimage.label(own & (values >= threshold), structure=structure)
                if found:
                    best[position] = max(best[position], int(np.bincount(parts.ravel())[1:].max()))
    return [float(size) * voxel_mm3 for size in best]


def patient_positive(largest_mm3_at_threshold: float, noise_threshold_mm3: float = DEFAULT_NOISE_THRESHOLD_MM3) -> bool:
    """The paper's component rule: a fracture component of at least ``noise_threshold_mm3`` survives.

    Secondary: it builds the paper's patient-level convex-hull ROC from stored component sizes; the
    report's patient decision is :func:`patient_decision`.
    """
    return bool(largest_mm3_at_threshold > 0 and largest_mm3_at_threshold >= noise_threshold_mm3)


def largest_at(
    probability_thresholds: Sequence[float], largest_mm3: Sequence[float], probability_threshold: float
) -> float:
    """Largest component at ``probability_threshold`` from a stored threshold grid (nearest grid value)."""
    grid = np.asarray(probability_thresholds, dtype=np.float64)
    if grid.size == 0:
        raise VfdetectError("empty probability threshold grid")
    index = int(np.argmin(np.abs(grid - probability_threshold)))
    if abs(grid[index] - probability_threshold) > 1e-6:
        raise VfdetectError(f"probability threshold {probability_threshold} is not on the stored grid {grid.tolist()}")
    return float(largest_mm3[index])


def patient_score(vertebra_results: Sequence[dict[str, Any]], edge_margin_mm: float = DEFAULT_EDGE_MARGIN_MM) -> float:
    """The patient score: the highest vertebra score (``fracture_probability``) among the scored
    vertebrae whose ``edge_distance_mm`` (when given) is at least ``edge_margin_mm`` and that are not
    sacral or coccygeal (:data:`SACRAL_LABELS`: Genant grading is for vertebrae C1-L6, and training
    never labels the sacrum), falling back to the vertebrae far enough inside, then to all scored
    vertebrae, when that leaves none; NaN when no vertebra was scored (none given or found, or all
    outside the map).

    It is a ranking score, not a calibrated probability.
    """
    finite = [r for r in vertebra_results if math.isfinite(float(r["fracture_probability"]))]
    inside = [r for r in finite if r.get("edge_distance_mm") is None or float(r["edge_distance_mm"]) >= edge_margin_mm]
    counted = [r for r in inside if r.get("label") not in SACRAL_LABELS] or inside or finite
    return float(max(float(r["fracture_probability"]) for r in counted)) if counted else float("nan")


def edge_distance_mm(grid: Any, position_mm: Sequence[float]) -> float:
    """Distance (mm) from a point to the nearest face of the field of view of ``grid`` (``.shape``,
    ``.affine``: the scan's own voxel grid, whose voxels span index -0.5 ... n - 0.5); negative outside."""
    from vfdetect.volume import world_to_voxel

    affine = np.asarray(grid.affine, dtype=np.float64)
    voxel = world_to_voxel(affine, np.asarray(position_mm, dtype=np.float64))
    spacing = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    shape = np.asarray(grid.shape[:3], dtype=np.float64)
    return float(min(((voxel + 0.5) * spacing).min(), ((shape - 0.5 - voxel) * spacing).min()))


def patient_decision(score: float, threshold: float = DEFAULT_PATIENT_THRESHOLD) -> bool | None:
    """The patient decision of :data:`PATIENT_RULE`: ``score >= threshold``; None for a NaN score."""
    if not 0.0 < threshold <= 1.0:
        raise VfdetectError(f"the patient threshold must lie in (0, 1], got {threshold}")
    if math.isnan(score):
        return None
    return bool(score >= threshold)


def patient_rule(threshold: float) -> str:
    """One line stating the patient rule with its threshold (written into each report)."""
    return PATIENT_RULE.format(threshold=threshold)


def score_case(
    probabilities: np.ndarray,
    affine: np.ndarray,
    grid: Any,
    given: list[Vertebra] | None,
    patient_threshold: float,
    *,
    cube_edge_mm: float = DEFAULT_CUBE_EDGE_MM,
    sigma_mm: float | None = DEFAULT_SIGMA_MM,
    vertebra_threshold: float = DEFAULT_VERTEBRA_THRESHOLD,
    anchor_level: str | None = None,
    component_thresholds: Sequence[float] = COMPONENT_THRESHOLDS,
    probability_threshold: float = DEFAULT_PROBABILITY_THRESHOLD,
) -> tuple[list[Vertebra], list[dict[str, Any]], dict[str, Any]]:
    """Vertebrae (``given``, else localised in the map), their report entries, and the patient part of the report.

    ``probabilities``: the (X, Y, Z, 3) map on the grid of ``affine`` (the internal frame); ``grid``:
    the input grid (``.affine``), where the report's voxel centroids are given.
    """
    from vfdetect.volume import Volume, world_to_voxel

    fracture = Volume(probabilities[..., 2], affine)
    if given is None:
        vertebra_map = Volume(probabilities[..., 1] + probabilities[..., 2], affine)
        vertebrae = localise_vertebrae(vertebra_map, anchor_level=anchor_level)
        source = "localised"
    else:
        vertebrae, source = given, "given"
    raw = vertebra_scores(
        fracture, vertebrae, cube_edge_mm=cube_edge_mm, sigma_mm=sigma_mm,
        normal_probability=Volume(probabilities[..., 1], affine), vertebra_threshold=vertebra_threshold,
    )
    scores = []
    for vertebra, entry in zip(vertebrae, raw, strict=True):
        voxel = world_to_voxel(grid.affine, np.asarray(vertebra.position_mm))
        scores.append({
            "label": entry["label"],
            "name": entry["name"],
            "centroid_voxel": [round(float(v), 2) for v in voxel],
            "centroid_mm": [round(float(v), 2) for v in entry["centroid_mm"]],
            "fracture_probability": entry["fracture_probability"],
            "normal_probability": entry["normal_probability"],
            "predicted": entry["predicted"],
            "source": source,
            "grade": vertebra.grade,
            "edge_distance_mm": round(edge_distance_mm(grid, vertebra.position_mm), 1),
        })
    component_thresholds = list(component_thresholds)
    largest = largest_components(fracture, component_thresholds + [probability_threshold])
    score = patient_score(scores)
    patient = {
        "patient_score": score,
        "patient_fracture": patient_decision(score, patient_threshold),
        "patient_threshold": patient_threshold,
        "patient_rule": patient_rule(patient_threshold),
        "largest_component_mm3": largest.pop(),
        "component_sizes": {"probability_thresholds": component_thresholds, "largest_component_mm3": largest},
    }
    return vertebrae, scores, patient


__all__ = [
    "COMPONENT_THRESHOLDS",
    "DEFAULT_CUBE_EDGE_MM",
    "DEFAULT_NOISE_THRESHOLD_MM3",
    "DEFAULT_PATIENT_THRESHOLD",
    "DEFAULT_PROBABILITY_THRESHOLD",
    "DEFAULT_SIGMA_MM",
    "DEFAULT_STEP_MM",
    "DEFAULT_VERTEBRA_THRESHOLD",
    "NAMING_ORDER",
    "PATIENT_RULE",
    "TYPICAL_GAP_MM",
    "LocalisationConfig",
    "cube_offsets",
    "find_vertebral_bodies",
    "identification",
    "largest_at",
    "largest_components",
    "localise_vertebrae",
    "name_by_spacing",
    "name_from_anchor",
    "order_along_spine",
    "patient_decision",
    "patient_positive",
    "patient_rule",
    "patient_score",
    "score_case",
    "vertebra_scores",
    "voxel_volume_mm3",
]
