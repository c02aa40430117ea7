"""Training and validation segments: class-weighted centre sampling, augmentation and tf.data wiring.

The pipeline follows DeepMedic's per-class sampling as used by the paper (see
``deepmedic_spec.md`` sections 3 and 4):

1. Each training case is resampled to the internal frame, z-scored over the body and reflect-padded
   by the network's margin (:func:`prepare_case`).
2. Per subepoch, up to ``cases_per_subepoch`` random cases are picked and the segments are split
   evenly between them, the remainder going to random cases (:func:`draw_subepoch`).
3. Within a case, class ``c`` (0 background, 1 normal vertebra, 2 fractured vertebra) receives
   ``floor(n * p_c)`` segments and the leftovers are drawn in proportion to ``p``; a class absent
   from the case gets ``p_c = 0`` and the others are renormalised (:func:`distribute_to_classes`).
4. Centres are drawn with replacement, uniformly over the class's voxels among the valid centres of
   the padded volume (those whose whole high-resolution segment fits, :func:`sample_centres`).
5. Each sample is the high-resolution (HR) segment, its decimated low-resolution (LR) context and
   the label block of the network's output size; intensity noise ``I' = (I + s) * m`` (same ``s``,
   ``m`` for both pathways) and random flips per axis, applied identically to HR, LR and labels.
   All samples of a subepoch are shuffled together.

Every draw comes from a :class:`numpy.random.Generator`; :func:`subepoch_rng` derives it from
``(seed, epoch, subepoch)``, so a given subepoch always yields the same segments whichever thread
draws it and whether or not the run was resumed. Arrays are indexed ``[x, y, z]`` and batches are
``(batch, x, y, z, channel)``.

TensorFlow is imported only inside :func:`segments_dataset` and :func:`make_dataset`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError, refuse_unknown_fields
from vfdetect.geometry import NetworkGeometry, centre_bounds, corner_mean, extract_segments, pad_volume

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorflow as tf

    from vfdetect.vertebrae import Case

N_CLASSES = 3
CLASS_NAMES = ("background", "normal", "fracture")

# Stream tags mixed into the seed so that training and validation draws never share a stream.
_TRAINING_STREAM = 0
_VALIDATION_STREAM = 1

# A class covering at least this fraction of the valid centres is sampled by rejection (drawing
# uniform centres and keeping those of the class) instead of storing its voxel indices, which
# would cost 4-8 bytes per voxel for the background of a full-size CT.
_REJECTION_MIN_FRACTION = 0.25

ShapeLike = Sequence[int]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How training segments are drawn and augmented.

    Attributes:
        hr_shape: high-resolution segment shape ``(x, y, z)``; 25^3 as in the original DeepMedic.
        class_weights: sampling proportions of (background, normal vertebra, fractured vertebra);
            normalised to sum 1. Equal thirds follow DeepMedic's per-class sampling.
        cases_per_subepoch: at most this many random cases contribute to one subepoch (DeepMedic 50).
        noise_shift_sd: standard deviation of the additive intensity shift ``s ~ N(0, sd)``.
        noise_scale_sd: standard deviation of the multiplicative factor ``m ~ N(1, sd)``.
        flip_probability: probability of flipping along x, y and z, each independently.
    """

    hr_shape: tuple[int, int, int] = (25, 25, 25)
    class_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    cases_per_subepoch: int = 50
    noise_shift_sd: float = 0.05
    noise_scale_sd: float = 0.01
    flip_probability: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        hr_shape = tuple(int(n) for n in self.hr_shape)
        if len(hr_shape) != 3 or min(hr_shape) < 1:
            raise VfdetectError(f"hr_shape must be three positive sizes, got {self.hr_shape}")
        object.__setattr__(self, "hr_shape", hr_shape)
        weights = tuple(float(w) for w in self.class_weights)
        if len(weights) != N_CLASSES or min(weights) < 0 or not math.isfinite(sum(weights)) or sum(weights) <= 0:
            raise VfdetectError(
                f"class_weights must be {N_CLASSES} non-negative numbers with a positive sum, got {self.class_weights}"
            )
        object.__setattr__(self, "class_weights", tuple(w / sum(weights) for w in weights))
        if int(self.cases_per_subepoch) < 1:
            raise VfdetectError(f"cases_per_subepoch must be at least 1, got {self.cases_per_subepoch}")
        object.__setattr__(self, "cases_per_subepoch", int(self.cases_per_subepoch))
        if not (self.noise_shift_sd >= 0 and self.noise_scale_sd >= 0):
            raise VfdetectError("noise_shift_sd and noise_scale_sd must be non-negative")
        flips = tuple(float(p) for p in self.flip_probability)
        if len(flips) != 3 or not all(0.0 <= p <= 1.0 for p in flips):
            raise VfdetectError(f"flip_probability must be three probabilities, got {self.flip_probability}")
        object.__setattr__(self, "flip_probability", flips)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (lists for tuples)."""
        return {
            "hr_shape": list(self.hr_shape),
            "class_weights": list(self.class_weights),
            "cases_per_subepoch": self.cases_per_subepoch,
            "noise_shift_sd": self.noise_shift_sd,
            "noise_scale_sd": self.noise_scale_sd,
            "flip_probability": list(self.flip_probability),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        refuse_unknown_fields(cls, values, "sampling setting(s)")
        return cls(
            hr_shape=tuple(values.get("hr_shape", cls.hr_shape)),  # type: ignore[arg-type]
            class_weights=tuple(values.get("class_weights", cls.class_weights)),  # type: ignore[arg-type]
            cases_per_subepoch=int(values.get("cases_per_subepoch", cls.cases_per_subepoch)),
            noise_shift_sd=float(values.get("noise_shift_sd", cls.noise_shift_sd)),
            noise_scale_sd=float(values.get("noise_scale_sd", cls.noise_scale_sd)),
            flip_probability=tuple(values.get("flip_probability", cls.flip_probability)),  # type: ignore[arg-type]
        )


def subepoch_rng(seed: int, epoch: int, subepoch: int, validation: bool = False) -> np.random.Generator:
    """The generator of one subepoch's draws, a pure function of ``(seed, epoch, subepoch)``."""
    stream = _VALIDATION_STREAM if validation else _TRAINING_STREAM
    return np.random.default_rng([int(seed), stream, int(epoch), int(subepoch)])


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One case in the internal frame: z-scored image and its 0/1/2 label image on the same grid."""

    case: str
    image: np.ndarray  # float32, normalised, internal frame [x, y, z]
    labels: np.ndarray  # uint8, 0 background / 1 normal / 2 fracture, same shape

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape != self.labels.shape:
            raise VfdetectError(
                f"case {self.case}: image {self.image.shape} and labels {self.labels.shape} must be 3D and equal"
            )


def _grids_agree(shape_a: ShapeLike, affine_a: np.ndarray, shape_b: ShapeLike, affine_b: np.ndarray) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, rtol=0, atol=1e-3)


def load_training_case(case: Case, labels_dir: Path, spacing: float = 1.0) -> TrainingCase:
    """Load ``case``'s scan and its label image ``labels_dir/<case>_labels.nii.gz`` for training.

    The scan is resampled to the internal frame (linear) and z-scored over its body mask; the label
    image, which must lie on the scan's own grid, is resampled nearest-neighbour onto the same
    internal grid. Raises :class:`InputError` naming the label file when it is missing, not on the
    scan's grid, or holds values other than 0, 1 and 2.
    """
    from vfdetect.labels import label_path
    from vfdetect.volume import load_label_image, load_scan, normalise, to_internal

    label_file = label_path(Path(labels_dir), case.case)
    if not label_file.is_file():
        raise InputError(label_file, f"label image of case {case.case} not found (run synth-labels first?)")
    scan, scan_grid = load_scan(case.image)
    labels, _ = load_label_image(label_file)
    if not _grids_agree(scan.shape, scan.affine, labels.shape, labels.affine):
        raise InputError(
            label_file,
            f"label image grid (shape {tuple(labels.shape)}) is not the grid of the scan {scan_grid.source} "
            f"(shape {tuple(scan.shape)}); label images must be written on the scan's grid",
        )
    lowest, highest = int(labels.array.min()), int(labels.array.max())
    if lowest < 0 or highest >= N_CLASSES:
        raise InputError(label_file, f"label values must be 0, 1 or 2, found values from {lowest} to {highest}")
    internal_scan = to_internal(scan, spacing=spacing, order=1)
    internal_labels = to_internal(labels, spacing=spacing, order=0)
    if not _grids_agree(
        internal_scan.shape, internal_scan.affine, internal_labels.shape, internal_labels.affine
    ):  # pragma: no cover - to_internal is deterministic per grid
        raise InputError(label_file, "label image and scan map to different internal grids")
    image = normalise(np.asarray(internal_scan.array, dtype=np.float32))
    return TrainingCase(
        case=case.case,
        image=np.ascontiguousarray(image, dtype=np.float32),
        labels=np.ascontiguousarray(internal_labels.array, dtype=np.uint8),
    )


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """A case ready for sampling: padded image and labels plus the per-class centre lookup.

    ``centre_low``/``centre_high`` bound (``high`` exclusive) the valid centres in padded
    coordinates for ``hr_shape``; ``class_counts[c]`` counts the voxels of class ``c`` among them;
    ``class_indices[c]`` holds their flat indices within that box, or ``None`` when the class is
    common enough to be drawn by rejection.
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
    if case.labels.size and (int(case.labels.min()) < 0 or int(case.labels.max()) >= N_CLASSES):
        raise VfdetectError(f"case {case.case}: label values must be 0, 1 or 2")
    padded_image = np.asarray(pad_volume(case.image, geometry, min_shape=hr_shape), dtype=np.float32)
    padded_labels = np.asarray(pad_volume(case.labels, geometry, min_shape=hr_shape), dtype=np.uint8)
    low, high = valid_centre_bounds(padded_image.shape, hr_shape)
    box = padded_labels[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))]
    counts = np.bincount(box.ravel(), minlength=N_CLASSES)[:N_CLASSES]
    indices: list[np.ndarray | None] = []
    for label, count in enumerate(counts):
        if count == 0 or count >= _REJECTION_MIN_FRACTION * box.size:
            indices.append(None)
        else:
            flat = np.flatnonzero(box.ravel() == label)
            indices.append(flat.astype(np.int32) if box.size < 2**31 else flat)
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
    )


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


def _split_between_cases(
    n_cases: int, n_segments: int, cases_per_draw: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick up to ``cases_per_draw`` random cases and split ``n_segments`` evenly between them."""
    n_chosen = min(n_cases, cases_per_draw)
    chosen = rng.choice(n_cases, size=n_chosen, replace=False)
    per_case = np.full(n_chosen, n_segments // n_chosen, dtype=np.int64)
    remainder = n_segments - int(per_case.sum())
    if remainder:
        per_case[rng.choice(n_chosen, size=remainder, replace=False)] += 1
    return chosen, per_case


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


def _extract(
    padded_image: np.ndarray,
    padded_labels: np.ndarray,
    fill_value: float,
    centre: ShapeLike,
    geometry: NetworkGeometry,
    hr_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start = geometry.segment_start(centre, hr_shape)
    hr, lr = extract_segments(padded_image, start, hr_shape, geometry, fill_value)
    labels = padded_labels[geometry.output_slices(start, hr_shape)]
    return np.asarray(hr, dtype=np.float32), np.asarray(lr, dtype=np.float32), labels


def extract_sample(
    prepared: PreparedCase, centre: ShapeLike, geometry: NetworkGeometry, hr_shape: ShapeLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HR segment, LR context and label block for a centre in padded coordinates (no augmentation).

    The HR segment is ``[c - (s - 1) // 2, + s)``; the label block is the network's output region of
    that segment (the HR segment shrunk by the margin ``(RF - 1) // 2`` before and the rest after);
    the LR context comes from :func:`vfdetect.geometry.extract_segments` with the corner-mean fill.
    """
    shape = tuple(int(s) for s in (hr_shape or prepared.hr_shape))
    return _extract(prepared.padded_image, prepared.padded_labels, prepared.fill_value, centre, geometry, shape)


def _empty_segments(n: int, hr_shape: ShapeLike, geometry: NetworkGeometry) -> dict[str, np.ndarray]:
    out_shape = geometry.output_shape(hr_shape)
    lr_shape = tuple(int(n) for n in geometry.lr_input_shape(out_shape))
    return {
        "hr": np.empty((n, *hr_shape, 1), dtype=np.float32),
        "lr": np.empty((n, *lr_shape, 1), dtype=np.float32),
        "labels": np.empty((n, *out_shape), dtype=np.uint8),
    }


def _as_prepared(
    cases: Sequence[TrainingCase | PreparedCase], geometry: NetworkGeometry, hr_shape: ShapeLike
) -> list[PreparedCase]:
    prepared = []
    for case in cases:
        if isinstance(case, PreparedCase) and case.hr_shape == tuple(hr_shape):
            prepared.append(case)
        elif isinstance(case, PreparedCase):
            raise VfdetectError(f"case {case.case} was prepared for segments {case.hr_shape}, not {tuple(hr_shape)}")
        else:
            prepared.append(prepare_case(case, geometry, hr_shape))
    return prepared


def draw_subepoch(
    cases: Sequence[TrainingCase | PreparedCase],
    geometry: NetworkGeometry,
    config: SamplingConfig,
    n_segments: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Draw and augment one subepoch's training segments, shuffled together.

    Returns ``{"hr": (N, X, Y, Z, 1) float32, "lr": (N, x, y, z, 1) float32, "labels": (N, ox, oy, oz)
    uint8, "case_index": (N,) int64 index into ``cases``, "centre": (N, 3) int64 padded coordinates,
    "flips": (N, 3) bool}``. Pass :class:`PreparedCase` objects (see :func:`prepare_case`) to avoid
    re-padding the cases every subepoch.
    """
    if n_segments < 1:
        raise VfdetectError(f"n_segments must be at least 1, got {n_segments}")
    prepared = _as_prepared(cases, geometry, config.hr_shape)
    eligible = [
        i
        for i, case in enumerate(prepared)
        if any(config.class_weights[c] > 0 and case.class_counts[c] > 0 for c in range(N_CLASSES))
    ]
    if not eligible:
        raise VfdetectError("no training case contains a class with a positive sampling weight")

    chosen, per_case = _split_between_cases(len(eligible), n_segments, config.cases_per_subepoch, rng)
    case_index: list[np.ndarray] = []
    centres: list[np.ndarray] = []
    for position, n_case in zip(chosen, per_case, strict=True):
        index = eligible[int(position)]
        case = prepared[index]
        per_class = distribute_to_classes(
            int(n_case), config.class_weights, [n > 0 for n in case.class_counts], rng
        )
        for label, n_class in enumerate(per_class):
            if n_class:
                centres.append(sample_centres(case, label, int(n_class), rng))
                case_index.append(np.full(int(n_class), index, dtype=np.int64))
    order = rng.permutation(n_segments)
    all_cases = np.concatenate(case_index)[order]
    all_centres = np.concatenate(centres)[order]

    shifts = rng.normal(0.0, config.noise_shift_sd, size=n_segments).astype(np.float32)
    scales = rng.normal(1.0, config.noise_scale_sd, size=n_segments).astype(np.float32)
    flips = rng.random((n_segments, 3)) < np.asarray(config.flip_probability)

    segments = _empty_segments(n_segments, config.hr_shape, geometry)
    for i in range(n_segments):
        hr, lr, labels = extract_sample(prepared[all_cases[i]], all_centres[i], geometry, config.hr_shape)
        axes = tuple(int(a) for a in np.flatnonzero(flips[i]))
        if axes:
            hr, lr, labels = np.flip(hr, axes), np.flip(lr, axes), np.flip(labels, axes)
        segments["hr"][i, ..., 0] = (hr + shifts[i]) * scales[i]
        segments["lr"][i, ..., 0] = (lr + shifts[i]) * scales[i]
        segments["labels"][i] = labels
    segments["case_index"] = all_cases
    segments["centre"] = all_centres
    segments["flips"] = flips
    return segments


def uniform_validation_segments(
    cases: Sequence[TrainingCase | PreparedCase],
    geometry: NetworkGeometry,
    n_segments: int,
    rng: np.random.Generator,
    hr_shape: ShapeLike | None = None,
    cases_per_draw: int = 50,
) -> dict[str, np.ndarray]:
    """Segments centred uniformly over the whole image, without augmentation, for validation accuracy.

    ``hr_shape`` defaults to the receptive field, so each segment predicts one output voxel and the
    valid centres cover every voxel of the unpadded image. Cases are picked and segments split as
    in :func:`draw_subepoch`; the result has the same keys (``flips`` all false).
    """
    if n_segments < 1:
        raise VfdetectError(f"n_segments must be at least 1, got {n_segments}")
    hr_shape = tuple(int(s) for s in (hr_shape or geometry.receptive_field))
    sources: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (case index, image, labels, fill)
    for index, case in enumerate(cases):
        if isinstance(case, PreparedCase):
            image, labels, fill = case.padded_image, case.padded_labels, case.fill_value
        else:
            image = np.asarray(pad_volume(case.image, geometry, min_shape=hr_shape), dtype=np.float32)
            labels = np.asarray(pad_volume(case.labels, geometry, min_shape=hr_shape), dtype=np.uint8)
            fill = float(corner_mean(case.image))
        low, high = valid_centre_bounds(image.shape, hr_shape)
        if all(hi > lo for lo, hi in zip(low, high, strict=True)):
            sources.append((index, image, labels, fill))
    if not sources:
        raise VfdetectError(f"no validation case is large enough for segments of {hr_shape}")

    chosen, per_case = _split_between_cases(len(sources), n_segments, cases_per_draw, rng)
    segments = _empty_segments(n_segments, hr_shape, geometry)
    case_index = np.empty(n_segments, dtype=np.int64)
    centres = np.empty((n_segments, 3), dtype=np.int64)
    row = 0
    for position, n_case in zip(chosen, per_case, strict=True):
        index, image, labels, fill = sources[int(position)]
        low, high = valid_centre_bounds(image.shape, hr_shape)
        for centre in rng.integers(low, high, size=(int(n_case), 3)):
            hr, lr, block = _extract(image, labels, fill, centre, geometry, hr_shape)
            segments["hr"][row, ..., 0] = hr
            segments["lr"][row, ..., 0] = lr
            segments["labels"][row] = block
            case_index[row] = index
            centres[row] = centre
            row += 1
    segments["case_index"] = case_index
    segments["centre"] = centres
    segments["flips"] = np.zeros((n_segments, 3), dtype=bool)
    return segments


# --------------------------------------------------------------------------------------------
# Subepoch source with background drawing
# --------------------------------------------------------------------------------------------


class TrainingSampler:
    """Draws the training segments of any ``(epoch, subepoch)`` of a seeded run.

    The cases are prepared (padded and indexed) once. :meth:`draw` is a pure function of the seed
    and the position, so a resumed run sees exactly the segments an uninterrupted run would, and
    the next subepoch can safely be drawn in a background thread (:meth:`iterate`).
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase | PreparedCase],
        geometry: NetworkGeometry,
        config: SamplingConfig,
        segments_per_subepoch: int,
        seed: int,
    ) -> None:
        if segments_per_subepoch < 1:
            raise VfdetectError(f"segments_per_subepoch must be at least 1, got {segments_per_subepoch}")
        self.geometry = geometry
        self.config = config
        self.segments_per_subepoch = int(segments_per_subepoch)
        self.seed = int(seed)
        self.cases = _as_prepared(cases, geometry, config.hr_shape)
        out_shape = geometry.output_shape(config.hr_shape)
        self.output_shape = out_shape
        self.lr_shape = tuple(int(n) for n in geometry.lr_input_shape(out_shape))

    def draw(self, epoch: int, subepoch: int) -> dict[str, np.ndarray]:
        """The (shuffled, augmented) segments of one subepoch."""
        rng = subepoch_rng(self.seed, epoch, subepoch)
        return draw_subepoch(self.cases, self.geometry, self.config, self.segments_per_subepoch, rng)

    def iterate(self, positions: Iterator[tuple[int, int]] | Sequence[tuple[int, int]]) -> Iterator[
        tuple[tuple[int, int], dict[str, np.ndarray]]
    ]:
        """Yield ``((epoch, subepoch), segments)`` in order, drawing the next one in a background thread."""
        positions = iter(positions)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vfdetect-sampler") as pool:
            current = next(positions, None)
            if current is None:
                return
            future = pool.submit(self.draw, *current)
            while current is not None:
                segments = future.result()
                following = next(positions, None)
                if following is not None:
                    future = pool.submit(self.draw, *following)
                yield current, segments
                current = following


def subepoch_positions(
    subepochs_per_epoch: int, start: tuple[int, int] = (0, 0), epochs: int | None = None
) -> Iterator[tuple[int, int]]:
    """``(epoch, subepoch)`` from ``start`` up to (not including) epoch ``epochs``, or forever."""
    epoch, subepoch = start
    for index in itertools.count(epoch * subepochs_per_epoch + subepoch):
        position = divmod(index, subepochs_per_epoch)
        if epochs is not None and position[0] >= epochs:
            return
        yield position


# --------------------------------------------------------------------------------------------
# tf.data
# --------------------------------------------------------------------------------------------


def segments_dataset(segments: Mapping[str, np.ndarray], batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``((hr, lr), labels)`` batches over already drawn segments, in order.

    ``hr``/``lr`` are float32 ``(batch, x, y, z, 1)``; ``labels`` int32 ``(batch, ox, oy, oz)``.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(
        ((segments["hr"], segments["lr"]), segments["labels"].astype(np.int32))
    )
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def make_dataset(
    sampler: TrainingSampler,
    batch_size: int,
    subepochs_per_epoch: int,
    start: tuple[int, int] = (0, 0),
    epochs: int | None = None,
    shard: tuple[int, int] = (0, 1),
    prefetch_batches: int = 4,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` streaming training batches ``((hr, lr), labels)`` subepoch after subepoch.

    Each subepoch contributes ``segments_per_subepoch // batch_size`` full batches (DeepMedic trains
    on that many; a leftover partial batch is dropped so batches never straddle subepochs). The
    next subepoch is drawn in a background thread while the current one is consumed, and tf.data
    prefetches ``prefetch_batches`` batches, so sampling overlaps training. The stream starts at
    ``start = (epoch, subepoch)`` (for resuming) and ends before epoch ``epochs`` (``None``: never).
    ``shard = (index, count)`` keeps only batches ``b`` with ``b % count == index`` of each
    subepoch, for workers that share one seed. Shapes are static: hr ``(batch_size, *hr_shape, 1)``,
    lr ``(batch_size, *lr_shape, 1)`` float32, labels ``(batch_size, *output_shape)`` int32.
    """
    import tensorflow as tf

    if batch_size < 1 or batch_size > sampler.segments_per_subepoch:
        raise VfdetectError(
            f"batch_size must be between 1 and segments_per_subepoch ({sampler.segments_per_subepoch}), got {batch_size}"
        )
    shard_index, shard_count = (int(shard[0]), int(shard[1]))
    if not 0 <= shard_index < shard_count:
        raise VfdetectError(f"shard index must be in [0, {shard_count}), got {shard_index}")
    n_batches = sampler.segments_per_subepoch // batch_size

    def batches() -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
        positions = subepoch_positions(subepochs_per_epoch, start, epochs)
        for _, segments in sampler.iterate(positions):
            labels = segments["labels"].astype(np.int32)
            for b in range(shard_index, n_batches, shard_count):
                rows = slice(b * batch_size, (b + 1) * batch_size)
                yield (segments["hr"][rows], segments["lr"][rows]), labels[rows]

    signature = (
        (
            tf.TensorSpec((batch_size, *sampler.config.hr_shape, 1), tf.float32),
            tf.TensorSpec((batch_size, *sampler.lr_shape, 1), tf.float32),
        ),
        tf.TensorSpec((batch_size, *sampler.output_shape), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.prefetch(prefetch_batches)
