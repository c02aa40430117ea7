"""Tests of the synthetic spine CT phantoms (the package vfdetect/phantom/ and `vfdetect phantoms`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from vfdetect.cli import cli
from vfdetect.errors import VfdetectError
from vfdetect.phantom import (
    GENANT_BANDS,
    LEVELS,
    MORPHOLOGIES,
    PhantomConfig,
    generate_phantom,
    measure_soft_tissue,
    measure_vertebral_bodies,
    render_vertebra_labels,
    write_phantom_dataset,
)
from vfdetect.phantom.anatomy import _build_model, _choose_levels, _draw_fractures
from vfdetect.vertebrae import read_centroids, read_grades, read_manifest, spine_rank

CALIBRATION = Path(__file__).resolve().parents[1] / "experiments" / "calibration" / "real_ct_measurements.json"
SMALL = PhantomConfig.small()
# Many fractures per phantom, so that a few small phantoms hold every grade and morphology.
FRACTURED_SMALL = replace(SMALL, fracture_prevalence=0.6, negative_fraction=0.0)


@pytest.fixture(scope="module")
def small_cases():
    return [generate_phantom(f"case{i}", np.random.default_rng(42 + i), FRACTURED_SMALL) for i in range(3)]


def _centroids(case) -> dict[int, np.ndarray]:
    return {shape.label: shape.body_centroid for shape in case.model.vertebrae}


def test_small_phantom_is_consistent(small_cases):
    for case in small_cases:
        image, mask = case.image, case.mask
        assert np.asarray(image.dataobj).dtype == np.int16
        assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
        assert max(image.shape) <= 140 and list(image.shape).count(100) >= 2
        assert np.allclose(sorted(image.header.get_zooms()), [1.0, 1.0, 1.0])
        hu = np.asarray(image.dataobj)
        labels = np.asarray(mask.dataobj)
        assert hu.min() < -900 and hu.max() > 400  # air and cortical bone both present
        listed = [v.label for v in case.vertebrae]
        assert 4 <= len(listed) <= 5 and all(label in LEVELS for label in listed)
        assert listed == sorted(listed, key=spine_rank)
        inverse = np.linalg.inv(image.affine)
        for vertebra in case.vertebrae:
            voxel = np.rint(inverse[:3, :3] @ vertebra.position_mm + inverse[:3, 3]).astype(int)
            voxel = np.clip(voxel, 0, np.array(image.shape) - 1)
            # The body centroid lies in that vertebra's mask, in trabecular bone.
            assert labels[tuple(voxel)] == vertebra.label
            assert case.morphology[vertebra.label] in (*MORPHOLOGIES, "normal")
            assert (case.morphology[vertebra.label] == "normal") == (vertebra.grade == 0)
            low, high = GENANT_BANDS[vertebra.grade]
            assert low <= case.height_loss[vertebra.label] < high
        assert set(np.unique(labels)) - {0} >= set(listed)


def test_height_loss_measured_on_fine_render_matches_grade(small_cases):
    """The measured loss of every generated body lies in its grade's band; normal bodies lose < 15 %."""
    seen_grades, seen_morphologies = set(), set()
    for case in small_cases:
        centroids = _centroids(case)
        normals = [v.label for v in case.vertebrae if v.grade == 0 and v.label not in (26, 29)]
        for vertebra in case.vertebrae:
            if vertebra.label not in normals[:2] and (vertebra.grade == 0 or vertebra.label in (26, 29)):
                continue  # every fracture and two normal bodies per case (time)
            labels, affine = render_vertebra_labels(case.model, vertebra.label, spacing=0.5)
            neighbours = {k: v for k, v in centroids.items() if abs(spine_rank(k) - spine_rank(vertebra.label)) <= 1}
            measured = measure_vertebral_bodies(labels, affine, neighbours)[vertebra.label]
            loss = measured.height_loss(case.reference_height_mm[vertebra.label])
            if vertebra.grade == 0:
                assert loss < 0.15, (case.case, vertebra.name, loss)
            else:
                low, high = GENANT_BANDS[vertebra.grade]
                assert low <= loss < high, (case.case, vertebra.name, vertebra.grade, loss)
                seen_grades.add(vertebra.grade)
                seen_morphologies.add(case.morphology[vertebra.label])
    assert seen_grades == {1, 2, 3}
    assert len(seen_morphologies) >= 2


def test_height_loss_measured_on_scan_mask_is_close(small_cases):
    """On the 1 mm scan mask itself the measurement is coarser but still tracks the truth."""
    for case in small_cases:
        labels = np.asarray(case.mask.dataobj)
        measured = measure_vertebral_bodies(labels, case.image.affine, {v.label: v.position_mm for v in case.vertebrae})
        for label, body in measured.items():
            loss = body.height_loss(case.reference_height_mm[label])
            if label not in (26, 29) and np.isfinite(loss):
                assert abs(loss - case.height_loss[label]) < 0.1, (case.case, label, loss, case.height_loss[label])


def test_fracture_statistics_follow_config():
    rng = np.random.default_rng(7)
    config = PhantomConfig()
    vertebrae = fractured = negatives = adjacent = multiple = 0
    grades = np.zeros(4)
    for _ in range(3000):
        levels = _choose_levels(rng, config)
        assert config.min_vertebrae <= len(levels) <= config.max_vertebrae
        drawn = _draw_fractures(rng, levels, config)
        vertebrae += len(levels)
        broken = [label for label in levels if drawn[label] > 0]
        fractured += len(broken)
        negatives += not broken
        for grade in drawn.values():
            grades[grade] += 1
        if len(broken) >= 2:
            multiple += 1
            ranks = sorted(LEVELS.index(label) for label in broken)
            adjacent += any(b - a == 1 for a, b in zip(ranks, ranks[1:], strict=False))
    assert abs(fractured / vertebrae - 0.19) < 0.03
    assert abs(negatives / 3000 - 0.12) < 0.03
    assert adjacent / multiple > 0.5
    share = grades[1:] / grades[1:].sum()
    assert np.allclose(share, [0.46, 0.35, 0.19], atol=0.04)
    none = _draw_fractures(rng, levels, replace(config, fracture_prevalence=0.0))
    assert set(none.values()) == {0}


def test_morphologies_and_kyphosis_from_wedges():
    rng = np.random.default_rng(3)
    levels = list(LEVELS[8:15])
    grades = {label: 3 for label in levels}
    counts = {m: 0 for m in MORPHOLOGIES}
    for _ in range(60):
        model, morphology = _build_model(rng, levels, grades, PhantomConfig())
        for label in levels:
            counts[morphology[label]] += 1
            assert model.by_label(label).height_loss > 0.40
    share = np.array([counts[m] for m in MORPHOLOGIES]) / sum(counts.values())
    assert np.allclose(share, [0.5, 0.3, 0.2], atol=0.06)


def _patient_properties(model) -> dict:
    """Everything about a patient that must not depend on whether it has fractures."""
    return {
        **{f"trait_{k}": v for k, v in model.traits.items()},
        **{f"hu_{k}": v for k, v in model.hu.items()},
        "torso": (model.torso_half_width, model.torso_half_depth, model.back_depth, model.fat_mm, model.texture_seed),
        "vertebrae": [(s.label, s.height, s.depth, s.width, s.trabecular_hu, s.cortex_hu, s.cortex_mm, s.osteophyte_mm,
                       s.disc_state, s.physiological_concavity) for s in model.vertebrae],
    }


def _status_differences(config: PhantomConfig, n: int = 40) -> list[str]:
    """Patient properties that change when the same generator state gets fractures instead of none."""
    levels = list(LEVELS[3:10])
    fractured = {label: (2 if label in (13, 14) else 0) for label in levels}
    healthy = {label: 0 for label in levels}
    differing = set()
    for seed in range(n):
        with_fractures, _ = _build_model(np.random.default_rng(seed), levels, fractured, config)
        without, _ = _build_model(np.random.default_rng(seed), levels, healthy, config)
        assert with_fractures.by_label(13).height_loss > 0.25 and without.by_label(13).height_loss < 0.1
        a, b = _patient_properties(with_fractures), _patient_properties(without)
        differing |= {key for key in a if a[key] != b[key]}
    return sorted(differing)


def test_patient_properties_do_not_depend_on_fracture_status():
    """Same generator state, grades forced on or off: density, posture, size and tissue HU stay identical."""
    assert _status_differences(PhantomConfig()) == []
    # The check can fail: the opt-in confounded draw changes density and kyphosis with the status.
    confounded = _status_differences(replace(PhantomConfig(), density_fracture_correlation=True), n=5)
    assert {"trait_trabecular_hu", "trait_kyphosis", "vertebrae"} <= set(confounded)


def _status_p_values(config: PhantomConfig, n: int = 40) -> dict[str, float]:
    """Two-sample KS p-values of patient properties, patients with fractures against patients without."""
    from scipy.stats import ks_2samp

    groups: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    rng = np.random.default_rng(2024)
    fracturing = replace(config, fracture_prevalence=0.3, negative_fraction=0.0)
    for status in (True, False):
        for _ in range(n):
            levels = _choose_levels(rng, SMALL)
            grades = _draw_fractures(rng, levels, fracturing if status else replace(config, fracture_prevalence=0.0))
            assert any(grades.values()) == status
            model, _ = _build_model(rng, levels, grades, replace(SMALL, density_fracture_correlation=config.density_fracture_correlation))
            values = {
                "trabecular_hu": model.traits["trabecular_hu"], "kyphosis": model.traits["kyphosis"],
                "cortex_hu": model.traits["cortex_hu"], "fat_mm": model.fat_mm, "fat_hu": model.hu["fat"],
                "torso_half_width": model.torso_half_width, "scale": model.traits["scale"],
                "degeneration": model.traits["degeneration"],
                "level_trabecular_hu": float(np.mean([s.trabecular_hu for s in model.vertebrae])),
            }
            for key, value in values.items():
                groups[status].setdefault(key, []).append(value)
    return {key: float(ks_2samp(groups[True][key], groups[False][key]).pvalue) for key in groups[True]}


def test_patient_distributions_match_with_and_without_fractures():
    """40 small-phantom models with fractures against 40 without: no property tells them apart."""
    p_values = _status_p_values(PhantomConfig())
    assert min(p_values.values()) > 0.01, p_values
    confounded = _status_p_values(replace(PhantomConfig(), density_fracture_correlation=True))
    assert confounded["trabecular_hu"] < 0.01 and confounded["kyphosis"] < 0.01, confounded


def test_dataset_is_deterministic_and_readable(tmp_path):
    first = write_phantom_dataset(tmp_path / "a", 2, seed=5, config=SMALL, quiet=True)
    second = write_phantom_dataset(tmp_path / "b", 2, seed=5, config=SMALL, quiet=True, workers=2)
    other = write_phantom_dataset(tmp_path / "c", 1, seed=6, config=SMALL, quiet=True)
    for name in ("manifest.csv", "grades.csv", "phantom000_ctd.json", "phantom001_ctd.json"):
        assert (first.parent / name).read_text() == (second.parent / name).read_text()
    a = nib.load(first.parent / "phantom001_ct.nii.gz")
    b = nib.load(second.parent / "phantom001_ct.nii.gz")
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    c = nib.load(other.parent / "phantom000_ct.nii.gz")
    d = nib.load(first.parent / "phantom000_ct.nii.gz")
    assert c.shape != d.shape or not np.array_equal(np.asarray(c.dataobj), np.asarray(d.dataobj))
    cases = read_manifest(first)
    grades = read_grades(first.parent / "grades.csv")
    assert [case.case for case in cases] == ["phantom000", "phantom001"]
    for case in cases:
        image = nib.load(case.image)
        mask = np.asarray(nib.load(first.parent / f"{case.case}_msk.nii.gz").dataobj)
        vertebrae = read_centroids(case.centroids, image.affine, image.shape)
        assert {v.label for v in vertebrae} == set(grades[case.case]) == set(case.grades)
        inverse = np.linalg.inv(image.affine)
        for vertebra in vertebrae:
            voxel = np.rint(inverse[:3, :3] @ vertebra.position_mm + inverse[:3, 3]).astype(int)
            assert mask[tuple(np.clip(voxel, 0, np.array(image.shape) - 1))] == vertebra.label
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_acquisition_settings_are_honoured():
    config = replace(SMALL, inplane_spacing_mm=(0.7, 0.7), slice_spacing_choices=(2.5,), slice_spacing_weights=(1.0,),
                     orientations=("PIR",))
    case = generate_phantom("x", np.random.default_rng(1), config)
    assert nib.aff2axcodes(case.image.affine) == ("P", "I", "R")
    zooms = dict(zip(nib.aff2axcodes(case.image.affine), case.image.header.get_zooms(), strict=True))
    assert np.isclose(zooms["P"], 0.7) and np.isclose(zooms["R"], 0.7) and np.isclose(zooms["I"], 2.5)
    with pytest.raises(VfdetectError):
        PhantomConfig(fracture_prevalence=1.5)
    with pytest.raises(VfdetectError):
        PhantomConfig(orientations=("XYZ",))
    with pytest.raises(VfdetectError):
        PhantomConfig(min_vertebrae=6, max_vertebrae=5)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "phantoms"
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(out), "--cases", "1", "--seed", "2", "--small", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "grades.csv", "manifest.csv", "phantom000_ct.nii.gz", "phantom000_ctd.json", "phantom000_msk.nii.gz",
    ]
    bad = CliRunner().invoke(cli, ["phantoms", "--out", str(out), "--cases", "0"])
    assert bad.exit_code != 0


def test_cli_prevalence_options_reach_the_generator(tmp_path):
    none = tmp_path / "none"
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(none), "--cases", "3", "--seed", "4", "--small",
                                      "--quiet", "--fracture-prevalence", "0"])
    assert result.exit_code == 0, result.output
    grades = read_grades(none / "grades.csv")
    assert grades and all(grade == 0 for case in grades.values() for grade in case.values())
    every = tmp_path / "every"
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(every), "--cases", "3", "--seed", "4", "--small",
                                      "--quiet", "--negative-fraction", "0"])
    assert result.exit_code == 0, result.output
    grades = read_grades(every / "grades.csv")
    assert all(any(grade > 0 for grade in case.values()) for case in grades.values())



def test_cli_correlation_option_reaches_the_generator(tmp_path, monkeypatch):
    import vfdetect.phantom

    seen = []
    monkeypatch.setattr(vfdetect.phantom, "write_phantom_dataset",
                        lambda out_dir, cases, seed, config, **kwargs: seen.append(config) or out_dir / "manifest.csv")
    for extra in ([], ["--density-fracture-correlation"]):
        result = CliRunner().invoke(cli, ["phantoms", "--out", str(tmp_path), "--small", "--quiet", *extra])
        assert result.exit_code == 0, result.output
    assert [config.density_fracture_correlation for config in seen] == [False, True]


# ----------------------------------------------------------------------------------------------
# Calibration against real CT
# ----------------------------------------------------------------------------------------------


def _real_summary() -> dict:
    return json.loads(CALIBRATION.read_text())["summary"]


def _check(name: str, values: list[float], real: dict, slack: float) -> None:
    """The phantoms' median lies in the real range; every value within ``slack`` of it."""
    values = [v for v in values if np.isfinite(v)]
    assert values, name
    low, high = real["min"], real["max"]
    median = float(np.median(values))
    assert low <= median <= high, (name, median, low, high)
    assert all(low - slack <= v <= high + slack for v in values), (name, sorted(values), low, high)


# Allowed excursion of single phantom values beyond the few real scans' range (mm or HU).
SLACK = {
    "height_posterior_mm": 3.0, "height_middle_mm": 3.0, "depth_mm": 5.0, "width_mm": 5.0,
    "disc_height_below_mm": 3.0, "trabecular_hu": 40.0, "cortex_hu": 100.0, "cortex_p90_hu": 150.0,
    "disc_hu": 30.0, "muscle_hu": 15.0, "muscle_sd_hu": 10.0, "fat_hu": 20.0,
}


def test_real_ct_measurement_is_reproducible(real_data):
    """The committed calibration JSON matches a fresh measurement of the VerSe case."""
    folder = real_data / "verse19-sub-verse014"
    image = nib.load(folder / "sub-verse014_ct.nii.gz")
    labels = np.asarray(nib.load(folder / "sub-verse014_seg-vert_msk.nii.gz").dataobj).astype(np.int32)
    entries = json.loads((folder / "sub-verse014_seg-vb_ctd.json").read_text())
    centroids = {e["label"]: image.affine[:3, :3] @ [e["X"], e["Y"], e["Z"]] + image.affine[:3, 3]
                 for e in entries if "label" in e}
    measured = measure_vertebral_bodies(labels, image.affine, centroids, hu=np.asarray(image.dataobj, dtype=np.float32))
    committed = next(s for s in json.loads(CALIBRATION.read_text())["scans"] if s["scan"] == "sub-verse014")
    for label, name in ((20, "L1"), (22, "L3"), (24, "L5")):
        assert np.isclose(measured[label].height_posterior_mm, committed["vertebrae"][name]["height_posterior_mm"], atol=0.05)
        assert np.isclose(measured[label].trabecular_hu, committed["vertebrae"][name]["trabecular_hu"], atol=0.5)
        assert 20.0 < measured[label].height_middle_mm < 32.0  # adult lumbar body


@pytest.mark.slow
def test_phantoms_fall_in_real_ct_ranges(small_cases):
    """Tissue HU and lumbar morphometry of the phantoms against the real-CT ranges."""
    summary = _real_summary()
    lumbar = summary["lumbar"]
    # One default-size (adult) phantom for the morphometry; its lumbar bodies must look adult.
    adult = generate_phantom("adult", np.random.default_rng(11), PhantomConfig(min_vertebrae=6, max_vertebrae=8,
                                                                                 abdominal_fraction=1.0))
    hu = np.asarray(adult.image.dataobj).astype(np.float32)
    labels = np.asarray(adult.mask.dataobj)
    listed = {v.label: v.position_mm for v in adult.vertebrae}
    bodies = measure_vertebral_bodies(labels, adult.image.affine, listed, hu=hu)
    lumbar_bodies = [b for label, b in bodies.items() if 20 <= label <= 24 and adult.morphology[label] == "normal"]
    assert len(lumbar_bodies) >= 3
    for quantity in ("height_posterior_mm", "height_middle_mm", "depth_mm", "width_mm"):
        _check(quantity, [getattr(b, quantity) for b in lumbar_bodies], lumbar[quantity], SLACK[quantity])
    discs = [b.disc_height_below_mm for b in lumbar_bodies]
    _check("disc_height_below_mm", discs, lumbar["disc_height_below_mm"], SLACK["disc_height_below_mm"])
    # HU on the small phantoms (1 mm) and the adult one.
    samples: dict[str, list[float]] = {"trabecular_hu": [], "cortex_hu": [], "cortex_p90_hu": [], "disc_hu": []}
    tissue: dict[str, list[float]] = {"muscle_hu": [], "muscle_sd_hu": [], "fat_hu": []}
    for case in [*small_cases, adult]:
        hu = np.asarray(case.image.dataobj).astype(np.float32)
        labels = np.asarray(case.mask.dataobj)
        listed = {v.label: v.position_mm for v in case.vertebrae}
        for label, body in measure_vertebral_bodies(labels, case.image.affine, listed, hu=hu).items():
            if label in (26, 29) or case.morphology[label] != "normal":
                continue
            for key in samples:
                # A vacuum or calcified (degenerated) disc is meant to leave the real disc HU range.
                if key != "disc_hu" or case.model.by_label(label).disc_state not in ("vacuum", "calcified"):
                    samples[key].append(getattr(body, key))
        for key, value in measure_soft_tissue(hu, labels, case.image.affine, listed).items():
            tissue[key].append(value)
    for key, values in samples.items():
        _check(key, values, summary["all_levels"][key], SLACK[key])
    for key, values in tissue.items():
        _check(key, values, summary["soft_tissue"][key], SLACK[key])


def test_cli_config_file_sets_phantom_settings(tmp_path) -> None:
    settings = tmp_path / "phantom.json"
    settings.write_text(json.dumps({"min_vertebrae": 4, "max_vertebrae": 4, "fov_mm": [90, 90]}))
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(tmp_path / "out"), "--cases", "1", "--small",
                                      "--config", str(settings), "--quiet"])
    assert result.exit_code == 0, result.output
    (centroid_file,) = (tmp_path / "out").glob("*_ctd.json")
    assert len(json.loads(centroid_file.read_text())) == 1 + 4  # direction entry + the 4 vertebrae asked for
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fov": [90, 90]}))
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(tmp_path / "out2"), "--cases", "1", "--small",
                                      "--config", str(bad)])
    assert result.exit_code == 1 and "unknown phantom setting(s): fov" in result.output
    assert not (tmp_path / "out2").exists()
