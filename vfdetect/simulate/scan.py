"""One simulated scan: :func:`simulate_scan` and its records (:class:`VertebraOutcome`, :class:`SimulatedScan`).

Loads the scan, finds the frames, plants the drawn fractures, checks that unfractured vertebrae
keep their heights, optionally varies the acquisition, and builds the output images on the
input's grid, header and dtype.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect.errors import InputError, VfdetectError
from vfdetect.simulate.acquisition import _vary_acquisition
from vfdetect.simulate.config import SimulationConfig
from vfdetect.simulate.fracture import _draw_grades, _Fracture, _plant
from vfdetect.simulate.frame import VertebraFrame, _anatomy, _box_of, _centroid
from vfdetect.simulate.inputs import _load_inputs
from vfdetect.simulate.measure import BodyHeights, _measure
from vfdetect.vertebrae import LABEL_NAMES, Vertebra, spine_rank, vertebra_name

_UNFRACTURED_TOLERANCE = 0.03


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
