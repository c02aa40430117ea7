"""Where things live on disk: training runs, predictions, label images, evaluations, experiments.

Every file and folder name the package reads or writes is spelled here once. A folder is a small
frozen dataclass around its path; its properties are the paths inside it (nothing is created or
read here)::

    run folder        model.keras  model_last.keras  config.json  log.csv  report.json  tensorboard/
                      model_epoch<NNN>.keras (with --keep-epoch-models)  checkpoint/last.npz
                      workers/<type>-<index>/ (a run folder per non-chief worker)
    prediction folder <case>/{report.json, report.csv, scores_map.nii.gz, probabilities.nii.gz, labels.nii.gz,
                      overlay.png}  summary.csv
    label folder      <case>_labels.nii.gz  <case>_labels.png (preview)  label_config.json
    evaluation folder metrics.json  metrics.md  roc.npz  roc_vertebra.csv  roc_patient_hull.csv
                      patient_operating_points.csv  roc_bootstrap_mean.csv  vertebrae.csv
    cross-validation  splits.json  labels/  fold<k>/{run/, predictions/, predictions_<source>/,
                      evaluation/, fold.json}  evaluation/  evaluation_centroid_noise/  cv.json
    model selection   split.json  labels/  <variant>/{run/, predictions/, evaluation/, variant.json}
                      model_selection.json  model_selection.md
    figures           <folder>/figures/
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

CASE_REPORT_NAME = "report.json"
PROBABILITIES_NAME = "probabilities.nii.gz"
SCORES_MAP_NAME = "scores_map.nii.gz"
LABELS_SUFFIX = "_labels.nii.gz"
METRICS_NAME = "metrics.json"


class _File:
    """A file (or folder) of a fixed name inside a folder object: ``Folder.name`` is its path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: Any, owner: type | None = None) -> Path:
        return Path(folder.path) / self.name


FolderT = TypeVar("FolderT")


class _Subfolder(Generic[FolderT]):
    """A subfolder of a fixed name, seen as a folder object of its own kind."""

    def __init__(self, kind: Callable[[Path], FolderT], name: str) -> None:
        self.kind = kind
        self.name = name

    def __get__(self, folder: Any, owner: type | None = None) -> FolderT:
        return self.kind(Path(folder.path) / self.name)


@dataclass(frozen=True)
class RunFolder:
    """A training run: the model, its configuration, the epoch log, the run report, checkpoints."""

    path: Path
    model = _File("model.keras")
    model_last = _File("model_last.keras")
    config = _File("config.json")
    log = _File("log.csv")
    report = _File("report.json")
    tensorboard = _File("tensorboard")
    checkpoint_dir = _File("checkpoint")

    def epoch_model(self, epoch: int) -> Path:
        """The weights after ``epoch`` (1-based), kept when a run is asked to keep every epoch."""
        return Path(self.path) / f"model_epoch{epoch:03d}.keras"

    @property
    def checkpoint(self) -> Path:
        """The last checkpoint, rewritten after every subepoch."""
        return self.checkpoint_dir / "last.npz"

    def worker(self, name: str) -> RunFolder:
        """The run folder a non-chief worker ``name`` (``<type>-<index>``) writes to."""
        return RunFolder(Path(self.path) / "workers" / name)


@dataclass(frozen=True)
class CaseFolder:
    """One case's prediction outputs: ``<prediction folder>/<case>/``.

    ``scores_map``: the map the vertebra scores were computed from, on the internal RAS grid (1 mm
    at the bundled spacing): float32 channels p(fracture), p(normal), cropped to the voxels the
    network computed plus the scoring cube's margin, with the affine of the crop; a header extension
    records the full grid and the exact centroids scored (:func:`vfdetect.case_outputs.write_scores_map`).
    ``probabilities``: the same maps resampled onto the input scan's grid and stored in steps of
    1/255, for viewing beside the scan; ``labels``: the argmax classes on that grid.
    """

    path: Path
    report = _File(CASE_REPORT_NAME)
    report_csv = _File("report.csv")
    scores_map = _File(SCORES_MAP_NAME)
    probabilities = _File(PROBABILITIES_NAME)
    labels = _File("labels.nii.gz")
    overlay = _File("overlay.png")


@dataclass(frozen=True)
class PredictionFolder:
    """The output folder of ``vfdetect predict``: one :class:`CaseFolder` per case and summary.csv."""

    path: Path
    summary_csv = _File("summary.csv")

    def case(self, name: str) -> CaseFolder:
        return CaseFolder(Path(self.path) / name)


def find_case_report(case: str, pred_dirs: Sequence[Path]) -> Path | None:
    """``<pred_dir>/<case>/report.json`` in the first of ``pred_dirs`` that has it."""
    for pred_dir in pred_dirs:
        candidate = PredictionFolder(Path(pred_dir)).case(case).report
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class LabelFolder:
    """Label images synthesised from centroids and grades, their previews and their settings."""

    path: Path
    config = _File("label_config.json")

    def image(self, case: str) -> Path:
        return Path(self.path) / f"{case}{LABELS_SUFFIX}"

    def preview(self, case: str) -> Path:
        return Path(self.path) / f"{case}_labels.png"


@dataclass(frozen=True)
class EvaluationFolder:
    """The output folder of ``vfdetect evaluate``."""

    path: Path
    metrics = _File(METRICS_NAME)
    metrics_markdown = _File("metrics.md")
    roc_arrays = _File("roc.npz")
    roc_vertebra_csv = _File("roc_vertebra.csv")
    roc_patient_hull_csv = _File("roc_patient_hull.csv")
    patient_operating_points_csv = _File("patient_operating_points.csv")
    roc_bootstrap_mean_csv = _File("roc_bootstrap_mean.csv")
    vertebrae_csv = _File("vertebrae.csv")


@dataclass(frozen=True)
class TrainedFolder:
    """One trained model of an experiment (a fold, a variant): run, predictions, evaluation, finished marker."""

    path: Path
    run = _Subfolder(RunFolder, "run")
    predictions = _Subfolder(PredictionFolder, "predictions")
    evaluation = _Subfolder(EvaluationFolder, "evaluation")


@dataclass(frozen=True)
class FoldFolder(TrainedFolder):
    """One cross-validation fold; ``predictions`` holds its test cases."""

    done = _File("fold.json")

    def predictions_for(self, source: str) -> PredictionFolder:
        """Predictions of the fold's ``source`` cases (``validation``, ``training``) for its patient threshold."""
        return PredictionFolder(Path(self.path) / f"predictions_{source}")


@dataclass(frozen=True)
class VariantFolder(TrainedFolder):
    """One variant of the model-selection experiment; ``predictions`` holds the validation cases."""

    done = _File("variant.json")


@dataclass(frozen=True)
class CvFolder:
    """A cross-validation experiment (``vfdetect cv``); ``evaluation`` pools all folds' test predictions."""

    path: Path
    splits = _File("splits.json")
    labels = _Subfolder(LabelFolder, "labels")
    evaluation = _Subfolder(EvaluationFolder, "evaluation")
    evaluation_centroid_noise = _Subfolder(EvaluationFolder, "evaluation_centroid_noise")
    summary = _File("cv.json")

    def fold(self, index: int) -> FoldFolder:
        return FoldFolder(Path(self.path) / f"fold{index}")


@dataclass(frozen=True)
class ModelSelectionFolder:
    """The model-selection experiment (``vfdetect cv --model-selection``)."""

    path: Path
    split = _File("split.json")
    labels = _Subfolder(LabelFolder, "labels")
    summary = _File("model_selection.json")
    summary_markdown = _File("model_selection.md")

    def variant(self, name: str) -> VariantFolder:
        return VariantFolder(Path(self.path) / name)


def figures_dir(folder: Path) -> Path:
    """Default folder of the figures drawn from ``folder``'s saved outputs."""
    return Path(folder) / "figures"


def fixed_files(folder: Any) -> list[Path]:
    """Every fixed-name file (or folder) of a folder object (``RunFolder(path)``, ``EvaluationFolder(path)``...).

    The command line checks these against its inputs, so that no output overwrites an input.
    """
    names = [attribute.name for kind in type(folder).__mro__ for attribute in vars(kind).values()
             if isinstance(attribute, _File)]
    return [Path(folder.path) / name for name in dict.fromkeys(names)]
