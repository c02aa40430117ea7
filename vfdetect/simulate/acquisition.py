"""Acquisition changes of a simulated copy (``--vary-acquisition``): crop, noise, rotation, orientation, dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from vfdetect.simulate.config import SimulationConfig
from vfdetect.simulate.frame import _unit, _world

_ORIENTATIONS = ("LPS", "PIR", "RAS", "LAS", "RPI")


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
