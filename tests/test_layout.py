"""Tests of vfdetect.layout: the names of runs, predictions, label images and experiment folders."""

from __future__ import annotations

from pathlib import Path

from vfdetect.layout import (
    CvFolder,
    LabelFolder,
    ModelSelectionFolder,
    PredictionFolder,
    RunFolder,
    find_case_report,
)


def test_names_inside_each_folder() -> None:
    run = RunFolder(Path("run"))
    assert [p.name for p in (run.model, run.config, run.log, run.report, run.checkpoint_dir)] == [
        "model.keras", "config.json", "log.csv", "report.json", "checkpoint"]
    case = PredictionFolder(Path("pred")).case("verse004")
    assert case.report == Path("pred/verse004/report.json")
    assert [p.name for p in (case.scores_map, case.probabilities, case.labels, case.overlay, case.report_csv)] == [
        "scores_map.nii.gz", "probabilities.nii.gz", "labels.nii.gz", "overlay.png", "report.csv"]
    assert PredictionFolder(Path("pred")).summary_csv == Path("pred/summary.csv")
    labels = LabelFolder(Path("labels"))
    assert labels.image("c1") == Path("labels/c1_labels.nii.gz") and labels.preview("c1").name == "c1_labels.png"
    experiment = CvFolder(Path("cv"))
    fold = experiment.fold(2)
    assert fold.run.model == Path("cv/fold2/run/model.keras") and fold.done == Path("cv/fold2/fold.json")
    assert fold.predictions_for("validation").path == Path("cv/fold2/predictions_validation")
    assert experiment.labels.image("c1") == Path("cv/labels/c1_labels.nii.gz")
    assert experiment.evaluation.metrics == Path("cv/evaluation/metrics.json")
    selection = ModelSelectionFolder(Path("ms"))
    assert selection.variant("3d").predictions.case("c1").labels == Path("ms/3d/predictions/c1/labels.nii.gz")


def test_find_case_report_takes_the_first_folder_that_has_it(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        PredictionFolder(folder).case("c1").path.mkdir(parents=True)
    PredictionFolder(second).case("c1").report.write_text("{}")
    assert find_case_report("c1", [first, second]) == second / "c1" / "report.json"
    PredictionFolder(first).case("c1").report.write_text("{}")
    assert find_case_report("c1", [first, second]) == first / "c1" / "report.json"
    assert find_case_report("c2", [first, second]) is None
