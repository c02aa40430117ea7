"""Vertebra frames (:class:`VertebraFrame`), neighbours, approximate bodies, and world/voxel helpers.

A frame's ``superior`` axis joins the caudal to the cranial neighbour's centroid, ``anterior`` is
the body centroid minus the whole-vertebra centroid made orthogonal to it; without a body mask the
body is approximated as the part of the vertebra anterior of its centre of mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vfdetect.simulate.inputs import _Inputs
from vfdetect.vertebrae import SPINE_ORDER, spine_rank

# Labels a neighbour may skip: T13 and L6 are transitional vertebrae most spines lack.
_OPTIONAL_LABELS = frozenset({25, 28})


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
