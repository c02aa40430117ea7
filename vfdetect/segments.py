"""Segments of a subepoch: extraction of HR/LR/label samples, class-weighted subepoch drawing, the seeded sampler.

Steps 2 and 5 of :mod:`vfdetect.sampling`'s pipeline. Every draw comes from :func:`subepoch_rng`,
a pure function of ``(seed, epoch, subepoch)``; :class:`TrainingSampler` draws any subepoch of a
run. Arrays are indexed ``[x, y, z]``, batches ``(batch, x, y, z, channel)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from vfdetect.augment import Randomisation, draw_randomisation, noise_box, randomised_window
from vfdetect.errors import VfdetectError
from vfdetect.geometry import NetworkGeometry, corner_mean, extract_segments, pad_volume
from vfdetect.training_cases import (
    N_CLASSES,
    PreparedCase,
    ShapeLike,
    TrainingCase,
    distribute_to_classes,
    prepare_case,
    sample_centres,
    split_between_cases,
    valid_centre_bounds,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from vfdetect.sampling import SamplingConfig

# Stream tags mixed into the seed so that training and validation draws never share a stream.
_TRAINING_STREAM = 0
_VALIDATION_STREAM = 1


def subepoch_rng(seed: int, epoch: int, subepoch: int, validation: bool = False) -> np.random.Generator:
    """The generator of one subepoch's draws, a pure function of ``(seed, epoch, subepoch)``."""
    stream = _VALIDATION_STREAM if validation else _TRAINING_STREAM
    return np.random.default_rng([int(seed), stream, int(epoch), int(subepoch)])


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

    chosen, per_case = split_between_cases(
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

    chosen, per_case = split_between_cases(len(sources), n_segments, cases_per_draw, rng)
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
