"""Tests of vfdetect.figures: every figure drawn from saved outputs, PNG and PDF, and the CLI commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_png_has_content

from vfdetect import evaluate as ev
from vfdetect import figures
from vfdetect.cli import cli
from vfdetect.errors import InputError

SHAPE = (40, 40, 90)
LABELS = (18, 19, 20, 21)


@dataclass(frozen=True)
class FakeCase:
    case: str
    grades: dict[int, int]
    image: Path


def _affine(flipped: bool) -> np.ndarray:
    """1 mm grid; ``flipped`` stores the scan in LPS voxel order with the same world positions."""
    if not flipped:
        return np.eye(4)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    return affine


def _write_cohort(root: Path) -> tuple[list[FakeCase], Path]:
    """Six scans with box 'vertebrae', probability maps and reports; two cases carry errors."""
    pred_dir = root / "pred"
    cases = []
    for i in range(6):
        grades = {label: (2 if (i + k) % 4 == 0 and i < 4 else 0) for k, label in enumerate(LABELS)}
        affine = _affine(flipped=i % 2 == 1)
        world_to_voxel = np.linalg.inv(affine)
        ct = np.full(SHAPE, -900, dtype=np.int16)
        probability = np.zeros((*SHAPE, 2), dtype=np.uint8)
        vertebrae = []
        for k, label in enumerate(LABELS):
            centre_mm = np.array([20.0, 18.0, 78.0 - 20 * k])
            x, y, z = np.rint(world_to_voxel @ np.r_[centre_mm, 1])[:3].astype(int)
            ct[x - 8:x + 9, y - 6:y + 7, z - 7:z + 8] = 300
            fractured = grades[label] > 0
            score = 0.8 if fractured else 0.1
            if (i, k) == (4, 1):
                score = 0.7  # false positive
            if (i, k) == (1, 3) and fractured:
                score = 0.2  # false negative
            probability[x - 5:x + 6, y - 4:y + 5, z - 4:z + 5, 0] = int(score * 255)
            vertebrae.append({"label": label, "fracture_probability": score, "centroid_mm": centre_mm.tolist()})
        folder = pred_dir / f"case{i}"
        folder.mkdir(parents=True)
        image_path = root / f"case{i}_ct.nii.gz"
        nib.save(nib.Nifti1Image(ct, affine), image_path)
        probability_image = nib.Nifti1Image(probability, affine)
        probability_image.header.set_slope_inter(1 / 255, 0)
        nib.save(probability_image, folder / "probabilities.nii.gz")
        labels = np.where(probability[..., 0] > 100, 2, np.where(ct > 0, 1, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, affine), folder / "labels.nii.gz")
        positive = any(g > 0 for g in grades.values())
        (folder / "report.json").write_text(json.dumps({
            "vertebrae": vertebrae, "patient_score": max(v["fracture_probability"] for v in vertebrae),
            "patient_threshold": 0.5, "patient_rule": "patient_score >= patient_threshold",
            "patient_fracture": max(v["fracture_probability"] for v in vertebrae) >= 0.5,
            "component_sizes": {"probability_thresholds": [0.3, 0.6],
                                "largest_component_mm3": [900.0 + i, 800.0] if positive else [90.0 + i, 0.0]},
        }))
        cases.append(FakeCase(f"case{i}", grades, image_path))
    return cases, pred_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[FakeCase], Path, Path]:
    root = tmp_path_factory.mktemp("cohort")
    cases, pred_dir = _write_cohort(root)
    ev.evaluate_predictions(cases, pred_dir, root / "evaluation", n_bootstrap=100, seed=0)
    return cases, pred_dir, root / "evaluation"


def test_draw_figures_from_an_evaluation(evaluated: tuple[list[FakeCase], Path, Path], tmp_path: Path) -> None:
    cases, _, evaluation = evaluated
    written = figures.draw_figures(evaluation, tmp_path / "fig", cases_per_figure=2)
    names = sorted(path.name for path in written)
    for stem in ("figure1_fractures_per_level", "figure4_patient_roc", "figure5_vertebra_roc",
                 "figure6_correct_cases", "figure7_cases_with_errors"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    for path in written:
        assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
        if path.suffix == ".png":
            assert_png_has_content(path)


def test_overlay_case_choice(evaluated: tuple[list[FakeCase], Path, Path]) -> None:
    _, _, evaluation = evaluated
    correct, wrong = figures.choose_overlay_cases(figures._case_rows(evaluation), 3)
    assert set(wrong) == {"case1", "case4"}  # the planted FN and FP
    assert "case0" in correct and not set(correct) & set(wrong)


def test_images_stored_in_any_orientation_land_on_one_internal_grid(tmp_path: Path) -> None:
    """A scan stored LPS and the same scan stored RAS read back identical (internal frame, world kept)."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(6, 7, 8)).astype(np.int16)
    ras = np.diag([2.0, 1.5, 1.0, 1.0])
    ras[:3, 3] = [10.0, -3.0, 7.0]
    lps = ras @ np.array([[-1, 0, 0, 5], [0, -1, 0, 6], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps), tmp_path / "lps.nii.gz")
    first = figures.load_internal(tmp_path / "ras.nii.gz", "scan")
    second = figures.load_internal(tmp_path / "lps.nii.gz", "scan")
    np.testing.assert_allclose(first.affine, second.affine)
    np.testing.assert_allclose(first.array, second.array)
    assert np.all(np.diag(first.affine)[:3] > 0)
    labels = figures.load_internal(tmp_path / "lps.nii.gz", "labels")
    assert np.issubdtype(labels.array.dtype, np.integer)
    with pytest.raises(InputError, match="probability map not found"):
        figures.load_internal(tmp_path / "missing.nii.gz", "probability")


def test_figure3_from_a_model_selection_folder(evaluated: tuple[list[FakeCase], Path, Path], tmp_path: Path) -> None:
    cases, pred_dir, _ = evaluated
    selection = tmp_path / "selection"
    for variant in ("1slice", "5slices", "3d"):
        target = selection / variant / "predictions" / "case0"
        target.mkdir(parents=True)
        for name in ("labels.nii.gz", "report.json"):
            (target / name).write_bytes((pred_dir / "case0" / name).read_bytes())
    (selection / "model_selection.json").write_text(json.dumps({
        "figure3_case": "case0", "figure3_image": str(cases[0].image),
        "variants": [{"variant": v} for v in ("1slice", "5slices", "3d")]}))
    written = figures.draw_figures(selection)
    assert sorted(p.name for p in written) == ["figure3_variants.pdf", "figure3_variants.png"]


def test_commands_evaluate_and_figures(evaluated: tuple[list[FakeCase], Path, Path], tmp_path: Path) -> None:
    cases, pred_dir, _ = evaluated
    root = cases[0].image.parent
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case,image,centroids\n" + "".join(f"{c.case},{c.image.name},\n" for c in cases))
    (tmp_path / "grades.csv").write_text("case,label,grade\n" + "".join(
        f"{c.case},{label},{grade}\n" for c in cases for label, grade in c.grades.items()))
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(cli, ["evaluate", str(manifest), str(pred_dir), "--out", str(out), "--data-root",
                                 str(root), "--bootstrap", "50", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "patient level: AUC" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_bootstrap"] == 50 and metrics["patient_counts"]["patients"] == 6
    result = runner.invoke(cli, ["figures", str(out), "--manifest", str(manifest), "--data-root", str(root),
                                 "--cases-per-figure", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "figures" / "figure1_manifest.png").is_file()
    assert (out / "figures" / "figure4_patient_roc.pdf").is_file()
    result = runner.invoke(cli, ["evaluate", str(manifest), str(tmp_path / "nowhere"), "--out", str(out),
                                 "--data-root", str(root)])
    assert result.exit_code == 1 and "prediction folder not found" in result.output
    with pytest.raises(InputError, match="holds no metrics.json"):
        figures.draw_figures(tmp_path)


def test_figure5_uses_the_centroid_noise_evaluation(evaluated: tuple[list[FakeCase], Path, Path],
                                                    tmp_path: Path) -> None:
    cases, pred_dir, _ = evaluated
    folder = tmp_path / "cv"
    ev.evaluate_predictions(cases, pred_dir, folder / "evaluation", n_bootstrap=30, seed=0)
    noisy = ev.evaluate_predictions(cases, pred_dir, folder / "evaluation_centroid_noise", n_bootstrap=30, seed=0,
                                    centroid_noise_mm=3.0, noise_draws=2)
    assert noisy["vertebra_centroid_noise"]["draws"] == 2 and "vertebra_noise_free" in noisy
    (folder / "cv.json").write_text("{}")
    written = figures.draw_figures(folder, tmp_path / "fig", cases_per_figure=1)
    names = {path.name for path in written}
    assert {"figure4_patient_roc.png", "figure5_vertebra_roc.png", "figure5_vertebra_roc.pdf"} <= names
    assert not any("centroid_noise" in name for name in names)
    plain = json.loads((folder / "evaluation" / "metrics.json").read_text())
    assert plain["patient_fixed_rule"]["thresholds"] == [0.5]
