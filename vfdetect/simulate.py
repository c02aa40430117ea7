"""Compression fractures planted in real CT scans that have vertebra masks.

A real scan with a vertebra instance mask becomes a scan with Genant-graded fractures whose
height loss is *measured*, not assumed. Each fractured vertebral body collapses through a smooth,
invertible deformation in the vertebra's own frame:

* **frame** (world RAS mm): ``superior`` points from the caudal to the cranial neighbour's centroid
  (body centroids when a body mask is given, else whole-vertebra centroids), not along an image
  axis; ``anterior`` is the body centroid minus the whole-vertebra centroid, made orthogonal to
  ``superior``; ``lateral`` is their cross product. The frame's origin is the body centroid.
* **warp**: a backward map ``x_in = x_out + d(x_out) * superior`` with the displacement ``d`` along
  the superior axis only. Along every line parallel to that axis ``d`` is piecewise linear in the
  superior coordinate ``s``: zero up to the top of the caudal neighbour, then the inferior endplate
  moves up by ``delta_bottom``, the body between the endplates is compressed uniformly, the
  superior endplate moves down by ``delta_top``, and the disc above stretches to fill the gap up to
  the bottom of the cranial neighbour, beyond which ``d`` is zero again. ``delta_top`` and
  ``delta_bottom`` vary over the body's cross-section (the morphology: ``wedge`` mostly anterior,
  ``biconcave`` central, ``crush`` uniform) and taper smoothly to zero a few millimetres outside it,
  so soft tissue next to the body follows smoothly. The field is then smoothed with a 0.5 mm
  Gaussian. The Jacobian determinant of such a map is ``1 + dd/ds``; every segment of the profile
  is increasing, so it is positive by construction, and it is computed and reported (a map with a
  determinant <= 0 anywhere is refused). Neighbouring vertebrae lie where ``d = 0``: they do not move.
* **resampling**: the CT with linear interpolation, masks with nearest neighbour, on a sub-box
  around the vertebra, everything on the input's own grid (shape, affine, header and dtype).

Heights are measured on the vertebral-body mask (given, or approximated from the vertebra mask as
the part anterior of the plane through the whole vertebra's centre of mass, normal to
``anterior``): along the superior axis, in the mid-sagittal plane, at the anterior, middle and
posterior points (75 % of the half-depth in front of / behind the body's middle), each the median
of three lines 2 mm apart laterally, sampled every 0.1 mm on the trilinearly interpolated
indicator (the continuous warped indicator for a fractured body, so sub-voxel changes count).

**Height loss** = ``1 - min(Ha_after / Ha_before, Hm_after / Hm_before, Hp_after / Hp_before)``: the
largest relative loss of the three heights, each against the same vertebra's own height at the
same point before the fracture (so an unfractured body has loss 0 whatever its natural shape). A
fractured vertebra's loss lies inside its Genant band (grade 1: 20-25 %, 2: 25-40 %, 3: 40-60 %);
the amplitude is found by bisection and the morphology redrawn a few times when a band cannot
be reached. Unfractured vertebrae change by less than 3 % (they are checked after every fracture of
the scan is planted).

Arrays are indexed ``[i, j, k]`` of their affine (nibabel's voxel -> world RAS mm).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect import __version__
from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import atomic_path, write_json_atomic, write_text_atomic
from vfdetect.vertebrae import (
    DATA_ROOT_VARIABLE,
    LABEL_NAMES,
    LABEL_SCHEMES,
    SPINE_ORDER,
    Vertebra,
    _FileIndex,
    _read_csv_rows,
    _resolve_entry,
    spine_rank,
    vertebra_label,
    vertebra_name,
    write_centroids,
)
from vfdetect.volume import SourceGrid, load_label_image, load_scan

__all__ = [
    "MORPHOLOGIES",
    "GENANT_BANDS",
    "SimulationConfig",
    "SourceScan",
    "VertebraFrame",
    "BodyHeights",
    "VertebraOutcome",
    "SimulatedScan",
    "parse_levels",
    "read_simulation_manifest",
    "simulate_scan",
    "simulate_dataset",
    "write_preview_png",
]

MORPHOLOGIES: tuple[str, ...] = ("wedge", "biconcave", "crush")

GENANT_BANDS: dict[int, tuple[float, float]] = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.60)}
"""Height-loss band of each Genant grade (grade 3 is capped at 60 %)."""

# Targets drawn inside each band, away from its edges, so that the measured loss lands inside it.
_TARGET_BANDS: dict[int, tuple[float, float]] = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.57)}
_LOSS_TOLERANCE = 0.005
_UNFRACTURED_TOLERANCE = 0.03
_SMOOTHING_MM = 0.5
_TAPER_MM = 6.0
_DEFAULT_GAP_MM = 8.0
_MIN_GAP_MM = 0.5
_MAX_STRETCH = 9.0
_LINE_STEP_MM = 0.1
_LATERAL_OFFSETS_MM = (-2.0, 0.0, 2.0)
# Labels a neighbour may skip: T13 and L6 are transitional vertebrae most spines lack.
_OPTIONAL_LABELS = frozenset({25, 28})
_ORIENTATIONS = ("LPS", "PIR", "RAS", "LAS", "RPI")
_PREVIEW_WINDOW_HU = (-400.0, 1100.0)


def parse_levels(text: str) -> tuple[int, ...]:
    """VerSe labels of a level range or list: ``"T4-L5"`` -> T4..T12, T13, L1..L5; ``"T12,L1"``.

    Ranges follow :data:`vfdetect.vertebrae.SPINE_ORDER`; raises :class:`VfdetectError` for an
    unknown name or a range that runs caudal to cranial.
    """
    labels: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (vertebra_label(name) for name in part.split("-", 1))
            start, stop = spine_rank(first), spine_rank(last)
            if stop < start:
                raise VfdetectError(f"level range {part!r} runs caudal to cranial")
            labels.extend(SPINE_ORDER[start : stop + 1])
        else:
            labels.append(vertebra_label(part))
    if not labels:
        raise VfdetectError(f"no vertebra levels in {text!r}")
    return tuple(sorted(set(labels), key=spine_rank))


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of the fracture simulation; the defaults follow the paper's data (as the phantoms do).

    ``fracture_prevalence`` is the share of eligible vertebrae fractured over the whole dataset and
    ``negative_fraction`` the share of scans without any fracture; a scan that is not negative has at
    least one. Grades 1/2/3 and morphologies wedge/biconcave/crush are drawn with the given
    probabilities. ``levels`` are the VerSe labels that may fracture. ``vary_acquisition`` also
    rotates (up to ``max_rotation_deg``), crops along the spine, adds noise (SD up to
    ``max_noise_sd_hu``), reorients and re-types each copy; ``compaction`` adds a denser trabecular
    band (+50..150 HU) below each collapsed endplate. ``max_tries`` is the number of morphology draws
    for a vertebra whose grade cannot be reached before it is left unfractured.
    """

    copies: int = 1
    fracture_prevalence: float = 0.19
    negative_fraction: float = 0.12
    grade_probabilities: tuple[float, float, float] = (0.46, 0.35, 0.19)
    morphology_probabilities: tuple[float, float, float] = (0.5, 0.3, 0.2)
    levels: tuple[int, ...] = field(default_factory=lambda: parse_levels("T4-L5"))
    vary_acquisition: bool = False
    compaction: bool = False
    max_rotation_deg: float = 10.0
    max_noise_sd_hu: float = 30.0
    max_tries: int = 4

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise VfdetectError(f"copies must be at least 1, got {self.copies}")
        for name in ("fracture_prevalence", "negative_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VfdetectError(f"{name} must lie in [0, 1], got {value}")
        if self.negative_fraction >= 1.0 and self.fracture_prevalence > 0:
            raise VfdetectError("negative_fraction 1 leaves no scan to hold the fractures")
        for name in ("grade_probabilities", "morphology_probabilities"):
            values = np.asarray(getattr(self, name), dtype=float)
            if values.shape != (3,) or values.min() < 0 or values.sum() <= 0:
                raise VfdetectError(f"{name} must be 3 non-negative numbers with a positive sum")
        for label in self.levels:
            vertebra_name(label)
        if self.max_tries < 1:
            raise VfdetectError("max_tries must be at least 1")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceScan:
    """One row of a simulation manifest: resolved paths of the CT, its vertebra mask and body mask."""

    case: str
    image: Path
    mask: Path
    label_scheme: str = "verse"
    body_mask: Path | None = None


def read_simulation_manifest(path: str | Path, data_root: str | Path | None = None) -> list[SourceScan]:
    """Read a manifest with the columns ``case,image,mask`` (+ optional ``label_scheme``, ``body_mask``).

    ``mask`` is a vertebra instance mask NIfTI (a manifest without it may give the mask in
    ``centroids``); ``label_scheme`` its numbering (:data:`vfdetect.vertebrae.LABEL_SCHEMES`);
    ``body_mask`` a vertebral-body mask on its grid (binary, TPTBox sub-regions with 49/50 = body,
    or TotalSegmentator ``vertebrae_body`` with 1 = bodies). Relative paths are resolved as
    :func:`vfdetect.vertebrae.read_manifest` does: against ``data_root``, else
    ``$VFDETECT_DATA_ROOT``, else the manifest's folder, else by file name under the root.
    """
    path = Path(path)
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_VARIABLE) or None
    root = Path(data_root) if data_root is not None else path.resolve().parent
    if not root.is_dir():
        raise InputError(root, "data root folder not found")
    rows = _read_csv_rows(path, ("case", "image"))
    if not rows:
        raise InputError(path, "the manifest lists no cases")
    index = _FileIndex(root)
    scans: list[SourceScan] = []
    seen: set[str] = set()
    for line, row in rows:
        case = row["case"]
        if not case:
            raise InputError(path, f"line {line}: empty case id")
        if case in seen:
            raise InputError(path, f"line {line}: duplicate case id {case!r}")
        seen.add(case)
        mask_value = row.get("mask", "") or (
            row.get("centroids", "") if row.get("centroids", "").lower().endswith((".nii", ".nii.gz")) else ""
        )
        if not row["image"] or not mask_value:
            raise InputError(path, f"line {line} (case {case!r}): needs an image and a vertebra mask (column 'mask')")
        scheme = row.get("label_scheme", "") or "verse"
        if scheme not in LABEL_SCHEMES:
            raise InputError(
                path, f"line {line} (case {case!r}): unknown label_scheme {scheme!r} (known: {', '.join(LABEL_SCHEMES)})"
            )
        body_value = row.get("body_mask", "")
        scans.append(
            SourceScan(
                case,
                _resolve_entry(path, line, case, "image", row["image"], root, index),
                _resolve_entry(path, line, case, "mask", mask_value, root, index),
                scheme,
                _resolve_entry(path, line, case, "body_mask", body_value, root, index) if body_value else None,
            )
        )
    return scans


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VertebraFrame:
    """A vertebra's own frame in world RAS mm: origin at the body centroid, three unit axes."""

    label: int
    centre: np.ndarray
    superior: np.ndarray
    anterior: np.ndarray
    lateral: np.ndarray

    def coordinates(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(superior, anterior, lateral) coordinates of world points (shape (..., 3))."""
        offset = np.asarray(points, dtype=np.float64) - self.centre
        return offset @ self.superior, offset @ self.anterior, offset @ self.lateral


@dataclass(frozen=True)
class BodyHeights:
    """Anterior, middle and posterior vertebral-body heights in mm (NaN where not measurable)."""

    anterior_mm: float
    middle_mm: float
    posterior_mm: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.anterior_mm, self.middle_mm, self.posterior_mm)

    def loss_from(self, before: BodyHeights) -> float:
        """``1 - min(H_after / H_before)`` over the three points (the module's height-loss definition)."""
        ratios = [after / ref for after, ref in zip(self.as_tuple(), before.as_tuple(), strict=True)]
        return float(1.0 - min(ratios))


@dataclass(frozen=True)
class VertebraOutcome:
    """What happened to one vertebra of a simulated scan, with its measured heights.

    ``grade`` 0 and ``morphology`` ``"normal"`` for an unfractured vertebra; ``min_jacobian`` is the
    smallest Jacobian determinant of its fracture's map (1 for an unfractured vertebra);
    ``amplitude_mm`` the largest endplate travel (top + bottom) of the morphology's footprint.
    """

    label: int
    grade: int
    morphology: str
    height_loss: float
    heights_before: BodyHeights
    heights_after: BodyHeights
    min_jacobian: float = 1.0
    amplitude_mm: float = 0.0

    @property
    def name(self) -> str:
        return LABEL_NAMES[self.label]


@dataclass(frozen=True, eq=False)
class SimulatedScan:
    """One output scan: CT and VerSe-numbered vertebra mask (nibabel images), body centroids, outcomes.

    ``vertebrae`` are the body centroids (world mm) of every vertebra with body voxels, with grades
    for those in ``outcomes`` (the vertebrae whose body lies wholly inside the scan). ``previews``
    maps a fractured label to its (before, after) mid-sagittal slices in the vertebra frame.
    """

    case: str
    source: str
    ct: nib.Nifti1Image
    mask: nib.Nifti1Image
    vertebrae: list[Vertebra]
    outcomes: list[VertebraOutcome]
    previews: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    acquisition: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> bool:
    return tuple(shape_a) == tuple(shape_b) and bool(np.allclose(affine_a, affine_b, atol=1e-3))


def _verse_labels(array: np.ndarray, label_scheme: str, source: str) -> np.ndarray:
    """Mask values -> VerSe labels (uint8, 0 elsewhere); unknown VerSe values are an error."""
    values = [int(value) for value in np.unique(array) if value != 0]
    mapping = LABEL_SCHEMES[label_scheme]
    if mapping is None:
        unknown = [value for value in values if value not in LABEL_NAMES]
        if unknown:
            raise InputError(source, f"unknown vertebra label(s) {unknown} in the mask (VerSe numbering 1-28, 29 = S2)")
        table = {value: value for value in values}
    else:
        table = {value: int(mapping[value]) for value in values if value in mapping}
    if not table:
        raise InputError(source, f"no vertebra in the mask ({label_scheme} numbering)")
    lookup = np.zeros(max(values) + 1, dtype=np.uint8)
    for value, label in table.items():
        lookup[value] = label
    clipped = np.clip(array, 0, max(values)).astype(np.int64)
    return lookup[clipped]


def _body_indicator(array: np.ndarray, source: str) -> np.ndarray:
    """Vertebral-body voxels of a body mask: 49/50 (TPTBox), else 1 (binary, TotalSegmentator), else its one value."""
    values = {int(value) for value in np.unique(array) if value != 0}
    if values & {49, 50}:
        return np.isin(array, (49, 50))
    if 1 in values:
        return np.asarray(array == 1)
    if len(values) == 1:
        return np.asarray(array != 0)
    raise InputError(source, f"cannot tell the vertebral bodies in the body mask (values {sorted(values)})")


@dataclass(frozen=True, eq=False)
class _Inputs:
    hu: np.ndarray
    labels: np.ndarray
    bodies: np.ndarray  # VerSe label where vertebral body, 0 elsewhere
    affine: np.ndarray
    ct_grid: SourceGrid
    mask_grid: SourceGrid
    ct_dtype: np.dtype
    ct_scaling: tuple[float, float]
    body_given: bool


def _load_inputs(
    ct: str | Path | nib.Nifti1Image,
    mask: str | Path | nib.Nifti1Image,
    body: str | Path | nib.Nifti1Image | None,
    label_scheme: str,
) -> _Inputs:
    if label_scheme not in LABEL_SCHEMES:
        raise VfdetectError(f"unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
    volume, ct_grid = load_scan(ct)
    mask_volume, mask_grid = load_label_image(mask)
    if not _same_grid(volume.shape, volume.affine, mask_volume.shape, mask_volume.affine):
        raise InputError(
            mask_grid.source,
            f"vertebra mask (shape {list(mask_volume.shape)}) is not on the grid of the CT {ct_grid.source} "
            f"(shape {list(volume.shape)})",
        )
    labels = _verse_labels(mask_volume.array, label_scheme, mask_grid.source)
    if body is not None:
        body_volume, body_grid = load_label_image(body)
        if not _same_grid(body_volume.shape, body_volume.affine, mask_volume.shape, mask_volume.affine):
            raise InputError(body_grid.source, f"body mask is not on the grid of the vertebra mask {mask_grid.source}")
        bodies = np.where(_body_indicator(body_volume.array, body_grid.source), labels, 0).astype(np.uint8)
        if not bodies.any():
            raise InputError(body_grid.source, "the body mask has no voxel inside any vertebra of the mask")
    else:
        bodies = np.zeros_like(labels)
    header = ct_grid.header
    slope, inter = header.get_slope_inter()
    scaling = (1.0 if slope is None else float(slope), 0.0 if inter is None else float(inter))
    return _Inputs(
        volume.array, labels, bodies, volume.affine, ct_grid, mask_grid, header.get_data_dtype(), scaling, body is not None
    )


# ----------------------------------------------------------------------------------------------
# Anatomy: frames, bodies, eligibility
# ----------------------------------------------------------------------------------------------


def _unit(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float64) / float(np.linalg.norm(vector))


def _orthogonal(vector: np.ndarray, axis: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float64) - axis * float(vector @ axis)


def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return np.asarray(voxels, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def _neighbours(label: int, present: Sequence[int]) -> tuple[int | None, int | None]:
    """The cranial and caudal neighbours of ``label`` among ``present`` (None where missing)."""
    rank = spine_rank(label)

    def adjacent(step: int) -> int | None:
        position = rank + step
        while 0 <= position < len(SPINE_ORDER):
            candidate = SPINE_ORDER[position]
            if candidate in present:
                return candidate
            if candidate not in _OPTIONAL_LABELS:
                return None
            position += step
        return None

    return adjacent(-1), adjacent(1)


def _box_of(slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.start for s in slices]), np.array([s.stop for s in slices])


def _centroid(indicator: np.ndarray, start: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return _world(affine, np.argwhere(indicator).mean(axis=0) + start)


def _anatomy(inputs: _Inputs) -> tuple[dict[int, VertebraFrame], set[int]]:
    """Frames of the vertebrae whose frame is definable, and the labels with a complete body.

    Fills ``inputs.bodies`` with the approximate body (anterior of the plane through the whole
    vertebra's centre of mass) when no body mask was given.
    """
    labels, bodies, affine = inputs.labels, inputs.bodies, inputs.affine
    boxes = ndimage.find_objects(labels)
    present = [label for label in range(1, len(boxes) + 1) if boxes[label - 1] is not None]
    whole = {}
    for label in present:
        box = boxes[label - 1]
        whole[label] = _centroid(labels[box] == label, _box_of(box)[0], affine)
    if not inputs.body_given:
        world_anterior = np.array([0.0, 1.0, 0.0])
        for label in present:
            above, below = _neighbours(label, present)
            ends = [whole[n] for n in (above, below) if n is not None]
            superior = _unit(ends[0] - ends[-1]) if len(ends) == 2 else np.array([0.0, 0.0, 1.0])
            if len(ends) == 1:
                superior = _unit(ends[0] - whole[label]) if above is not None else _unit(whole[label] - ends[0])
            box = boxes[label - 1]
            start = _box_of(box)[0]
            inside = labels[box] == label
            voxels = np.argwhere(inside)
            points = _world(affine, voxels + start)
            anterior = _unit(_orthogonal(world_anterior, superior))
            for _ in range(2):
                front = (points - whole[label]) @ anterior > 0
                if not front.any():
                    break
                anterior = _unit(_orthogonal(points[front].mean(axis=0) - whole[label], superior))
            front = (points - whole[label]) @ anterior > 0
            region = bodies[box]
            selected = voxels[front]
            region[selected[:, 0], selected[:, 1], selected[:, 2]] = label
    body_boxes = ndimage.find_objects(bodies)
    body_centre: dict[int, np.ndarray] = {}
    complete: set[int] = set()
    for label in present:
        if label > len(body_boxes) or body_boxes[label - 1] is None:
            continue
        box = body_boxes[label - 1]
        start, stop = _box_of(box)
        body_centre[label] = _centroid(bodies[box] == label, start, affine)
        if np.all(start > 0) and np.all(stop < np.array(bodies.shape)) and np.count_nonzero(bodies[box] == label) >= 50:
            complete.add(label)
    frames: dict[int, VertebraFrame] = {}
    for label in body_centre:
        above, below = _neighbours(label, present)
        if above is None or below is None:
            continue
        reference = body_centre if inputs.body_given and above in body_centre and below in body_centre else whole
        superior = _unit(reference[above] - reference[below])
        anterior = _orthogonal(body_centre[label] - whole[label], superior)
        if np.linalg.norm(anterior) < 1.0:  # body and vertebra centres nearly coincide: no usable frame
            continue
        anterior = _unit(anterior)
        frames[label] = VertebraFrame(label, body_centre[label], superior, anterior, np.cross(superior, anterior))
    return frames, complete


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _sample(array: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``array`` (grid ``affine``) at world points (..., 3); 0 outside."""
    inverse = np.linalg.inv(affine)
    voxels = np.asarray(points, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]
    flat = voxels.reshape(-1, 3).T
    values = ndimage.map_coordinates(np.asarray(array, dtype=np.float32), flat, order=1, mode="constant", cval=0.0)
    return values.reshape(voxels.shape[:-1])


def _longest_run(inside: np.ndarray) -> tuple[int, int]:
    """(start, stop) of the longest run of True along the last axis of a 1-D boolean array."""
    if not inside.any():
        return (0, 0)
    padded = np.concatenate([[False], inside, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, stops = edges[0::2], edges[1::2]
    best = int(np.argmax(stops - starts))
    return int(starts[best]), int(stops[best])


def _extent(indicator: np.ndarray, affine: np.ndarray, origin: np.ndarray, direction: np.ndarray, reach: float = 80.0) -> float:
    """Length in mm of the longest run of ``indicator >= 0.5`` along the line origin + t * direction."""
    t = np.arange(-reach, reach + 1e-9, _LINE_STEP_MM)
    values = _sample(indicator, affine, origin[None, :] + t[:, None] * direction[None, :])
    start, stop = _longest_run(values >= 0.5)
    return (stop - start) * _LINE_STEP_MM if stop > start else float("nan")


def _measuring_points(indicator: np.ndarray, affine: np.ndarray, frame: VertebraFrame) -> np.ndarray:
    """World points (anterior, middle, posterior) where the body heights are measured."""
    t = np.arange(-80.0, 80.0 + 1e-9, _LINE_STEP_MM)
    values = _sample(indicator, affine, frame.centre[None, :] + t[:, None] * frame.anterior[None, :])
    start, stop = _longest_run(values >= 0.5)
    if stop <= start:
        raise VfdetectError(f"vertebra {vertebra_name(frame.label)}: no body along its anterior axis")
    back, front = t[start], t[stop - 1]
    middle = frame.centre + frame.anterior * 0.5 * (front + back)
    half = 0.5 * (front - back)
    return np.stack([middle + frame.anterior * 0.75 * half, middle, middle - frame.anterior * 0.75 * half])


def _heights(indicator: np.ndarray, affine: np.ndarray, frame: VertebraFrame, points: np.ndarray) -> BodyHeights:
    values = []
    for point in points:
        lines = [_extent(indicator, affine, point + frame.lateral * side, frame.superior) for side in _LATERAL_OFFSETS_MM]
        values.append(float(np.nanmedian(lines)) if np.any(np.isfinite(lines)) else float("nan"))
    return BodyHeights(*values)


# ----------------------------------------------------------------------------------------------
# The warp
# ----------------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True, eq=False)
class _WarpGeometry:
    """Everything about one vertebra's warp that does not depend on the amplitude."""

    frame: VertebraFrame
    box: tuple[slice, slice, slice]
    box_affine: np.ndarray
    s: np.ndarray
    u: np.ndarray  # normalised anterior coordinate over the body's cross-section (-1 posterior wall, +1 anterior)
    v: np.ndarray  # normalised lateral coordinate
    envelope: np.ndarray  # 1 over the cross-section, tapering to 0 outside it
    knots: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # per voxel: caudal neighbour top, body bottom, body top, cranial neighbour bottom
    direction_voxel: np.ndarray
    sigma_voxel: np.ndarray
    spacing: np.ndarray
    neighbours: tuple[int, ...]


def _column_extents(
    indicator: np.ndarray, affine: np.ndarray, frame: VertebraFrame, a_values: np.ndarray, l_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest ``s`` where ``indicator >= 0.5`` on lines along ``superior`` through (a, l) cells.

    NaN where a line never enters the indicator. Sampled every 0.5 mm over +-70 mm of the centre.
    """
    t = np.arange(-70.0, 70.0 + 1e-9, 0.5)
    grid_a, grid_l = np.meshgrid(a_values, l_values, indexing="ij")
    origins = frame.centre + grid_a[..., None] * frame.anterior + grid_l[..., None] * frame.lateral
    inside = _sample(indicator, affine, origins[..., None, :] + t[:, None] * frame.superior) >= 0.5
    any_inside = inside.any(axis=-1)
    lowest = np.where(any_inside, t[np.argmax(inside, axis=-1)], np.nan)
    highest = np.where(any_inside, t[len(t) - 1 - np.argmax(inside[..., ::-1], axis=-1)], np.nan)
    return lowest, highest


def _filled(surface: np.ndarray, sigma_cells: float) -> np.ndarray:
    """A body surface map with empty cells filled from the nearest full one, then smoothed."""
    empty = ~np.isfinite(surface)
    nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    return ndimage.gaussian_filter(surface[tuple(nearest)], sigma_cells, mode="nearest")


def _plan_geometry(labels: np.ndarray, bodies: np.ndarray, affine: np.ndarray, frame: VertebraFrame) -> _WarpGeometry:
    """Sub-box, cross-section footprint and per-column knots of the warp of ``frame.label``.

    The knots are maps over the body's cross-section (1 mm cells): the top of the
    caudal neighbour, the bottom and top of the body, and the bottom of the cranial neighbour, each
    along ``superior``. The neighbour maps are widened (minimum/maximum filter) and pulled back by
    two smoothing widths (the smoothing kernel's reach), so that neither the smoothing nor tilted endplates move a neighbour.
    """
    label = frame.label
    present = [int(value) for value in np.unique(labels) if value]
    above, below = _neighbours(label, present)
    neighbours = tuple(n for n in (above, below) if n is not None)
    shape = np.array(labels.shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    indices = {n: np.argwhere(labels == n) for n in (label, *neighbours)}
    body_points = frame.coordinates(_world(affine, np.argwhere(bodies == label)))
    voxel_half = 0.5 * float(np.abs(frame.superior @ affine[:3, :3]).sum())
    _, a_body, l_body = body_points
    a_lo, a_hi = np.percentile(a_body, [1, 99])
    l_lo, l_hi = np.percentile(l_body, [1, 99])
    a_centre, l_centre = 0.5 * (a_lo + a_hi), 0.5 * (l_lo + l_hi)
    radius_a, radius_l = 0.5 * (a_hi - a_lo) + voxel_half, 0.5 * (l_hi - l_lo) + voxel_half
    outer = 1.0 + _TAPER_MM / min(radius_a, radius_l)
    margin = 2.0 * _SMOOTHING_MM
    cell = 1.0
    a_first, l_first = a_centre - radius_a * outer - 2 * cell - margin, l_centre - radius_l * outer - 2 * cell - margin
    a_cells = a_first + cell * (0.5 + np.arange(int(math.ceil(2 * (a_centre - a_first) / cell)) + 1))
    l_cells = l_first + cell * (0.5 + np.arange(int(math.ceil(2 * (l_centre - l_first) / cell)) + 1))
    search_low = np.min([i.min(axis=0) for i in indices.values() if len(i)], axis=0)
    search_high = np.max([i.max(axis=0) for i in indices.values() if len(i)], axis=0) + 2
    search = tuple(slice(int(lo), int(hi)) for lo, hi in zip(search_low, search_high, strict=True))
    search_affine = affine.copy()
    search_affine[:3, 3] = _world(affine, search_low[None, :].astype(float))[0]
    bottom, top = _column_extents((bodies[search] == label).astype(np.float32), search_affine, frame, a_cells, l_cells)
    top, bottom = _filled(top, 1.0), _filled(bottom, 1.0)
    reach = int(math.ceil((margin + cell) / cell))
    upper = np.full(top.shape, np.inf)
    lower = np.full(top.shape, -np.inf)
    for neighbour, sign in ((above, 1.0), (below, -1.0)):
        if neighbour is None:
            continue
        # Every voxel centre of the neighbour bounds its cell (conservative, unlike line sampling).
        s_n, a_n, l_n = frame.coordinates(_world(affine, indices[neighbour]))
        cell_a = np.clip(np.rint((a_n - a_cells[0]) / cell).astype(int), 0, len(a_cells) - 1)
        cell_l = np.clip(np.rint((l_n - l_cells[0]) / cell).astype(int), 0, len(l_cells) - 1)
        bound = np.full(top.shape, np.inf)
        np.minimum.at(bound, (cell_a, cell_l), sign * s_n)
        bound = ndimage.minimum_filter(bound, 2 * reach + 1)
        if sign > 0:
            upper = bound
        else:
            lower = -bound
    upper = np.minimum(upper - margin, top + _DEFAULT_GAP_MM)
    lower = np.maximum(lower + margin, bottom - _DEFAULT_GAP_MM)
    centre_cell = (int(np.argmin(np.abs(a_cells - a_centre))), int(np.argmin(np.abs(l_cells - l_centre))))
    if float(top[centre_cell] - bottom[centre_cell]) < 5.0:
        raise VfdetectError(f"vertebra {vertebra_name(label)}: its body is too thin to deform")
    # Sub-box: the support between the neighbours, padded for the smoothing.
    s_low, s_high = float(lower.min()) - margin, float(upper.max()) + margin
    corners = np.array(
        [
            frame.centre + frame.superior * zs + frame.anterior * (a_centre + sa * radius_a * outer)
            + frame.lateral * (l_centre + sl * radius_l * outer)
            for zs in (s_low, s_high)
            for sa in (-1, 1)
            for sl in (-1, 1)
        ]
    )
    corner_voxels = (corners - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    box_low = np.maximum(np.floor(corner_voxels.min(axis=0)).astype(int) - 2, 0)
    box_high = np.minimum(np.ceil(corner_voxels.max(axis=0)).astype(int) + 3, shape)
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(box_low, box_high, strict=True))
    box_shape = tuple(int(n) for n in box_high - box_low)
    box_grid = np.indices(box_shape).reshape(3, -1).T + box_low
    bs, ba, bl = frame.coordinates(_world(affine, box_grid))
    map_coordinates = np.stack([(ba - a_cells[0]) / cell, (bl - l_cells[0]) / cell])

    def lookup(surface: np.ndarray) -> np.ndarray:
        finite = np.where(np.isfinite(surface), surface, 0.0)
        return ndimage.map_coordinates(finite, map_coordinates, order=1, mode="nearest").reshape(box_shape)

    z0, z1, z2, z3 = (lookup(surface) for surface in (lower, bottom, top, upper))
    z1 = np.maximum(z1, z0 + _MIN_GAP_MM)
    z2 = np.maximum(np.minimum(z2, z3 - _MIN_GAP_MM), z1 + _MIN_GAP_MM)
    z3 = np.maximum(z3, z2 + _MIN_GAP_MM)
    u, v = (ba - a_centre) / radius_a, (bl - l_centre) / radius_l
    q = (u**4 + v**4) ** 0.25
    envelope = _smoothstep((outer - q) / (outer - 1.0))
    box_affine = affine.copy()
    box_affine[:3, 3] = _world(affine, box_low[None, :].astype(float))[0]
    return _WarpGeometry(
        frame=frame,
        box=box,  # type: ignore[arg-type]
        box_affine=box_affine,
        s=bs.reshape(box_shape),
        u=u.reshape(box_shape),
        v=v.reshape(box_shape),
        envelope=envelope.reshape(box_shape),
        knots=(z0, z1, z2, z3),
        direction_voxel=np.linalg.solve(affine[:3, :3], frame.superior),
        sigma_voxel=_SMOOTHING_MM / spacing,
        spacing=spacing,
        neighbours=neighbours,
    )


@dataclass(frozen=True)
class _Morphology:
    name: str
    top_share: float


def _footprints(geometry: _WarpGeometry, morphology: _Morphology) -> tuple[np.ndarray, np.ndarray]:
    """Endplate travel per mm of amplitude: (superior endplate, inferior endplate) over the box."""
    u, v, envelope = geometry.u, geometry.v, geometry.envelope
    if morphology.name == "wedge":
        shape = 0.1 + 0.9 * np.clip((u + 1.0) / 2.0, 0.0, 1.0) ** 1.2
    elif morphology.name == "biconcave":
        rho = np.clip(np.sqrt(u**2 + v**2) / 0.95, 0.0, 1.0)
        shape = np.cos(0.5 * np.pi * rho) ** 2
    elif morphology.name == "crush":
        shape = np.ones_like(u)
    else:
        raise VfdetectError(f"unknown fracture morphology {morphology.name!r} (known: {', '.join(MORPHOLOGIES)})")
    total = shape * envelope
    return total * morphology.top_share, total * (1.0 - morphology.top_share)


def _displacement(geometry: _WarpGeometry, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Smoothed backward displacement (mm along ``superior``) on the box for endplate travels ``top``, ``bottom``."""
    z0, z1, z2, z3 = geometry.knots
    s = geometry.s
    # A disc stretches at most tenfold (Jacobian >= 0.1): thin discs in the mask would otherwise turn
    # a sliver of endplate into a long streak. The other endplate or other columns take up the rest.
    top = np.minimum(top, _MAX_STRETCH * (z3 - z2))
    bottom = np.minimum(bottom, _MAX_STRETCH * (z1 - z0))
    # Never take more than 70 % of a column's height: the body between the endplates keeps >= 30 %.
    cap = np.clip(0.7 * (z2 - z1) / np.maximum(top + bottom, 1e-9), 0.0, 1.0)
    top, bottom = top * cap, bottom * cap
    p1, p2 = z1 + bottom, z2 - top
    source = np.where(
        s <= z0,
        s,
        np.where(
            s <= p1,
            z0 + (s - z0) * (z1 - z0) / (p1 - z0),
            np.where(s <= p2, z1 + (s - p1) * (z2 - z1) / (p2 - p1), np.where(s < z3, z2 + (s - p2) * (z3 - z2) / (z3 - p2), s)),
        ),
    )
    displacement = (source - s).astype(np.float32)
    # The kernel stops at the neighbours' safety margin (two widths, fewer voxels on coarse axes).
    radius = [int(2.0 * _SMOOTHING_MM // step) for step in geometry.spacing]
    smoothed = ndimage.gaussian_filter(displacement, geometry.sigma_voxel, mode="nearest", radius=radius)
    # Kernel tails below 0.01 mm are dropped, so that untouched voxels keep their exact values.
    smoothed[np.abs(smoothed) < 0.01] = 0.0
    return smoothed


def _min_jacobian(geometry: _WarpGeometry, displacement: np.ndarray) -> float:
    """Smallest determinant of the map's Jacobian, ``1 + dd/ds`` (finite differences on the box)."""
    gradient = np.gradient(displacement.astype(np.float64))
    derivative = sum(g * float(c) for g, c in zip(gradient, geometry.direction_voxel, strict=True))
    return float(1.0 + np.min(derivative))


def _source_coordinates(geometry: _WarpGeometry, displacement: np.ndarray) -> np.ndarray:
    start = np.array([s.start for s in geometry.box], dtype=np.float64)
    grid = np.indices(displacement.shape, dtype=np.float64)
    return np.stack(
        [grid[axis] + start[axis] + displacement * geometry.direction_voxel[axis] for axis in range(3)]
    )


def _warp(array: np.ndarray, coordinates: np.ndarray, order: int) -> np.ndarray:
    return ndimage.map_coordinates(array, coordinates.reshape(3, -1), order=order, mode="nearest").reshape(
        coordinates.shape[1:]
    )


@dataclass(frozen=True, eq=False)
class _Fracture:
    geometry: _WarpGeometry
    morphology: _Morphology
    amplitude_mm: float
    displacement: np.ndarray
    heights_before: BodyHeights
    heights_after: BodyHeights
    min_jacobian: float

    @property
    def height_loss(self) -> float:
        return self.heights_after.loss_from(self.heights_before)


def _try_fracture(
    geometry: _WarpGeometry,
    body_box: np.ndarray,
    morphology: _Morphology,
    target: float,
    band: tuple[float, float],
    before: BodyHeights,
    points: np.ndarray,
) -> _Fracture | None:
    """Bisect the amplitude until the measured loss is within tolerance of ``target``; None if out of reach."""
    top, bottom = _footprints(geometry, morphology)
    z0, z1, z2, z3 = geometry.knots
    peak = float(np.max(top + bottom))
    high = 0.7 * float(np.max(z2 - z1)) / max(peak, 1e-6)
    start = np.array([s.start for s in geometry.box], dtype=np.float64)
    local_points = points  # world points; the box affine places the box indicator

    def attempt(amplitude: float) -> _Fracture:
        displacement = _displacement(geometry, top * amplitude, bottom * amplitude)
        coordinates = _source_coordinates(geometry, displacement) - start[:, None, None, None]
        warped = _warp(body_box, coordinates, order=1)
        after = _heights(warped, geometry.box_affine, geometry.frame, local_points)
        return _Fracture(geometry, morphology, amplitude * peak, displacement, before, after, _min_jacobian(geometry, displacement))

    best = attempt(high)
    if not best.height_loss >= target:
        return best if band[0] < best.height_loss < band[1] else None
    low = 0.0
    for _ in range(24):
        middle = 0.5 * (low + high)
        candidate = attempt(middle)
        loss = candidate.height_loss
        if abs(loss - target) < _LOSS_TOLERANCE:
            return candidate
        if loss < target:
            low = middle
        else:
            high, best = middle, candidate
    return best if band[0] < best.height_loss < band[1] else None


def _draw_morphology(rng: np.random.Generator, config: SimulationConfig) -> _Morphology:
    probabilities = np.asarray(config.morphology_probabilities, dtype=float)
    name = MORPHOLOGIES[int(rng.choice(3, p=probabilities / probabilities.sum()))]
    share = float(rng.uniform(0.7, 0.9)) if name == "wedge" else float(rng.uniform(0.4, 0.6))
    return _Morphology(name, share)


def _draw_grades(rng: np.random.Generator, eligible: Sequence[int], config: SimulationConfig) -> dict[int, int]:
    """Genant grade per fractured label: a negative scan has none, any other at least one."""
    if not eligible or config.fracture_prevalence <= 0 or rng.random() < config.negative_fraction:
        return {}
    rate = min(1.0, config.fracture_prevalence / max(1e-9, 1.0 - config.negative_fraction))
    count = int(np.clip(rng.binomial(len(eligible), rate), 1, len(eligible)))
    chosen = sorted((eligible[int(i)] for i in rng.choice(len(eligible), size=count, replace=False)), key=spine_rank)
    probabilities = np.asarray(config.grade_probabilities, dtype=float)
    return {label: 1 + int(rng.choice(3, p=probabilities / probabilities.sum())) for label in chosen}


def _box_indicator(bodies: np.ndarray, geometry: _WarpGeometry) -> np.ndarray:
    return (bodies[geometry.box] == geometry.frame.label).astype(np.float32)


def _compaction(geometry: _WarpGeometry, fracture: _Fracture, rng: np.random.Generator) -> np.ndarray:
    """HU to add in the box: a band of impacted trabecular bone just inside each collapsed endplate."""
    top, bottom = _footprints(geometry, fracture.morphology)
    scale = fracture.amplitude_mm / max(float(np.max(top + bottom)), 1e-6)
    top, bottom = top * scale, bottom * scale
    _, z1, z2, _ = geometry.knots
    width = 2.0
    band_top = np.exp(-0.5 * ((geometry.s - (z2 - top - width)) / width) ** 2) * np.clip(top / 3.0, 0.0, 1.0)
    band_bottom = np.exp(-0.5 * ((geometry.s - (z1 + bottom + width)) / width) ** 2) * np.clip(bottom / 3.0, 0.0, 1.0)
    return (float(rng.uniform(50.0, 150.0)) * np.maximum(band_top, band_bottom)).astype(np.float32)


def _plant(
    state: dict[str, np.ndarray],
    affine: np.ndarray,
    frame: VertebraFrame,
    grade: int,
    rng: np.random.Generator,
    config: SimulationConfig,
) -> _Fracture | None:
    """Plant one fracture into ``state`` (hu, labels, bodies; modified in place); None if no draw fits."""
    geometry = _plan_geometry(state["labels"], state["bodies"], affine, frame)
    body_box = _box_indicator(state["bodies"], geometry)
    points = _measuring_points(body_box, geometry.box_affine, frame)
    before = _heights(body_box, geometry.box_affine, frame, points)
    if not all(np.isfinite(before.as_tuple())) or min(before.as_tuple()) < 5.0:
        return None
    band = GENANT_BANDS[grade]
    fracture = None
    for _ in range(config.max_tries):
        morphology = _draw_morphology(rng, config)
        target = float(rng.uniform(*_TARGET_BANDS[grade]))
        fracture = _try_fracture(geometry, body_box, morphology, target, band, before, points)
        if fracture is not None and fracture.min_jacobian > 0:
            break
        fracture = None
    if fracture is None:
        return None
    coordinates = _source_coordinates(geometry, fracture.displacement)
    box = geometry.box
    new_labels = _warp(state["labels"], coordinates, order=0)
    for neighbour in geometry.neighbours:
        if np.count_nonzero((new_labels == neighbour) != (state["labels"][box] == neighbour)):
            raise VfdetectError(f"vertebra {vertebra_name(frame.label)}: the fracture moved its neighbour {vertebra_name(neighbour)}")
    hu_box = _warp(state["hu"], coordinates, order=1)
    if config.compaction:
        hu_box = hu_box + _compaction(geometry, fracture, rng) * (_warp(state["bodies"], coordinates, order=0) == frame.label)
    new_bodies = _warp(state["bodies"], coordinates, order=0)
    state["hu"][box] = hu_box
    state["labels"][box] = new_labels
    state["bodies"][box] = new_bodies
    return fracture


# ----------------------------------------------------------------------------------------------
# Acquisition changes
# ----------------------------------------------------------------------------------------------


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = _unit(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _vary_acquisition(
    state: dict[str, np.ndarray], affine: np.ndarray, fractured: Sequence[int], rng: np.random.Generator, config: SimulationConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop along the spine, add noise, rotate (affine) and reorient; ``state`` is replaced in place."""
    superior_axis = int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))
    n = state["hu"].shape[superior_axis]
    keep = np.isin(state["labels"], list(fractured)) if fractured else np.zeros(state["labels"].shape, bool)
    if keep.any():
        other = tuple(i for i in range(3) if i != superior_axis)
        present = np.flatnonzero(keep.any(axis=other))
        low, high = int(present[0]), int(present[-1]) + 1
    else:
        low = high = n // 2
    length = int(rng.integers(max(high - low, int(math.ceil(0.6 * n))), n + 1))
    first = int(rng.integers(max(0, high - length), min(low, n - length) + 1))
    crop = [slice(None)] * 3
    crop[superior_axis] = slice(first, first + length)
    for key in state:
        state[key] = np.ascontiguousarray(state[key][tuple(crop)])
    affine = affine.copy()
    affine[:3, 3] += affine[:3, superior_axis] * first
    noise_sd = float(rng.uniform(0.0, config.max_noise_sd_hu))
    state["hu"] = state["hu"] + rng.normal(0.0, noise_sd, state["hu"].shape).astype(np.float32)
    angle = math.radians(float(rng.uniform(0.0, config.max_rotation_deg)))
    rotation = _rotation(rng.normal(size=3), angle)
    centre = _world(affine, (np.array(state["hu"].shape) - 1) / 2.0)
    moved = np.eye(4)
    moved[:3, :3] = rotation
    moved[:3, 3] = centre - rotation @ centre
    affine = moved @ affine
    code = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(code)))
    shape = state["hu"].shape
    for key in state:
        state[key] = np.ascontiguousarray(nib.orientations.apply_orientation(state[key], transform))
    affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    dtype = ("int16", "float32")[int(rng.integers(2))]
    details = {
        "crop_axis": superior_axis,
        "crop_first": first,
        "crop_length": length,
        "noise_sd_hu": round(noise_sd, 3),
        "rotation_deg": round(math.degrees(angle), 3),
        "orientation": code,
        "dtype": dtype,
    }
    return affine, details


# ----------------------------------------------------------------------------------------------
# One scan
# ----------------------------------------------------------------------------------------------


def _complete_bodies(bodies: np.ndarray) -> set[int]:
    boxes = ndimage.find_objects(bodies)
    shape = np.array(bodies.shape)
    complete = set()
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        start, stop = _box_of(box)
        if np.all(start > 0) and np.all(stop < shape):
            complete.add(label)
    return complete


def _measure(bodies: np.ndarray, affine: np.ndarray, frame: VertebraFrame, points: np.ndarray | None = None) -> tuple[BodyHeights, np.ndarray]:
    indicator = (bodies == frame.label).astype(np.float32)
    box = ndimage.find_objects(indicator.astype(np.uint8))[0]
    low = np.array([max(0, s.start - 3) for s in box])
    high = np.array([min(n, s.stop + 3) for s, n in zip(box, bodies.shape, strict=True)])
    sub = indicator[tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))]
    sub_affine = affine.copy()
    sub_affine[:3, 3] = _world(affine, low[None, :].astype(float))[0]
    if points is None:
        points = _measuring_points(sub, sub_affine, frame)
    return _heights(sub, sub_affine, frame, points), points


def _preview(hu: np.ndarray, affine: np.ndarray, frame: VertebraFrame) -> np.ndarray:
    """Mid-sagittal slice in the vertebra frame: rows superior (top) to inferior, columns anterior to posterior."""
    s = np.arange(50.0, -50.0 - 1e-9, -0.5)
    a = np.arange(45.0, -45.0 - 1e-9, -0.5)
    points = frame.centre + s[:, None, None] * frame.superior + a[None, :, None] * frame.anterior
    inverse = np.linalg.inv(affine)
    voxels = points @ inverse[:3, :3].T + inverse[:3, 3]
    return ndimage.map_coordinates(hu, voxels.reshape(-1, 3).T, order=1, mode="constant", cval=-1024.0).reshape(points.shape[:2])


def simulate_scan(
    ct: str | Path | nib.Nifti1Image,
    mask: str | Path | nib.Nifti1Image,
    rng: np.random.Generator,
    config: SimulationConfig = SimulationConfig(),
    body_mask: str | Path | nib.Nifti1Image | None = None,
    label_scheme: str = "verse",
    case: str = "case",
    source: str | None = None,
    previews: bool = False,
) -> SimulatedScan:
    """Plant Genant-graded compression fractures into one real CT scan (files or in-memory images).

    ``mask`` is a vertebra instance mask on the CT's grid (numbering ``label_scheme``), ``body_mask``
    an optional vertebral-body mask on that grid. Eligible vertebrae are those in ``config.levels``
    with a neighbour on each side and a body wholly inside the scan; fracture status, grades,
    morphologies and amplitudes are drawn from ``rng``. Returns the new CT (on the input's grid,
    header and dtype unless ``config.vary_acquisition``), the warped mask in VerSe numbering, body
    centroids with grades and the measured outcome of every vertebra with a complete body.

    Raises :class:`InputError` for unreadable files, a mask off the CT's grid, unknown labels or a
    mask without vertebrae, and when no vertebra of ``config.levels`` has a definable frame.
    """
    started = time.perf_counter()
    inputs = _load_inputs(ct, mask, body_mask, label_scheme)
    frames, complete = _anatomy(inputs)
    mask_source = inputs.mask_grid.source
    in_levels = [label for label in frames if label in config.levels]
    if not in_levels:
        raise InputError(
            mask_source,
            "no vertebra of the chosen levels has neighbours on both sides to define its frame "
            f"(mask holds {', '.join(vertebra_name(label) for label in sorted(np.unique(inputs.labels)[1:], key=spine_rank))})",
        )
    eligible = sorted((label for label in in_levels if label in complete), key=spine_rank)
    affine = inputs.affine
    original_hu = inputs.hu
    state = {"hu": inputs.hu.copy(), "labels": inputs.labels.copy(), "bodies": inputs.bodies.copy()}
    reference = {label: _measure(inputs.bodies, affine, frames[label]) for label in sorted(complete) if label in frames}
    grades = _draw_grades(rng, eligible, config)
    fractures: dict[int, _Fracture] = {}
    for label in sorted(grades, key=spine_rank):
        fracture = _plant(state, affine, frames[label], grades[label], rng, config)
        if fracture is not None:
            fractures[label] = fracture
    outcomes: list[VertebraOutcome] = []
    for label, (before, points) in sorted(reference.items(), key=lambda item: spine_rank(item[0])):
        if label in fractures:
            fracture = fractures[label]
            outcomes.append(
                VertebraOutcome(
                    label, grades[label], fracture.morphology.name, fracture.height_loss, before, fracture.heights_after,
                    fracture.min_jacobian, fracture.amplitude_mm,
                )
            )
            continue
        after, _ = _measure(state["bodies"], affine, frames[label], points)
        change = max(abs(1.0 - b / a) for a, b in zip(before.as_tuple(), after.as_tuple(), strict=True))
        if not change < _UNFRACTURED_TOLERANCE:
            raise VfdetectError(f"{case}: unfractured {vertebra_name(label)} changed by {change:.1%}")
        outcomes.append(VertebraOutcome(label, 0, "normal", after.loss_from(before), before, after))
    preview_slices = (
        {label: (_preview(original_hu, affine, frames[label]), _preview(state["hu"], affine, frames[label])) for label in fractures}
        if previews
        else {}
    )
    acquisition: dict[str, Any] = {}
    ct_dtype = inputs.ct_dtype
    scaling = inputs.ct_scaling
    if config.vary_acquisition:
        affine, acquisition = _vary_acquisition(state, affine, sorted(fractures), rng, config)
        ct_dtype, scaling = np.dtype(acquisition["dtype"]), (1.0, 0.0)
        kept = _complete_bodies(state["bodies"])
        outcomes = [outcome for outcome in outcomes if outcome.label in kept]
    ct_image = _ct_image(state["hu"], affine, inputs.ct_grid.header, ct_dtype, scaling)
    mask_image = _mask_image(state["labels"], affine, inputs.mask_grid.header)
    graded = {outcome.label: outcome.grade for outcome in outcomes}
    vertebrae = _body_centroids(state["bodies"], affine, graded)
    return SimulatedScan(
        case, source or str(inputs.ct_grid.source), ct_image, mask_image, vertebrae, outcomes, preview_slices,
        acquisition, time.perf_counter() - started,
    )


def _body_centroids(bodies: np.ndarray, affine: np.ndarray, grades: Mapping[int, int]) -> list[Vertebra]:
    boxes = ndimage.find_objects(bodies)
    vertebrae = []
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        position = _centroid(bodies[box] == label, _box_of(box)[0], affine)
        vertebrae.append(Vertebra(label, (float(position[0]), float(position[1]), float(position[2])), grades.get(label)))
    return sorted(vertebrae, key=lambda vertebra: spine_rank(vertebra.label))


def _header(template: nib.Nifti1Header, affine: np.ndarray, shape: Sequence[int], dtype: np.dtype) -> nib.Nifti1Header:
    header = template.copy()
    header.extensions.clear()
    header.set_data_dtype(dtype)
    header.set_data_shape(tuple(shape))
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    header.set_sform(affine, code=sform_code or (0 if qform_code else 2))
    header.set_qform(affine, code=qform_code)
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    return header


def _ct_image(hu: np.ndarray, affine: np.ndarray, template: nib.Nifti1Header, dtype: np.dtype, scaling: tuple[float, float]) -> nib.Nifti1Image:
    slope, inter = scaling
    raw = (hu.astype(np.float64) - inter) / slope
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)  # type: ignore[type-var]
        raw = np.clip(np.rint(raw), info.min, info.max)
    header = _header(template, affine, hu.shape, dtype)
    header.set_slope_inter(slope, inter)
    return nib.Nifti1Image(raw.astype(dtype), affine, header)


def _mask_image(labels: np.ndarray, affine: np.ndarray, template: nib.Nifti1Header) -> nib.Nifti1Image:
    dtype = template.get_data_dtype()
    if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < 29:  # type: ignore[type-var]
        dtype = np.dtype(np.uint8)
    header = _header(template, affine, labels.shape, dtype)
    header.set_slope_inter(1.0, 0.0)
    return nib.Nifti1Image(labels.astype(dtype), affine, header)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _write_nifti(path: Path, image: nib.Nifti1Image) -> None:
    """Write ``image`` byte-for-byte reproducibly (gzip without time stamp or name), atomically."""
    header = image.header.copy()
    header["magic"] = b"n+1"
    header["vox_offset"] = 352
    buffer = io.BytesIO()
    header.write_to(buffer)
    buffer.write(b"\x00" * (352 - buffer.tell()))
    data = np.asanyarray(image.dataobj)
    buffer.write(np.asarray(data, dtype=header.get_data_dtype()).tobytes(order="F"))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=6) as stream:
            stream.write(buffer.getvalue())


def write_preview_png(path: str | Path, before: np.ndarray, after: np.ndarray, title: str) -> None:
    """Before/after mid-sagittal slices side by side (anterior left, superior up, 0.5 mm pixels) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), dpi=100)
    for index, (image, name) in enumerate(((before, "before"), (after, "after"))):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.imshow(image, cmap="gray", vmin=_PREVIEW_WINDOW_HU[0], vmax=_PREVIEW_WINDOW_HU[1], extent=(45, -45, -50, 50))
        axes.set_title(name)
        axes.set_xlabel("anterior coordinate (mm)")
        axes.set_ylabel("superior axis (mm)")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _case_rng(seed: int, case: str, copy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(case.encode()), copy]))


def _outcome_record(outcome: VertebraOutcome) -> dict[str, Any]:
    record = asdict(outcome)
    record["name"] = outcome.name
    record["heights_before"] = [round(value, 3) for value in outcome.heights_before.as_tuple()]
    record["heights_after"] = [round(value, 3) for value in outcome.heights_after.as_tuple()]
    for key in ("height_loss", "min_jacobian", "amplitude_mm"):
        record[key] = round(float(record[key]), 4)
    return record


def simulate_dataset(
    manifest: str | Path,
    out_dir: str | Path,
    seed: int,
    config: SimulationConfig = SimulationConfig(),
    data_root: str | Path | None = None,
    preview: bool = False,
    quiet: bool = False,
    label_scheme: str | None = None,
) -> Path:
    """Simulate ``config.copies`` fractured copies of every scan of ``manifest``; returns the output manifest.

    Writes ``<case>-sim<k>_ct.nii.gz``, ``_ctd.json`` (VerSe body centroids), ``_msk.nii.gz`` (warped
    vertebra mask, VerSe numbering), ``manifest.csv`` (``case,image,centroids,mask,source``, readable
    by :func:`vfdetect.vertebrae.read_manifest`), ``grades.csv`` (``case,label,grade,morphology,height_loss``),
    ``simulation.json`` (seed, settings, measured heights, Jacobian minima, timings) and with
    ``preview`` ``previews/<case>_<vertebra>.png``. ``label_scheme`` overrides the manifest's
    ``label_scheme`` column for every row. Everything is written into a temporary folder that
    is renamed onto ``out_dir`` at the end, so a failed run leaves nothing; ``out_dir`` must not
    exist or be empty. Each copy draws from its own generator seeded by (seed, case, copy).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "output folder exists and is not empty")
    scans = read_simulation_manifest(manifest, data_root)
    if label_scheme is not None:
        if label_scheme not in LABEL_SCHEMES:
            raise VfdetectError(f"unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
        scans = [replace(scan, label_scheme=label_scheme) for scan in scans]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        manifest_rows: list[list[str]] = []
        grade_rows: list[list[Any]] = []
        records: list[dict[str, Any]] = []
        jobs = [(scan, copy) for scan in scans for copy in range(1, config.copies + 1)]
        for scan, copy in tqdm(jobs, desc="simulate-fractures", unit="scan", disable=quiet):
            name = f"{scan.case}-sim{copy}"
            result = simulate_scan(
                scan.image, scan.mask, _case_rng(seed, scan.case, copy), config, scan.body_mask, scan.label_scheme,
                case=name, source=scan.case, previews=preview,
            )
            image, centroids, mask = f"{name}_ct.nii.gz", f"{name}_ctd.json", f"{name}_msk.nii.gz"
            _write_nifti(work / image, result.ct)
            _write_nifti(work / mask, result.mask)
            write_centroids(work / centroids, result.vertebrae, result.ct.affine)
            manifest_rows.append([name, image, centroids, mask, scan.case])
            for outcome in result.outcomes:
                grade_rows.append([name, outcome.label, outcome.grade, outcome.morphology, f"{outcome.height_loss:.4f}"])
            for label, (before, after) in result.previews.items():
                title = f"{name} {vertebra_name(label)}"
                for graded in (o for o in result.outcomes if o.label == label):
                    title += f": grade {graded.grade} {graded.morphology}, height loss {graded.height_loss:.1%}"
                write_preview_png(work / "previews" / f"{name}_{vertebra_name(label)}.png", before, after, title)
            records.append(
                {
                    "case": name,
                    "source": scan.case,
                    "copy": copy,
                    "seconds": round(result.seconds, 2),
                    "acquisition": result.acquisition,
                    "vertebrae": [_outcome_record(outcome) for outcome in result.outcomes],
                }
            )
        write_text_atomic(work / "manifest.csv", _csv_text(("case", "image", "centroids", "mask", "source"), manifest_rows))
        write_text_atomic(work / "grades.csv", _csv_text(("case", "label", "grade", "morphology", "height_loss"), grade_rows))
        settings = asdict(config)
        write_json_atomic(
            work / "simulation.json",
            {"version": __version__, "seed": seed, "manifest": str(Path(manifest).resolve()), "config": settings, "cases": records},
        )
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"
