"""Tests of vfdetect.sampling and its modules (training_cases, augment, segments, dataset): centre sampling,
segment extraction, augmentation, seeding, tf.data."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from vfdetect.augment import Randomisation, draw_randomisation, noise_box, randomised_window
from vfdetect.dataset import make_dataset, segments_dataset
from vfdetect.errors import InputError, VfdetectError
from vfdetect.geometry import NetworkGeometry, extract_segments, geometry_for, pad_volume
from vfdetect.sampling import SamplingConfig
from vfdetect.segments import (
    TrainingSampler,
    draw_subepoch,
    extract_sample,
    subepoch_positions,
    subepoch_rng,
    uniform_validation_segments,
)
from vfdetect.training_cases import (
    PreparedCase,
    TrainingCase,
    distribute_to_classes,
    load_training_case,
    prepare_case,
    sample_centres,
    valid_centre_bounds,
)

GEOMETRY_3D = geometry_for("3d")
NO_AUGMENTATION = {"noise_shift_sd": 0.0, "noise_scale_sd": 0.0, "flip_probability": (0.0, 0.0, 0.0)}


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """Whether ``count`` successes of ``n`` trials is within ``sigmas`` standard deviations of ``n p``."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


def spine_like_case(name: str = "c", shape=(40, 36, 48), with_fracture: bool = True, seed: int = 0) -> TrainingCase:
    """A small case: noise image, a block of 'normal' vertebra voxels, optionally a fractured block."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[15:25, 14:22, 8:40] = 1
    if with_fracture:
        labels[15:25, 14:22, 20:26] = 2
    return TrainingCase(name, image, labels)


# ----------------------------------------------------------------------------------------------
# Centres
# ----------------------------------------------------------------------------------------------


def test_tiny_map_one_valid_voxel_per_class_gives_exact_centres() -> None:
    # RF 3, segment 3: the valid centres are exactly the unpadded voxels; x = 0, 1, 2 hold classes 0, 1, 2.
    geometry = NetworkGeometry(kernels=((3, 3, 3),))
    labels = np.array([0, 1, 2], dtype=np.uint8).reshape(3, 1, 1)
    case = TrainingCase("tiny", np.zeros((3, 1, 1), np.float32), labels)
    prepared = prepare_case(case, geometry, (3, 3, 3))
    assert prepared.padded_labels.shape == (5, 3, 3)
    assert valid_centre_bounds(prepared.padded_labels.shape, (3, 3, 3)) == ((1, 1, 1), (4, 2, 2))
    assert prepared.class_counts == (1, 1, 1)
    rng = np.random.default_rng(3)
    for label in range(3):
        centres = sample_centres(prepared, label, 7, rng)
        assert centres.tolist() == [[label + 1, 1, 1]] * 7
    config = SamplingConfig(hr_shape=(3, 3, 3), **NO_AUGMENTATION)
    segments = draw_subepoch([prepared], geometry, config, 9, rng)
    assert sorted(map(tuple, segments["centre"].tolist())) == [(1, 1, 1)] * 3 + [(2, 1, 1)] * 3 + [(3, 1, 1)] * 3
    assert np.array_equal(segments["labels"].reshape(-1), segments["centre"][:, 0] - 1)


def test_edge_exclusion_with_the_3d_network() -> None:
    # 12^3 volume, padded by 8 to 28^3; 25^3 segments fit only for centres 12..15 (unpadded 4..7).
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[5, 6, 7] = 2  # the only fracture voxel, inside the valid box
    labels[7, 4, 4] = 1  # the only normal voxel inside the valid box
    labels[0, 0, 0] = 1  # outside the valid box: must never be a centre
    labels[11, 3, 9] = 2  # outside as well
    case = TrainingCase("edge", np.zeros((12, 12, 12), np.float32), labels)
    prepared = prepare_case(case, GEOMETRY_3D, (25, 25, 25))
    assert prepared.centre_low == (12, 12, 12) and prepared.centre_high == (16, 16, 16)
    assert prepared.class_counts == (62, 1, 1)
    config = SamplingConfig(class_weights=(0, 1, 1), **NO_AUGMENTATION)
    segments = draw_subepoch([prepared], GEOMETRY_3D, config, 40, np.random.default_rng(0))
    centres = set(map(tuple, segments["centre"].tolist()))
    assert centres == {(13, 14, 15), (15, 12, 12)}
    assert np.count_nonzero(segments["centre"][:, 0] == 13) == 20
    # Background draws stay inside the valid box.
    background = sample_centres(prepared, 0, 500, np.random.default_rng(1))
    assert background.min() >= 12 and background.max() <= 15
    assert np.all(prepared.padded_labels[tuple(background.T)] == 0)


def test_distribution_to_classes_floor_then_leftovers_in_proportion() -> None:
    rng = np.random.default_rng(0)
    counts = distribute_to_classes(10, (0.5, 0.3, 0.2), (True, True, True), rng)
    assert counts.tolist() == [5, 3, 2]
    # One sample at a time: the class is drawn with probability p.
    draws = np.array([distribute_to_classes(1, (0.5, 0.3, 0.2), (True, True, True), rng) for _ in range(3000)])
    assert draws.sum(axis=1).tolist() == [1] * 3000
    for label, p in enumerate((0.5, 0.3, 0.2)):
        assert binomial_ok(int(draws[:, label].sum()), 3000, p)
    # Absent fracture class: its third goes to the other two in proportion.
    draws = np.array([distribute_to_classes(1, (1 / 3,) * 3, (True, True, False), rng) for _ in range(3000)])
    assert draws[:, 2].sum() == 0
    assert binomial_ok(int(draws[:, 0].sum()), 3000, 0.5)
    assert distribute_to_classes(7, (1 / 3,) * 3, (True, True, False), rng).sum() == 7
    with pytest.raises(VfdetectError):
        distribute_to_classes(5, (0, 0, 1), (True, True, False), rng)


def test_class_frequencies_of_subepochs_match_weights() -> None:
    geometry = GEOMETRY_3D
    weights = (0.5, 0.3, 0.2)
    config = SamplingConfig(class_weights=weights, **NO_AUGMENTATION)
    cases = [prepare_case(spine_like_case(f"c{i}", seed=i), geometry) for i in range(3)]
    centre_labels = []
    for subepoch in range(4):
        # 301 segments over 3 cases: 100 or 101 per case, so leftovers are drawn every time.
        segments = draw_subepoch(cases, geometry, config, 301, subepoch_rng(0, 0, subepoch))
        assert len(segments["labels"]) == 301
        centre_labels.append(segments["labels"][:, 4, 4, 4])
    frequencies = np.bincount(np.concatenate(centre_labels), minlength=3)
    for label, p in enumerate(weights):
        assert binomial_ok(int(frequencies[label]), 1204, p)

    # A case without fracture voxels: its segments split between background and normal only.
    no_fracture = prepare_case(spine_like_case("n", with_fracture=False), geometry)
    assert no_fracture.class_counts[2] == 0
    segments = draw_subepoch([no_fracture], geometry, SamplingConfig(**NO_AUGMENTATION), 1001, np.random.default_rng(5))
    frequencies = np.bincount(segments["labels"][:, 4, 4, 4], minlength=3)
    assert frequencies[2] == 0
    assert abs(int(frequencies[0]) - int(frequencies[1])) <= 1


def test_centres_are_uniform_within_a_class() -> None:
    # In a 4^3 valid box: 44 background voxels (rejection sampling), 16 normal (rejection), 4 fracture
    # (stored indices). Every voxel of a class is hit about equally often.
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[4:8, 4:8, 4] = 1
    labels[4:6, 4:6, 5] = 2
    prepared = prepare_case(TrainingCase("u", np.zeros((12, 12, 12), np.float32), labels), GEOMETRY_3D)
    assert prepared.class_counts == (44, 16, 4)
    assert prepared.class_indices[0] is None and prepared.class_indices[2] is not None
    rng = np.random.default_rng(11)
    for label, n_voxels in ((0, 44), (1, 16), (2, 4)):
        centres = sample_centres(prepared, label, 200 * n_voxels, rng)
        assert np.all(prepared.padded_labels[tuple(centres.T)] == label)
        _, hits = np.unique(centres, axis=0, return_counts=True)
        assert len(hits) == n_voxels
        assert all(binomial_ok(int(h), 200 * n_voxels, 1 / n_voxels) for h in hits)


def test_cases_per_subepoch_and_even_split() -> None:
    cases = [prepare_case(spine_like_case(f"c{i}", shape=(30, 30, 30), seed=i), GEOMETRY_3D) for i in range(5)]
    config = SamplingConfig(cases_per_subepoch=3, **NO_AUGMENTATION)
    segments = draw_subepoch(cases, GEOMETRY_3D, config, 31, np.random.default_rng(2))
    used, per_case = np.unique(segments["case_index"], return_counts=True)
    assert len(used) == 3
    assert sorted(per_case.tolist()) == [10, 10, 11]
    # Shuffled together: not grouped by case.
    assert np.any(np.diff(segments["case_index"]) != 0) and len(np.flatnonzero(np.diff(segments["case_index"]))) > 3


# ----------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------


def test_segment_at_known_centre_equals_hand_computed_slices() -> None:
    shape = (30, 32, 34)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 100.0
    labels = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.uint8)
    prepared = prepare_case(TrainingCase("a", image, labels), GEOMETRY_3D)
    padded = np.pad(image, 8, mode="reflect")
    padded_labels = np.pad(labels, 8, mode="reflect")
    corners = image[np.ix_([0, -1], [0, -1], [0, -1])]
    assert prepared.fill_value == pytest.approx(float(corners.mean()))

    centre = (13, 20, 35)  # near the start of x: the LR window leaves the padded volume there
    hr, lr, block = extract_sample(prepared, centre, GEOMETRY_3D)
    start = (1, 8, 23)  # centre - 12
    assert np.array_equal(hr, padded[1:26, 8:33, 23:48])
    assert np.array_equal(block, padded_labels[9:18, 16:25, 31:40])  # centre -4 .. +4
    assert block[4, 4, 4] == padded_labels[centre]
    # LR: 19 samples per axis, every 3rd voxel from hr_start + 1 - 17, corner mean outside.
    expected = np.empty((19, 19, 19), np.float32)
    for i in range(19):
        for j in range(19):
            for k in range(19):
                index = (start[0] - 16 + 3 * i, start[1] - 16 + 3 * j, start[2] - 16 + 3 * k)
                inside = all(0 <= v < n for v, n in zip(index, padded.shape, strict=True))
                expected[i, j, k] = padded[index] if inside else np.float32(prepared.fill_value)
    assert np.array_equal(lr, expected)
    assert np.any(lr == np.float32(prepared.fill_value))  # the fill was exercised

    # The drawn (unaugmented) segment at that centre is the same.
    config = SamplingConfig(**NO_AUGMENTATION)
    segments = draw_subepoch([prepared], GEOMETRY_3D, config, 50, np.random.default_rng(0))
    row = 0
    c = tuple(segments["centre"][row])
    hr_row, lr_row, block_row = extract_sample(prepared, c, GEOMETRY_3D)
    assert np.array_equal(segments["hr"][row, ..., 0], hr_row)
    assert np.array_equal(segments["lr"][row, ..., 0], lr_row)
    assert np.array_equal(segments["labels"][row], block_row)


@pytest.mark.parametrize("variant", ["5slices", "1slice"])
def test_slice_variants_shapes(variant: str) -> None:
    geometry = geometry_for(variant)
    config = SamplingConfig()
    segments = draw_subepoch([spine_like_case()], geometry, config, 6, np.random.default_rng(0))
    out = geometry.output_shape(config.hr_shape)
    assert segments["hr"].shape == (6, 25, 25, 25, 1)
    assert segments["lr"].shape == (6, *geometry.lr_input_shape(out), 1)
    assert segments["labels"].shape == (6, *out)


def test_augmentation_flips_hr_lr_and_labels_alike_and_shares_noise() -> None:
    case = prepare_case(spine_like_case(), GEOMETRY_3D)
    plain = draw_subepoch([case], GEOMETRY_3D, SamplingConfig(**NO_AUGMENTATION), 40, np.random.default_rng(9))
    config = SamplingConfig(flip_probability=(0.5, 0.5, 0.5))
    augmented = draw_subepoch([case], GEOMETRY_3D, config, 40, np.random.default_rng(9))
    assert np.array_equal(plain["centre"], augmented["centre"])
    flips = augmented["flips"]
    assert 0 < flips.sum() < flips.size
    shifts, scales = [], []
    for row in range(40):
        axes = tuple(np.flatnonzero(flips[row]))
        hr = np.flip(plain["hr"][row, ..., 0], axes)
        lr = extract_sample(case, plain["centre"][row], GEOMETRY_3D, flip_axes=axes)[1]
        assert np.array_equal(augmented["labels"][row], np.flip(plain["labels"][row], axes))
        hr_aug = augmented["hr"][row, ..., 0]
        # Solve (hr + s) * m for s and m from two voxels, then check every HR and LR voxel.
        a, b = np.unravel_index(np.argmax(hr), hr.shape), np.unravel_index(np.argmin(hr), hr.shape)
        m = (hr_aug[a] - hr_aug[b]) / (hr[a] - hr[b])
        s = hr_aug[a] / m - hr[a]
        np.testing.assert_allclose(hr_aug, (hr + s) * m, atol=1e-4)
        np.testing.assert_allclose(augmented["lr"][row, ..., 0], (lr + s) * m, atol=1e-4)
        shifts.append(s)
        scales.append(m)
    assert 0.02 < np.std(shifts) < 0.1 and 0.004 < np.std(scales) < 0.02
    # Flipping only x: label blocks are mirrored along x only.
    only_x = draw_subepoch([case], GEOMETRY_3D, SamplingConfig(flip_probability=(1, 0, 0), noise_shift_sd=0,
                                                               noise_scale_sd=0), 40, np.random.default_rng(9))
    assert only_x["flips"].tolist() == [[True, False, False]] * 40
    assert np.array_equal(only_x["hr"], plain["hr"][:, ::-1])
    assert np.array_equal(only_x["labels"], plain["labels"][:, ::-1])
    # The LR context is read from the mirrored volume, not flipped: the window is not symmetric.
    assert not np.array_equal(only_x["lr"], plain["lr"][:, ::-1])


def test_validation_segments_are_uniform_over_the_whole_image() -> None:
    shape = (6, 5, 4)
    labels = (np.arange(120).reshape(shape) % 3).astype(np.uint8)
    image = np.arange(120, dtype=np.float32).reshape(shape)
    case = TrainingCase("v", image, labels)
    segments = uniform_validation_segments([case], GEOMETRY_3D, 12000, np.random.default_rng(0))
    assert segments["hr"].shape == (12000, 17, 17, 17, 1)
    assert segments["lr"].shape == (12000, 17, 17, 17, 1)
    assert segments["labels"].shape == (12000, 1, 1, 1)
    unpadded = segments["centre"] - 8
    assert unpadded.min(axis=0).tolist() == [0, 0, 0]
    assert unpadded.max(axis=0).tolist() == [5, 4, 3]
    assert np.array_equal(segments["labels"][:, 0, 0, 0], labels[tuple(unpadded.T)])
    assert np.array_equal(segments["hr"][:, 8, 8, 8, 0], image[tuple(unpadded.T)])  # no augmentation
    _, hits = np.unique(unpadded, axis=0, return_counts=True)
    assert len(hits) == 120 and all(binomial_ok(int(h), 12000, 1 / 120) for h in hits)


# ----------------------------------------------------------------------------------------------
# Seeds, threads, tf.data
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_segments_and_background_thread_agrees() -> None:
    cases = [spine_like_case("a", seed=1), spine_like_case("b", seed=2, with_fracture=False)]
    config = SamplingConfig()
    first = TrainingSampler(cases, GEOMETRY_3D, config, segments_per_subepoch=30, seed=7)
    second = TrainingSampler(cases, GEOMETRY_3D, config, segments_per_subepoch=30, seed=7)
    other = TrainingSampler(cases, GEOMETRY_3D, config, segments_per_subepoch=30, seed=8)
    a, b, c = first.draw(1, 2), second.draw(1, 2), other.draw(1, 2)
    for key in ("hr", "lr", "labels", "centre", "flips"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["hr"], c["hr"])
    assert not np.array_equal(a["hr"], first.draw(1, 3)["hr"])
    streamed = list(first.iterate(subepoch_positions(4, start=(1, 1), epochs=2)))
    assert [position for position, _ in streamed] == [(1, 1), (1, 2), (1, 3)]
    assert np.array_equal(streamed[1][1]["hr"], a["hr"])


def test_training_case_requires_consistent_arrays() -> None:
    with pytest.raises(VfdetectError):
        TrainingCase("bad", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(VfdetectError):
        SamplingConfig(class_weights=(0, 0, 0))
    with pytest.raises(VfdetectError):
        draw_subepoch([spine_like_case()], GEOMETRY_3D, SamplingConfig(hr_shape=(15, 25, 25)), 4,
                      np.random.default_rng(0))
    assert SamplingConfig.from_dict(SamplingConfig(class_weights=(2, 1, 1)).to_dict()) == SamplingConfig(
        class_weights=(0.5, 0.25, 0.25)
    )


def test_module_import_does_not_import_tensorflow() -> None:
    code = "import sys, vfdetect.sampling; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_tf_datasets_yield_batches_of_the_right_shapes_and_dtypes() -> None:
    tf = pytest.importorskip("tensorflow")
    cases = [spine_like_case("a", seed=1)]
    sampler = TrainingSampler(cases, GEOMETRY_3D, SamplingConfig(), segments_per_subepoch=25, seed=3)
    dataset = make_dataset(sampler, batch_size=10, subepochs_per_epoch=2, start=(0, 1), epochs=2)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 3 * 2  # subepochs (0,1), (1,0), (1,1); 2 full batches each, 5 segments dropped
    (hr, lr), labels = batches[0]
    assert hr.shape == (10, 25, 25, 25, 1) and hr.dtype == np.float32
    assert lr.shape == (10, 19, 19, 19, 1) and lr.dtype == np.float32
    assert labels.shape == (10, 9, 9, 9) and labels.dtype == np.int32
    expected = sampler.draw(1, 0)
    (hr, lr), labels = batches[3]
    assert np.array_equal(hr, expected["hr"][10:20]) and np.array_equal(labels, expected["labels"][10:20])
    spec = dataset.element_spec
    assert spec[0][0].shape == (10, 25, 25, 25, 1) and spec[1].dtype == tf.int32

    sharded = list(make_dataset(sampler, 10, 2, start=(0, 0), epochs=1, shard=(1, 2)).as_numpy_iterator())
    assert len(sharded) == 2 and np.array_equal(sharded[0][1], sampler.draw(0, 0)["labels"][10:20])

    validation = uniform_validation_segments(cases, GEOMETRY_3D, 23, np.random.default_rng(0))
    batches = list(segments_dataset(validation, 10).as_numpy_iterator())
    assert [b[1].shape for b in batches] == [(10, 1, 1, 1), (10, 1, 1, 1), (3, 1, 1, 1)]
    assert batches[0][0][1].shape == (10, 17, 17, 17, 1)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _write_case(tmp_path, label_affine=None, label_values=(0, 1, 2)):
    from vfdetect.vertebrae import Case

    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    hu = np.full((24, 30, 16), -1000, dtype=np.int16)
    hu[4:20, 5:25, :] = 40
    hu[10:14, 12:18, :] = 400
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[10:14, 12:18, 2:8] = label_values[1]
    labels[10:14, 12:18, 8:12] = label_values[2]
    scan = tmp_path / "s1_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), scan)
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    nib.save(nib.Nifti1Image(labels, affine if label_affine is None else label_affine), labels_dir / "s1_labels.nii.gz")
    return Case("s1", scan), labels_dir


def test_load_training_case_resamples_and_normalises(tmp_path) -> None:
    case, labels_dir = _write_case(tmp_path)
    training = load_training_case(case, labels_dir)
    assert training.image.dtype == np.float32 and training.labels.dtype == np.uint8
    from vfdetect.volume import internal_grid

    expected_shape, _ = internal_grid((24, 30, 16), np.diag([1.5, 1.0, 2.0, 1.0]), 1.0)
    assert training.image.shape == training.labels.shape == tuple(expected_shape)
    assert training.image.shape[2] >= 30  # 16 slices of 2 mm resampled to 1 mm
    assert set(np.unique(training.labels).tolist()) == {0, 1, 2}
    body = training.image > training.image.min() + 1.0
    assert abs(float(training.image[body].mean())) < 0.5
    # Vertebra labels sit on the bright block.
    assert training.image[training.labels > 0].mean() > training.image[training.labels == 0].mean() + 1.0


def test_load_training_case_rejects_labels_off_the_scan_grid(tmp_path) -> None:
    shifted = np.diag([1.5, 1.0, 2.0, 1.0])
    shifted[:3, 3] = (-20.0, 10.0, 9.0)
    case, labels_dir = _write_case(tmp_path, label_affine=shifted)
    with pytest.raises(InputError, match="s1_labels.nii.gz"):
        load_training_case(case, labels_dir)
    with pytest.raises(InputError, match="not found"):
        load_training_case(case, tmp_path / "nowhere")


def test_load_training_case_rejects_unknown_label_values(tmp_path) -> None:
    case, labels_dir = _write_case(tmp_path, label_values=(0, 1, 7))
    with pytest.raises(InputError, match=r"0, 1, 2 or 255 \(ignored\), found \[7\]"):
        load_training_case(case, labels_dir)


def test_ignored_vertebrae_load_but_are_never_segment_centres(tmp_path) -> None:
    case, labels_dir = _write_case(tmp_path, label_values=(0, 1, 255))
    loaded = load_training_case(case, labels_dir)
    assert set(np.unique(loaded.labels)) == {0, 1, 255}
    prepared = prepare_case(loaded, GEOMETRY_3D)
    assert prepared.class_counts[2] == 0
    segments = draw_subepoch([prepared], GEOMETRY_3D, SamplingConfig(), 40, np.random.default_rng(0))
    centres = segments["centre"]
    assert all(prepared.padded_labels[tuple(c)] in (0, 1) for c in centres)


def test_load_training_case_draws_labels_on_the_internal_grid_from_centroids(tmp_path) -> None:
    """A thick-slice (1 x 1 x 4 mm) case with centroids: the fracture keeps its true height (13.2 mm)."""
    import json

    from vfdetect.labels import FRACTURE, LabelConfig, synthesize_labels
    from vfdetect.vertebrae import Case

    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    hu = np.full((50, 50, 30), -1000, dtype=np.int16)
    hu[5:45, 5:45, :] = 40
    scan = tmp_path / "thick_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), scan)
    centroids = tmp_path / "thick_ctd.json"
    centroids.write_text(json.dumps([{"direction": ["R", "A", "S"]}] + [
        {"label": label, "X": 25.0, "Y": 25.0, "Z": z / 4.0} for label, z in ((20, 17.5), (21, 50.5), (22, 83.5))
    ]))
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    (labels_dir / "label_config.json").write_text(json.dumps(LabelConfig().to_dict()))
    case = Case("thick", scan, centroids, grades={20: 0, 21: 3, 22: 0})
    loaded = load_training_case(case, labels_dir)
    from vfdetect.volume import internal_grid

    shape, internal_affine = internal_grid(hu.shape, affine)
    vertebrae = case.vertebrae(affine, hu.shape)
    assert [v.position_mm for v in vertebrae] == [(25.0, 25.0, 17.5), (25.0, 25.0, 50.5), (25.0, 25.0, 83.5)]
    assert np.array_equal(loaded.labels, synthesize_labels(shape, internal_affine, vertebrae))
    assert abs(int(np.count_nonzero(loaded.labels[25, 25, :] == FRACTURE)) - 13.2) <= 1.0
    assert not (labels_dir / "thick_labels.nii.gz").exists()  # no label image needed


@pytest.mark.parametrize("hr_shape", [(25, 25, 25), (17, 17, 17), (45, 45, 45)])
def test_prepare_case_with_class_voxels_equals_scanning_the_labels(hr_shape) -> None:
    case = spine_like_case()
    labels = case.labels.copy()
    labels[16:18, 15:17, 30:33] = 255
    plain = TrainingCase("c", case.image, labels)
    voxels = {value: np.flatnonzero(labels.ravel() == value) for value in (1, 2, 255)}
    indexed = TrainingCase("c", case.image, labels, class_voxels=voxels)
    expected, found = prepare_case(plain, GEOMETRY_3D, hr_shape), prepare_case(indexed, GEOMETRY_3D, hr_shape)
    assert found.class_counts == expected.class_counts
    for mine, theirs in zip(found.class_indices, expected.class_indices, strict=True):
        assert (mine is None and theirs is None) or np.array_equal(mine, theirs)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    config = SamplingConfig(hr_shape=hr_shape, **NO_AUGMENTATION)
    a = draw_subepoch([expected], GEOMETRY_3D, config, 30, rng_a)
    b = draw_subepoch([found], GEOMETRY_3D, config, 30, rng_b)
    assert np.array_equal(a["centre"], b["centre"]) and np.array_equal(a["hr"], b["hr"])


def test_prepared_case_is_reused_not_recomputed() -> None:
    prepared = prepare_case(spine_like_case(), GEOMETRY_3D)
    assert isinstance(prepared, PreparedCase)
    sampler = TrainingSampler([prepared], GEOMETRY_3D, SamplingConfig(), 10, seed=0)
    assert sampler.cases[0] is prepared
    with pytest.raises(VfdetectError, match="prepared for segments"):
        TrainingSampler([prepared], GEOMETRY_3D, SamplingConfig(hr_shape=(27, 27, 27)), 10, seed=0)


def test_sampling_config_round_trips_and_refuses_unknown_settings() -> None:
    config = SamplingConfig(class_weights=(0.2, 0.4, 0.4))
    assert SamplingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(VfdetectError, match="unknown sampling setting.*class_weight"):
        SamplingConfig.from_dict({"class_weight": [0.2, 0.4, 0.4]})


# ----------------------------------------------------------------------------------------------
# Flips and the LR context
# ----------------------------------------------------------------------------------------------


def test_lr_window_is_not_symmetric_about_the_segment_centre() -> None:
    # 25^3 segment of the 3D network: LR samples at c - 28, c - 25, ..., c + 26 (centred on c - 1),
    # so flipping an extracted LR window would read c - 26 .. c + 28 in the mirrored frame.
    start = GEOMETRY_3D.segment_start((100, 100, 100), (25, 25, 25))
    lr_start = GEOMETRY_3D.lr_start(start)
    n = GEOMETRY_3D.lr_shape_for((25, 25, 25))[0]
    offsets = lr_start[0] + 3 * np.arange(n) - 100
    assert (offsets[0], offsets[-1]) == (-28, 26)
    assert np.array_equal(-offsets[::-1], offsets + 2)


@pytest.mark.parametrize("hr_shape", [(25, 25, 25), (27, 25, 31), (26, 25, 28)])
@pytest.mark.parametrize("flip", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_flipped_sample_is_the_sample_of_the_mirrored_volume(hr_shape, flip) -> None:
    rng = np.random.default_rng(3)
    shape = (37, 41, 45)
    image = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    case = prepare_case(TrainingCase("r", image, labels), GEOMETRY_3D, hr_shape)
    axes = tuple(int(a) for a in np.flatnonzero(flip))
    mirrored_case = prepare_case(TrainingCase("m", np.flip(image, axes).copy(), np.flip(labels, axes).copy()),
                                 GEOMETRY_3D, hr_shape)
    assert np.array_equal(mirrored_case.padded_image, np.flip(case.padded_image, axes))
    config = SamplingConfig(hr_shape=hr_shape, flip_probability=flip, noise_shift_sd=0, noise_scale_sd=0)
    segments = draw_subepoch([case], GEOMETRY_3D, config, 30, np.random.default_rng(5))
    size = np.asarray(case.padded_image.shape)
    odd = np.asarray(hr_shape) % 2 == 1
    for row in range(30):
        centre = segments["centre"][row]
        start = np.asarray(GEOMETRY_3D.segment_start(centre, hr_shape))
        mirrored_start = np.where(flip, size - start - np.asarray(hr_shape), start)
        hr, lr = extract_segments(mirrored_case.padded_image, mirrored_start, hr_shape, GEOMETRY_3D,
                                  mirrored_case.fill_value)
        block = mirrored_case.padded_labels[GEOMETRY_3D.output_slices(mirrored_start, hr_shape)]
        assert np.array_equal(segments["hr"][row, ..., 0], hr)
        assert np.array_equal(segments["lr"][row, ..., 0], lr)
        assert np.array_equal(segments["labels"][row], block)
        if all(odd):  # odd sizes: exactly the sample at the mirrored centre
            mirrored_centre = np.where(flip, size - 1 - centre, centre)
            expected = extract_sample(mirrored_case, mirrored_centre, GEOMETRY_3D, hr_shape)
            for got, want in zip((segments["hr"][row, ..., 0], segments["lr"][row, ..., 0], segments["labels"][row]),
                                 expected, strict=True):
                assert np.array_equal(got, want)
        # HR and labels are the flipped arrays of the unflipped sample; the LR is not.
        plain_hr, plain_lr, plain_labels = extract_sample(case, centre, GEOMETRY_3D, hr_shape)
        assert np.array_equal(segments["hr"][row, ..., 0], np.flip(plain_hr, axes))
        assert np.array_equal(segments["labels"][row], np.flip(plain_labels, axes))


# ----------------------------------------------------------------------------------------------
# Domain randomisation
# ----------------------------------------------------------------------------------------------

EVERYTHING = {name: 1.0 for name in ("intensity_probability", "gamma_probability", "blur_probability",
                                     "thick_slice_probability", "noise_probability", "bias_probability")}


def _full_grid(shape) -> list[np.ndarray]:
    return [np.arange(n) for n in shape]


def test_identity_randomisation_reads_what_extraction_reads() -> None:
    case = prepare_case(spine_like_case(), GEOMETRY_3D)
    for centre in [(12, 12, 12), (30, 25, 40)]:
        start = GEOMETRY_3D.segment_start(centre, (25, 25, 25))
        hr, lr = extract_segments(case.padded_image, start, (25, 25, 25), GEOMETRY_3D, case.fill_value)
        lr_start = GEOMETRY_3D.lr_start(start)
        hr_grid = [np.arange(s, s + 25) for s in start]
        lr_grid = [s + 3 * np.arange(19) for s in lr_start]
        assert np.array_equal(randomised_window(case.padded_image, case.fill_value, Randomisation(), hr_grid), hr)
        assert np.array_equal(randomised_window(case.padded_image, case.fill_value, Randomisation(), lr_grid), lr)


def test_segment_randomisation_equals_randomising_the_volume_then_extracting() -> None:
    rng = np.random.default_rng(4)
    padded = pad_volume(rng.normal(size=(40, 44, 38)).astype(np.float32), GEOMETRY_3D)
    fill = 0.3
    for seed in range(4):
        randomisation = draw_randomisation(SamplingConfig.randomised(**EVERYTHING), np.random.default_rng(seed))
        assert randomisation.slice_axis is not None and randomisation.bias_waves and randomisation.noise_sd > 0
        white = np.random.default_rng(seed).standard_normal(padded.shape).astype(np.float32)
        volume = randomised_window(padded, fill, randomisation, _full_grid(padded.shape), white)
        for centre in [(12, 12, 12), (30, 27, 25), (43, 47, 41)]:
            start = GEOMETRY_3D.segment_start(centre, (25, 25, 25))
            hr, lr = extract_segments(volume, start, (25, 25, 25), GEOMETRY_3D,
                                      float(randomisation.point_transform(fill)))
            hr_grid = [np.arange(s, s + 25) for s in start]
            lr_grid = [s + 3 * np.arange(19) for s in GEOMETRY_3D.lr_start(start)]
            origin, box = noise_box(randomisation, padded.shape, [hr_grid, lr_grid])
            block = white[tuple(slice(o, o + n) for o, n in zip(origin, box, strict=True))]
            np.testing.assert_allclose(randomised_window(padded, fill, randomisation, hr_grid, block, origin), hr,
                                       atol=2e-5)
            np.testing.assert_allclose(randomised_window(padded, fill, randomisation, lr_grid, block, origin), lr,
                                       atol=2e-5)


@pytest.mark.parametrize("flip", [(0, 0, 0), (1, 1, 1)])
def test_randomised_draws_agree_between_pathways_where_they_overlap(flip) -> None:
    case = prepare_case(spine_like_case(shape=(50, 46, 52)), GEOMETRY_3D)
    config = SamplingConfig.randomised(noise_shift_sd=0, noise_scale_sd=0, flip_probability=flip, **EVERYTHING)
    segments = draw_subepoch([case], GEOMETRY_3D, config, 12, np.random.default_rng(1))
    plain = draw_subepoch([case], GEOMETRY_3D, SamplingConfig(**NO_AUGMENTATION), 12, np.random.default_rng(1))
    # LR samples at HR-segment offsets -16 + 3 i: offsets 2, 5, ..., 23 (LR index 6 .. 13) lie inside the
    # HR segment. A flipped sample is a sample of the mirrored volume, so the same rule holds for it.
    inside_hr = slice(2, 24, 3)
    inside_lr = slice(6, 14)
    for row in range(12):
        hr = segments["hr"][row, ..., 0]
        lr = segments["lr"][row, ..., 0]
        np.testing.assert_allclose(lr[inside_lr, inside_lr, inside_lr], hr[inside_hr, inside_hr, inside_hr], atol=1e-5)
        assert not np.allclose(hr, plain["hr"][row, ..., 0], atol=1e-2)  # the image did change
    axes = tuple(int(a) for a in np.flatnonzero(flip))
    assert np.array_equal(segments["labels"], np.flip(plain["labels"], tuple(a + 1 for a in axes)))


def test_randomised_draws_are_reproducible_and_off_by_default() -> None:
    case = prepare_case(spine_like_case(), GEOMETRY_3D)
    config = SamplingConfig.randomised()
    first = draw_subepoch([case], GEOMETRY_3D, config, 20, np.random.default_rng(7))
    again = draw_subepoch([case], GEOMETRY_3D, config, 20, np.random.default_rng(7))
    other = draw_subepoch([case], GEOMETRY_3D, config, 20, np.random.default_rng(8))
    for key in first:
        assert np.array_equal(first[key], again[key])
    assert not np.array_equal(first["hr"], other["hr"])
    assert not SamplingConfig().randomise and config.randomise
    # Off: the draws are those of a configuration without the new settings.
    off = draw_subepoch([case], GEOMETRY_3D, SamplingConfig.randomised(randomise=False), 20, np.random.default_rng(7))
    base = draw_subepoch([case], GEOMETRY_3D, SamplingConfig(), 20, np.random.default_rng(7))
    assert np.array_equal(off["hr"], base["hr"]) and np.array_equal(off["lr"], base["lr"])
    # The number of draws does not depend on which augmentations are on.
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    draw_randomisation(SamplingConfig.randomised(**EVERYTHING), rng_a)
    draw_randomisation(SamplingConfig.randomised(**{name: 0.0 for name in EVERYTHING}), rng_b)
    assert rng_a.random() == rng_b.random()


def _high_frequency_energy(volume: np.ndarray, axis: int) -> float:
    return float(np.mean(np.diff(volume, axis=axis) ** 2))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slices_remove_high_frequencies_along_their_axis_only(axis) -> None:
    volume = np.random.default_rng(0).normal(size=(30, 32, 34)).astype(np.float32)
    thick = randomised_window(volume, 0.0, Randomisation(slice_axis=axis, slice_thickness=4.0, slice_phase=1.3),
                              _full_grid(volume.shape))
    for other in range(3):  # white noise: mean squared difference / (2 variance) = 1 on every axis
        relative = _high_frequency_energy(thick, other) / (2 * float(thick.var()))
        assert relative < 0.25 if other == axis else relative == pytest.approx(1.0, abs=0.1)
    assert float(thick.var()) < 0.5 * float(volume.var())
    # Averages: a constant stays constant.
    constant = randomised_window(np.full((20, 20, 20), 2.5, np.float32), 0.0,
                                 Randomisation(slice_axis=axis, slice_thickness=3.3), _full_grid((20, 20, 20)))
    np.testing.assert_allclose(constant, 2.5, rtol=1e-5)
    # Thickness 1 at phase 0 is the identity.
    same = randomised_window(volume, 0.0, Randomisation(slice_axis=axis, slice_thickness=1.0), _full_grid(volume.shape))
    np.testing.assert_allclose(same, volume, atol=1e-6)


def test_blur_smooths_and_keeps_the_mean() -> None:
    volume = np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32)
    blurred = randomised_window(volume, 0.0, Randomisation(blur_sigma=1.0), _full_grid(volume.shape))
    for axis in range(3):
        assert _high_frequency_energy(blurred, axis) < 0.1 * _high_frequency_energy(volume, axis)
    assert abs(float(blurred.mean()) - float(volume.mean())) < 0.01


def test_gamma_is_monotone_and_leaves_values_outside_its_window() -> None:
    values = np.linspace(-6, 8, 2001, dtype=np.float32)
    for gamma in (0.7, 1.5):
        curved = Randomisation(gamma=gamma, gamma_window=(-3.0, 5.0)).point_transform(values)
        assert np.all(np.diff(curved) >= 0)
        outside = (values <= -3) | (values >= 5)
        np.testing.assert_allclose(curved[outside], values[outside], atol=1e-5)
        inside = (values > -2.9) & (values < 4.9)
        assert np.all(curved[inside] < values[inside]) if gamma > 1 else np.all(curved[inside] > values[inside])
    scaled = Randomisation(scale=1.1, offset=-0.2).point_transform(values)
    np.testing.assert_allclose(scaled, 1.1 * values - 0.2, atol=1e-5)


def test_bias_field_is_smooth_and_within_its_amplitude() -> None:
    config = SamplingConfig.randomised(**{**{name: 0.0 for name in EVERYTHING}, "bias_probability": 1.0})
    randomisation = draw_randomisation(config, np.random.default_rng(2))
    assert randomisation.scale == 1.0 and randomisation.noise_sd == 0 and len(randomisation.bias_waves) == 4
    shape = (60, 60, 60)
    ones = randomised_window(np.ones(shape, np.float32), 0.0, randomisation, _full_grid(shape))
    zeros = randomised_window(np.zeros(shape, np.float32), 0.0, randomisation, _full_grid(shape))
    gain, offset = ones - zeros - 1, zeros
    assert np.abs(gain).max() <= config.bias_gain + 1e-6 and np.abs(offset).max() <= config.bias_offset + 1e-6
    assert np.abs(offset).max() > 0.01 and np.abs(gain).max() > 0.005
    shortest = config.bias_wavelength[0]
    for field in (gain, offset):
        for axis in range(3):  # |second difference| <= amplitude * (2 pi / wavelength)^2
            curvature = np.abs(np.diff(field, n=2, axis=axis)).max()
            assert curvature <= np.abs(field).max() * (2 * np.pi / shortest) ** 2 * 2 + 1e-6


@pytest.mark.parametrize("correlation", [0.0, 1.0])
def test_noise_has_the_drawn_level_and_correlation(correlation) -> None:
    shape = (40, 40, 40)
    randomisation = Randomisation(noise_sd=0.2, noise_correlation=correlation)
    grid = _full_grid(shape)
    origin, box = noise_box(randomisation, shape, [grid])
    white = np.random.default_rng(0).standard_normal(box).astype(np.float32)
    noise = randomised_window(np.zeros(shape, np.float32), 0.0, randomisation, grid, white, origin)[5:-5, 5:-5, 5:-5]
    assert float(noise.std()) == pytest.approx(0.2, rel=0.1)
    neighbour = float(np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1])
    assert abs(neighbour) < 0.05 if correlation == 0 else neighbour == pytest.approx(np.exp(-1 / 4), abs=0.05)
    with pytest.raises(VfdetectError, match="white_noise"):
        randomised_window(np.zeros(shape, np.float32), 0.0, randomisation, grid)


def test_randomised_config_round_trips_and_refuses_bad_ranges() -> None:
    config = SamplingConfig.randomised(gamma_range=(0.8, 1.2), noise_probability=0.1)
    assert SamplingConfig.from_dict(config.to_dict()) == config
    assert SamplingConfig.from_dict({}).randomise is False
    with pytest.raises(VfdetectError, match="gamma_range"):
        SamplingConfig(gamma_range=(1.5, 0.7))
    with pytest.raises(VfdetectError, match="blur_probability"):
        SamplingConfig(blur_probability=1.5)
    with pytest.raises(VfdetectError, match="slice_thickness"):
        SamplingConfig(slice_thickness=(0.5, 2.0))
    with pytest.raises(VfdetectError, match="unknown sampling setting.*randomize"):
        SamplingConfig.from_dict({"randomize": True})


# ----------------------------------------------------------------------------------------------
# Case weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cases_per_subepoch", [50, 5])
def test_case_weights_set_the_share_of_each_source(cases_per_subepoch) -> None:
    phantoms = [TrainingCase(f"p{i}", *_small_arrays(i), source="phantom", weight=1 / 20) for i in range(20)]
    real = [TrainingCase(f"r{i}", *_small_arrays(100 + i), source="real", weight=1 / 2) for i in range(2)]
    cases = [prepare_case(case, GEOMETRY_3D) for case in phantoms + real]
    assert cases[-1].source == "real" and cases[-1].weight == 0.5
    config = SamplingConfig(cases_per_subepoch=cases_per_subepoch, **NO_AUGMENTATION)
    counts = np.zeros(2)
    for subepoch in range(20):
        segments = draw_subepoch(cases, GEOMETRY_3D, config, 100, subepoch_rng(0, 0, subepoch))
        per_source = np.bincount(segments["case_index"] >= 20, minlength=2)
        if cases_per_subepoch == 50:  # every case used: 2 segments per phantom, 25 per real scan, 10 by weight
            assert 40 <= per_source[0] <= 50 and 50 <= per_source[1] <= 60
        counts += per_source
    # 1:1 by source although the case counts are 10:1.
    assert binomial_ok(int(counts[1]), int(counts.sum()), 0.5, sigmas=4.5 if cases_per_subepoch == 50 else 12)
    with pytest.raises(VfdetectError, match="weight"):
        TrainingCase("bad", *_small_arrays(0), weight=0.0)


def _small_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    case = spine_like_case(shape=(26, 26, 26), seed=seed)
    return case.image, case.labels
