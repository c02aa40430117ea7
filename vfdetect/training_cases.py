"""Training cases: scans and label images on the internal grid, padded and indexed for sampling, class centres.

Steps 1, 3 and 4 of :mod:`vfdetect.sampling`'s pipeline: a case is loaded (:func:`load_training_case`),
reflect-padded by the network's margin and its class voxels indexed (:func:`prepare_case`); segments
are shared between cases (:func:`distribute_to_classes` within a case) and centres drawn uniformly
over a class's valid centres (:func:`sample_centres`). Arrays are indexed ``[x, y, z]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.geometry import NetworkGeometry, centre_bounds, corner_mean, pad_volume
from vfdetect.labels import IGNORE as IGNORE_LABEL

if TYPE_CHECKING:  # pragma: no cover - typing only
    from vfdetect.vertebrae import Case

N_CLASSES = 3
CLASS_NAMES = ("background", "normal", "fracture")

# A class covering at least this fraction of the valid centres is sampled by rejection (drawing
# uniform centres and keeping those of the class) instead of storing its voxel indices, which
# would cost 4-8 bytes per voxel for the background of a full-size CT.
_REJECTION_MIN_FRACTION = 0.25

ShapeLike = Sequence[int]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One case in the internal frame: z-scored image and its 0/1/2 label image on the same grid.

    ``class_voxels`` (optional, as stored in the preprocessing cache): for every non-background label
    value present, the sorted flat C-order indices of its voxels in ``labels``; :func:`prepare_case`
    then finds the class voxels without scanning the volume.
    """

    case: str
    image: np.ndarray  # float32, normalised, internal frame [x, y, z]
    labels: np.ndarray  # uint8, 0 background / 1 normal / 2 fracture, same shape
    source: str = ""  # the data source (manifest ``source`` column), for reporting shares
    weight: float = 1.0  # relative share of training draws (manifest ``weight`` column)
    class_voxels: Mapping[int, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape != self.labels.shape:
            raise VfdetectError(
                f"case {self.case}: image {self.image.shape} and labels {self.labels.shape} must be 3D and equal"
            )
        _check_weight(self.case, self.weight)
        object.__setattr__(self, "weight", float(self.weight))


def _check_weight(case: str, weight: float) -> None:
    if not (math.isfinite(float(weight)) and float(weight) > 0):
        raise VfdetectError(f"case {case}: the sampling weight must be a positive number, got {weight}")


def load_training_case(
    case: Case, labels_dir: Path | None, spacing: float = 1.0, cache_dir: Path | None = None
) -> TrainingCase:
    """``case``'s normalised image and label image on the internal grid, ready for sampling.

    The image is :func:`vfdetect.preprocess.prepare_scan`'s (the very array prediction feeds the
    network); the labels are :func:`vfdetect.preprocess.training_labels`' (ellipsoids drawn on the
    internal grid from the centroids with the label folder's settings, or the folder's label image
    resampled nearest-neighbour for cases without centroids). With ``cache_dir`` both are read
    memory-mapped from the preprocessing cache, the case being prepared and added first when it is
    missing there or stale. Nothing on the source grid is kept. Raises :class:`InputError` naming
    the label file when it is needed and missing, not on the scan's grid, or holds values other
    than 0, 1, 2 and 255.
    """
    from vfdetect.preprocess import cached_case, prepare_scan, training_labels

    source, weight = str(getattr(case, "source", "")), float(getattr(case, "weight", 1.0))
    if cache_dir is not None:
        cached = cached_case(cache_dir, case, labels_dir, spacing)
        return TrainingCase(
            case.case, cached.image, cached.labels, source=source, weight=weight, class_voxels=cached.class_voxels
        )
    scan = prepare_scan(case.image, spacing=spacing)
    labels = training_labels(case, scan, labels_dir)
    image = scan.image
    del scan  # HU and body mask are not needed for training
    return TrainingCase(case.case, image, labels, source=source, weight=weight)


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """A case ready for sampling: padded image and labels plus the per-class centre lookup.

    ``centre_low``/``centre_high`` bound (``high`` exclusive) the valid centres in padded
    coordinates for ``hr_shape``; ``class_counts[c]`` counts the voxels of class ``c`` among them;
    ``class_indices[c]`` holds their flat indices within that box, or ``None`` when the class is
    common enough to be drawn by rejection. ``source`` and ``weight`` come from the
    :class:`TrainingCase`.
    """

    case: str
    padded_image: np.ndarray
    padded_labels: np.ndarray
    fill_value: float
    hr_shape: tuple[int, int, int]
    centre_low: tuple[int, int, int]
    centre_high: tuple[int, int, int]
    class_counts: tuple[int, ...]
    class_indices: tuple[np.ndarray | None, ...] = field(repr=False)
    source: str = ""
    weight: float = 1.0

    @property
    def present_classes(self) -> tuple[int, ...]:
        """Classes with at least one valid centre voxel."""
        return tuple(c for c, n in enumerate(self.class_counts) if n > 0)


def valid_centre_bounds(padded_shape: ShapeLike, hr_shape: ShapeLike) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Lowest and one-past-highest centre (padded coordinates) whose HR segment fits the volume.

    The segment of centre ``c`` starts at ``c - (s - 1) // 2`` (for even sizes the centre is one
    voxel toward the start, as in DeepMedic); see :func:`vfdetect.geometry.centre_bounds`. Empty
    bounds (``high <= low`` on some axis) mean no centre fits.
    """
    low, upper = centre_bounds(padded_shape, hr_shape)
    return tuple(low), tuple(u + 1 for u in upper)


def prepare_case(case: TrainingCase, geometry: NetworkGeometry, hr_shape: ShapeLike = (25, 25, 25)) -> PreparedCase:
    """Reflect-pad ``case`` by the network margin and index its class voxels among the valid centres."""
    hr_shape = tuple(int(s) for s in hr_shape)
    geometry.output_shape(hr_shape)  # raises when the segment is smaller than the receptive field
    if case.labels.size and (int(case.labels.min()) < 0 or int(case.labels.max()) > IGNORE_LABEL):
        raise VfdetectError(f"case {case.case}: label values must be 0, 1, 2 or {IGNORE_LABEL} (ignored)")
    padded_image = np.asarray(pad_volume(case.image, geometry, min_shape=hr_shape), dtype=np.float32)
    padded_labels = np.asarray(pad_volume(case.labels, geometry, min_shape=hr_shape), dtype=np.uint8)
    low, high = valid_centre_bounds(padded_image.shape, hr_shape)
    box_slices = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    box_size = int(np.prod([max(0, hi - lo) for lo, hi in zip(low, high, strict=True)]))
    class_voxels = _box_class_voxels(case, geometry, low, high)
    if class_voxels is None:
        box = padded_labels[box_slices]
        counts = np.bincount(box.ravel(), minlength=N_CLASSES)[:N_CLASSES]
    else:
        found = [int(voxels.size) for voxels in class_voxels.values()]
        counts = np.array(
            [box_size - sum(found), *(class_voxels.get(c, np.zeros(0)).size for c in range(1, N_CLASSES))]
        )
    indices: list[np.ndarray | None] = []
    for label, count in enumerate(counts):
        if count == 0 or count >= _REJECTION_MIN_FRACTION * box_size:
            indices.append(None)
            continue
        if class_voxels is not None and label in class_voxels:
            flat = class_voxels[label]
        else:
            flat = np.flatnonzero(padded_labels[box_slices].ravel() == label)
        indices.append(flat.astype(np.int32) if box_size < 2**31 else flat)
    return PreparedCase(
        case=case.case,
        padded_image=padded_image,
        padded_labels=padded_labels,
        fill_value=float(corner_mean(case.image)),
        hr_shape=hr_shape,  # type: ignore[arg-type]
        centre_low=low,  # type: ignore[arg-type]
        centre_high=high,  # type: ignore[arg-type]
        class_counts=tuple(int(n) for n in counts),
        class_indices=tuple(indices),
        source=case.source,
        weight=case.weight,
    )


def _box_class_voxels(
    case: TrainingCase, geometry: NetworkGeometry, low: Sequence[int], high: Sequence[int]
) -> dict[int, np.ndarray] | None:
    """``case.class_voxels`` as flat indices within the valid-centre box ``[low, high)`` (padded
    coordinates), per non-background value; None without them or when the box reaches into the
    padding (then the box is scanned instead)."""
    if case.class_voxels is None:
        return None
    before = np.array([pair[0] for pair in geometry.margin()], dtype=np.int64)
    start = np.asarray(low, dtype=np.int64) - before
    stop = np.asarray(high, dtype=np.int64) - before
    if np.any(start < 0) or np.any(stop > np.asarray(case.labels.shape)) or np.any(stop <= start):
        return None
    box_shape = tuple(int(n) for n in stop - start)
    result: dict[int, np.ndarray] = {}
    for value, voxels in case.class_voxels.items():
        coordinates = np.stack(np.unravel_index(np.asarray(voxels, dtype=np.int64), case.labels.shape), axis=1)
        coordinates -= start
        inside = np.all((coordinates >= 0) & (coordinates < np.asarray(box_shape)), axis=1)
        result[int(value)] = np.ravel_multi_index(tuple(coordinates[inside].T), box_shape).astype(np.int64)
    return result


# --------------------------------------------------------------------------------------------
# Centres
# --------------------------------------------------------------------------------------------


def distribute_to_classes(
    n_samples: int, weights: Sequence[float], present: Sequence[bool], rng: np.random.Generator
) -> np.ndarray:
    """Samples per class: ``floor(n * p_c)`` then the leftovers drawn in proportion to ``p``.

    Absent classes get ``p_c = 0`` and the remaining weights are renormalised. Raises
    :class:`VfdetectError` when no class with a positive weight is present.
    """
    p = np.asarray(weights, dtype=np.float64) * np.asarray(present, dtype=bool)
    if p.sum() <= 0:
        raise VfdetectError("no class with a positive sampling weight is present")
    p = p / p.sum()
    counts = np.floor(n_samples * p + 1e-9).astype(np.int64)
    leftover = int(n_samples - counts.sum())
    if leftover > 0:
        counts += np.bincount(rng.choice(p.size, size=leftover, p=p), minlength=p.size)
    return counts


def sample_centres(prepared: PreparedCase, label: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``n_samples`` centres ``(n, 3)`` in padded coordinates, uniform with replacement over the
    voxels of class ``label`` whose HR segment fits the padded volume."""
    if n_samples == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if prepared.class_counts[label] == 0:
        raise VfdetectError(f"case {prepared.case}: class {CLASS_NAMES[label]} has no valid centre")
    low = np.asarray(prepared.centre_low, dtype=np.int64)
    high = np.asarray(prepared.centre_high, dtype=np.int64)
    box_shape = tuple(int(n) for n in high - low)
    indices = prepared.class_indices[label]
    if indices is not None:
        chosen = indices[rng.integers(0, indices.size, size=n_samples)]
        return np.stack(np.unravel_index(chosen, box_shape), axis=1).astype(np.int64) + low
    # Rejection: uniform candidates over the box, keep those of the class, in draw order.
    fraction = prepared.class_counts[label] / float(np.prod(box_shape))
    found: list[np.ndarray] = []
    n_found = 0
    while n_found < n_samples:
        n_candidates = int(math.ceil((n_samples - n_found) / fraction * 1.25)) + 16
        candidates = rng.integers(low, high, size=(n_candidates, 3))
        keep = candidates[prepared.padded_labels[tuple(candidates.T)] == label]
        found.append(keep)
        n_found += len(keep)
    return np.concatenate(found)[:n_samples]


def split_between_cases(
    n_cases: int,
    n_segments: int,
    cases_per_draw: int,
    rng: np.random.Generator,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick up to ``cases_per_draw`` cases and split ``n_segments`` between them.

    Equal (or no) ``weights``: distinct random cases, segments split evenly, the remainder going to
    random cases. Unequal weights: each case's expected share of the segments is proportional to
    its weight. When every case fits in one draw, all are used and the segments split in proportion
    to the weights (floor, then the leftovers drawn by the rounded-off parts); otherwise ``cases_per_draw`` cases
    are drawn with replacement by weight and the segments split evenly between those draws.
    Returns the distinct chosen cases and their segment counts (zero counts possible).
    """
    n_chosen = min(n_cases, cases_per_draw)
    if weights is None or len(set(float(w) for w in weights)) <= 1:
        chosen = rng.choice(n_cases, size=n_chosen, replace=False)
        per_case = np.full(n_chosen, n_segments // n_chosen, dtype=np.int64)
        remainder = n_segments - int(per_case.sum())
        if remainder:
            per_case[rng.choice(n_chosen, size=remainder, replace=False)] += 1
        return chosen, per_case
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    if n_chosen == n_cases:
        exact = n_segments * p
        per_case = np.floor(exact + 1e-9).astype(np.int64)
        leftover = n_segments - int(per_case.sum())
        if leftover > 0:  # drawn in proportion to the rounded-off parts: expected counts are n * p exactly
            rest = np.clip(exact - per_case, 0, None)
            per_case += np.bincount(rng.choice(n_cases, size=leftover, p=rest / rest.sum()), minlength=n_cases)
        return np.arange(n_cases), per_case
    draws = rng.choice(n_cases, size=n_chosen, replace=True, p=p)
    per_draw = np.full(n_chosen, n_segments // n_chosen, dtype=np.int64)
    remainder = n_segments - int(per_draw.sum())
    if remainder:
        per_draw[rng.choice(n_chosen, size=remainder, replace=False)] += 1
    chosen, inverse = np.unique(draws, return_inverse=True)
    return chosen, np.bincount(inverse, weights=per_draw, minlength=len(chosen)).astype(np.int64)
