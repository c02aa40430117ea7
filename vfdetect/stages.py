"""What the experiments delegate, and what cross-validation and model selection share.

:class:`Stages` holds the work of an experiment as injectable callables (label synthesis,
training, prediction, evaluation), so the orchestration of :mod:`vfdetect.cv` and
:mod:`vfdetect.model_selection` can be tested without TensorFlow; :func:`default_stages` gives the
real ones. Truth is the same everywhere: a patient is positive when one of its vertebrae has a
Genant grade of at least ``min_grade`` (:func:`is_positive`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.jsonutil import json_safe
from vfdetect.layout import LabelFolder, PredictionFolder, RunFolder


def is_positive(case: Any, min_grade: int = 1) -> bool:
    """A patient is positive when one of its vertebrae has Genant grade >= ``min_grade``."""
    return any(int(grade) >= min_grade for grade in case.grades.values())


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


def evaluate_stage(cases: Sequence[Any], pred_dirs: Sequence[Path], out_dir: Path, **options: Any) -> Mapping[str, Any]:
    from vfdetect.evaluate import evaluate_predictions

    return evaluate_predictions(cases, list(pred_dirs), out_dir, **options)


def training_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a model and a report saying the run finished."""
    run = RunFolder(Path(run_dir))
    try:
        report = json.loads(run.report.read_text())
    except (OSError, ValueError):
        return False
    return run.model.is_file() and report.get("status") == "finished"


def default_stages(train_options: Mapping[str, Any] | None = None,
                   predict_options: Mapping[str, Any] | None = None,
                   quiet: bool = False) -> Stages:
    """The real stages: :mod:`vfdetect.labels`, :mod:`vfdetect.train`, :mod:`vfdetect.predict`.

    ``train_options`` are :class:`vfdetect.train.TrainConfig` fields (its ``min_grade`` also sets the
    label images'), ``predict_options`` :class:`vfdetect.predict.PredictConfig` fields; TensorFlow is
    imported only when a stage runs. Training keeps a preprocessing cache (:mod:`vfdetect.preprocess`)
    in ``cache`` beside the label folder, so that the folds and variants of one experiment prepare
    each scan once.
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
        run = RunFolder(Path(run_dir))
        resume = run.config.is_file() or run.checkpoint_dir.exists()
        return run_training(train_cases, labels_dir, run_dir, config, resume=resume, quiet=quiet,
                            validation_cases=validation_cases or None, cache_dir=Path(labels_dir).parent / "cache")

    def predict(run_dir: Path, cases: Sequence[Any], pred_dir: Path) -> Any:
        from vfdetect.predict import PredictConfig, predict_cases

        failures: list[Any] = []
        results = predict_cases(run_dir, cases, pred_dir, PredictConfig(**predict_options), quiet=quiet,
                                failures=failures)
        if failures:
            details = "; ".join(str(failure) for failure in failures[:3])
            raise VfdetectError(f"prediction failed for {len(failures)} case(s): {details}")
        return results

    return Stages(synthesize, train, predict, evaluate_stage)


def ensure_labels(cases: Sequence[Any], labels_dir: Path, stages: Stages) -> None:
    """Synthesise the label images of the cases that have none yet (once per output folder)."""
    folder = LabelFolder(Path(labels_dir))
    missing = [case for case in cases if not folder.image(case.case).is_file()]
    if missing:
        stages.synthesize_labels(missing, Path(labels_dir))
    still_missing = [case.case for case in cases if not folder.image(case.case).is_file()]
    if still_missing:
        raise VfdetectError(f"label synthesis wrote no label image for: {', '.join(still_missing[:5])}")


def train_and_predict(stages: Stages, train_cases: Sequence[Any], validation_cases: Sequence[Any], labels_dir: Path,
                      run_dir: Path, cases: Sequence[Any], pred_dir: Path, what: str,
                      say: Callable[[str], None] = lambda message: None) -> None:
    """Train (or resume) a run, then predict those of ``cases`` (``what``: e.g. "test") not predicted yet.

    ``say`` gets progress lines prefixed by the run's name (the last part of ``run_dir``'s parent).
    """
    name = Path(run_dir).parent.name
    say(f"{name}: training on {len(train_cases)} cases ({len(validation_cases)} validation)")
    # The validation cases steer the learning-rate schedule, as in the paper's regime.
    stages.train(train_cases, validation_cases, labels_dir, run_dir)
    missing = missing_predictions(cases, pred_dir)
    if missing:
        say(f"{name}: predicting {len(missing)} {what} case(s)")
        stages.predict(run_dir, missing, pred_dir)


def missing_predictions(cases: Sequence[Any], pred_dir: Path) -> list[Any]:
    """The cases without a prediction report in ``pred_dir``."""
    folder = PredictionFolder(Path(pred_dir))
    return [case for case in cases if not folder.case(case.case).report.is_file()]


SUMMARY_KEYS: tuple[str, ...] = (
    "vertebra_auc", "vertebra_auc_interval95", "vertebra_auc_sd", "vertebra_noise_free", "vertebra_centroid_noise",
    "patient_auc", "patient_auc_interval95", "patient_auc_sd", "patient_auc_refitted_hull_mean", "patient_counts",
    "vertebra_counts", "patient_fixed_rule", "patient_training_threshold", "patient_hull_best_point",
)
"""Metrics copied into fold.json and cv.json (headline values and intervals first)."""


def metrics_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYS` of an evaluation's metrics, JSON-ready."""
    return {key: json_safe(metrics.get(key)) for key in SUMMARY_KEYS if key in metrics}
