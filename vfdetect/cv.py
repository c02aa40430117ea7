"""The paper's experiments end to end: stratified k-fold cross-validation and model selection.

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

Model selection (paper section 3.2): the three variants (1slice, 5slices, 3d) trained on one seeded
split (68/22 in the paper, i.e. about 24 % validation) with the same regime, compared on voxel
accuracy and vertebra-level AUC on the validation cases; one validation case is recorded for the
paper's Figure 3.

The stages (label synthesis, training, prediction, evaluation) are injectable callables
(:class:`Stages`), so the orchestration can be tested without TensorFlow.

Output folder of :func:`run_cross_validation`::

    splits.json  labels/  fold0/{run/, predictions/, predictions_validation/, evaluation/, fold.json}  ...
    evaluation/ (pooled)  [evaluation_centroid_noise/]  cv.json
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic, write_text_atomic
from vfdetect.jsonutil import format_value, json_safe

SPLITS_NAME = "splits.json"
FOLD_DONE_NAME = "fold.json"
SPLITS_FORMAT = 1
VARIANTS: tuple[str, ...] = ("1slice", "5slices", "3d")
PAPER_MODEL_SELECTION_VALIDATION_FRACTION = 22 / 90
"""The paper's model-selection split: 68 training and 22 validation cases of 90."""
PATIENT_THRESHOLD_SOURCES: tuple[str, ...] = ("validation", "training", "model")
"""Where a fold's patient-level threshold comes from (see the module doc)."""


def is_positive(case: Any, min_grade: int = 1) -> bool:
    """A patient is positive when one of its vertebrae has Genant grade >= ``min_grade``."""
    return any(int(grade) >= min_grade for grade in case.grades.values())


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


def stratified_holdout(
    positives: Sequence[str], negatives: Sequence[str], fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Hold out ``round(fraction * n)`` names (at least one if ``fraction > 0`` and n >= 2).

    The held-out names are shared between the classes in proportion (largest remainder), so the
    validation set has negatives when the class is large enough. Returns ``(kept, held_out)`` in
    the order of the inputs (positives first).
    """
    positives, negatives = list(positives), list(negatives)
    total = len(positives) + len(negatives)
    if fraction <= 0 or total < 2:
        return positives + negatives, []
    n_held = min(total - 1, max(1, round(fraction * total)))
    n_negative = min(len(negatives), round(n_held * len(negatives) / total))
    n_positive = min(len(positives), n_held - n_negative)
    n_negative = n_held - n_positive
    held = {positives[int(i)] for i in rng.permutation(len(positives))[:n_positive]}
    held |= {negatives[int(i)] for i in rng.permutation(len(negatives))[:n_negative]}
    ordered = positives + negatives
    return [name for name in ordered if name not in held], [name for name in ordered if name in held]


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
    path = Path(out_dir) / SPLITS_NAME
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
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stages:
    """The work a run delegates; replace any of them (tests use stand-ins).

    * ``synthesize_labels(cases, labels_dir)`` writes a label image per case;
    * ``train(train_cases, validation_cases, labels_dir, run_dir)`` trains (and resumes) a run;
    * ``predict(run_dir, cases, pred_dir)`` writes ``pred_dir/<case>/report.json`` and maps;
    * ``evaluate(cases, pred_dirs, out_dir, **options)`` writes the metrics and returns them.
    """

    synthesize_labels: Callable[[Sequence[Any], Path], Any]
    train: Callable[[Sequence[Any], Sequence[Any], Path, Path], Any]
    predict: Callable[[Path, Sequence[Any], Path], Any]
    evaluate: Callable[..., Mapping[str, Any]]


def _evaluate(cases: Sequence[Any], pred_dirs: Sequence[Path], out_dir: Path, **options: Any) -> Mapping[str, Any]:
    from vfdetect.evaluate import evaluate_predictions

    return evaluate_predictions(cases, list(pred_dirs), out_dir, **options)


def training_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a model and a report saying the run finished."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "model.keras").is_file() and report.get("status") == "finished"


def default_stages(train_options: Mapping[str, Any] | None = None,
                   predict_options: Mapping[str, Any] | None = None,
                   quiet: bool = False) -> Stages:
    """The real stages: :mod:`vfdetect.labels`, :mod:`vfdetect.train`, :mod:`vfdetect.predict`.

    ``train_options`` are :class:`vfdetect.train.TrainConfig` fields (its ``min_grade`` also sets the
    label images'), ``predict_options`` :class:`vfdetect.predict.PredictConfig` fields; TensorFlow is
    imported only when a stage runs.
    """
    train_options = dict(train_options or {})
    predict_options = dict(predict_options or {})

    def synthesize(cases: Sequence[Any], labels_dir: Path) -> Any:
        from vfdetect.labels import LabelConfig, synthesize_manifest_labels

        # The label images, the training split and the evaluation share one min_grade.
        label_config = LabelConfig(min_grade=int(train_options.get("min_grade", 1)))
        return synthesize_manifest_labels(cases, labels_dir, label_config, quiet=quiet)

    def train(train_cases: Sequence[Any], validation_cases: Sequence[Any], labels_dir: Path, run_dir: Path) -> Any:
        if training_finished(run_dir):
            return run_dir
        from vfdetect.train import TrainConfig, run_training

        config = TrainConfig.from_dict(train_options)
        resume = (Path(run_dir) / "config.json").is_file() or (Path(run_dir) / "checkpoint").exists()
        return run_training(train_cases, labels_dir, run_dir, config, resume=resume, quiet=quiet,
                            validation_cases=validation_cases or None)

    def predict(run_dir: Path, cases: Sequence[Any], pred_dir: Path) -> Any:
        from vfdetect.predict import PredictConfig, predict_cases

        failures: list[Any] = []
        results = predict_cases(run_dir, cases, pred_dir, PredictConfig(**predict_options), quiet=quiet,
                                failures=failures)
        if failures:
            details = "; ".join(str(failure) for failure in failures[:3])
            raise VfdetectError(f"prediction failed for {len(failures)} case(s): {details}")
        return results

    return Stages(synthesize, train, predict, _evaluate)


def ensure_labels(cases: Sequence[Any], labels_dir: Path, stages: Stages) -> None:
    """Synthesise the label images of the cases that have none yet (once per output folder)."""
    labels_dir = Path(labels_dir)
    missing = [case for case in cases if not (labels_dir / f"{case.case}_labels.nii.gz").is_file()]
    if missing:
        stages.synthesize_labels(missing, labels_dir)
    still_missing = [case.case for case in cases if not (labels_dir / f"{case.case}_labels.nii.gz").is_file()]
    if still_missing:
        raise VfdetectError(f"label synthesis wrote no label image for: {', '.join(still_missing[:5])}")


def _missing_predictions(cases: Sequence[Any], pred_dir: Path) -> list[Any]:
    return [case for case in cases if not (Path(pred_dir) / case.case / "report.json").is_file()]


SUMMARY_KEYS: tuple[str, ...] = (
    "vertebra_auc", "vertebra_auc_interval95", "vertebra_auc_sd", "vertebra_noise_free", "vertebra_centroid_noise",
    "patient_auc", "patient_auc_interval95", "patient_auc_sd", "patient_auc_refitted_hull_mean", "patient_counts",
    "vertebra_counts", "patient_fixed_rule", "patient_training_threshold", "patient_hull_best_point",
)
"""Metrics copied into fold.json and cv.json (headline values and intervals first)."""


def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {key: json_safe(metrics.get(key)) for key in SUMMARY_KEYS if key in metrics}


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the prediction report ({error})") from None
    if not isinstance(report, dict):
        raise InputError(path, "not a prediction report")
    return report


def choose_patient_threshold(
    cases: Sequence[Any], pred_dir: Path, min_grade: int = 1
) -> dict[str, Any]:
    """Threshold on the patient score chosen on ``cases`` (their reports in ``pred_dir``).

    Youden's J on the reports' patient scores (:func:`vfdetect.evaluate.youden_threshold`) against
    :func:`is_positive`. When the cases hold one class, the model's ``patient_threshold`` from
    their reports is used instead (``fallback`` says why); ``threshold`` is None when neither
    exists. Returns ``{"threshold", "cases", "positives", "negatives", "fallback"}``.
    """
    from vfdetect.evaluate import youden_threshold
    from vfdetect.report import patient_score_of, patient_threshold_of

    truth, scores, model_thresholds = [], [], set()
    for case in cases:
        path = Path(pred_dir) / case.case / "report.json"
        report = _read_report(path)
        score = patient_score_of(report)
        if score is None:
            raise InputError(path, "no patient score (patient_score) in the report")
        truth.append(is_positive(case, min_grade))
        scores.append(score)
        model_threshold = patient_threshold_of(report)
        if model_threshold is not None:
            model_thresholds.add(model_threshold)
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
    from vfdetect.evaluate import decision_summary
    from vfdetect.report import patient_score_of

    truth, calls = [], []
    for case in cases:
        score = patient_score_of(_read_report(Path(pred_dir) / case.case / "report.json"))
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
    test_dir = Path(fold_dir) / "predictions"
    test_cases = [by_name[name] for name in fold.test]
    if source == "model":
        from vfdetect.report import patient_threshold_of

        found = {patient_threshold_of(_read_report(test_dir / c.case / "report.json")) for c in test_cases}
        record: dict[str, Any] = {"threshold": found.pop() if len(found) == 1 else None, "fallback": None,
                                  "cases": 0}
        note = "the model's patient_threshold, fixed before seeing the test cases"
    else:
        names = fold.validation if source == "validation" else fold.train + fold.validation
        chosen_cases = [by_name[name] for name in names]
        pred_dir = Path(fold_dir) / f"predictions_{source}"
        missing = _missing_predictions(chosen_cases, pred_dir)
        if missing:
            say(f"fold {fold.index}: predicting {len(missing)} {source} case(s) to choose the patient threshold")
            stages.predict(Path(fold_dir) / "run", missing, pred_dir)
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
    labels_dir = out_dir / "labels"
    say(f"label images -> {labels_dir}")
    ensure_labels(cases, labels_dir, stages)
    result = CvResult(folds, {}, None)
    evaluation_options: dict[str, Any] = {"min_grade": config.min_grade, "n_bootstrap": config.n_bootstrap,
                                          "seed": config.seed}
    for fold in folds:
        fold_dir = out_dir / f"fold{fold.index}"
        done = fold_dir / FOLD_DONE_NAME
        if done.is_file():
            say(f"fold {fold.index}: finished earlier, reused")
            result.reused_folds.append(fold.index)
            continue
        started = time.perf_counter()
        run_dir, pred_dir = fold_dir / "run", fold_dir / "predictions"
        train_cases = [by_name[name] for name in fold.train]
        validation_cases = [by_name[name] for name in fold.validation]
        test_cases = [by_name[name] for name in fold.test]
        say(f"fold {fold.index}: training on {len(train_cases)} cases ({len(validation_cases)} validation)")
        stages.train(train_cases, validation_cases, labels_dir, run_dir)
        missing = _missing_predictions(test_cases, pred_dir)
        if missing:
            say(f"fold {fold.index}: predicting {len(missing)} test case(s)")
            stages.predict(run_dir, missing, pred_dir)
        still_missing = _missing_predictions(test_cases, pred_dir)
        if still_missing:
            raise VfdetectError(f"fold {fold.index}: no prediction report for {', '.join(c.case for c in still_missing)}")
        threshold = fold_patient_threshold(fold, by_name, fold_dir, stages, config, say)
        fold_options = dict(evaluation_options)
        if threshold.get("threshold") is not None:
            fold_options.update(patient_score_thresholds={name: threshold["threshold"] for name in fold.test},
                                patient_threshold_note=threshold["note"])
        metrics = stages.evaluate(test_cases, [pred_dir], fold_dir / "evaluation", **fold_options)
        seconds = time.perf_counter() - started
        result.fold_seconds[fold.index] = seconds
        write_json_atomic(done, {"fold": fold.index, "test": list(fold.test), "seconds": round(seconds, 1),
                                 "patient_threshold": threshold, "metrics": _summary(metrics)})
    fold_records = []
    thresholds: dict[str, float] = {}
    notes = set()
    for fold in folds:
        fold_dir = out_dir / f"fold{fold.index}"
        try:
            record = json.loads((fold_dir / FOLD_DONE_NAME).read_text())
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
    pred_dirs = [out_dir / f"fold{fold.index}" / "predictions" for fold in folds]
    if len(thresholds) == len(test_cases):
        evaluation_options.update(patient_score_thresholds=thresholds, patient_threshold_note="; ".join(sorted(notes)))
    result.pooled_metrics = stages.evaluate(test_cases, pred_dirs, out_dir / "evaluation", **evaluation_options)
    if config.centroid_noise_mm > 0:
        result.noisy_metrics = stages.evaluate(test_cases, pred_dirs, out_dir / "evaluation_centroid_noise",
                                               centroid_noise_mm=config.centroid_noise_mm,
                                               noise_draws=config.noise_draws, **evaluation_options)
    write_json_atomic(out_dir / "cv.json", {
        "experiment": "cross_validation",
        "settings": asdict(config),
        "provenance": dict(provenance or {}),
        "folds": fold_records,
        "pooled": _summary(result.pooled_metrics),
        "pooled_centroid_noise": _summary(result.noisy_metrics) if result.noisy_metrics is not None else None,
    })
    return result


# ----------------------------------------------------------------------------------------------
# Model selection
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSelectionConfig:
    """Settings of the model-selection experiment (paper section 3.2)."""

    variants: tuple[str, ...] = VARIANTS
    validation_fraction: float = PAPER_MODEL_SELECTION_VALIDATION_FRACTION
    seed: int = 0
    min_grade: int = 1
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise VfdetectError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise VfdetectError("the model-selection validation fraction must lie in (0, 1)")


def voxel_agreement(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Voxel accuracy of hard labels 0/1/2: overall, per reference class, and inside the vertebrae.

    ``vertebra_accuracy`` counts only reference voxels labelled 1 or 2 (the overall figure is
    dominated by background); ``mean_class_recall`` averages the three per-class recalls.
    """
    predicted = np.asarray(predicted).reshape(-1)
    reference = np.asarray(reference).reshape(-1)
    if predicted.shape != reference.shape:
        raise VfdetectError(f"label images differ in size: {predicted.size} vs {reference.size} voxels")
    result: dict[str, float] = {"accuracy": float(np.mean(predicted == reference)) if reference.size else math.nan}
    recalls = []
    for value, key in ((0, "background"), (1, "normal"), (2, "fracture")):
        members = reference == value
        recall = float(np.mean(predicted[members] == value)) if members.any() else math.nan
        result[f"{key}_recall"] = recall
        if not math.isnan(recall):
            recalls.append(recall)
    vertebra = reference > 0
    result["vertebra_accuracy"] = float(np.mean(predicted[vertebra] == reference[vertebra])) if vertebra.any() else math.nan
    result["mean_class_recall"] = float(np.mean(recalls)) if recalls else math.nan
    result["voxels"] = float(reference.size)
    return result


def validation_voxel_agreement(cases: Sequence[Any], pred_dir: Path, labels_dir: Path) -> dict[str, float]:
    """:func:`voxel_agreement` over all validation cases together (predicted ``labels.nii.gz`` vs label images)."""
    import nibabel as nib

    predicted_parts, reference_parts = [], []
    for case in cases:
        predicted_path = Path(pred_dir) / case.case / "labels.nii.gz"
        reference_path = Path(labels_dir) / f"{case.case}_labels.nii.gz"
        for path in (predicted_path, reference_path):
            if not path.is_file():
                raise InputError(path, "label image not found")
        predicted_image: Any = nib.load(str(predicted_path))
        reference_image: Any = nib.load(str(reference_path))
        predicted = np.asarray(predicted_image.dataobj).astype(np.uint8)
        reference = np.asarray(reference_image.dataobj).astype(np.uint8)
        if predicted.shape != reference.shape:
            raise InputError(predicted_path, f"grid {predicted.shape} differs from the label image's {reference.shape}")
        predicted_parts.append(predicted.reshape(-1))
        reference_parts.append(reference.reshape(-1))
    if not predicted_parts:
        raise VfdetectError("no validation case to measure voxel accuracy on")
    return voxel_agreement(np.concatenate(predicted_parts), np.concatenate(reference_parts))


def training_log_summary(run_dir: Path) -> dict[str, Any]:
    """Best validation accuracy and parameter count from a run folder (what exists of them)."""
    summary: dict[str, Any] = {}
    run_dir = Path(run_dir)
    try:
        description = json.loads((run_dir / "config.json").read_text())
        summary["trainable_parameters"] = description.get("trainable_parameters")
    except (OSError, ValueError):
        pass
    log = run_dir / "log.csv"
    if log.is_file():
        import csv

        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = [c for c in (rows[0].keys() if rows else []) if "val" in c and "acc" in c]
        if columns:
            values = [float(row[columns[0]]) for row in rows if row.get(columns[0]) not in ("", None)]
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                summary["best_validation_segment_accuracy"] = max(finite)
                summary["validation_accuracy_column"] = columns[0]
        summary["epochs_logged"] = len(rows)
    return summary


def figure3_case(cases: Sequence[Any], min_grade: int = 1) -> str:
    """The validation case shown in Figure 3: the one with the most fractured vertebrae (then by name)."""
    if not cases:
        raise VfdetectError("no validation case")
    return sorted(cases, key=lambda c: (-sum(int(g) >= min_grade for g in c.grades.values()), c.case))[0].case


def run_model_selection(
    cases: Sequence[Any],
    out_dir: Path,
    config: ModelSelectionConfig = ModelSelectionConfig(),
    stages_for_variant: Callable[[str], Stages] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train each variant on one seeded split and compare them on the validation cases.

    Writes ``split.json``, ``labels/``, ``<variant>/{run,predictions,evaluation}/``,
    ``<variant>/variant.json`` (finished marker: a finished variant is reused),
    ``model_selection.json`` (comparison and the Figure 3 case) and ``model_selection.md``.
    """
    stages_for_variant = stages_for_variant or (
        lambda variant: default_stages({"variant": variant, "min_grade": config.min_grade})
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    by_name = {case.case: case for case in cases}
    split_path = out_dir / "split.json"
    settings = {"validation_fraction": config.validation_fraction, "seed": config.seed, "min_grade": config.min_grade}
    if split_path.is_file():
        saved = json.loads(split_path.read_text())
        if saved.get("settings") != settings or sorted(saved["train"] + saved["validation"]) != sorted(by_name):
            raise InputError(split_path, "was made for other cases or settings; use another --out folder or delete it")
        train_names, validation_names = saved["train"], saved["validation"]
    else:
        positives = sorted(c.case for c in cases if is_positive(c, config.min_grade))
        negatives = sorted(c.case for c in cases if not is_positive(c, config.min_grade))
        train_names, validation_names = stratified_holdout(positives, negatives, config.validation_fraction,
                                                           np.random.default_rng([config.seed, 0x35]))
        if not validation_names:
            raise VfdetectError("model selection needs at least 2 cases")
        write_json_atomic(split_path, {"settings": settings, "train": sorted(train_names),
                                       "validation": sorted(validation_names)})
    train_cases = [by_name[n] for n in sorted(train_names)]
    validation_cases = [by_name[n] for n in sorted(validation_names)]
    labels_dir = out_dir / "labels"
    ensure_labels(cases, labels_dir, stages_for_variant(config.variants[0]))
    rows: list[dict[str, Any]] = []
    for variant in config.variants:
        stages = stages_for_variant(variant)
        variant_dir = out_dir / variant
        done = variant_dir / "variant.json"
        if done.is_file():
            say(f"{variant}: finished earlier, reused")
            rows.append(json.loads(done.read_text()))
            continue
        started = time.perf_counter()
        run_dir, pred_dir = variant_dir / "run", variant_dir / "predictions"
        say(f"{variant}: training on {len(train_cases)} cases")
        # The validation cases steer the learning-rate schedule, as in the paper's regime.
        stages.train(train_cases, validation_cases, labels_dir, run_dir)
        missing = _missing_predictions(validation_cases, pred_dir)
        if missing:
            say(f"{variant}: predicting {len(missing)} validation case(s)")
            stages.predict(run_dir, missing, pred_dir)
        metrics = stages.evaluate(validation_cases, [pred_dir], variant_dir / "evaluation",
                                  min_grade=config.min_grade, n_bootstrap=config.n_bootstrap, seed=config.seed)
        row = {
            "variant": variant,
            "seconds": round(time.perf_counter() - started, 1),
            "voxels": json_safe(validation_voxel_agreement(validation_cases, pred_dir, labels_dir)),
            **training_log_summary(run_dir),
            **_summary(metrics),
        }
        write_json_atomic(done, row)
        rows.append(row)
    document = {
        "experiment": "model_selection",
        "settings": asdict(config),
        "provenance": dict(provenance or {}),
        "train": sorted(train_names),
        "validation": sorted(validation_names),
        "figure3_case": figure3_case(validation_cases, config.min_grade),
        "figure3_image": str(by_name[figure3_case(validation_cases, config.min_grade)].image),
        "variants": rows,
    }
    write_json_atomic(out_dir / "model_selection.json", document)
    write_text_atomic(out_dir / "model_selection.md", model_selection_markdown(document))
    return document


def _interval(values: Any) -> str:
    low, high = values if isinstance(values, list | tuple) and len(values) == 2 else (None, None)
    return f"{format_value(low)} - {format_value(high)}"


def model_selection_markdown(document: Mapping[str, Any]) -> str:
    """Readable comparison table of :func:`run_model_selection`."""

    fmt = format_value

    lines = [
        "# Model selection (paper section 3.2, Table 1)",
        "",
        f"Training cases: {len(document['train'])}; validation cases: {len(document['validation'])}. "
        f"Figure 3 case: {document['figure3_case']}.",
        "",
        "| variant | trainable parameters | validation voxel accuracy | accuracy inside vertebrae | "
        "mean class recall | best validation segment accuracy | vertebra AUC (95 % interval) | patient AUC (95 % "
        "interval) | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["variants"]:
        voxels = row.get("voxels", {})
        lines.append(
            f"| {row['variant']} | {fmt(row.get('trainable_parameters'))} | {fmt(voxels.get('accuracy'))} | "
            f"{fmt(voxels.get('vertebra_accuracy'))} | {fmt(voxels.get('mean_class_recall'))} | "
            f"{fmt(row.get('best_validation_segment_accuracy'))} | {fmt(row.get('vertebra_auc'))} "
            f"({_interval(row.get('vertebra_auc_interval95'))}) | {fmt(row.get('patient_auc'))} "
            f"({_interval(row.get('patient_auc_interval95'))}) | {fmt(row.get('seconds'))} |"
        )
    return "\n".join(lines) + "\n"


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
