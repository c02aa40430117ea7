"""Tests of vfdetect.geometry against DeepMedic's size table and hand-computed segments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vfdetect.errors import VfdetectError
from vfdetect.geometry import (
    GeometryError,
    NetworkGeometry,
    centre_bounds,
    corner_mean,
    extract_segment_batch,
    extract_segments,
    geometry_for,
    pad_volume,
    unpad_volume,
    valid_centre_mask,
)

# DeepMedic's table (spec section 1.3), rewritten in our (x, y, z) order: the slice variants' short axis is x.
# Columns: receptive field, 25^3 -> output / LR input, 45^3 -> output / LR input (blanket factor 3).
SPEC_TABLE = {
    "3d": ((17, 17, 17), (9, 9, 9), (19, 19, 19), (29, 29, 29), (26, 26, 26)),
    "5slices": ((5, 17, 17), (21, 9, 9), (11, 19, 19), (41, 29, 29), (18, 26, 26)),
    "1slice": ((1, 17, 17), (25, 9, 9), (9, 19, 19), (45, 29, 29), (15, 26, 26)),
}


@pytest.mark.parametrize("variant", sorted(SPEC_TABLE))
def test_sizes_match_the_spec_table_with_blanket_factor_three(variant: str) -> None:
    rf, out25, lr25, out45, lr45 = SPEC_TABLE[variant]
    geometry = geometry_for(variant, subsample_factor=(3, 3, 3))
    assert geometry.receptive_field == rf
    assert geometry.output_shape((25, 25, 25)) == out25
    assert geometry.lr_input_shape(out25) == lr25
    assert geometry.output_shape((45, 45, 45)) == out45
    assert geometry.lr_shape_for((45, 45, 45)) == lr45
    # validation segment = RF gives one output voxel and an LR window of the RF
    assert geometry.output_shape(rf) == (1, 1, 1)
    assert geometry.lr_shape_for(rf) == rf
    assert geometry.input_shape(out45) == (45, 45, 45)


def test_default_geometries() -> None:
    three_d = geometry_for("3d")
    assert three_d.kernels == ((3, 3, 3),) * 8
    assert three_d.subsample_factor == (3, 3, 3)
    assert three_d.margin() == ((8, 8),) * 3
    assert three_d.lr_offset == (-16, -16, -16)  # hr_start + 1 - RF
    assert three_d.lr_receptive_field_hr == (49, 49, 49)
    assert three_d.output_shape((37, 37, 37)) == (21, 21, 21)
    assert three_d.lr_shape_for((37, 37, 37)) == (23, 23, 23)

    one_slice = geometry_for("1slice")
    assert one_slice.kernels == ((1, 3, 3),) * 8  # one voxel wide left-right: the sagittal plane
    assert one_slice.subsample_factor == (1, 3, 3)
    assert one_slice.margin() == ((0, 0), (8, 8), (8, 8))
    # factor 1 along x: the LR window spans exactly the HR segment's slices
    assert one_slice.lr_shape_for((25, 25, 25)) == (25, 19, 19)
    assert one_slice.lr_offset == (0, -16, -16)

    five_slices = geometry_for("5slices")
    assert five_slices.kernels[0] == (5, 3, 3)
    assert five_slices.kernels[1:] == ((1, 3, 3),) * 7
    assert five_slices.margin() == ((2, 2), (8, 8), (8, 8))
    assert five_slices.lr_shape_for((25, 25, 25)) == (25, 19, 19)
    assert five_slices.lr_offset == (0, -16, -16)


def test_invalid_geometry_and_sizes_are_refused() -> None:
    with pytest.raises(VfdetectError, match="unknown network variant"):
        geometry_for("2d")
    with pytest.raises(GeometryError, match="odd"):
        NetworkGeometry(kernels=((2, 3, 3),))
    with pytest.raises(GeometryError, match="odd"):
        NetworkGeometry(kernels=((3, 3, 3),), subsample_factor=(2, 3, 3))
    with pytest.raises(GeometryError, match="smaller than the receptive field"):
        geometry_for("3d").output_shape((16, 25, 25))
    with pytest.raises(GeometryError, match="3 values"):
        geometry_for("3d").output_shape((25, 25))


def test_lr_alignment_centres_lr_output_on_every_third_hr_output() -> None:
    geometry = geometry_for("3d")
    hr_start = 5
    rf = geometry.receptive_field[0]
    for j in range(geometry.lr_input_shape((9, 9, 9))[0] - rf + 1):
        lr_centre_hr = geometry.lr_start((hr_start,) * 3)[0] + 3 * (j + (rf - 1) // 2)
        hr_output_centre = hr_start + geometry.margin()[0][0] + 3 * j
        assert lr_centre_hr == hr_output_centre


def _hand_lr(padded: np.ndarray, hr_start: tuple[int, int, int], lr_shape, offset, factor, fill: float) -> np.ndarray:
    """Independent voxel-by-voxel LR window: every factor-th voxel from hr_start + offset."""
    lr = np.empty(lr_shape, dtype=padded.dtype)
    for i, j, k in itertools.product(*(range(n) for n in lr_shape)):
        x, y, z = (hr_start[a] + offset[a] + factor[a] * (i, j, k)[a] for a in range(3))
        inside = 0 <= x < padded.shape[0] and 0 <= y < padded.shape[1] and 0 <= z < padded.shape[2]
        lr[i, j, k] = padded[x, y, z] if inside else fill
    return lr


@pytest.mark.parametrize(
    ("variant", "factor", "centre"),
    [
        ("3d", None, (20, 21, 22)),  # deep inside: LR window partly outside on some axes
        ("3d", None, (12, 12, 45)),  # first valid centre on x, y; last on z
        ("3d", None, (30, 30, 30)),
        ("1slice", None, (0, 14, 33)),
        ("5slices", None, (4, 14, 20)),
        ("5slices", (3, 3, 3), (5, 15, 25)),
    ],
)
def test_segment_at_known_centre_equals_hand_computed_slices(variant, factor, centre) -> None:
    geometry = geometry_for(variant, factor)
    volume = np.arange(30 * 31 * 42, dtype=np.float32).reshape(30, 31, 42)
    padded = pad_volume(volume, geometry)
    hr_shape = (25, 25, 25)
    lower, upper = centre_bounds(padded.shape, hr_shape)
    centre = tuple(min(max(c, lo), hi) for c, lo, hi in zip(centre, lower, upper, strict=True))
    fill = -7.5
    hr_start = geometry.segment_start(centre, hr_shape)
    assert hr_start == tuple(c - 12 for c in centre)
    hr, lr = extract_segments(padded, hr_start, hr_shape, geometry, fill)
    expected_hr = padded[centre[0] - 12 : centre[0] + 13, centre[1] - 12 : centre[1] + 13, centre[2] - 12 : centre[2] + 13]
    np.testing.assert_array_equal(hr, expected_hr)
    offset = tuple(-(f - 1) * (rf - 1) // 2 for f, rf in zip(geometry.subsample_factor, geometry.receptive_field, strict=True))
    expected_lr = _hand_lr(padded, hr_start, geometry.lr_shape_for(hr_shape), offset, geometry.subsample_factor, fill)
    np.testing.assert_array_equal(lr, expected_lr)
    assert lr.shape == geometry.lr_shape_for(hr_shape)


def test_lr_window_fill_outside_and_values_inside() -> None:
    geometry = geometry_for("3d")
    volume = np.arange(20**3, dtype=np.float32).reshape(20, 20, 20)
    padded = pad_volume(volume, geometry)  # 36^3
    hr, lr = extract_segments(padded, (0, 0, 0), (25, 25, 25), geometry, fill_value=-1000.0)
    # LR voxel i samples padded index -16 + 3 i: outside for i <= 5, inside from i = 6 (index 2)
    assert lr.shape == (19, 19, 19)
    assert np.all(lr[:6] == -1000.0) and np.all(lr[:, :6] == -1000.0) and np.all(lr[:, :, :6] == -1000.0)
    assert lr[6, 6, 6] == padded[2, 2, 2]
    # last inside index: -16 + 3 i <= 35  ->  i <= 17; i = 18 samples index 38, past the end
    assert lr[18, 18, 18] == -1000.0 and np.all(lr[18] == -1000.0)
    assert lr[17, 17, 17] == padded[35, 35, 35]
    np.testing.assert_array_equal(hr, padded[:25, :25, :25])


def test_segments_are_copies_and_keep_trailing_axes() -> None:
    geometry = geometry_for("3d")
    padded = np.random.default_rng(0).normal(size=(40, 40, 40, 2)).astype(np.float32)
    hr, lr = extract_segments(padded, (3, 4, 5), (25, 25, 25), geometry, 0.0)
    assert hr.shape == (25, 25, 25, 2) and lr.shape == (19, 19, 19, 2)
    hr[...] = 99.0
    lr[...] = 99.0
    assert not np.any(padded == 99.0)


def test_segment_outside_the_padded_volume_is_refused() -> None:
    geometry = geometry_for("3d")
    padded = np.zeros((30, 30, 30), dtype=np.float32)
    with pytest.raises(GeometryError, match="leaves the padded volume"):
        extract_segments(padded, (6, 0, 0), (25, 25, 25), geometry, 0.0)
    with pytest.raises(GeometryError, match="leaves the padded volume"):
        extract_segments(padded, (-1, 0, 0), (25, 25, 25), geometry, 0.0)


def test_batch_extraction_equals_single_extraction() -> None:
    geometry = geometry_for("3d")
    rng = np.random.default_rng(1)
    padded = pad_volume(rng.normal(size=(33, 28, 40)).astype(np.float32), geometry)
    starts = np.stack([rng.integers(0, padded.shape[a] - 25 + 1, size=12) for a in range(3)], axis=1)
    hr_batch, lr_batch = extract_segment_batch(padded, starts, (25, 25, 25), geometry, 3.0)
    assert hr_batch.shape == (12, 25, 25, 25) and lr_batch.shape == (12, 19, 19, 19)
    for index, start in enumerate(starts):
        hr, lr = extract_segments(padded, start, (25, 25, 25), geometry, 3.0)
        np.testing.assert_array_equal(hr_batch[index], hr)
        np.testing.assert_array_equal(lr_batch[index], lr)


def test_pad_volume_reflects_and_unpads() -> None:
    geometry = geometry_for("3d")
    volume = np.arange(10 * 11 * 12, dtype=np.float32).reshape(10, 11, 12)
    padded = pad_volume(volume, geometry)
    assert padded.shape == (26, 27, 28)
    np.testing.assert_array_equal(padded[8:18, 8:19, 8:20], volume)
    # numpy 'reflect': the edge voxel is not repeated
    np.testing.assert_array_equal(padded[7, 8:19, 8:20], volume[1])
    np.testing.assert_array_equal(padded[18, 8:19, 8:20], volume[8])
    np.testing.assert_array_equal(unpad_volume(padded, geometry, volume.shape), volume)

    one_slice = geometry_for("1slice")
    padded_slice = pad_volume(volume, one_slice)
    assert padded_slice.shape == (10, 27, 28)  # no padding left-right

    small = pad_volume(volume[:3, :3, :3], geometry, min_shape=(25, 25, 25))
    assert small.shape == (25, 25, 25)  # 3 + 16 = 19, extra 6 at the end
    np.testing.assert_array_equal(unpad_volume(small, geometry, (3, 3, 3)), volume[:3, :3, :3])

    labels = pad_volume(np.zeros((10, 11, 12, 3), dtype=np.uint8), geometry)
    assert labels.shape == (26, 27, 28, 3) and labels.dtype == np.uint8


def test_corner_mean() -> None:
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    corners = list(itertools.product((0, -1), (0, -1), (0, -1)))
    for value, corner in enumerate(corners):
        volume[corner] = value
    volume[1:3, 1:4, 1:5] = 1000.0  # interior ignored
    assert corner_mean(volume) == pytest.approx(np.mean(range(8)))
    with pytest.raises(GeometryError):
        corner_mean(np.zeros((3, 3)))


@pytest.mark.parametrize("segment", [(25, 25, 25), (24, 17, 18), (5, 6, 7)])
def test_valid_centre_mask_is_exactly_where_segments_fit(segment) -> None:
    geometry = geometry_for("3d")
    shape = (30, 26, 27)
    mask = valid_centre_mask(shape, segment)
    for centre in itertools.product(*(range(n) for n in shape)):
        start = geometry.segment_start(centre, segment)
        fits = all(0 <= s and s + n <= size for s, n, size in zip(start, segment, shape, strict=True))
        assert mask[centre] == fits, centre
    # even size: centre one voxel toward the start -> one more excluded voxel at the end
    lower, upper = centre_bounds(shape, segment)
    assert lower == tuple((n - 1) // 2 for n in segment)
    assert upper == tuple(d - 1 - n // 2 for d, n in zip(shape, segment, strict=True))
    assert not valid_centre_mask((20, 30, 30), (25, 25, 25)).any()


def test_label_block_of_valid_centres_lies_in_the_unpadded_volume() -> None:
    geometry = geometry_for("3d")
    volume_shape = (14, 20, 31)
    padded_shape = tuple(n + 16 for n in volume_shape)
    lower, upper = centre_bounds(padded_shape, (25, 25, 25))
    for centre in itertools.product(*zip(lower, upper, strict=True)):
        block = geometry.label_block_slices(centre, (25, 25, 25))
        for axis, piece in enumerate(block):
            assert piece.stop - piece.start == 9
            assert piece.start == centre[axis] - 4  # [c - (out - 1) // 2, +out)
            assert 8 <= piece.start and piece.stop <= 8 + volume_shape[axis]
    # the extreme centres touch both ends of the unpadded volume
    first = geometry.label_block_slices(lower, (25, 25, 25))
    last = geometry.label_block_slices(upper, (25, 25, 25))
    assert [s.start for s in first] == [8, 8, 8]
    assert [s.stop for s in last] == [8 + n for n in volume_shape]
