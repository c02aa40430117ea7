"""Geometric primitives of the renderer: the axis-aligned RAS grid, signed distances, random fields.

:class:`_Grid` gives world coordinates per axis and sub-boxes; the signed-distance functions
(capsule, ellipse), the smooth random field and the coarse-to-fine upsampling are shared by the
spine and torso renderers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


class _Grid:
    """An axis-aligned RAS grid: world coordinate vectors per axis and helpers for sub-boxes."""

    def __init__(self, origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = np.asarray(spacing, dtype=float)
        self.shape = shape
        self.axes = [(self.origin[i] + self.spacing[i] * np.arange(shape[i])).astype(np.float32) for i in range(3)]
        self.ramp = float(np.mean(self.spacing))

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
        start = np.floor((np.asarray(low) - self.origin) / self.spacing).astype(int)
        stop = np.ceil((np.asarray(high) - self.origin) / self.spacing).astype(int) + 1
        start = np.clip(start, 0, self.shape)
        stop = np.clip(stop, 0, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]

    def local(self, box: tuple[slice, slice, slice], centre: np.ndarray, frame: np.ndarray) -> list[np.ndarray]:
        """Coordinates of the box voxels along the rows of ``frame`` (broadcast 3D arrays)."""
        offsets = [self.axes[i][box[i]] - np.float32(centre[i]) for i in range(3)]
        out = []
        for row in frame.astype(np.float32):
            out.append(
                (offsets[0] * row[0])[:, None, None] + (offsets[1] * row[1])[None, :, None] + (offsets[2] * row[2])[None, None, :]
            )
        return out


def _capsule(u: np.ndarray, v: np.ndarray, w: np.ndarray, start: Sequence[float], stop: Sequence[float],
             radius: float, stretch: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Approximate signed distance to a capsule; ``stretch`` > 1 thins it along that axis."""
    p = [(u - start[0]) * stretch[0], (v - start[1]) * stretch[1], (w - start[2]) * stretch[2]]
    d = np.array([(stop[i] - start[i]) * stretch[i] for i in range(3)])
    length2 = float(d @ d) or 1e-9
    s = np.clip((p[0] * d[0] + p[1] * d[1] + p[2] * d[2]) / length2, 0.0, 1.0)
    return np.sqrt((p[0] - s * d[0]) ** 2 + (p[1] - s * d[1]) ** 2 + (p[2] - s * d[2]) ** 2) - radius


def _ellipse_sdf(a: np.ndarray, b: np.ndarray, ra: float | np.ndarray, rb: float | np.ndarray) -> np.ndarray:
    return (np.sqrt((a / ra) ** 2 + (b / rb) ** 2) - 1.0) * np.minimum(ra, rb)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, feature_mm: float) -> np.ndarray:
    """Smooth random field (zero mean, unit sd roughly) with features of about ``feature_mm``."""
    coarse_shape = tuple(max(2, int(math.ceil(n * s / feature_mm)) + 2) for n, s in zip(shape, spacing, strict=True))
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 0.7)
    coarse /= coarse.std() + 1e-6
    coordinates = [np.linspace(0.5, c - 1.5, n, dtype=np.float32) for c, n in zip(coarse_shape, shape, strict=True)]
    # Separable linear interpolation, axis by axis (far cheaper than a 3D map_coordinates).
    out = coarse
    for axis, coordinate in enumerate(coordinates):
        low = np.floor(coordinate).astype(int)
        frac = (coordinate - low).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, low + 1, axis=axis) * frac
    return out.astype(np.float32)


def _upsample(array: np.ndarray, coarse: _Grid, fine: _Grid) -> np.ndarray:
    """Separable linear interpolation of a coarse-grid array onto a finer grid with the same origin."""
    out = array
    for axis in range(3):
        position = (fine.axes[axis] - np.float32(coarse.origin[axis])) / np.float32(coarse.spacing[axis])
        low = np.clip(np.floor(position).astype(int), 0, array.shape[axis] - 2)
        frac = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, low + 1, axis=axis) * frac
    return np.ascontiguousarray(out, dtype=np.float32)
