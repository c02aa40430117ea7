"""Tests of fractures planted in real CT (the package vfdetect/simulate/ and `vfdetect simulate-fractures`)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from vfdetect.cli import cli
from vfdetect.errors import InputError, VfdetectError
from vfdetect.simulate import (
    GENANT_BANDS,
    MORPHOLOGIES,
    SimulationConfig,
    parse_levels,
    read_simulation_manifest,
    simulate_dataset,
    simulate_scan,
)
from vfdetect.vertebrae import read_grades, read_manifest

ALL_FRACTURED = SimulationConfig(fracture_prevalence=1.0, negative_fraction=0.0)
VERSE014 = ("verse19-sub-verse014/sub-verse014_ct.nii.gz", "verse19-sub-verse014/sub-verse014_seg-vert_msk.nii.gz")
TPTBOX = (
    "tptbox-sample-ct/sub-ct_label-22_ct.nii.gz",
    "tptbox-sample-ct/sub-ct_seg-vert_label-22_msk.nii.gz",
    "tptbox-sample-ct/sub-ct_seg-subreg_label-22_msk.nii.gz",
)


def box_spine(shape: tuple[int, int, int] = (50, 56, 150)) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
    """A 1 mm RAS volume with five box-shaped vertebrae L1-L5 (body + posterior element), CT, mask and body mask."""
    hu = np.full(shape, 40.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = np.zeros(shape, dtype=np.uint8)
    for index, label in enumerate(range(24, 19, -1)):  # L5 at the bottom
        z0 = 8 + index * 28
        labels[10:40, 22:48, z0 : z0 + 22] = label  # body: 30 wide, 26 deep, 22 tall
        body[10:40, 22:48, z0 : z0 + 22] = 1
        labels[20:30, 4:22, z0 + 4 : z0 + 18] = label  # posterior element
        hu[10:40, 22:48, z0 : z0 + 22] = 250.0
        hu[11:39, 23:47, z0 + 1 : z0 + 21] = 180.0
        hu[20:30, 4:22, z0 + 4 : z0 + 18] = 400.0
    hu += np.random.default_rng(0).normal(0, 10, shape).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return (
        nib.Nifti1Image(np.rint(hu).astype(np.int16), affine),
        nib.Nifti1Image(labels, affine),
        nib.Nifti1Image(body, affine),
    )


def write_manifest(folder: Path, rows: list[tuple[str, ...]], header: str = "case,image,mask,label_scheme,body_mask") -> Path:
    path = folder / "manifest.csv"
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def assert_clean(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [entry for entry in parent.iterdir() if entry.name.startswith(f".{out.name}.")]


# ----------------------------------------------------------------------------------------------
# Levels and settings


def test_parse_levels() -> None:
    levels = parse_levels("T4-L5")
    assert levels[0] == 11 and levels[-1] == 24 and 28 in levels and 25 not in levels
    assert parse_levels("L1,T12") == (19, 20)
    with pytest.raises(VfdetectError):
        parse_levels("L5-T4")
    with pytest.raises(VfdetectError):
        SimulationConfig(fracture_prevalence=1.5)


# ----------------------------------------------------------------------------------------------
# The warp on box-shaped vertebrae


@pytest.fixture(scope="module")
def box_results():
    ct, mask, body = box_spine()
    return ct, mask, [simulate_scan(ct, mask, np.random.default_rng(seed), ALL_FRACTURED, body) for seed in range(3)]


def test_box_spine_bands_jacobian_and_neighbours(box_results) -> None:
    ct, mask, results = box_results
    graded = set()
    for result in results:
        # L1 and L5 lack a neighbour; L2-L4 are eligible and all fractured.
        fractured = {o.label: o for o in result.outcomes if o.grade > 0}
        assert set(fractured) == {21, 22, 23}
        for outcome in fractured.values():
            low, high = GENANT_BANDS[outcome.grade]
            assert low < outcome.height_loss < high
            assert 0 < outcome.min_jacobian <= 1.0
            assert outcome.morphology in MORPHOLOGIES
            graded.add(outcome.grade)
        # The body heights before are the boxes' 22 mm.
        assert all(abs(h - 22.0) < 1.0 for o in result.outcomes for h in o.heights_before.as_tuple())
        # Never a neighbour outside the simulated ones: L1 and L5 keep every voxel.
        before, after = np.asarray(mask.dataobj), np.asarray(result.mask.dataobj)
        for label in (20, 24):
            assert np.array_equal(before == label, after == label)
        assert result.ct.shape == ct.shape and np.allclose(result.ct.affine, ct.affine)
    assert len(graded) >= 2


def test_unfractured_vertebrae_and_far_voxels_unchanged(real_data: Path) -> None:
    ct_path, mask_path = (real_data / name for name in VERSE014)
    config = SimulationConfig(fracture_prevalence=0.3, negative_fraction=0.0, levels=parse_levels("L3"))
    result = simulate_scan(ct_path, mask_path, np.random.default_rng(5), config)
    outcomes = {o.label: o for o in result.outcomes}
    assert outcomes[22].grade > 0
    low, high = GENANT_BANDS[outcomes[22].grade]
    assert low < outcomes[22].height_loss < high
    for label in (21, 23):
        outcome = outcomes[label]
        assert outcome.grade == 0 and outcome.morphology == "normal"
        ratios = np.array(outcome.heights_after.as_tuple()) / np.array(outcome.heights_before.as_tuple())
        assert np.all(np.abs(ratios - 1) < 0.03)
    source = nib.load(ct_path)
    before = np.asarray(source.dataobj)
    after = np.asarray(result.ct.dataobj)
    labels = np.asarray(nib.load(mask_path).dataobj)
    for label in (20, 21, 23, 24):  # every other vertebra, neighbours included, keeps its voxels
        assert np.array_equal(before[labels == label], after[labels == label])
        assert np.array_equal(labels == label, np.asarray(result.mask.dataobj) == label)
    centre = next(v for v in result.vertebrae if v.label == 22).position_mm
    voxels = np.indices(before.shape).reshape(3, -1).T
    world = voxels @ source.affine[:3, :3].T + source.affine[:3, 3]
    far = (np.linalg.norm(world - np.asarray(centre), axis=1) > 50.0).reshape(before.shape)
    assert np.array_equal(before[far], after[far])
    assert not np.array_equal(before, after)


def test_tptbox_every_grade_in_band(real_data: Path) -> None:
    ct_path, mask_path, body_path = (real_data / name for name in TPTBOX)
    seen = set()
    for seed in range(6):
        result = simulate_scan(ct_path, mask_path, np.random.default_rng(seed), ALL_FRACTURED, body_path)
        (outcome,) = result.outcomes
        assert outcome.label == 22
        if outcome.grade:
            low, high = GENANT_BANDS[outcome.grade]
            assert low < outcome.height_loss < high and outcome.min_jacobian > 0
            seen.add((outcome.grade, outcome.morphology))
    assert len({grade for grade, _ in seen}) >= 2


# ----------------------------------------------------------------------------------------------
# The dataset writer


@pytest.fixture(scope="module")
def written(tmp_path_factory, real_data: Path):
    folder = tmp_path_factory.mktemp("simulate")
    manifest = write_manifest(folder, [("tpt", *TPTBOX[:2], "verse", TPTBOX[2])])
    config = SimulationConfig(copies=2, fracture_prevalence=1.0, negative_fraction=0.0)
    first = simulate_dataset(manifest, folder / "a", 7, config, data_root=real_data, quiet=True, preview=True)
    second = simulate_dataset(manifest, folder / "b", 7, config, data_root=real_data, quiet=True)
    other = simulate_dataset(manifest, folder / "c", 8, config, data_root=real_data, quiet=True)
    return first.parent, second.parent, other.parent


def test_output_on_the_input_grid(written, real_data: Path) -> None:
    out, _, _ = written
    source = nib.load(real_data / TPTBOX[0])
    for copy in (1, 2):
        image = nib.load(out / f"tpt-sim{copy}_ct.nii.gz")
        assert image.shape == source.shape
        assert np.allclose(image.affine, source.affine)
        assert image.get_data_dtype() == source.get_data_dtype()
        for code in ("sform_code", "qform_code"):
            assert int(image.header[code]) == int(source.header[code])
        mask = nib.load(out / f"tpt-sim{copy}_msk.nii.gz")
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert sorted(path.name for path in (out / "previews").iterdir())


def test_deterministic_per_seed(written) -> None:
    first, second, other = written
    names = sorted(path.name for path in first.iterdir() if path.is_file() and path.name != "simulation.json")
    assert names == sorted(path.name for path in second.iterdir() if path.is_file() and path.name != "simulation.json")
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "tpt-sim1_ct.nii.gz").read_bytes() != (other / "tpt-sim1_ct.nii.gz").read_bytes()
    assert (first / "tpt-sim1_ct.nii.gz").read_bytes() != (first / "tpt-sim2_ct.nii.gz").read_bytes()


def test_manifest_and_grades_readable(written) -> None:
    out, _, _ = written
    cases = read_manifest(out / "manifest.csv")
    assert [case.case for case in cases] == ["tpt-sim1", "tpt-sim2"]
    grades = read_grades(out / "grades.csv")
    with open(out / "grades.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "label", "grade", "morphology", "height_loss"]
    for case, row in zip(cases, rows, strict=True):
        assert case.grades == grades[case.case] == {22: int(row["grade"])}
        image = nib.load(case.image)
        (vertebra,) = [v for v in case.vertebrae(image.affine, image.shape) if v.label == 22]
        assert vertebra.grade == int(row["grade"])
        if int(row["grade"]):
            low, high = GENANT_BANDS[int(row["grade"])]
            assert low < float(row["height_loss"]) < high


def test_vary_acquisition(tmp_path: Path, real_data: Path) -> None:
    ct_path, mask_path, body_path = (real_data / name for name in TPTBOX)
    config = SimulationConfig(fracture_prevalence=1.0, negative_fraction=0.0, vary_acquisition=True, compaction=True)
    result = simulate_scan(ct_path, mask_path, np.random.default_rng(3), config, body_path)
    details = result.acquisition
    assert details["orientation"] == "".join(nib.aff2axcodes(result.ct.affine))
    assert result.ct.get_data_dtype() == np.dtype(details["dtype"])
    assert 0 <= details["rotation_deg"] <= 10 and 0 <= details["noise_sd_hu"] <= 30
    # The centroid of L3 lies inside its warped mask.
    (l3,) = [v for v in result.vertebrae if v.label == 22]
    voxel = np.linalg.solve(result.mask.affine, [*l3.position_mm, 1.0])[:3]
    assert np.asarray(result.mask.dataobj)[tuple(np.rint(voxel).astype(int))] == 22


# ----------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs(folder: Path, real_data: Path) -> dict[str, tuple[str, ...]]:
    """Problem (a fragment of the error message) -> (CT, mask) paths that have it."""
    source = nib.load(real_data / TPTBOX[1])
    labels = np.asarray(source.dataobj)
    nib.save(nib.Nifti1Image(labels[:-1], source.affine), folder / "offgrid.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(labels), source.affine), folder / "empty.nii.gz")
    nib.save(nib.Nifti1Image(np.where(labels == 21, 99, labels).astype(np.uint8), source.affine), folder / "unknown.nii.gz")
    nib.save(nib.Nifti1Image(np.where(labels == 22, 22, 0).astype(np.uint8), source.affine), folder / "alone.nii.gz")
    (folder / "garbage.nii.gz").write_bytes(b"not a nifti file at all")
    ct = str(real_data / TPTBOX[0])
    return {
        "not on the grid": (ct, str(folder / "offgrid.nii.gz")),
        "no vertebra": (ct, str(folder / "empty.nii.gz")),
        "unknown vertebra label": (ct, str(folder / "unknown.nii.gz")),
        "neighbours on both sides": (ct, str(folder / "alone.nii.gz")),
        "garbage.nii.gz": (str(folder / "garbage.nii.gz"), str(real_data / TPTBOX[1])),
    }


def test_bad_input_raises_and_writes_nothing(tmp_path: Path, real_data: Path) -> None:
    for problem, (ct, mask) in _bad_inputs(tmp_path, real_data).items():
        manifest = write_manifest(tmp_path, [("bad", ct, mask)], header="case,image,mask")
        out = tmp_path / "out"
        with pytest.raises(InputError, match=problem):
            simulate_dataset(manifest, out, 1, ALL_FRACTURED, quiet=True)
        assert_clean(tmp_path, out)
    with pytest.raises(InputError):
        read_simulation_manifest(write_manifest(tmp_path, [("x", "missing.nii.gz", "missing.nii.gz")], "case,image,mask"))


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_on_verse014(tmp_path: Path, real_data: Path) -> None:
    manifest = write_manifest(tmp_path, [("sub-verse014", *VERSE014, "verse", "")])
    out = tmp_path / "sim"
    result = CliRunner().invoke(
        cli, ["simulate-fractures", str(manifest), "--data-root", str(real_data), "--out", str(out), "--seed", "2",
              "--fracture-prevalence", "1", "--negative-fraction", "0", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    grades = read_grades(out / "grades.csv")["sub-verse014-sim1"]
    assert set(grades) == {21, 22, 23} and all(grade > 0 for grade in grades.values())
    again = CliRunner().invoke(cli, ["simulate-fractures", str(manifest), "--data-root", str(real_data), "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output
