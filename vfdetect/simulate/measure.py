"""Vertebral-body heights (anterior, middle, posterior) measured along the frame's superior axis.

Each height is the median of three lines 2 mm apart laterally, sampled every 0.1 mm on the
trilinearly interpolated body indicator, so sub-voxel changes count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.simulate.frame import VertebraFrame, _world
from vfdetect.vertebrae import vertebra_name

_LINE_STEP_MM = 0.1
_LATERAL_OFFSETS_MM = (-2.0, 0.0, 2.0)


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
