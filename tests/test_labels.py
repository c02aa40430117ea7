"""Tests of vfdetect.labels: ellipsoid label synthesis and the synth-labels command."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_png_has_content

from vfdetect.cli import cli
from vfdetect.errors import VfdetectError
from vfdetect.labels import (
    FRACTURE,
    IGNORE,
    NORMAL,
    LabelConfig,
    ellipsoids,
    label_path,
    read_label_config,
    read_label_min_grade,
    synthesize_labels,
    synthesize_manifest_labels,
)
from vfdetect.manifest import Case, read_manifest
from vfdetect.vertebrae import Vertebra, attach_grades, read_centroids

VERSE014 = "verse19-sub-verse014"
VERSE004 = "verse19-sub-verse004-annotations"


def _world(affine: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return indices @ affine[:3, :3].T + affine[:3, 3]


def _oblique_affine(
    spacing=(0.8, 1.1, 2.0), angle_deg: float = 20.0, origin=(-40.0, -50.0, -60.0)
) -> np.ndarray:
    """A P,I,R-like oblique grid: voxel axes rotated about the world x axis, anisotropic spacing."""
    angle = np.deg2rad(angle_deg)
    rotation = np.array(
        [[0.0, 0.0, 1.0], [-np.cos(angle), np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0]]
    )  # columns: voxel axis directions (P-ish, I-ish, R)
    rotation[:, 1] *= -1
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def _straight_spine(
    direction, spacing_mm: float, labels=(18, 19, 20, 21, 22), centre=(0.0, 0.0, 0.0), grades=None
):
    direction = np.asarray(direction, dtype=float)
    direction /= np.linalg.norm(direction)
    middle = (len(labels) - 1) / 2
    return [
        Vertebra(label, tuple(np.asarray(centre) - (index - middle) * spacing_mm * direction),
                 0 if grades is None else grades[index])
        for index, label in enumerate(labels)
    ]  # fmt: skip


def _voxels_of(labels: np.ndarray, affine: np.ndarray, vertebrae, target: Vertebra) -> np.ndarray:
    """World positions of labelled voxels whose nearest centroid is ``target``."""
    indices = np.argwhere(labels > 0).astype(float)
    world = _world(affine, indices)
    centres = np.array([vertebra.position_mm for vertebra in vertebrae])
    nearest = np.argmin(((world[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    return world[nearest == vertebrae.index(target)]


# --------------------------------------------------------------------------------------------- config


def test_label_config_validation_and_round_trip():
    config = LabelConfig(along_fraction=0.3, fracture_height_scale=[0.8, 0.6, 0.4])
    assert config.fracture_height_scale == (0.8, 0.6, 0.4)
    assert LabelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (
        {"along_fraction": 0.0},
        {"left_right_fraction": 1.5},
        {"fracture_height_scale": (0.5, 0.5)},
        {"unknown_grade": "fracture"},
        {"min_spacing_mm": 50.0, "max_spacing_mm": 40.0},
    ):
        with pytest.raises(VfdetectError):
            LabelConfig(**bad)
    with pytest.raises(VfdetectError, match="unknown LabelConfig"):
        LabelConfig.from_dict({"radius": 3})


# ------------------------------------------------------------------------------------------- geometry


def test_ellipsoid_follows_an_oblique_spine_on_an_oblique_anisotropic_grid():
    direction = np.array([0.0, 0.5, 1.0]) / np.linalg.norm([0.0, 0.5, 1.0])  # spine tilted 27 deg forward
    vertebrae = _straight_spine(direction, 30.0)
    (middle_shape,) = [shape for shape in ellipsoids(vertebrae) if shape.label == 20]
    assert abs(abs(middle_shape.axes[0] @ direction) - 1.0) < 1e-9
    config = LabelConfig()
    assert np.allclose(
        middle_shape.semi_axes_mm,
        np.array([config.along_fraction, config.left_right_fraction, config.anterior_posterior_fraction])
        * 30.0,
    )
    affine = _oblique_affine()
    shape = (140, 150, 40)
    centre_voxel = np.array(shape) / 2
    shift = _world(affine, centre_voxel[None])[0]
    vertebrae = _straight_spine(direction, 30.0, centre=shift)
    labels = synthesize_labels(shape, affine, vertebrae)
    assert labels.dtype == np.uint8 and labels.shape == shape and set(np.unique(labels)) == {0, NORMAL}
    points = _voxels_of(labels, affine, vertebrae, vertebrae[2]) - np.array(vertebrae[2].position_mm)
    # principal axis with the smallest spread = along the spine; extent matches the semi-axes
    along = points @ direction
    left_right = points[:, 0]
    assert np.max(np.abs(along)) == pytest.approx(0.4 * 30.0, abs=1.5)
    assert np.max(np.abs(left_right)) == pytest.approx(0.55 * 30.0, abs=1.5)
    # volume in mm^3 matches the analytic ellipsoid despite the anisotropic oblique voxels
    voxel_volume = abs(np.linalg.det(affine[:3, :3]))
    expected = 4 / 3 * np.pi * np.prod(middle_shape.semi_axes_mm)
    assert len(points) * voxel_volume == pytest.approx(expected, rel=0.05)


def test_fractures_are_flattened_along_the_spine_and_labelled_two():
    vertebrae = _straight_spine((0, 0, 1), 30.0, grades=[0, 1, 3, None, 0])
    shapes = {shape.label: shape for shape in ellipsoids(vertebrae)}
    assert [shapes[label].value for label in (18, 19, 20, 21, 22)] == [
        NORMAL,
        FRACTURE,
        FRACTURE,
        IGNORE,  # ungraded: not known to be normal
        NORMAL,
    ]
    assert shapes[20].semi_axes_mm[0] == pytest.approx(0.4 * 30.0 * 0.5)
    assert shapes[19].semi_axes_mm[0] == pytest.approx(0.4 * 30.0 * 0.75)
    assert np.allclose(shapes[20].semi_axes_mm[1:], shapes[18].semi_axes_mm[1:])
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-40, -40, -90)
    labels = synthesize_labels((80, 80, 180), affine, vertebrae)
    index_of_centre = [
        tuple(np.rint(np.linalg.solve(affine[:3, :3], np.subtract(v.position_mm, affine[:3, 3]))).astype(int))
        for v in vertebrae
    ]
    assert [labels[index] for index in index_of_centre] == [1, 2, 2, 255, 1]
    height = {
        vertebra.label: np.ptp(np.argwhere(labels[40, 40, :] > 0).ravel()[
            np.abs(np.argwhere(labels[40, 40, :] > 0).ravel() - index_of_centre[n][2]) < 15
        ])
        for n, vertebra in enumerate(vertebrae)
    }  # fmt: skip
    assert height[20] < 0.6 * height[18]
    skipped = synthesize_labels((80, 80, 180), affine, vertebrae, LabelConfig(unknown_grade="skip"))
    assert skipped[index_of_centre[3]] == 0 and skipped[index_of_centre[2]] == FRACTURE
    as_normal = synthesize_labels((80, 80, 180), affine, vertebrae, LabelConfig(unknown_grade="normal"))
    assert as_normal[index_of_centre[3]] == NORMAL


def test_min_grade_labels_milder_grades_ignore_neither_normal_nor_fracture():
    vertebrae = _straight_spine((0, 0, 1), 30.0, grades=[0, 1, 2, None, 3])
    config = LabelConfig(min_grade=2)
    shapes = {shape.label: shape for shape in ellipsoids(vertebrae, config)}
    assert [shapes[label].value for label in (18, 19, 20, 21, 22)] == [NORMAL, IGNORE, FRACTURE, IGNORE, FRACTURE]
    # the shape follows the grade whatever the label value: the grade-1 vertebra is still flattened
    assert shapes[19].semi_axes_mm[0] == pytest.approx(0.4 * 30.0 * 0.75)
    affine = np.eye(4)
    affine[:3, 3] = (-40, -40, -90)
    labels = synthesize_labels((80, 80, 180), affine, vertebrae, config)
    centres = [tuple(np.rint(np.subtract(v.position_mm, affine[:3, 3])).astype(int)) for v in vertebrae]
    assert [int(labels[index]) for index in centres] == [NORMAL, IGNORE, FRACTURE, IGNORE, FRACTURE]
    grade_one = labels[:, :, centres[1][2] - 3 : centres[1][2] + 4]
    assert IGNORE in grade_one and not np.isin(grade_one, (NORMAL, FRACTURE)).any()
    assert set(np.unique(labels)) == {0, NORMAL, FRACTURE, IGNORE}
    # the default (min_grade 1) labels the same grade-1 vertebra fractured
    assert {shape.label: shape.value for shape in ellipsoids(vertebrae)}[19] == FRACTURE
    for bad in (0, 4, True, 1.5):
        with pytest.raises(VfdetectError, match="min_grade"):
            LabelConfig(min_grade=bad)
    assert LabelConfig.from_dict(config.to_dict()) == config
    assert LabelConfig.from_dict({"along_fraction": 0.4}).min_grade == 1  # files from before the setting


def test_label_min_grade_is_read_back_from_the_label_folder(tmp_path):
    assert read_label_min_grade(tmp_path) is None
    (tmp_path / "label_config.json").write_text(json.dumps(LabelConfig(min_grade=3).to_dict()))
    assert read_label_min_grade(tmp_path) == 3
    (tmp_path / "label_config.json").write_text(json.dumps({"along_fraction": 0.4}))
    assert read_label_min_grade(tmp_path) == 1
    (tmp_path / "label_config.json").write_text("{")
    with pytest.raises(VfdetectError, match="label_config.json"):
        read_label_min_grade(tmp_path)


def test_label_config_is_read_back_from_the_label_folder(tmp_path):
    assert read_label_config(tmp_path) is None
    config = LabelConfig(along_fraction=0.35, min_grade=2, unknown_grade="skip")
    (tmp_path / "label_config.json").write_text(json.dumps(config.to_dict()))
    assert read_label_config(tmp_path) == config
    (tmp_path / "label_config.json").write_text(json.dumps({"along_fraction": 2.0}))
    with pytest.raises(VfdetectError, match="label_config.json: invalid label settings"):
        read_label_config(tmp_path)


def _column_height(labels: np.ndarray, value: int, x: int, y: int) -> int:
    """Voxels of ``value`` in the column ``labels[x, y, :]`` (its height in mm on a 1 mm grid)."""
    return int(np.count_nonzero(labels[x, y, :] == value))


def test_thick_slice_fracture_keeps_its_height_when_drawn_on_the_internal_grid():
    """On a 1 x 1 x 4 mm scan a flattened ellipsoid drawn on the internal 1 mm grid has its true height;
    the source-grid label image resampled nearest-neighbour is quantised to the 4 mm slices."""
    from vfdetect.volume import Volume, internal_grid, to_internal

    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    shape = (50, 50, 30)
    vertebrae = [
        Vertebra(20, (25.0, 25.0, 17.5), grade=0),
        Vertebra(21, (25.0, 25.0, 50.5), grade=3),
        Vertebra(22, (25.0, 25.0, 83.5), grade=0),
    ]
    config = LabelConfig()
    true_height = 2 * config.along_fraction * 33.0 * config.fracture_height_scale[2]  # 13.2 mm
    internal_shape, internal_affine = internal_grid(shape, affine)
    drawn = synthesize_labels(internal_shape, internal_affine, vertebrae, config)
    resampled = np.asarray(to_internal(Volume(synthesize_labels(shape, affine, vertebrae, config), affine), order=0).array)
    assert resampled.shape == drawn.shape
    drawn_height = _column_height(drawn, FRACTURE, 25, 25)
    resampled_height = _column_height(resampled, FRACTURE, 25, 25)
    assert abs(drawn_height - true_height) <= 1.0
    assert resampled_height % 4 == 0 and abs(resampled_height - true_height) > 1.0


def test_synth_labels_help_documents_min_grade_and_the_ignore_value():
    result = CliRunner().invoke(cli, ["synth-labels", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--min-grade" in text and "255" in text and "[ignore|normal|skip]" in text


def test_spacing_ignores_a_missing_level_and_defaults_for_lone_vertebrae():
    # L1 and L3 annotated, L2 missing: the level spacing is half their distance
    vertebrae = [Vertebra(20, (0, 0, 0)), Vertebra(22, (0, 0, -64.0))]
    assert [shape.semi_axes_mm[0] for shape in ellipsoids(vertebrae)] == pytest.approx([0.4 * 32.0] * 2)
    # T12, (T13 not annotated), L1: one level apart
    vertebrae = [Vertebra(19, (0, 0, 0)), Vertebra(20, (0, 0, -30.0))]
    assert ellipsoids(vertebrae)[0].semi_axes_mm[0] == pytest.approx(0.4 * 30.0)
    # a lone vertebra uses a typical spacing for its region and the world S-I axis
    (lone,) = ellipsoids([Vertebra(22, (5, 5, 5))])
    assert lone.semi_axes_mm[0] == pytest.approx(0.4 * 33.0)
    assert abs(lone.axes[0] @ [0, 0, 1]) == pytest.approx(1.0)
    with pytest.raises(VfdetectError, match="more than once"):
        ellipsoids([Vertebra(22, (0, 0, 0)), Vertebra(22, (0, 0, 9))])


def test_overlapping_ellipsoids_go_to_the_nearest_centroid():
    vertebrae = [Vertebra(20, (0, 0, 10.0), 0), Vertebra(21, (0, 0, -10.0), 3)]
    config = LabelConfig(along_fraction=1.0, left_right_fraction=0.5, anterior_posterior_fraction=0.5,
                         fracture_height_scale=(1.0, 1.0, 1.0))  # fmt: skip
    affine = np.eye(4)
    affine[:3, 3] = (-20, -20, -40)
    labels = synthesize_labels((41, 41, 81), affine, vertebrae, config)
    column = labels[20, 20, :]
    z = np.arange(81) - 40.0
    inside = column > 0
    assert np.all(column[inside & (z > 0.5)] == NORMAL) and np.all(column[inside & (z < -0.5)] == FRACTURE)
    assert inside[(z > -25) & (z < 25)].all()  # both ellipsoids reach across the midpoint


def test_labels_outside_the_grid_and_empty_input():
    assert not synthesize_labels((10, 10, 10), np.eye(4), []).any()
    far = [Vertebra(20, (500, 500, 500))]
    assert not synthesize_labels((10, 10, 10), np.eye(4), far).any()


# ------------------------------------------------------------------------------------------- real data


def _check_inside_mask(labels, mask, affine, vertebrae, minimum=0.9):
    fractions = {}
    for vertebra in vertebrae:
        points = _voxels_of(labels, affine, vertebrae, vertebra)
        indices = np.rint(np.linalg.solve(affine[:3, :3], (points - affine[:3, 3]).T).T).astype(int)
        fractions[vertebra.name] = float(np.mean(mask[tuple(indices.T)] == vertebra.label))
        assert len(points) > 300, vertebra.name
    assert min(fractions.values()) >= minimum, fractions
    return fractions


def test_verse014_labels_lie_in_the_expert_mask_and_cover_the_body_centre(real_data):
    ct = nib.load(str(real_data / VERSE014 / "sub-verse014_ct.nii.gz"))
    mask = np.asanyarray(nib.load(str(real_data / VERSE014 / "sub-verse014_seg-vert_msk.nii.gz")).dataobj)
    vertebrae = attach_grades(
        read_centroids(real_data / VERSE014 / "sub-verse014_seg-vb_ctd.json", ct.affine, ct.shape),
        {label: 0 for label in range(20, 25)},
    )
    labels = synthesize_labels(ct.shape, ct.affine, vertebrae)
    assert labels.shape == ct.shape and set(np.unique(labels)) == {0, NORMAL}
    _check_inside_mask(labels, mask, ct.affine, vertebrae)
    # every voxel within 5 mm of a body centroid is labelled
    grid = np.stack(np.meshgrid(*[np.arange(size) for size in ct.shape], indexing="ij"), -1).reshape(-1, 3)
    world = _world(ct.affine, grid.astype(float))
    for vertebra in vertebrae:
        near = np.linalg.norm(world - np.array(vertebra.position_mm), axis=1) <= 5.0
        assert near.sum() > 20 and np.all(labels.reshape(-1)[near] == NORMAL), vertebra.name


def test_verse004_fractures_are_labelled_and_stay_inside_the_mask(real_data):
    image = nib.load(str(real_data / VERSE004 / "sub-verse004_seg-vert_msk.nii.gz"))
    mask = np.asanyarray(image.dataobj).astype(np.int32)
    grades = {16: 2, 17: 2, 18: 0, 19: 0, 20: 3, 21: 0, 22: 0}
    vertebrae = attach_grades(
        read_centroids(real_data / VERSE004 / "sub-verse004_seg-subreg_ctd.json", image.affine, mask.shape),
        grades,
    )
    labels = synthesize_labels(mask.shape, image.affine, vertebrae)
    _check_inside_mask(labels, mask, image.affine, vertebrae)
    expected = {None: IGNORE, False: NORMAL, True: FRACTURE}  # ungraded vertebrae are ignored
    for vertebra in vertebrae:
        index = tuple(np.rint(np.linalg.solve(image.affine[:3, :3], np.subtract(vertebra.position_mm, image.affine[:3, 3]))).astype(int))  # fmt: skip
        assert labels[index] == expected[vertebra.fractured], vertebra.name


# -------------------------------------------------------------------------------------- files and CLI


def test_manifest_labels_are_written_on_the_scan_grid_with_preview(real_data, tmp_path):
    case = Case(
        "v014",
        real_data / VERSE014 / "sub-verse014_ct.nii.gz",
        real_data / VERSE014 / "sub-verse014_seg-vb_ctd.json",
        {20: 0, 21: 3},
    )
    (path,) = synthesize_manifest_labels([case], tmp_path / "labels", preview=True, quiet=True)
    assert path == label_path(tmp_path / "labels", "v014") == tmp_path / "labels" / "v014_labels.nii.gz"
    written = nib.load(str(path))
    ct = nib.load(str(case.image))
    assert written.shape == ct.shape and np.allclose(written.affine, ct.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    values = np.asanyarray(written.dataobj)
    assert set(np.unique(values)) == {0, NORMAL, FRACTURE, IGNORE}  # L3-L5 are ungraded here
    assert read_label_min_grade(tmp_path / "labels") == 1
    assert_png_has_content(tmp_path / "labels" / "v014_labels.png")
    assert json.loads((tmp_path / "labels" / "label_config.json").read_text())["along_fraction"] == 0.4
    assert sorted(item.name for item in (tmp_path / "labels").iterdir()) == [
        "label_config.json", "v014_labels.nii.gz", "v014_labels.png",
    ]  # fmt: skip


def test_synth_labels_command_on_the_real_manifest(real_data, tmp_path):
    manifest = Path(__file__).resolve().parents[1] / "data_manifests" / "real.csv"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "synth-labels",
            str(manifest),
            "--out",
            str(out),
            "--data-root",
            str(real_data),
            "--no-preview",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(item.name for item in out.iterdir()) == [
        "label_config.json", "sub-verse014_labels.nii.gz", "totalseg-example_ct_labels.nii.gz",
    ]  # fmt: skip
    cases = read_manifest(manifest, data_root=real_data)
    example = nib.load(str(out / "totalseg-example_ct_labels.nii.gz"))
    body = np.asanyarray(nib.load(str(cases[1].body_mask)).dataobj)
    labelled = np.asanyarray(example.dataobj) > 0
    assert labelled.sum() > 1000 and np.mean(body[labelled] == 1) > 0.85  # ellipsoids sit in the bodies


def test_synth_labels_command_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,image,centroids\na,scan.nii.gz,missing_ctd.json\n")
    result = CliRunner().invoke(
        cli, ["synth-labels", str(manifest), "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfdetect: error:") and "missing_ctd.json" in lines[0]
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        cli, ["synth-labels", str(manifest), "--out", str(tmp_path / "out"), "--along-fraction", "2"]
    )
    assert result.exit_code == 1 and "along_fraction" in result.output
