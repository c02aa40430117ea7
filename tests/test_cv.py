"""Tests of vfdetect.cv, vfdetect.model_selection and vfdetect.stages: split properties, splits.json reuse,
resumable orchestration with stand-in stages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vfdetect import cv, model_selection
from vfdetect.errors import InputError, VfdetectError
from vfdetect.layout import CvFolder, LabelFolder
from vfdetect.stages import Stages, default_stages, evaluate_stage, is_positive


@dataclass(frozen=True)
class FakeCase:
    case: str
    grades: dict[int, int]
    image: Path = Path("/nonexistent.nii.gz")


def cohort(n_cases: int = 30, n_negative: int = 10) -> list[FakeCase]:
    cases = []
    for i in range(n_cases):
        grades = {18: 0, 19: 0, 20: 0}
        if i >= n_negative:
            grades[18 + i % 3] = 1 + i % 3
        cases.append(FakeCase(f"case{i:02d}", grades))
    return cases


def test_folds_are_stratified_partition_with_two_negatives() -> None:
    cases = cohort(31, 11)
    config = cv.CvConfig(n_folds=5, seed=3)
    folds = cv.make_folds(cases, config)
    negatives = {c.case for c in cases if not is_positive(c)}
    tests = [name for fold in folds for name in fold.test]
    assert sorted(tests) == sorted(c.case for c in cases)  # partition
    negative_counts = [sum(n in negatives for n in fold.test) for fold in folds]
    positive_counts = [len(fold.test) - k for fold, k in zip(folds, negative_counts, strict=True)]
    assert min(negative_counts) >= 2 and max(negative_counts) - min(negative_counts) <= 1
    assert max(positive_counts) - min(positive_counts) <= 1
    assert max(len(f.test) for f in folds) - min(len(f.test) for f in folds) <= 1
    for fold in folds:
        assert not set(fold.validation) & set(fold.test)
        assert not set(fold.validation) & set(fold.train)
        assert len(fold.train) + len(fold.validation) + len(fold.test) == 31
        assert len(fold.validation) == round(0.15 * (31 - len(fold.test)))
        assert any(n in negatives for n in fold.validation)  # ~30 % negatives -> one of 4 held out
    assert cv.make_folds(cases, config) == folds  # seeded
    assert cv.make_folds(cases, cv.CvConfig(n_folds=5, seed=4)) != folds


def test_too_few_negatives_is_reported_clearly() -> None:
    with pytest.raises(VfdetectError, match=r"only 9 negative patient\(s\).*need 10"):
        cv.make_folds(cohort(30, 9), cv.CvConfig(n_folds=5))
    folds = cv.make_folds(cohort(30, 9), cv.CvConfig(n_folds=5, min_negatives_per_fold=1))
    assert len(folds) == 5
    with pytest.raises(VfdetectError, match="at least 5 cases"):
        cv.make_folds(cohort(4, 0), cv.CvConfig(n_folds=5, min_negatives_per_fold=0))


def test_splits_json_is_saved_and_reused(tmp_path: Path) -> None:
    cases = cohort(20, 6)
    config = cv.CvConfig(n_folds=3, seed=1)
    folds = cv.ensure_splits(cases, tmp_path, config)
    path = CvFolder(tmp_path).splits
    document = json.loads(path.read_text())
    assert document["settings"]["seed"] == 1 and len(document["folds"]) == 3
    # the saved file is authoritative: edit it and the edited split comes back
    first, second = document["folds"][0], document["folds"][1]
    moved = first["test"].pop()
    second["test"].append(moved)
    path.write_text(json.dumps(document))
    reused = cv.ensure_splits(cases, tmp_path, config)
    assert moved in reused[1].test and moved not in reused[0].test
    assert reused[2] == folds[2]
    with pytest.raises(InputError, match="seed"):
        cv.ensure_splits(cases, tmp_path, cv.CvConfig(n_folds=3, seed=2))
    with pytest.raises(InputError, match="other cases"):
        cv.ensure_splits(cases[:-1], tmp_path, config)


# ----------------------------------------------------------------------------------------------
# Orchestration with stand-in stages
# ----------------------------------------------------------------------------------------------


@dataclass
class StandIns:
    """Stages that write plausible outputs instantly and record their calls."""

    calls: list[tuple[str, ...]] = field(default_factory=list)
    fail_predict_for: str | None = None
    grid: tuple[int, int, int] = (6, 6, 6)

    def stages(self) -> Stages:
        return Stages(self.synthesize, self.train, self.predict, evaluate_stage)

    def synthesize(self, cases, labels_dir: Path) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("labels", *sorted(c.case for c in cases)))
        labels_dir.mkdir(parents=True, exist_ok=True)
        for case in cases:
            data = np.zeros(self.grid, np.uint8)
            data[2:4, 2:4, 2:4] = 2 if is_positive(case) else 1
            nib.save(nib.Nifti1Image(data, np.eye(4)), labels_dir / f"{case.case}_labels.nii.gz")

    def train(self, train_cases, validation_cases, labels_dir: Path, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("train", str(run_dir)))
        assert not {c.case for c in train_cases} & {c.case for c in validation_cases}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.keras").write_text("stand-in")
        (run_dir / "report.json").write_text(json.dumps({"status": "finished"}))

    def predict(self, run_dir: Path, cases, pred_dir: Path) -> None:  # type: ignore[no-untyped-def]
        for case in cases:
            if case.case == self.fail_predict_for:
                raise VfdetectError("stand-in failure")
            self.calls.append(("predict", case.case, pred_dir.name))
            folder = pred_dir / case.case
            folder.mkdir(parents=True, exist_ok=True)
            number = int(case.case[-2:])
            vertebrae = [{"label": label, "fracture_probability": 0.2 + 0.5 * (grade > 0) + 0.01 * number % 0.2,
                          "centroid_mm": [0, 0, label]} for label, grade in case.grades.items()]
            large = 300.0 if is_positive(case) else 40.0
            (folder / "report.json").write_text(json.dumps({
                "vertebrae": vertebrae, "patient_fracture_probability": max(v["fracture_probability"] for v in vertebrae),
                "component_sizes": {"probability_thresholds": [0.5], "largest_component_mm3": [large + number]},
            }))
            data = np.zeros(self.grid, np.uint8)
            data[2:4, 2:4, 2:3] = 2 if is_positive(case) else 1
            nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "labels.nii.gz")


def test_cross_validation_runs_resumes_and_pools(tmp_path: Path) -> None:
    cases = cohort(15, 6)
    config = cv.CvConfig(n_folds=3, seed=0, n_bootstrap=20, centroid_noise_mm=0.0)
    stand_ins = StandIns(fail_predict_for="case14")
    with pytest.raises(VfdetectError, match="stand-in failure"):
        cv.run_cross_validation(cases, tmp_path, config, stand_ins.stages())
    failed_fold = next(f.index for f in cv.read_splits(CvFolder(tmp_path).splits)[1] if "case14" in f.test)
    assert not CvFolder(tmp_path).fold(failed_fold).done.exists()
    finished_before = {f for f in range(3) if CvFolder(tmp_path).fold(f).done.is_file()}
    assert finished_before == set(range(failed_fold))
    predicted_before = {c[1] for c in stand_ins.calls if c[0] == "predict" and c[2] == "predictions"}

    again = StandIns()
    result = cv.run_cross_validation(cases, tmp_path, config, again.stages())
    assert not any(c[0] == "labels" for c in again.calls)  # labels made once
    trained = [c[1] for c in again.calls if c[0] == "train"]
    assert trained == [str(tmp_path / f"fold{f}" / "run") for f in range(3) if f not in finished_before]
    predicted_now = {c[1] for c in again.calls if c[0] == "predict" and c[2] == "predictions"}
    # each fold's validation cases are predicted by the fold's model to choose its patient threshold
    assert {c[2] for c in again.calls if c[0] == "predict"} == {"predictions", "predictions_validation"}
    assert not predicted_now & predicted_before  # finished predictions are not redone
    assert predicted_now | predicted_before == {c.case for c in cases}
    assert result.reused_folds == sorted(finished_before)
    summary = json.loads((tmp_path / "cv.json").read_text())
    assert summary["pooled"]["patient_counts"] == {"patients": 15, "positive": 9, "negative": 6}
    assert summary["pooled"]["patient_auc"] == pytest.approx(1.0)
    assert len(summary["folds"]) == 3 and all("metrics" in f for f in summary["folds"])
    assert all(f["patient_threshold"]["source"] == "validation" for f in summary["folds"])
    assert "patient_training_threshold" in summary["pooled"] and "patient_auc_interval95" in summary["pooled"]
    assert (tmp_path / "evaluation" / "metrics.md").is_file()

    third = StandIns()
    cv.run_cross_validation(cases, tmp_path, config, third.stages())
    assert not any(c[0] in ("train", "predict", "labels") for c in third.calls)


def test_model_selection_compares_variants(tmp_path: Path) -> None:
    cases = cohort(12, 4)
    stand_ins = StandIns()
    config = model_selection.ModelSelectionConfig(n_bootstrap=10)
    document = model_selection.run_model_selection(cases, tmp_path, config, lambda variant: stand_ins.stages())
    assert [row["variant"] for row in document["variants"]] == ["1slice", "5slices", "3d"]
    assert len(document["validation"]) == round(12 * 22 / 90)
    row = document["variants"][0]
    # stand-in labels: 8 reference vertebra voxels of 216, 4 of them predicted
    assert row["voxels"]["vertebra_accuracy"] == pytest.approx(0.5)
    assert row["voxels"]["accuracy"] == pytest.approx(212 / 216)
    assert document["figure3_case"] in document["validation"]
    assert "| 3d |" in (tmp_path / "model_selection.md").read_text()
    trains = sum(c[0] == "train" for c in stand_ins.calls)
    model_selection.run_model_selection(cases, tmp_path, config, lambda variant: stand_ins.stages())
    assert sum(c[0] == "train" for c in stand_ins.calls) == trains  # finished variants reused


def test_voxel_agreement_by_hand() -> None:
    reference = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 2, 2, 2])
    agreement = model_selection.voxel_agreement(predicted, reference)
    assert agreement["accuracy"] == pytest.approx(4 / 6)
    assert agreement["vertebra_accuracy"] == pytest.approx(3 / 4)
    assert agreement["normal_recall"] == pytest.approx(0.5)
    assert agreement["mean_class_recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_experiment_files_parse(tmp_path: Path) -> None:
    folder = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(folder.glob("*.json"))
    assert {"cv5.json", "model_selection.json"} <= {f.name for f in files}
    for path in files:
        if json.loads(path.read_text()).get("experiment") not in ("cv", "model_selection"):
            continue  # other experiments have their own scripts
        document = cv.read_experiment(path)
        if document["experiment"] == "cv":
            cv.CvConfig(**document["cv"])
        else:
            assert model_selection.ModelSelectionConfig(**document["model_selection"]).variants == model_selection.VARIANTS
    bad = tmp_path / "bad.json"
    bad.write_text('{"experiment": "cv", "cv": {"folds": 5}}')
    with pytest.raises(InputError, match="unknown 'cv' setting"):
        cv.read_experiment(bad)


def test_cv_command_reports_too_few_negatives(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vfdetect.cli import cli

    rows, grades = [], []
    for case in cohort(12, 3):
        (tmp_path / f"{case.case}.nii.gz").write_bytes(b"")
        rows.append(f"{case.case},{case.case}.nii.gz,\n")
        grades += [f"{case.case},{label},{grade}\n" for label, grade in case.grades.items()]
    (tmp_path / "manifest.csv").write_text("case,image,centroids\n" + "".join(rows))
    (tmp_path / "grades.csv").write_text("case,label,grade\n" + "".join(grades))
    result = CliRunner().invoke(cli, ["cv", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "out"),
                                      "--folds", "2", "--quiet"])
    assert result.exit_code == 1
    assert "only 3 negative patient(s)" in result.output and "need 4" in result.output
    assert not CvFolder(tmp_path / "out").splits.exists()


@dataclass
class ScoredStandIns(StandIns):
    """Patient scores that differ between a fold's validation predictions and its test predictions.

    Validation side: positives 0.6, negatives 0.3 (best cut 0.45). Test side: positives 0.4,
    negatives 0.2: a cut chosen on the test cases would lie near 0.3 and call every test case right.
    """

    def predict(self, run_dir: Path, cases, pred_dir: Path) -> None:  # type: ignore[no-untyped-def]
        for case in cases:
            self.calls.append(("predict", case.case, pred_dir.name))
            positive = is_positive(case, 2)
            score = (0.6 if positive else 0.3) if pred_dir.name == "predictions_validation" else (
                0.4 if positive else 0.2)
            folder = pred_dir / case.case
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "report.json").write_text(json.dumps({
                "vertebrae": [{"label": label, "fracture_probability": score, "centroid_mm": [0, 0, label]}
                              for label in case.grades],
                "patient_score": score, "patient_threshold": 0.5, "patient_fracture": score >= 0.5,
                "patient_rule": "patient_score >= patient_threshold",
                "component_sizes": {"probability_thresholds": [0.5], "largest_component_mm3": [100 * score]},
            }))


def test_patient_threshold_is_chosen_on_the_training_side_only(tmp_path: Path) -> None:
    cases = cohort(24, 12)  # grades 1-3 among positives; with min_grade 2, grade-1 cases count as negative
    config = cv.CvConfig(n_folds=3, seed=0, n_bootstrap=10, min_grade=2, min_negatives_per_fold=2,
                         validation_fraction=0.3)
    stand_ins = ScoredStandIns()
    result = cv.run_cross_validation(cases, tmp_path, config, stand_ins.stages())
    summary = json.loads((tmp_path / "cv.json").read_text())
    for fold in summary["folds"]:
        chosen = fold["patient_threshold"]
        assert chosen["threshold"] == pytest.approx(0.45) and chosen["fallback"] is None
        # applied to the test fold: every test score (0.4 / 0.2) is below it
        assert chosen["test"]["recall"] == 0.0 and chosen["test"]["specificity"] == 1.0
    pooled = result.pooled_metrics["patient_training_threshold"]
    assert pooled["recall"] == 0.0 and pooled["thresholds"] == [pytest.approx(0.45)]
    assert "validation cases" in pooled["note"]
    # the fixed rule of the reports is summarised beside it, and truth follows min_grade everywhere
    assert result.pooled_metrics["patient_fixed_rule"]["thresholds"] == [0.5]
    positives = sum(is_positive(c, 2) for c in cases)
    assert result.pooled_metrics["patient_counts"]["positive"] == positives < sum(is_positive(c) for c in cases)
    splits = json.loads((CvFolder(tmp_path).splits).read_text())
    assert len(splits["positive_cases"]) == positives
    assert "chosen without the test cases" in (tmp_path / "evaluation" / "metrics.md").read_text()


def test_choose_patient_threshold_falls_back_on_one_class(tmp_path: Path) -> None:
    cases = [FakeCase("a", {18: 2}), FakeCase("b", {18: 3})]
    for case, score in zip(cases, (0.7, 0.9), strict=True):
        (tmp_path / case.case).mkdir()
        (tmp_path / case.case / "report.json").write_text(json.dumps(
            {"vertebrae": [], "patient_fracture_probability": score, "patient_threshold": 0.42}))
    record = cv.choose_patient_threshold(cases, tmp_path)
    assert record["threshold"] == 0.42 and "one class" in record["fallback"]
    with pytest.raises(VfdetectError, match="patient_threshold_from"):
        cv.CvConfig(patient_threshold_from="test")


def test_default_stages_label_images_follow_min_grade(tmp_path: Path) -> None:
    from vfdetect.labels import FRACTURE, IGNORE
    from vfdetect.vertebrae import Case, Vertebra, write_centroids
    from vfdetect.volume import load_label_image

    affine = np.eye(4)
    hu = np.full((40, 40, 80), -1000, dtype=np.int16)
    hu[10:30, 10:30, :] = 300
    image = tmp_path / "c_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), image)
    positions = {20: (20.0, 20.0, 20.0), 21: (20.0, 20.0, 45.0), 22: (20.0, 20.0, 70.0)}
    vertebrae = [Vertebra(label, position) for label, position in positions.items()]
    centroids = tmp_path / "c_ctd.json"
    write_centroids(centroids, vertebrae, affine)
    case = Case("c", image, centroids, {20: 0, 21: 1, 22: 2})
    values = {}
    for min_grade in (1, 2):
        labels_dir = tmp_path / f"labels{min_grade}"
        default_stages({"min_grade": min_grade}, quiet=True).synthesize_labels([case], labels_dir)
        labels = load_label_image(LabelFolder(labels_dir).image("c"))[0].array
        values[min_grade] = labels[20, 20, 45]
        assert json.loads(LabelFolder(labels_dir).config.read_text())["min_grade"] == min_grade
    assert values[1] == FRACTURE and values[2] == IGNORE


@pytest.mark.slow
def test_default_stages_prepare_each_scan_once_for_all_folds(tmp_path: Path) -> None:
    from vfdetect.manifest import Case
    from vfdetect.vertebrae import Vertebra, write_centroids

    cases = []
    for index in range(3):
        hu = np.full((48, 48, 90), -1000, dtype=np.int16)
        hu[6:42, 6:42, :] = 30
        hu[16:32, 14:34, 5:85] = 250 + 20 * index
        image = tmp_path / f"c{index}_ct.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.eye(4)), image)
        centroids = tmp_path / f"c{index}_ctd.json"
        write_centroids(centroids, [Vertebra(20 + k, (24.0, 24.0, 20.0 + 25 * k)) for k in range(3)], np.eye(4))
        cases.append(Case(f"c{index}", image, centroids, {20: 0, 21: 2, 22: 0}))
    options = {"epochs": 1, "subepochs": 1, "segments_per_subepoch": 20, "validation_segments": 10,
               "balanced_validation_segments": 10, "model_options": {"widths": [4] * 8, "fc_widths": [8, 8]}}
    stages = default_stages(options, quiet=True)
    labels_dir = tmp_path / "out" / "labels"
    stages.synthesize_labels(cases, labels_dir)
    stages.train(cases[:2], cases[2:], labels_dir, tmp_path / "out" / "fold0" / "run")
    cache = tmp_path / "out" / "cache"
    entries = sorted(path.name for path in cache.iterdir() if path.is_dir())
    assert entries == ["c0", "c1", "c2"]
    stamps = {name: (cache / name / "image.npy").stat().st_mtime_ns for name in entries}
    stages.train(cases[1:], cases[:1], labels_dir, tmp_path / "out" / "fold1" / "run")
    assert {name: (cache / name / "image.npy").stat().st_mtime_ns for name in entries} == stamps  # read, not rewritten
