"""Planting one fracture: grade and morphology draws, amplitude bisection to a Genant band, compaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.simulate.config import GENANT_BANDS, MORPHOLOGIES, SimulationConfig
from vfdetect.simulate.frame import VertebraFrame
from vfdetect.simulate.measure import BodyHeights, _heights, _measuring_points
from vfdetect.simulate.warp import (
    _displacement,
    _footprints,
    _min_jacobian,
    _Morphology,
    _plan_geometry,
    _source_coordinates,
    _warp,
    _WarpGeometry,
)
from vfdetect.vertebrae import spine_rank, vertebra_name

# Targets drawn inside each band, away from its edges, so that the measured loss lands inside it.
_TARGET_BANDS: dict[int, tuple[float, float]] = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.57)}
_LOSS_TOLERANCE = 0.005


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
