"""Vertebra localisation in a probability map, when no centroids are given, and its VerSe scores.

Numpy/scipy only. A map is anything with ``.array`` (3D) and ``.affine`` (voxel index -> world RAS
mm), such as a :class:`vfdetect.volume.Volume`; positions are in world millimetres.

:func:`localise_vertebrae` finds vertebral bodies in p(vertebra) = p(normal) + p(fracture)
(:func:`find_vertebral_bodies`) and names them from an anchor level (:func:`name_from_anchor`) or,
coarsely, from their spacing (:func:`name_by_spacing`); :func:`identification` scores the result
with the VerSe identification rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.frame import block_affine, nonzero_box
from vfdetect.vertebrae import LABEL_NAMES, Vertebra, vertebra_label

NAMING_ORDER: tuple[int, ...] = (*range(1, 8), *range(8, 20), *range(20, 25), 26, 29)
"""The usual sequence used to name localised vertebrae: C1-C7, T1-T12, L1-L5, S1, S2."""

TYPICAL_GAP_MM: dict[int, float] = {
    1: 15.0, 2: 20.0, 3: 17.0, 4: 17.0, 5: 17.0, 6: 17.0, 7: 18.0,
    8: 20.0, 9: 20.0, 10: 21.0, 11: 21.0, 12: 22.0, 13: 23.0, 14: 24.0, 15: 25.0, 16: 26.0, 17: 27.0,
    18: 28.0, 19: 31.0,
    20: 34.0, 21: 36.0, 22: 37.0, 23: 37.0, 24: 35.0, 26: 25.0,
}  # fmt: skip
"""Approximate adult centroid-to-centroid distance from a level to the next caudal one (mm).

Used only to guess names when no anchor level is given; the guess is coarse (see
:func:`name_by_spacing`).
"""


def map_array_and_affine(volume: Any) -> tuple[np.ndarray, np.ndarray]:
    """The 3D array and 4x4 affine of a probability map (anything with ``.array`` and ``.affine``)."""
    array = np.asarray(volume.array)
    affine = np.asarray(volume.affine, dtype=np.float64)
    if array.ndim != 3:
        raise VfdetectError(f"a probability map must be 3D, got shape {array.shape}")
    if affine.shape != (4, 4):
        raise VfdetectError("a probability map needs a 4x4 affine")
    return array, affine


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid with this affine."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


@dataclass(frozen=True)
class LocalisationConfig:
    """Parameters of :func:`localise_vertebrae` (lengths in mm)."""

    smoothing_sigma_mm: float = 1.5
    threshold: float = 0.5
    opening_radius_mm: float = 1.0
    min_volume_mm3: float = 300.0
    min_volume_fraction: float = 0.15
    split_ratio: float = 1.6
    waist_ratio_length: float = 1.2
    waist_min_part: float = 0.35
    waist_depth: float = 0.6
    chain_min_step_mm: float = 8.0
    chain_max_step_mm: float = 100.0
    chain_lateral_mm: float = 12.0
    chain_lateral_slope: float = 0.35
    chain_ap_mm: float = 15.0
    chain_ap_slope: float = 0.6
    fragment_gap_fraction: float = 0.6
    fragment_span_fraction: float = 1.3

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise VfdetectError("localisation threshold must lie in (0, 1)")
        if self.smoothing_sigma_mm < 0 or self.opening_radius_mm < 0 or self.min_volume_mm3 < 0:
            raise VfdetectError("localisation lengths and volumes must be >= 0")
        if self.split_ratio <= 1.0:
            raise VfdetectError("split_ratio must be > 1")
        if not 0 <= self.chain_min_step_mm < self.chain_max_step_mm:
            raise VfdetectError("chain steps must satisfy 0 <= chain_min_step_mm < chain_max_step_mm")


@dataclass(frozen=True)
class _Body:
    voxels: np.ndarray  # (N, 3) voxel indices
    weights: np.ndarray  # (N,) probabilities


def _ball(radius_voxels: np.ndarray) -> np.ndarray:
    extent = np.ceil(radius_voxels).astype(int)
    axes = [np.arange(-e, e + 1) / max(r, 1e-6) for e, r in zip(extent, radius_voxels, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return (grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2) <= 1.0


def _split_body(body: _Body, axis_vox: np.ndarray, parts: int) -> list[_Body]:
    """Split a merged body into ``parts`` pieces at the narrowest cross-sections along the spine axis."""
    projection = body.voxels @ axis_vox
    low, high = projection.min(), projection.max()
    bins = max(int(np.ceil(high - low)) + 1, parts * 2)
    histogram, edges = np.histogram(projection, bins=bins, range=(low, high + 1e-6))
    histogram = ndimage.gaussian_filter1d(histogram.astype(np.float64), 1.0)
    cuts: list[float] = []
    length = high - low
    for part in range(1, parts):
        # Look for the narrowest slice near the expected cut (equal split), within a third of a part.
        expected = low + length * part / parts
        window = length / parts / 3.0
        centres = (edges[:-1] + edges[1:]) / 2.0
        candidates = np.where(np.abs(centres - expected) <= window)[0]
        if candidates.size == 0:
            cuts.append(expected)
            continue
        cuts.append(float(centres[candidates[np.argmin(histogram[candidates])]]))
    assignment = np.searchsorted(np.asarray(cuts), projection)
    pieces = []
    for part in range(parts):
        chosen = assignment == part
        if chosen.any():
            pieces.append(_Body(body.voxels[chosen], body.weights[chosen]))
    return pieces


def _split_at_waists(body: _Body, axis_vox: np.ndarray, min_part: float, max_ratio: float) -> list[_Body]:
    """Split a body recursively where its cross-section along the spine axis narrows to a waist.

    A waist is an interior slice whose area is below ``max_ratio`` times the smaller of the largest
    areas on either side, with at least ``min_part`` (voxel units along the axis) on each side.
    """
    projection = body.voxels @ axis_vox
    low = projection.min()
    bins = int(np.ceil(projection.max() - low)) + 1
    if bins < 2 * min_part + 1:
        return [body]
    index = np.clip(np.floor(projection - low).astype(int), 0, bins - 1)
    profile = ndimage.gaussian_filter1d(np.bincount(index, minlength=bins).astype(np.float64), 1.0)
    best_ratio, best_cut = np.inf, -1
    first, last = int(np.ceil(min_part)), bins - int(np.ceil(min_part))
    for cut in range(first, last):
        ratio = profile[cut] / max(min(profile[:cut].max(), profile[cut + 1 :].max()), 1e-9)
        if ratio < best_ratio:
            best_ratio, best_cut = ratio, cut
    if best_cut < 0 or best_ratio >= max_ratio:
        return [body]
    below = index < best_cut
    above = index > best_cut
    parts = []
    for chosen in (below, above):
        if chosen.any():
            part = _Body(body.voxels[chosen], body.weights[chosen])
            parts.extend(_split_at_waists(part, axis_vox, min_part, max_ratio))
    return parts


def spine_chain(centres_mm: np.ndarray, masses: np.ndarray, config: LocalisationConfig = LocalisationConfig()) -> list[int]:
    """Indices of the bodies that form the vertebral column: the best chain from head to foot.

    Bone-like structures off the column (iliac wings, femoral heads, the sternum, rib heads) can
    look like vertebral bodies to the network. The column is a chain along world z (superior-
    inferior) whose consecutive bodies are ``chain_min_step_mm``-``chain_max_step_mm`` apart along
    z (a merged pair or a missed body still fits), shifted sideways (x) by at most
    ``chain_lateral_mm + chain_lateral_slope * dz`` and front-to-back (y) by at most
    ``chain_ap_mm + chain_ap_slope * dz`` (lordosis, kyphosis and the sacrum's tilt). Each body
    counts 1 plus its mass relative to the median body (at most 1 more), so the longest chain wins
    and mass breaks ties; the best chain is found by dynamic programming over the bodies sorted by z.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    count = len(centres)
    if count <= 1:
        return list(range(count))
    masses = np.asarray(masses, dtype=np.float64)
    value = 1.0 + np.clip(masses / max(float(np.median(masses)), 1e-9), 0.0, 1.0)
    order = np.argsort(-centres[:, 2], kind="stable")
    best = value[order].copy()
    previous = np.full(count, -1)
    for j in range(count):
        for i in range(j):
            a, b = centres[order[i]], centres[order[j]]
            dz = a[2] - b[2]
            if not config.chain_min_step_mm <= dz <= config.chain_max_step_mm:
                continue
            if abs(a[0] - b[0]) > config.chain_lateral_mm + config.chain_lateral_slope * dz:
                continue
            if abs(a[1] - b[1]) > config.chain_ap_mm + config.chain_ap_slope * dz:
                continue
            if best[i] + value[order[j]] > best[j] + 1e-12:
                best[j], previous[j] = best[i] + value[order[j]], i
    end = int(np.argmax(best))
    chain = []
    while end >= 0:
        chain.append(int(order[end]))
        end = int(previous[end])
    return sorted(chain)


def drop_fragments(centres_mm: np.ndarray, masses: np.ndarray, config: LocalisationConfig = LocalisationConfig()) -> list[int]:
    """Indices of the bodies of a chain that remain once fragments are dropped.

    A fragment (a piece of a body, or a disc the network half believes in) lies much closer to a
    neighbour than the local spacing (the median distance between nearby consecutive bodies, not
    counting the gaps next to it): for a body between two others, its position along the chord
    from one neighbour to the other is less than ``fragment_gap_fraction`` of the spacing from
    either end while the chord is at most ``fragment_span_fraction`` of the spacing long (the
    neighbours are about one spacing apart); for a body at an end of the chain, its distance to
    its neighbour is less than ``fragment_gap_fraction`` of the spacing. The lightest such body is
    dropped, and the test repeated.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    masses = np.asarray(masses, dtype=np.float64)
    kept = sorted(range(len(centres)), key=lambda k: -centres[k, 2])
    while len(kept) >= 4:
        points = centres[kept]
        gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
        candidates = []
        for r in range(len(kept)):
            touching = {r - 1, r}
            nearby = [gaps[g] for g in range(max(0, r - 3), min(len(gaps), r + 3)) if g not in touching]
            if not nearby:
                continue
            spacing = float(np.median(nearby))
            if 0 < r < len(kept) - 1:
                chord = points[r + 1] - points[r - 1]
                span = float(np.linalg.norm(chord))
                if span > config.fragment_span_fraction * spacing or span == 0.0:
                    continue
                along = float(np.dot(points[r] - points[r - 1], chord / span))
                nearest = min(along, span - along)
            else:
                nearest = float(gaps[r - 1] if r > 0 else gaps[r])
            if nearest < config.fragment_gap_fraction * spacing:
                candidates.append(r)
        if not candidates:
            break
        drop = min(candidates, key=lambda r: masses[kept[r]])
        kept.pop(drop)
    return sorted(kept)


def _crop_to_support(
    array: np.ndarray, affine: np.ndarray, config: LocalisationConfig, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The map cropped to its non-zero voxels plus the reach of the smoothing (4 sigma) and the
    opening, with the affine of the crop: every step after gives the same bodies as on the whole
    map (outside the crop the map is 0 there too), on the small region inference computes."""
    box = nonzero_box(array != 0)
    if box is None:
        return array, affine
    reach_mm = 4.0 * config.smoothing_sigma_mm + config.opening_radius_mm
    margin = np.ceil(reach_mm / spacing).astype(int) + 2
    start = np.maximum(box[0] - margin, 0)
    stop = np.minimum(box[1] + margin, np.array(array.shape))
    if not start.any() and np.array_equal(stop, array.shape):
        return array, affine
    return array[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]], block_affine(affine, start)


def find_vertebral_bodies(
    vertebra_probability: Any, config: LocalisationConfig = LocalisationConfig()
) -> list[np.ndarray]:
    """Centroids (world mm, (3,) arrays) of the vertebral bodies in a p(vertebra) map, unordered.

    Steps: Gaussian smoothing; threshold; a small opening to cut thin bridges between bodies;
    26-connected components, dropping those smaller than ``min_volume_mm3`` or
    ``min_volume_fraction`` of the median body; the spine axis is the principal axis of the body
    centroids (superior-inferior when fewer than three); a body longer along that axis than
    ``waist_ratio_length`` times the median length of its neighbours (two on each side along the
    spine, as bodies grow caudally) is split where its cross-section narrows to a waist (below
    ``waist_depth`` of the areas on either side, each part at least ``waist_min_part`` of that
    length long), recursively; one still longer than ``split_ratio`` times that length is cut at
    its narrowest cross-sections into as many bodies as its length holds at the neighbours'
    spacing; each centroid is the probability-weighted mean position. Only the bodies on the
    vertebral column are kept (:func:`spine_chain`, before and after splitting), and fragments are
    dropped (:func:`drop_fragments`).
    """
    array, affine = map_array_and_affine(vertebra_probability)
    spacing = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    array, affine = _crop_to_support(array, affine, config, spacing)
    probability = np.asarray(array, dtype=np.float32)
    if config.smoothing_sigma_mm > 0:
        probability = ndimage.gaussian_filter(probability, sigma=tuple(config.smoothing_sigma_mm / spacing))
    mask = probability >= config.threshold
    if config.opening_radius_mm > 0 and mask.any():
        opened = ndimage.binary_opening(mask, structure=_ball(config.opening_radius_mm / spacing))
        if opened.any():
            mask = opened
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    voxel_mm3 = voxel_volume_mm3(affine)
    sizes = np.bincount(labels.ravel())[1:] * voxel_mm3
    keep = sizes >= config.min_volume_mm3
    if keep.any():
        median = float(np.median(sizes[keep]))
        keep &= sizes >= config.min_volume_fraction * median
    bodies: list[_Body] = []
    objects = ndimage.find_objects(labels)
    for index in np.nonzero(keep)[0]:
        box = objects[index]
        local = labels[box] == index + 1
        voxels = np.argwhere(local) + np.array([s.start for s in box])
        weights = probability[tuple(voxels.T)].astype(np.float64)
        bodies.append(_Body(voxels, weights))
    if not bodies:
        return []

    linear = affine[:3, :3]

    def centre_mm(body: _Body) -> np.ndarray:
        voxel = np.average(body.voxels, axis=0, weights=body.weights)
        return linear @ voxel + affine[:3, 3]

    centres = np.array([centre_mm(body) for body in bodies])
    chain = spine_chain(centres, np.array([body.weights.sum() for body in bodies]), config)
    bodies, centres = [bodies[k] for k in chain], centres[chain]
    axis_mm = np.array([0.0, 0.0, 1.0])
    if len(centres) >= 3:
        _, _, vt = np.linalg.svd(centres - centres.mean(axis=0), full_matrices=False)
        axis_mm = vt[0] / np.linalg.norm(vt[0])
    # Direction of the spine axis in voxel units (projection of a voxel index onto the axis in mm).
    axis_vox = linear.T @ axis_mm
    lengths = np.array([np.ptp(body.voxels @ axis_vox) + 1.0 for body in bodies])
    # Bodies grow from the neck to the sacrum, so each body is compared with its neighbours along
    # the spine (up to two on each side): their median length, and their median centre-to-centre
    # spacing not counting the gaps next to the body itself (which a merge would inflate). A run
    # of k merged bodies is about length + (k - 1) * spacing long.
    along = centres @ axis_mm
    order = np.argsort(along)
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))
    sorted_positions = along[order]
    global_length = float(np.median(lengths))
    global_gaps = np.diff(sorted_positions)
    global_spacing = float(np.median(global_gaps)) if len(global_gaps) >= 2 else global_length / 0.65
    split: list[_Body] = []
    for body_index, (body, length) in enumerate(zip(bodies, lengths, strict=True)):
        r = int(rank[body_index])
        neighbours = [order[j] for j in range(max(0, r - 2), min(len(order), r + 3)) if j != r]
        local_length = float(np.median(lengths[neighbours])) if neighbours else global_length
        gaps = [sorted_positions[j + 1] - sorted_positions[j] for j in range(max(0, r - 2), min(len(order) - 1, r + 2))
                if j + 1 != r and j != r]
        local_spacing = float(np.median(gaps)) if gaps else global_spacing
        local_spacing = max(local_spacing, local_length)
        if length > config.waist_ratio_length * local_length or length > 60.0:
            pieces = _split_at_waists(body, axis_vox, config.waist_min_part * local_length, config.waist_depth)
            if len(pieces) > 1:
                split.extend(pieces)
                continue
        parts = 1 + int(round((length - local_length) / local_spacing))
        if len(bodies) >= 2 and length > config.split_ratio * local_length and parts >= 2:
            split.extend(_split_body(body, axis_vox, parts))
        elif len(bodies) == 1 and length > 60.0:
            # A single merged column: split at the typical adult body spacing.
            parts = max(2, int(round(length / 30.0)))
            split.extend(_split_body(body, axis_vox, parts))
        else:
            split.append(body)
    centres = np.array([centre_mm(body) for body in split])
    masses = np.array([body.weights.sum() for body in split])
    chain = spine_chain(centres, masses, config)
    kept = [chain[k] for k in drop_fragments(centres[chain], masses[chain], config)]
    return [centres[k] for k in kept]


def order_along_spine(centres_mm: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Centres sorted cranio-caudally (superior first, by world z)."""
    return sorted((np.asarray(c, dtype=np.float64) for c in centres_mm), key=lambda c: -float(c[2]))


def name_from_anchor(count: int, anchor_level: str | int, anchor_position: str = "lowest") -> list[int]:
    """Labels of ``count`` cranio-caudally ordered vertebrae whose lowest (or highest) is ``anchor_level``."""
    anchor = anchor_level if isinstance(anchor_level, int) else vertebra_label(anchor_level)
    if anchor not in NAMING_ORDER:
        raise VfdetectError(
            f"anchor level {LABEL_NAMES.get(anchor, anchor)} is not in the naming sequence C1-C7, T1-T12, L1-L5, S1, S2"
        )
    position = NAMING_ORDER.index(anchor)
    first = position - (count - 1) if anchor_position == "lowest" else position
    if anchor_position not in ("lowest", "highest"):
        raise VfdetectError("anchor_position must be 'lowest' or 'highest'")
    if first < 0 or first + count > len(NAMING_ORDER):
        raise VfdetectError(
            f"{count} vertebrae with the {anchor_position} at {LABEL_NAMES[anchor]} do not fit in C1-S2"
        )
    return list(NAMING_ORDER[first : first + count])


def name_by_spacing(centres_mm: Sequence[np.ndarray]) -> list[int]:
    """Guess labels of ordered vertebrae from the distances between neighbours.

    Vertebrae grow taller from the neck to the lumbar spine; the measured gaps are matched
    against :data:`TYPICAL_GAP_MM` at every possible position of the top vertebra, with a scale
    factor between 0.8 and 1.25 for body size, and the best least-squares fit (in log distance)
    wins. With fewer than two vertebrae, or when nothing fits, the lowest is called L5 (abdominal
    scans most often end there). This is a coarse guess: give an anchor level whenever possible.
    """
    count = len(centres_mm)
    levels = [label for label in NAMING_ORDER if label in TYPICAL_GAP_MM or label == 29]
    fallback = name_from_anchor(count, "L5") if count <= NAMING_ORDER.index(24) + 1 else list(NAMING_ORDER[:count])
    if count < 3:
        return fallback
    gaps = np.array([np.linalg.norm(centres_mm[i + 1] - centres_mm[i]) for i in range(count - 1)])
    if np.any(gaps <= 0):
        return fallback
    log_gaps = np.log(gaps)
    best: tuple[float, int] | None = None
    for first in range(0, len(NAMING_ORDER) - count + 1):
        labels = NAMING_ORDER[first : first + count]
        if any(label not in TYPICAL_GAP_MM for label in labels[:-1]):
            continue
        expected = np.log([TYPICAL_GAP_MM[label] for label in labels[:-1]])
        scale = float(np.clip(np.mean(log_gaps - expected), math.log(0.8), math.log(1.25)))
        error = float(np.mean((log_gaps - expected - scale) ** 2))
        if best is None or error < best[0] - 1e-12:
            best = (error, first)
    del levels
    if best is None:
        return fallback
    return list(NAMING_ORDER[best[1] : best[1] + count])


def localise_vertebrae(
    vertebra_probability: Any,
    anchor_level: str | int | None = None,
    config: LocalisationConfig = LocalisationConfig(),
) -> list[Vertebra]:
    """Vertebrae found in a p(vertebra) = p(normal) + p(fracture) map, named and ordered cranio-caudally.

    Bodies are found by :func:`find_vertebral_bodies`. With ``anchor_level`` (e.g. ``"L5"``) the
    lowest body found gets that name and the others the names above it; otherwise names are
    guessed from the spacing of the bodies (:func:`name_by_spacing`, unreliable: the positions
    are sound, the names often off by one or more levels).
    """
    centres = order_along_spine(find_vertebral_bodies(vertebra_probability, config))
    if not centres:
        return []
    if len(centres) > len(NAMING_ORDER):
        centres = centres[-len(NAMING_ORDER) :]
    if anchor_level is not None:
        labels = name_from_anchor(len(centres), anchor_level)
    else:
        labels = name_by_spacing(centres)
    return [Vertebra(label, tuple(float(v) for v in centre)) for label, centre in zip(labels, centres, strict=True)]  # type: ignore[arg-type]


def identification(
    predicted: Sequence[Vertebra], truth: Sequence[Vertebra], radius_mm: float = 20.0
) -> dict[str, float]:
    """VerSe identification rate and localisation error.

    A true vertebra is identified when a predicted vertebra carries its label, lies within
    ``radius_mm`` of it, and the true vertebra is the nearest true centroid to that prediction.
    Returns ``identification_rate`` (identified / true), ``mean_error_mm`` (distance between
    same-label pairs, over the labels both lists have), ``detection_rate`` (true vertebrae with
    any prediction within ``radius_mm``, names ignored) and the counts.
    """
    truth_positions = np.array([v.position_mm for v in truth], dtype=np.float64).reshape(-1, 3)
    truth_labels = [v.label for v in truth]
    by_label = {v.label: np.asarray(v.position_mm) for v in predicted}
    identified = 0
    errors = []
    for index, vertebra in enumerate(truth):
        if vertebra.label not in by_label:
            continue
        position = by_label[vertebra.label]
        distance = float(np.linalg.norm(position - truth_positions[index]))
        errors.append(distance)
        nearest = int(np.argmin(np.linalg.norm(truth_positions - position, axis=1)))
        if distance <= radius_mm and truth_labels[nearest] == vertebra.label:
            identified += 1
    detected = 0
    predicted_positions = np.array([v.position_mm for v in predicted], dtype=np.float64).reshape(-1, 3)
    nearest_distances = []
    for position in truth_positions:
        if len(predicted_positions):
            distance = float(np.min(np.linalg.norm(predicted_positions - position, axis=1)))
            nearest_distances.append(distance)
            detected += distance <= radius_mm
    return {
        "identification_rate": identified / len(truth) if truth else float("nan"),
        "mean_error_mm": float(np.mean(errors)) if errors else float("nan"),
        "detection_rate": detected / len(truth) if truth else float("nan"),
        "mean_nearest_error_mm": float(np.mean(nearest_distances)) if nearest_distances else float("nan"),
        "identified": float(identified),
        "true": float(len(truth)),
        "predicted": float(len(predicted)),
    }
