"""Stratified k-fold cross-validation end to end (the paper's main experiment).

Cross-validation (paper section 4): folds are drawn at patient level, stratified on "has a
fractured vertebra", with at least two negative patients in every fold (the paper's footnote 2);
15 % of each training fold is held out for validation. The split is saved as ``splits.json`` and
reused by every rerun. Label images are synthesised once; then each fold trains, predicts its
test cases and evaluates them. A fold whose ``fold.json`` exists is finished and never redone; an
interrupted fold resumes (training from its checkpoint, prediction from the missing cases). At the
end the out-of-fold predictions of all folds are pooled into one evaluation, as in the paper.

Patient-level decisions are not tuned on the test cases: each fold chooses its threshold on the
patient score (the highest vertebra score) from cases on its training side, by Youden's J
(``patient_threshold_from``: ``"validation"``, the fold's validation cases, default;
``"training"``, its training and validation cases, which are predicted for this and are optimistic
for the model that was fitted on them; ``"model"``, the ``patient_threshold`` stored by the model in
its reports). The threshold is applied to the fold's test cases; recall and specificity are given
per fold and pooled (``patient_training_threshold`` in the pooled metrics). A fold whose chosen
cases hold one class falls back to the model's threshold (recorded).

Truth is the same everywhere: a vertebra is fractured when its Genant grade is at least
``min_grade``, a patient positive when one of its vertebrae is (:func:`is_positive`, also the
stratification of the folds).

The stages (label synthesis, training, prediction, evaluation) are injectable callables
(:class:`vfdetect.stages.Stages`), so the orchestration can be tested without TensorFlow. Model
selection (paper section 3.2) is :mod:`vfdetect.model_selection`; :func:`read_experiment` reads
the experiment files of both.

Output folder of :func:`run_cross_validation` (:class:`vfdetect.layout.CvFolder`)::

    splits.json  labels/  fold0/{run/, predictions/, predictions_validation/, evaluation/, fold.json}  ...
    evaluation/ (pooled)  [evaluation_centroid_noise/]  cv.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic
from vfdetect.jsonutil import json_safe
from vfdetect.layout import CvFolder, FoldFolder, PredictionFolder
from vfdetect.metrics import decision_summary, youden_threshold
from vfdetect.model_selection import ModelSelectionConfig
from vfdetect.records import read_case_report
from vfdetect.stages import (
    Stages,
    default_stages,
    ensure_labels,
    is_positive,
    metrics_summary,
    missing_predictions,
    stratified_holdout,
    train_and_predict,
)

SPLITS_FORMAT = 1
PATIENT_THRESHOLD_SOURCES: tuple[str, ...] = ("validation", "training", "model")
"""Where a fold's patient-level threshold comes from (see the module doc)."""


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: case names to train on, to validate on and to test."""

    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class CvConfig:
    """Settings of a cross-validation run (all saved in ``splits.json`` / ``cv.json``)."""

    n_folds: int = 5
    seed: int = 0
    min_grade: int = 1
    min_negatives_per_fold: int = 2
    validation_fraction: float = 0.15
    n_bootstrap: int = 1000
    centroid_noise_mm: float = 0.0
    noise_draws: int = 10
    patient_threshold_from: str = "validation"

    def __post_init__(self) -> None:
        if self.noise_draws < 1:
            raise VfdetectError(f"noise_draws must be >= 1, got {self.noise_draws}")
        if self.patient_threshold_from not in PATIENT_THRESHOLD_SOURCES:
            raise VfdetectError(f"patient_threshold_from must be one of {', '.join(PATIENT_THRESHOLD_SOURCES)}, "
                                f"got {self.patient_threshold_from!r}")
        if self.n_folds < 2:
            raise VfdetectError(f"cross-validation needs at least 2 folds, got {self.n_folds}")
        if self.min_grade not in (1, 2, 3):
            raise VfdetectError(f"min_grade must be 1, 2 or 3, got {self.min_grade}")
        if self.min_negatives_per_fold < 0:
            raise VfdetectError("min_negatives_per_fold must be >= 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise VfdetectError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.n_bootstrap < 0:
            raise VfdetectError("n_bootstrap must be >= 0")
        if self.centroid_noise_mm < 0:
            raise VfdetectError("centroid_noise_mm must be >= 0")

    def split_settings(self) -> dict[str, Any]:
        """The settings that define the split (a saved split must match them)."""
        return {"n_folds": self.n_folds, "seed": self.seed, "min_grade": self.min_grade,
                "min_negatives_per_fold": self.min_negatives_per_fold,
                "validation_fraction": self.validation_fraction}


def make_folds(cases: Sequence[Any], config: CvConfig = CvConfig()) -> list[Fold]:
    """Stratified patient-level folds with at least ``config.min_negatives_per_fold`` negatives each.

    Negatives and positives are shuffled (seeded) and dealt round-robin, negatives first, so every
    fold gets ``floor`` or ``ceil`` of each class's share and the fold sizes differ by at most one.
    Raises :class:`VfdetectError` when there are too few negative patients for the rule, or fewer
    cases than folds.
    """
    names = [case.case for case in cases]
    if len(set(names)) != len(names):
        raise VfdetectError("duplicate case names in the manifest")
    k = config.n_folds
    if len(names) < k:
        raise VfdetectError(f"{k}-fold cross-validation needs at least {k} cases, the manifest has {len(names)}")
    positives = sorted(case.case for case in cases if is_positive(case, config.min_grade))
    negatives = sorted(case.case for case in cases if not is_positive(case, config.min_grade))
    needed = config.min_negatives_per_fold * k
    if len(negatives) < needed:
        raise VfdetectError(
            f"only {len(negatives)} negative patient(s) (no vertebra of Genant grade >= {config.min_grade}) among "
            f"{len(names)} cases: {k} folds with at least {config.min_negatives_per_fold} negatives each need "
            f"{needed}. Use fewer folds, or lower --min-negatives-per-fold (the paper used 2; with fewer, some "
            f"test folds have no negative patient and their patient-level ROC is undefined)"
        )
    rng = np.random.default_rng([config.seed, 0xC5])
    shuffled = [negatives[int(i)] for i in rng.permutation(len(negatives))]
    shuffled += [positives[int(i)] for i in rng.permutation(len(positives))]
    test_sets: list[list[str]] = [[] for _ in range(k)]
    for position, name in enumerate(shuffled):
        test_sets[position % k].append(name)
    positive_set = set(positives)
    folds = []
    for index, test in enumerate(test_sets):
        test_names = set(test)
        rest = [name for name in names if name not in test_names]
        kept, validation = stratified_holdout(
            sorted(n for n in rest if n in positive_set), sorted(n for n in rest if n not in positive_set),
            config.validation_fraction, np.random.default_rng([config.seed, 0xA1, index]),
        )
        folds.append(Fold(index, tuple(sorted(kept)), tuple(sorted(validation)), tuple(sorted(test))))
    return folds


def splits_document(cases: Sequence[Any], folds: Sequence[Fold], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON content of ``splits.json``."""
    min_grade = int(settings.get("min_grade", 1))
    positive = {case.case for case in cases if is_positive(case, min_grade)}
    return {
        "format": SPLITS_FORMAT,
        "settings": dict(settings),
        "cases": sorted(case.case for case in cases),
        "positive_cases": sorted(positive),
        "folds": [
            {**asdict(fold), "negatives_in_test": sum(name not in positive for name in fold.test),
             "positives_in_test": sum(name in positive for name in fold.test)}
            for fold in folds
        ],
    }


def read_splits(path: Path) -> tuple[dict[str, Any], list[Fold]]:
    """Read ``splits.json``: its settings and folds."""
    try:
        document = json.loads(Path(path).read_text())
        folds = [Fold(int(f["index"]), tuple(f["train"]), tuple(f["validation"]), tuple(f["test"]))
                 for f in document["folds"]]
        settings = dict(document["settings"])
        cases = set(document["cases"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"unreadable split file ({error})") from None
    covered = [name for fold in folds for name in fold.test]
    if sorted(covered) != sorted(cases):
        raise InputError(path, "the folds' test sets do not partition the listed cases")
    return {**settings, "cases": sorted(cases)}, folds


def ensure_splits(cases: Sequence[Any], out_dir: Path, config: CvConfig = CvConfig()) -> list[Fold]:
    """Folds from ``out_dir/splits.json`` when it exists (checked against the cases and settings),
    else new seeded folds saved there."""
    path = CvFolder(Path(out_dir)).splits
    if path.is_file():
        saved, folds = read_splits(path)
        names = sorted(case.case for case in cases)
        if saved["cases"] != names:
            missing = sorted(set(saved["cases"]) - set(names))
            extra = sorted(set(names) - set(saved["cases"]))
            raise InputError(path, f"was made for other cases (missing now: {missing[:5]}, new: {extra[:5]}); "
                                   "use another --out folder, or delete it to re-split")
        for key, value in config.split_settings().items():
            if key in saved and saved[key] != value:
                raise InputError(path, f"was made with {key}={saved[key]!r}, this run asks for {value!r}; "
                                       "use the saved value, another --out folder, or delete it to re-split")
        return folds
    folds = make_folds(cases, config)
    write_json_atomic(path, splits_document(cases, folds, config.split_settings()))
    return folds


# ----------------------------------------------------------------------------------------------
# Stages


def choose_patient_threshold(
    cases: Sequence[Any], pred_dir: Path, min_grade: int = 1
) -> dict[str, Any]:
    """Threshold on the patient score chosen on ``cases`` (their reports in ``pred_dir``).

    Youden's J on the reports' patient scores (:func:`vfdetect.metrics.youden_threshold`) against
    :func:`is_positive`. When the cases hold one class, the model's ``patient_threshold`` from
    their reports is used instead (``fallback`` says why); ``threshold`` is None when neither
    exists. Returns ``{"threshold", "cases", "positives", "negatives", "fallback"}``.
    """
    truth, scores, model_thresholds = [], [], set()
    folder = PredictionFolder(Path(pred_dir))
    for case in cases:
        path = folder.case(case.case).report
        report = read_case_report(path)
        if report.patient_score is None:
            raise InputError(path, "no patient score (patient_score) in the report")
        truth.append(is_positive(case, min_grade))
        scores.append(report.patient_score)
        if report.patient_threshold is not None:
            model_thresholds.add(report.patient_threshold)
    record: dict[str, Any] = {"cases": len(truth), "positives": sum(truth), "negatives": len(truth) - sum(truth),
                              "fallback": None}
    if any(truth) and not all(truth):
        record["threshold"] = youden_threshold(np.array(truth), np.array(scores))
    else:
        record["threshold"] = min(model_thresholds) if len(model_thresholds) == 1 else None
        record["fallback"] = ("the chosen cases hold one class; " + (
            "the model's patient_threshold is used" if record["threshold"] is not None
            else "the reports state no single patient_threshold: no threshold"))
    return record


def _test_decisions(cases: Sequence[Any], pred_dir: Path, threshold: float, min_grade: int) -> dict[str, Any]:
    """Recall and specificity of ``patient_score >= threshold`` on ``cases``."""
    truth, calls = [], []
    folder = PredictionFolder(Path(pred_dir))
    for case in cases:
        score = read_case_report(folder.case(case.case).report).patient_score
        truth.append(is_positive(case, min_grade))
        calls.append(score is not None and score >= threshold)
    return json_safe(decision_summary(np.array(truth, dtype=bool), np.array(calls, dtype=bool)))


# ----------------------------------------------------------------------------------------------
# Cross-validation
# ----------------------------------------------------------------------------------------------


def fold_patient_threshold(fold: Fold, by_name: Mapping[str, Any], fold_dir: Path, stages: Stages, config: CvConfig,
                           say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The fold's patient-score threshold, chosen without its test cases (``config.patient_threshold_from``).

    ``"validation"`` / ``"training"`` predict the fold's validation (and training) cases into
    ``fold_dir/predictions_<source>/`` when not done yet, choose by Youden's J
    (:func:`choose_patient_threshold`) and add the recall and specificity on the fold's test
    cases; ``"model"`` takes the model's ``patient_threshold`` from the test reports (fixed when
    the model was saved). Returns a JSON-ready record with ``threshold`` (None when none could be
    had), ``source``, ``note`` and ``test`` (the test-fold decisions).
    """
    source = config.patient_threshold_from
    folder = FoldFolder(Path(fold_dir))
    test_dir = folder.predictions.path
    test_cases = [by_name[name] for name in fold.test]
    if source == "model":
        found = {read_case_report(folder.predictions.case(c.case).report).patient_threshold for c in test_cases}
        record: dict[str, Any] = {"threshold": found.pop() if len(found) == 1 else None, "fallback": None,
                                  "cases": 0}
        note = "the model's patient_threshold, fixed before seeing the test cases"
    else:
        names = fold.validation if source == "validation" else fold.train + fold.validation
        chosen_cases = [by_name[name] for name in names]
        pred_dir = folder.predictions_for(source).path
        missing = missing_predictions(chosen_cases, pred_dir)
        if missing:
            say(f"fold {fold.index}: predicting {len(missing)} {source} case(s) to choose the patient threshold")
            stages.predict(folder.run.path, missing, pred_dir)
        record = choose_patient_threshold(chosen_cases, pred_dir, config.min_grade) if chosen_cases else {
            "threshold": None, "cases": 0, "fallback": "no case to choose on"}
        note = f"chosen per fold on its {source} cases (Youden's J of patient_score)"
    record.update(source=source, note=note)
    if record["threshold"] is not None:
        record["test"] = _test_decisions(test_cases, test_dir, record["threshold"], config.min_grade)
    return json_safe(record)


@dataclass
class CvResult:
    """What :func:`run_cross_validation` did."""

    folds: list[Fold]
    pooled_metrics: Mapping[str, Any]
    noisy_metrics: Mapping[str, Any] | None
    reused_folds: list[int] = field(default_factory=list)
    fold_seconds: dict[int, float] = field(default_factory=dict)


def run_cross_validation(
    cases: Sequence[Any],
    out_dir: Path,
    config: CvConfig = CvConfig(),
    stages: Stages | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CvResult:
    """Stratified k-fold cross-validation end to end, resumable fold by fold (see the module doc)."""
    stages = stages or default_stages({"min_grade": config.min_grade})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    by_name = {case.case: case for case in cases}
    folds = ensure_splits(cases, out_dir, config)
    experiment = CvFolder(out_dir)
    labels_dir = experiment.labels.path
    say(f"label images -> {labels_dir}")
    ensure_labels(cases, labels_dir, stages)
    result = CvResult(folds, {}, None)
    evaluation_options: dict[str, Any] = {"min_grade": config.min_grade, "n_bootstrap": config.n_bootstrap,
                                          "seed": config.seed}
    for fold in folds:
        fold_folder = experiment.fold(fold.index)
        fold_dir, done = fold_folder.path, fold_folder.done
        if done.is_file():
            say(f"fold {fold.index}: finished earlier, reused")
            result.reused_folds.append(fold.index)
            continue
        started = time.perf_counter()
        run_dir, pred_dir = fold_folder.run.path, fold_folder.predictions.path
        train_cases = [by_name[name] for name in fold.train]
        validation_cases = [by_name[name] for name in fold.validation]
        test_cases = [by_name[name] for name in fold.test]
        train_and_predict(stages, train_cases, validation_cases, labels_dir, run_dir, test_cases, pred_dir, "test", say)
        still_missing = missing_predictions(test_cases, pred_dir)
        if still_missing:
            raise VfdetectError(f"fold {fold.index}: no prediction report for {', '.join(c.case for c in still_missing)}")
        threshold = fold_patient_threshold(fold, by_name, fold_dir, stages, config, say)
        fold_options = dict(evaluation_options)
        if threshold.get("threshold") is not None:
            fold_options.update(patient_score_thresholds={name: threshold["threshold"] for name in fold.test},
                                patient_threshold_note=threshold["note"])
        metrics = stages.evaluate(test_cases, [pred_dir], fold_folder.evaluation.path, **fold_options)
        seconds = time.perf_counter() - started
        result.fold_seconds[fold.index] = seconds
        write_json_atomic(done, {"fold": fold.index, "test": list(fold.test), "seconds": round(seconds, 1),
                                 "patient_threshold": threshold, "metrics": metrics_summary(metrics)})
    fold_records = []
    thresholds: dict[str, float] = {}
    notes = set()
    for fold in folds:
        fold_folder = experiment.fold(fold.index)
        fold_dir = fold_folder.path
        try:
            record = json.loads(fold_folder.done.read_text())
        except (OSError, ValueError):
            record = {"fold": fold.index}
        if "patient_threshold" not in record:  # a fold finished before thresholds were chosen
            record["patient_threshold"] = fold_patient_threshold(fold, by_name, fold_dir, stages, config, say)
        fold_records.append(record)
        if record["patient_threshold"].get("threshold") is not None:
            thresholds.update({name: record["patient_threshold"]["threshold"] for name in fold.test})
            notes.add(record["patient_threshold"]["note"])
    say("pooling the out-of-fold predictions")
    test_cases = [by_name[name] for fold in folds for name in fold.test]
    pred_dirs = [experiment.fold(fold.index).predictions.path for fold in folds]
    if len(thresholds) == len(test_cases):
        evaluation_options.update(patient_score_thresholds=thresholds, patient_threshold_note="; ".join(sorted(notes)))
    result.pooled_metrics = stages.evaluate(test_cases, pred_dirs, experiment.evaluation.path, **evaluation_options)
    if config.centroid_noise_mm > 0:
        result.noisy_metrics = stages.evaluate(test_cases, pred_dirs, experiment.evaluation_centroid_noise.path,
                                               centroid_noise_mm=config.centroid_noise_mm,
                                               noise_draws=config.noise_draws, **evaluation_options)
    write_json_atomic(experiment.summary, {
        "experiment": "cross_validation",
        "settings": asdict(config),
        "provenance": dict(provenance or {}),
        "folds": fold_records,
        "pooled": metrics_summary(result.pooled_metrics),
        "pooled_centroid_noise": metrics_summary(result.noisy_metrics) if result.noisy_metrics is not None else None,
    })
    return result


# ----------------------------------------------------------------------------------------------
# Experiment configuration files
# ----------------------------------------------------------------------------------------------


def read_experiment(path: str | Path) -> dict[str, Any]:
    """Read an experiment JSON (see ``experiments/README.md``): ``experiment`` is ``cv`` or ``model_selection``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable experiment file ({error})") from None
    if not isinstance(document, dict) or document.get("experiment") not in ("cv", "model_selection"):
        raise InputError(path, "'experiment' must be \"cv\" or \"model_selection\"")
    for key in ("cv", "model_selection", "train", "predict"):
        if key in document and not isinstance(document[key], dict):
            raise InputError(path, f"'{key}' must be an object")
    known_cv = set(CvConfig.__dataclass_fields__)
    known_selection = set(ModelSelectionConfig.__dataclass_fields__)
    for key, known in (("cv", known_cv), ("model_selection", known_selection)):
        unknown = set(document.get(key, {})) - known
        if unknown:
            raise InputError(path, f"unknown '{key}' setting(s): {', '.join(sorted(unknown))}")
    return document
