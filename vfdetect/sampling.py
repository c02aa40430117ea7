"""Training and validation segments: class-weighted centre sampling, augmentation and tf.data wiring.

The pipeline follows DeepMedic's per-class sampling as used by the paper (see
``deepmedic_spec.md`` sections 3 and 4):

1. Each training case is resampled to the internal frame, z-scored over the body and reflect-padded
   by the network's margin (:func:`prepare_case`).
2. Per subepoch, up to ``cases_per_subepoch`` random cases are picked and the segments are split
   evenly between them, the remainder going to random cases (:func:`draw_subepoch`). Cases with
   unequal ``weight`` (manifest column) get shares of the segments proportional to their weights.
3. Within a case, class ``c`` (0 background, 1 normal vertebra, 2 fractured vertebra) receives
   ``floor(n * p_c)`` segments and the leftovers are drawn in proportion to ``p``; a class absent
   from the case gets ``p_c = 0`` and the others are renormalised (:func:`distribute_to_classes`).
4. Centres are drawn with replacement, uniformly over the class's voxels among the valid centres of
   the padded volume (those whose whole high-resolution segment fits, :func:`sample_centres`).
5. Each sample is the high-resolution (HR) segment, its decimated low-resolution (LR) context and
   the label block of the network's output size; intensity noise ``I' = (I + s) * m`` (same ``s``,
   ``m`` for both pathways) and random flips per axis. A flipped sample is the sample of the
   mirrored volume (:func:`extract_sample`), not the flipped arrays: the LR window is not symmetric
   about the segment centre. With ``randomise`` on, each sample is read from a randomised scan
   (intensity, gamma, blur, thick slices, noise, bias field; :func:`randomised_window`), the same
   one for both pathways. All samples of a subepoch are shuffled together.

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
from vfdetect.labels import IGNORE as IGNORE_LABEL

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

_PROBABILITY_FIELDS = (
    "intensity_probability",
    "gamma_probability",
    "blur_probability",
    "thick_slice_probability",
    "noise_probability",
    "bias_probability",
)
# Range settings of SamplingConfig and the lowest value each may take (None: any).
_RANGE_FIELDS: dict[str, float | None] = {
    "intensity_scale": 0.0,
    "intensity_offset": None,
    "gamma_range": 0.0,
    "gamma_window": None,
    "blur_sigma": 0.0,
    "slice_thickness": 1.0,
    "noise_sd": 0.0,
    "noise_correlation": 0.0,
    "bias_wavelength": 0.0,
}


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
        randomise: master switch of the domain randomisation below (off by default, so that
            existing experiment files reproduce; :meth:`randomised` turns it on).
        intensity_probability, intensity_scale, intensity_offset: probability of a global intensity
            change ``I' = a I + b``, ``a`` log-uniform in ``intensity_scale`` and ``b`` uniform in
            ``intensity_offset`` (normalised units: a z-score scale/offset is an HU scale/offset).
        gamma_probability, gamma_range, gamma_window: probability of a gamma curve, ``gamma``
            log-uniform in ``gamma_range``, applied to ``u = (I - lo) / (hi - lo)`` for ``u`` in [0, 1]
            (``lo, hi = gamma_window``); values outside the window are unchanged (monotone, continuous).
        blur_probability, blur_sigma: probability of an isotropic Gaussian blur with ``sigma``
            (voxels) uniform in ``blur_sigma``.
        thick_slice_probability, slice_thickness: probability of simulating thick slices along one
            random axis: box averages over slabs of the drawn thickness (voxels, uniform in
            ``slice_thickness``) at a random phase, linearly interpolated back to the voxel grid.
        noise_probability, noise_sd, noise_correlation: probability of additive Gaussian noise with
            standard deviation uniform in ``noise_sd`` (normalised units) and spatial correlation
            ``sigma`` uniform in ``noise_correlation`` (voxels; 0 gives white noise).
        bias_probability, bias_gain, bias_offset, bias_wavelength: probability of a smooth bias
            field ``I' = I (1 + g(p)) + o(p)``, ``g`` and ``o`` each a sum of two plane waves of
            random direction, wavelength uniform in ``bias_wavelength`` (voxels) and amplitudes up
            to ``bias_gain`` and ``bias_offset``.

    Voxel lengths are millimetres at the default 1 mm internal spacing. The randomisation is drawn
    per segment and applied to the image before the HR segment and the LR context are read from
    it (:func:`randomised_window`), so both pathways see one physically randomised scan.
    """

    hr_shape: tuple[int, int, int] = (25, 25, 25)
    class_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    cases_per_subepoch: int = 50
    noise_shift_sd: float = 0.05
    noise_scale_sd: float = 0.01
    flip_probability: tuple[float, float, float] = (0.5, 0.5, 0.5)
    randomise: bool = False
    intensity_probability: float = 0.8
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_offset: tuple[float, float] = (-0.2, 0.2)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_window: tuple[float, float] = (-3.0, 5.0)
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    thick_slice_probability: float = 0.3
    slice_thickness: tuple[float, float] = (1.0, 5.0)
    noise_probability: float = 0.5
    noise_sd: tuple[float, float] = (0.02, 0.3)
    noise_correlation: tuple[float, float] = (0.0, 1.5)
    bias_probability: float = 0.3
    bias_gain: float = 0.1
    bias_offset: float = 0.2
    bias_wavelength: tuple[float, float] = (80.0, 300.0)

    @classmethod
    def randomised(cls, **overrides: Any) -> SamplingConfig:
        """The domain-randomisation preset: the default ranges with ``randomise`` on."""
        return cls(**{"randomise": True, **overrides})

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
        object.__setattr__(self, "randomise", bool(self.randomise))
        for name in _PROBABILITY_FIELDS:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise VfdetectError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        for name, minimum in _RANGE_FIELDS.items():
            pair = tuple(float(v) for v in getattr(self, name))
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] > pair[1]:
                raise VfdetectError(f"{name} must be a range (low, high) with low <= high, got {getattr(self, name)}")
            if minimum is not None and pair[0] < minimum:
                raise VfdetectError(f"{name} must not go below {minimum}, got {pair}")
            object.__setattr__(self, name, pair)
        if self.intensity_scale[0] <= 0 or self.gamma_range[0] <= 0:
            raise VfdetectError("intensity_scale and gamma_range must be positive")
        if self.gamma_window[0] >= self.gamma_window[1]:
            raise VfdetectError(f"gamma_window must have low < high, got {self.gamma_window}")
        if self.bias_wavelength[0] <= 0:
            raise VfdetectError(f"bias_wavelength must be positive, got {self.bias_wavelength}")
        for name in ("bias_gain", "bias_offset"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise VfdetectError(f"{name} must be non-negative, got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        if self.bias_gain >= 0.5:
            raise VfdetectError(f"bias_gain must be below 0.5 (two waves keep 1 + g positive), got {self.bias_gain}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (lists for tuples)."""
        values = {
            "hr_shape": list(self.hr_shape),
            "class_weights": list(self.class_weights),
            "cases_per_subepoch": self.cases_per_subepoch,
            "noise_shift_sd": self.noise_shift_sd,
            "noise_scale_sd": self.noise_scale_sd,
            "flip_probability": list(self.flip_probability),
            "randomise": self.randomise,
        }
        for name in (*_PROBABILITY_FIELDS, "bias_gain", "bias_offset"):
            values[name] = getattr(self, name)
        for name in _RANGE_FIELDS:
            values[name] = list(getattr(self, name))
        return values

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
            randomise=bool(values.get("randomise", cls.randomise)),
            **_randomisation_settings(values),
        )


def _randomisation_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in (*_PROBABILITY_FIELDS, "bias_gain", "bias_offset"):
        if name in values:
            settings[name] = float(values[name])
    for name in _RANGE_FIELDS:
        if name in values:
            settings[name] = tuple(float(v) for v in values[name])
    return settings


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
    source: str = ""  # the data source (manifest ``source`` column), for reporting shares
    weight: float = 1.0  # relative share of training draws (manifest ``weight`` column)

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
    values = np.unique(np.asarray(labels.array))
    unexpected = [int(v) for v in values if int(v) not in (*range(N_CLASSES), IGNORE_LABEL)]
    if unexpected:
        raise InputError(
            label_file, f"label values must be 0, 1, 2 or {IGNORE_LABEL} (ignored), found {unexpected[:5]}"
        )
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
        source=str(getattr(case, "source", "")),
        weight=float(getattr(case, "weight", 1.0)),
    )


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
        source=case.source,
        weight=case.weight,
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


# --------------------------------------------------------------------------------------------
# Domain randomisation
# --------------------------------------------------------------------------------------------

_BIAS_WAVES = 2  # plane waves per bias field (gain and offset each)


@dataclass(frozen=True)
class Randomisation:
    """One drawn domain randomisation of a scan, in the normalised intensity unit.

    Applied in the order of an acquisition: Gaussian blur (``blur_sigma`` voxels, 0 for none) and
    thick slices along ``slice_axis`` (``None`` for none; slabs of ``slice_thickness`` voxels whose
    centres lie at ``slice_phase + k * slice_thickness``), then additive noise (``noise_sd``,
    correlation ``noise_correlation`` voxels), then the bias field ``I (1 + g) + o`` of the plane
    waves ``bias_waves`` (each ``(kx, ky, kz, phase, gain amplitude, offset amplitude)``, wave
    vector in radians per voxel), then ``scale * I + offset``, then the gamma curve over
    ``gamma_window``. Positions are padded coordinates of the volume being sampled.
    """

    scale: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    gamma_window: tuple[float, float] = (-3.0, 5.0)
    blur_sigma: float = 0.0
    slice_axis: int | None = None
    slice_thickness: float = 1.0
    slice_phase: float = 0.0
    noise_sd: float = 0.0
    noise_correlation: float = 0.0
    bias_waves: tuple[tuple[float, float, float, float, float, float], ...] = ()

    def point_transform(self, values: np.ndarray | float) -> np.ndarray:
        """The position-independent part: ``scale * I + offset`` then the gamma curve."""
        values = np.asarray(values, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.gamma == 1.0:
            return values
        low, high = self.gamma_window
        u = (values - np.float32(low)) / np.float32(high - low)
        inside = (u > 0) & (u < 1)
        curved = np.where(inside, np.power(np.clip(u, 0, 1), np.float32(self.gamma)), u)
        return (curved * np.float32(high - low) + np.float32(low)).astype(np.float32)


def _uniform(rng_values: np.ndarray, index: int, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(low + (high - low) * rng_values[index])


def _log_uniform(rng_values: np.ndarray, index: int, bounds: tuple[float, float]) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return float(math.exp(low + (high - low) * rng_values[index]))


def draw_randomisation(config: SamplingConfig, rng: np.random.Generator) -> Randomisation:
    """Draw one :class:`Randomisation` from ``config``'s probabilities and ranges.

    Always consumes the same number of draws from ``rng``, whichever augmentations are switched on.
    """
    u = rng.random(15 + 4 * 2 * _BIAS_WAVES)
    directions = rng.normal(size=(2 * _BIAS_WAVES, 3))
    on = u[:6] < np.asarray([getattr(config, name) for name in _PROBABILITY_FIELDS])
    intensity, gamma, blur, thick, noise, bias = (bool(v) for v in on)
    thickness = _uniform(u, 8, config.slice_thickness) if thick else 1.0
    waves: list[tuple[float, float, float, float, float, float]] = []
    if bias:
        for wave in range(2 * _BIAS_WAVES):
            base = 15 + 4 * wave
            wavelength = _uniform(u, base, config.bias_wavelength)
            direction = directions[wave] / max(float(np.linalg.norm(directions[wave])), 1e-12)
            k = direction * (2 * math.pi / wavelength)
            amplitude = float(u[base + 2]) / _BIAS_WAVES
            gain = config.bias_gain * amplitude if wave < _BIAS_WAVES else 0.0
            offset = config.bias_offset * amplitude if wave >= _BIAS_WAVES else 0.0
            waves.append((float(k[0]), float(k[1]), float(k[2]), float(2 * math.pi * u[base + 1]), gain, offset))
    return Randomisation(
        scale=_log_uniform(u, 6, config.intensity_scale) if intensity else 1.0,
        offset=_uniform(u, 7, config.intensity_offset) if intensity else 0.0,
        gamma=_log_uniform(u, 9, config.gamma_range) if gamma else 1.0,
        gamma_window=config.gamma_window,
        blur_sigma=_uniform(u, 10, config.blur_sigma) if blur else 0.0,
        slice_axis=min(2, int(3 * u[11])) if thickness > 1.0 else None,
        slice_thickness=thickness,
        slice_phase=float(u[12] * thickness),
        noise_sd=_uniform(u, 13, config.noise_sd) if noise else 0.0,
        noise_correlation=_uniform(u, 14, config.noise_correlation) if noise else 0.0,
        bias_waves=tuple(waves),
    )


@dataclass(frozen=True)
class _AxisOperator:
    """A linear map along one axis from source positions ``[low, low + width)`` to output positions.

    ``matrix`` (outputs x width) or, for a pure selection, ``indices`` (absolute positions).
    """

    low: int
    width: int
    matrix: np.ndarray | None = None
    indices: np.ndarray | None = None


def _selection(positions: np.ndarray, size: int) -> _AxisOperator:
    indices = np.clip(positions, 0, size - 1)
    low = int(indices.min())
    return _AxisOperator(low, int(indices.max()) - low + 1, indices=indices)


def _dense(rows: np.ndarray, columns: np.ndarray, weights: np.ndarray, n_rows: int, size: int) -> _AxisOperator:
    """Operator from (row, absolute column, weight) triples; columns clamped to ``[0, size)``."""
    columns = np.clip(columns, 0, size - 1)
    low = int(columns.min())
    width = int(columns.max()) - low + 1
    matrix = np.zeros((n_rows, width), dtype=np.float64)
    np.add.at(matrix, (rows, columns - low), weights)
    return _AxisOperator(low, width, matrix=matrix)


def _gaussian_kernel(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, weights / weights.sum()


def _gaussian_operator(positions: np.ndarray, size: int, sigma: float) -> _AxisOperator:
    """Gaussian smoothing evaluated at ``positions`` (nearest-edge extension of the volume)."""
    if sigma <= 0:
        return _selection(positions, size)
    offsets, weights = _gaussian_kernel(sigma)
    centres = np.clip(positions, 0, size - 1)
    rows = np.repeat(np.arange(len(positions)), len(offsets))
    columns = (centres[:, None] + offsets[None, :]).ravel()
    return _dense(rows, columns, np.tile(weights, len(positions)), len(positions), size)


def _thick_slice_operator(positions: np.ndarray, size: int, thickness: float, phase: float) -> _AxisOperator:
    """Box averages over slabs ``[c - T/2, c + T/2]`` (``c = phase + k T``), interpolated linearly.

    Voxel ``j`` covers ``[j - 1/2, j + 1/2]``; each output mixes the two slabs around its position.
    """
    centres = np.clip(positions, 0, size - 1).astype(np.float64)
    below = np.floor((centres - phase) / thickness)
    fraction = (centres - phase) / thickness - below
    reach = int(math.ceil(thickness / 2 + 1))
    offsets = np.arange(-reach, reach + 1)
    rows_list, columns_list, weights_list = [], [], []
    for slab, share in ((below, 1 - fraction), (below + 1, fraction)):
        slab_centre = phase + slab * thickness
        voxels = np.round(slab_centre)[:, None] + offsets[None, :]
        overlap = np.minimum(voxels + 0.5, slab_centre[:, None] + thickness / 2) - np.maximum(
            voxels - 0.5, slab_centre[:, None] - thickness / 2
        )
        weights = np.clip(overlap, 0, None) / thickness * share[:, None]
        rows_list.append(np.repeat(np.arange(len(positions)), len(offsets)))
        columns_list.append(voxels.astype(np.int64).ravel())
        weights_list.append(weights.ravel())
    return _dense(
        np.concatenate(rows_list), np.concatenate(columns_list), np.concatenate(weights_list), len(positions), size
    )


def _compose(outer: _AxisOperator, inner_for: Any, size: int) -> _AxisOperator:
    """``outer`` after the operator ``inner_for(positions)`` that produces its source positions."""
    assert outer.matrix is not None
    inner = inner_for(np.arange(outer.low, outer.low + outer.width))
    if inner.indices is not None:  # a selection of the same (in-range) positions
        return outer
    product = outer.matrix @ inner.matrix
    return _AxisOperator(inner.low, inner.width, matrix=product)


def _image_operator(positions: np.ndarray, size: int, axis: int, randomisation: Randomisation) -> _AxisOperator:
    blur = randomisation.blur_sigma
    if randomisation.slice_axis != axis:
        return _gaussian_operator(positions, size, blur)
    thick = _thick_slice_operator(positions, size, randomisation.slice_thickness, randomisation.slice_phase)
    return _compose(thick, lambda inner: _gaussian_operator(inner, size, blur), size)


def _apply_operators(source: np.ndarray, origin: Sequence[int], operators: Sequence[_AxisOperator]) -> np.ndarray:
    """Apply one :class:`_AxisOperator` per axis to ``source`` (whose voxel 0 sits at ``origin``)."""
    block = source[
        tuple(slice(op.low - o, op.low - o + op.width) for op, o in zip(operators, origin, strict=True))
    ]
    if any(n != op.width for n, op in zip(block.shape, operators, strict=True)):
        raise VfdetectError("the source array does not cover the operators' positions")
    for axis, op in enumerate(operators):  # selections first: they only shrink the block
        if op.indices is not None:
            local = op.indices - op.low
            steps = np.diff(local)
            if len(local) > 1 and steps[0] > 0 and np.all(steps == steps[0]):  # a strided view, no copy
                index: list[slice] = [slice(None)] * block.ndim
                index[axis] = slice(int(local[0]), int(local[-1]) + 1, int(steps[0]))
                block = block[tuple(index)]
            else:
                block = np.take(block, local, axis=axis)
    block = np.asarray(block, dtype=np.float32)
    for axis, op in enumerate(operators):
        if op.matrix is not None:
            moved = np.moveaxis(block, axis, -1) @ op.matrix.T.astype(np.float32)
            block = np.moveaxis(moved, -1, axis)
    return np.ascontiguousarray(block)


def _noise_operators(positions: Sequence[np.ndarray], size: Sequence[int], sigma: float) -> list[_AxisOperator]:
    return [_gaussian_operator(p, n, sigma) for p, n in zip(positions, size, strict=True)]


def noise_box(
    randomisation: Randomisation, padded_shape: Sequence[int], windows: Sequence[Sequence[np.ndarray]]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Origin and shape of the white-noise block that the noise of all ``windows`` reads.

    Each window is three arrays of positions (padded coordinates), as for :func:`randomised_window`.
    """
    size = tuple(int(n) for n in padded_shape[:3])
    lows, highs = [], []
    for positions in windows:
        ops = _noise_operators(positions, size, randomisation.noise_correlation)
        lows.append([op.low for op in ops])
        highs.append([op.low + op.width for op in ops])
    low = np.min(lows, axis=0)
    high = np.max(highs, axis=0)
    return tuple(int(v) for v in low), tuple(int(v) for v in high - low)  # type: ignore[return-value]


def _bias(randomisation: Randomisation, positions: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Gain ``g`` and offset ``o`` fields on the grid of ``positions`` (zero arrays when no waves)."""
    shape = tuple(len(p) for p in positions)
    gain = np.zeros(shape, dtype=np.float32)
    offset = np.zeros(shape, dtype=np.float32)
    for kx, ky, kz, phase, gain_amplitude, offset_amplitude in randomisation.bias_waves:
        px, py, pz = (np.asarray(p, dtype=np.float64) for p in positions)
        wave = (
            np.exp(1j * (kx * px + phase))[:, None, None]
            * np.exp(1j * ky * py)[None, :, None]
            * np.exp(1j * kz * pz)[None, None, :]
        ).real.astype(np.float32)
        if gain_amplitude:
            gain += np.float32(gain_amplitude) * wave
        if offset_amplitude:
            offset += np.float32(offset_amplitude) * wave
    return gain, offset


def randomised_window(
    padded: np.ndarray,
    fill_value: float,
    randomisation: Randomisation,
    positions: Sequence[np.ndarray],
    white_noise: np.ndarray | None = None,
    noise_origin: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """The randomised volume sampled on the grid ``positions[0] x positions[1] x positions[2]``.

    ``positions`` are integer padded coordinates per axis (e.g. an HR segment's range or an LR
    window's every ``factor``-th voxel). The value at a position is the one the whole randomised
    volume has there (filters extend the volume by its edge voxels), so HR segments and LR windows
    read from it agree wherever they meet; positions outside ``padded`` get ``fill_value`` through
    the point transform (scale, offset, gamma) only, as the fill of a randomised scan would be.
    ``white_noise`` (with its voxel 0 at ``noise_origin``) must cover :func:`noise_box` when the
    randomisation adds noise.
    """
    size = tuple(int(n) for n in padded.shape[:3])
    grid = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positions]
    operators = [_image_operator(p, n, axis, randomisation) for axis, (p, n) in enumerate(zip(grid, size, strict=True))]
    values = _apply_operators(padded, (0, 0, 0), operators)
    if randomisation.noise_sd > 0:
        if white_noise is None:
            raise VfdetectError("randomised_window needs white_noise for a randomisation with noise")
        noise_ops = _noise_operators(grid, size, randomisation.noise_correlation)
        norm = 1.0
        if randomisation.noise_correlation > 0:
            _, weights = _gaussian_kernel(randomisation.noise_correlation)
            norm = float(np.sqrt(np.sum(weights**2))) ** 3
        values += np.float32(randomisation.noise_sd / norm) * _apply_operators(white_noise, noise_origin, noise_ops)
    if randomisation.bias_waves:
        gain, offset = _bias(randomisation, grid)
        values = values * (1 + gain) + offset
    values = randomisation.point_transform(values)
    outside = [(p < 0) | (p >= n) for p, n in zip(grid, size, strict=True)]
    if any(mask.any() for mask in outside):
        mask = outside[0][:, None, None] | outside[1][None, :, None] | outside[2][None, None, :]
        values[mask] = randomisation.point_transform(float(fill_value))
    return values.astype(np.float32, copy=False)


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


def _mirrored(
    padded_image: np.ndarray, padded_labels: np.ndarray, start: Sequence[int], hr_shape: ShapeLike, flip_axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Views of image and labels mirrored along ``flip_axes``, and the segment start mirrored with them."""
    axes = tuple(int(a) for a in flip_axes)
    if not axes:
        return padded_image, padded_labels, tuple(int(v) for v in start)  # type: ignore[return-value]
    mirrored = tuple(
        int(padded_image.shape[a] - start[a] - hr_shape[a]) if a in axes else int(start[a]) for a in range(3)
    )
    return np.flip(padded_image, axes), np.flip(padded_labels, axes), mirrored  # type: ignore[return-value]


def extract_sample(
    prepared: PreparedCase,
    centre: ShapeLike,
    geometry: NetworkGeometry,
    hr_shape: ShapeLike | None = None,
    flip_axes: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HR segment, LR context and label block for a centre in padded coordinates (no intensity change).

    The HR segment is ``[c - (s - 1) // 2, + s)``; the label block is the network's output region of
    that segment (the HR segment shrunk by the margin ``(RF - 1) // 2`` before and the rest after);
    the LR context comes from :func:`vfdetect.geometry.extract_segments` with the corner-mean fill.

    ``flip_axes`` mirrors the sample: the result is the sample of the volume mirrored along those
    axes whose HR segment is the mirror image of this one (for odd sizes: centred on the mirrored
    centre). HR and labels are then the flipped arrays, but the LR context is read afresh: the LR
    window is not symmetric about the centre (see :class:`vfdetect.geometry.NetworkGeometry`), so
    flipping the extracted window would pair the HR segment with a context shifted relative to what
    inference reads.
    """
    shape = tuple(int(s) for s in (hr_shape or prepared.hr_shape))
    start = geometry.segment_start(centre, shape)
    image, labels, start = _mirrored(prepared.padded_image, prepared.padded_labels, start, shape, flip_axes)
    hr, lr = extract_segments(image, start, shape, geometry, prepared.fill_value)
    block = labels[geometry.output_slices(start, shape)]
    return np.asarray(hr, dtype=np.float32), np.asarray(lr, dtype=np.float32), block


def _randomised_sample(
    prepared: PreparedCase,
    centre: ShapeLike,
    geometry: NetworkGeometry,
    hr_shape: tuple[int, int, int],
    flip_axes: Sequence[int],
    randomisation: Randomisation,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`extract_sample` from the randomised (and mirrored) volume; white noise drawn from ``rng``."""
    start = geometry.segment_start(centre, hr_shape)
    image, labels, start = _mirrored(prepared.padded_image, prepared.padded_labels, start, hr_shape, flip_axes)
    lr_start = geometry.lr_start(start)
    lr_shape = geometry.lr_shape_for(hr_shape)
    hr_positions = [np.arange(s, s + n) for s, n in zip(start, hr_shape, strict=True)]
    lr_positions = [
        s + f * np.arange(n) for s, f, n in zip(lr_start, geometry.subsample_factor, lr_shape, strict=True)
    ]
    white_noise, origin = None, (0, 0, 0)
    if randomisation.noise_sd > 0:
        origin, box = noise_box(randomisation, image.shape, [hr_positions, lr_positions])
        white_noise = rng.standard_normal(box, dtype=np.float32)
    hr = randomised_window(image, prepared.fill_value, randomisation, hr_positions, white_noise, origin)
    lr = randomised_window(image, prepared.fill_value, randomisation, lr_positions, white_noise, origin)
    return hr, lr, labels[geometry.output_slices(start, hr_shape)]


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

    chosen, per_case = _split_between_cases(
        len(eligible), n_segments, config.cases_per_subepoch, rng, [prepared[i].weight for i in eligible]
    )
    case_index: list[np.ndarray] = []
    centres: list[np.ndarray] = []
    for position, n_case in zip(chosen, per_case, strict=True):
        if n_case == 0:
            continue
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
    randomisations = [draw_randomisation(config, rng) for _ in range(n_segments)] if config.randomise else []

    segments = _empty_segments(n_segments, config.hr_shape, geometry)
    for i in range(n_segments):
        axes = tuple(int(a) for a in np.flatnonzero(flips[i]))
        if randomisations:
            hr, lr, labels = _randomised_sample(
                prepared[all_cases[i]], all_centres[i], geometry, config.hr_shape, axes, randomisations[i], rng
            )
        else:
            hr, lr, labels = extract_sample(prepared[all_cases[i]], all_centres[i], geometry, config.hr_shape, axes)
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
