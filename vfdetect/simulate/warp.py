"""The fold-free deformation that collapses one vertebral body, and its Jacobian.

:func:`_plan_geometry` finds, per column along the superior axis, the knots of the piecewise
linear displacement (caudal neighbour top, body bottom, body top, cranial neighbour bottom) on a
sub-box around the vertebra; :func:`_footprints` spreads the endplate travel of a morphology over
the body's cross-section; :func:`_displacement` builds the smoothed backward displacement, whose
Jacobian determinant :func:`_min_jacobian` reports; :func:`_warp` resamples an array through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.simulate.config import MORPHOLOGIES
from vfdetect.simulate.frame import VertebraFrame, _neighbours, _world
from vfdetect.simulate.measure import _sample
from vfdetect.vertebrae import vertebra_name

_SMOOTHING_MM = 0.5
_TAPER_MM = 6.0
_DEFAULT_GAP_MM = 8.0
_MIN_GAP_MM = 0.5
_MAX_STRETCH = 9.0


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
