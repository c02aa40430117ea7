"""Validation measures and the checkpoint selection rule that picks ``model.keras``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vfdetect.labels import FRACTURE, NORMAL
from vfdetect.sampling import SamplingConfig
from vfdetect.train.config import CLASS_KEYS, N_CLASSES


def validation_accuracy(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Voxel accuracy overall and per true class (NaN for a class with no voxel); labels >= 3 are ignored."""
    predicted = np.asarray(predicted).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    known = labels < N_CLASSES
    predicted, labels = predicted[known], labels[known]
    result = {"accuracy": float(np.mean(predicted == labels)) if labels.size else math.nan}
    for value, key in enumerate(CLASS_KEYS):
        of_class = labels == value
        result[key] = float(np.mean(predicted[of_class] == value)) if of_class.any() else math.nan
    return result


def rank_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """ROC AUC: the probability that a positive scores above a negative, ties counting half.

    Computed from ranks (Mann-Whitney U), so it needs O(n log n), not O(n^2); NaN when either group
    is empty.
    """
    from scipy.stats import rankdata

    positives = np.asarray(positive_scores, dtype=np.float64).reshape(-1)
    negatives = np.asarray(negative_scores, dtype=np.float64).reshape(-1)
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    ranks = rankdata(np.concatenate([positives, negatives]))
    u_statistic = float(ranks[: positives.size].sum()) - positives.size * (positives.size + 1) / 2.0
    return u_statistic / (positives.size * negatives.size)


def fracture_score(probabilities: np.ndarray) -> np.ndarray:
    """``p(fracture) / (p(normal) + p(fracture))`` per voxel of ``(..., 3)`` probabilities (0.5 where both are 0)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    normal, fracture = probabilities[..., NORMAL], probabilities[..., FRACTURE]
    total = normal + fracture
    return np.divide(fracture, total, out=np.full(total.shape, 0.5), where=total > 0)


def vertebra_metrics(labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Normal-versus-fracture measures on the voxels whose true label is a vertebra class.

    ``labels`` true labels, ``predicted`` argmax classes and ``scores`` :func:`fracture_score`, all
    of the same shape; voxels of another label (background, ignored) are left out. Returns
    ``recall_normal`` (normal voxels predicted normal), ``recall_fracture`` (fractured voxels
    predicted fractured), ``mean_recall`` (mean over the classes present) and ``fracture_auc``
    (fractured versus normal voxels by score); NaN where a class is absent.
    """
    labels = np.asarray(labels).reshape(-1)
    predicted = np.asarray(predicted).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    is_normal, is_fracture = labels == NORMAL, labels == FRACTURE
    recalls = {
        key: float(np.mean(predicted[mask] == value)) if mask.any() else math.nan
        for key, mask, value in (("recall_normal", is_normal, NORMAL), ("recall_fracture", is_fracture, FRACTURE))
    }
    present = [value for value in recalls.values() if math.isfinite(value)]
    return {
        **recalls,
        "mean_recall": float(np.mean(present)) if present else math.nan,
        "fracture_auc": rank_auc(scores[is_fracture], scores[is_normal]),
    }


SELECTION_RULES: dict[str, tuple[str, str]] = {
    "fracture_auc": ("val_fracture_auc", "val_mean_recall"),
    "mean_recall": ("val_mean_recall", "val_accuracy"),
    "accuracy": ("val_accuracy", "val_accuracy"),
}
"""Checkpoint selection rule -> (log column of the measure, log column breaking ties)."""

SELECTION_DESCRIPTIONS: dict[str, str] = {
    "fracture_auc": "model.keras is the epoch with the highest fracture-vs-normal voxel AUC "
                    "(p(fracture) / (p(normal) + p(fracture)) on the vertebra voxels of the class-balanced "
                    "validation segments), ties broken by the mean of the normal and fracture recalls, "
                    "then by the earliest epoch; the learning-rate plateau rule follows the same AUC",
    "mean_recall": "the class-balanced validation segments hold no voxel of one vertebra class (no fractured "
                   "or no normal vertebra in the validation cases), so no fracture AUC: model.keras is the "
                   "epoch with the highest mean recall of the vertebra classes present, ties broken by the "
                   "overall validation accuracy, then by the earliest epoch; the learning-rate plateau rule "
                   "follows the same mean recall",
    "accuracy": "the class-balanced validation segments hold no vertebra voxel: model.keras is the epoch with "
                "the highest overall validation accuracy (uniform segments), the earliest epoch winning ties; "
                "the learning-rate plateau rule follows the same accuracy",
}
"""What each selection rule does, as written to ``config.json`` and ``report.json``."""


def selection_rule(labels: np.ndarray) -> str:
    """The checkpoint selection rule for the balanced validation segments' true ``labels``.

    ``"fracture_auc"`` when they hold both normal and fractured voxels, ``"mean_recall"`` when
    they hold only one of the two, ``"accuracy"`` when they hold neither (see :data:`SELECTION_RULES`).
    """
    labels = np.asarray(labels)
    has_normal, has_fracture = bool(np.any(labels == NORMAL)), bool(np.any(labels == FRACTURE))
    if has_normal and has_fracture:
        return "fracture_auc"
    return "mean_recall" if has_normal or has_fracture else "accuracy"


def _finite_or_minus_infinity(value: Any) -> float:
    if value is None:
        return -math.inf
    value = float(value)
    return value if math.isfinite(value) else -math.inf


def selection_key(row: Mapping[str, Any], rule: str) -> tuple[float, float]:
    """``(measure, tie break)`` of a log row under ``rule``; higher is better, missing or NaN is lowest."""
    measure, tie_break = SELECTION_RULES[rule]
    return _finite_or_minus_infinity(row.get(measure)), _finite_or_minus_infinity(row.get(tie_break))


def best_epoch_index(rows: Sequence[Mapping[str, Any]], rule: str) -> int | None:
    """Index of the row :func:`run_training` keeps as ``model.keras``: the highest :func:`selection_key`,
    the earliest row winning exact ties; None without rows."""
    best: int | None = None
    for index, row in enumerate(rows):
        if best is None or selection_key(row, rule) > selection_key(rows[best], rule):
            best = index
    return best


def balanced_sampling(sampling: SamplingConfig, n_cases: int) -> SamplingConfig:
    """Sampling of the class-balanced validation segments: the training segment shape and class
    weights, every validation case, no augmentation (no intensity noise, no flips)."""
    return SamplingConfig(
        hr_shape=sampling.hr_shape,
        class_weights=sampling.class_weights,
        cases_per_subepoch=max(1, int(n_cases)),
        noise_shift_sd=0.0,
        noise_scale_sd=0.0,
        flip_probability=(0.0, 0.0, 0.0),
    )


class Validator:
    """Predicts the fixed validation segments with the exported float32 model.

    ``uniform``: receptive-field segments for the voxel accuracies; ``balanced``: class-balanced
    segments for :func:`vertebra_metrics`. Returns one dict with the keys of both.
    """

    def __init__(self, model: keras.Model, uniform: Mapping[str, np.ndarray], balanced: Mapping[str, np.ndarray],
                 batch_size: int) -> None:
        self.model = model
        self.uniform = uniform
        self.balanced = balanced
        self.batch_size = batch_size
        self._predict = tf.function(lambda hr, lr: model([hr, lr], training=False), jit_compile=False, reduce_retracing=True)

    def _probabilities(self, segments: Mapping[str, np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
        for start in range(0, len(segments["labels"]), self.batch_size):
            rows = slice(start, start + self.batch_size)
            probabilities = self._predict(tf.constant(segments["hr"][rows]), tf.constant(segments["lr"][rows]))
            yield rows, np.asarray(probabilities, dtype=np.float32)

    def __call__(self) -> dict[str, float]:
        predicted = np.empty(self.uniform["labels"].shape, dtype=np.uint8)
        for rows, probabilities in self._probabilities(self.uniform):
            predicted[rows] = np.argmax(probabilities, axis=-1)
        scores = validation_accuracy(predicted, self.uniform["labels"])
        labels, classes, fracture_scores = [], [], []
        for rows, probabilities in self._probabilities(self.balanced):
            block = self.balanced["labels"][rows]
            vertebra = (block == NORMAL) | (block == FRACTURE)
            labels.append(block[vertebra])
            classes.append(np.argmax(probabilities, axis=-1)[vertebra])
            fracture_scores.append(fracture_score(probabilities)[vertebra])
        scores.update(vertebra_metrics(np.concatenate(labels), np.concatenate(classes), np.concatenate(fracture_scores)))
        return scores


def selection_summary(rule: str) -> dict[str, str]:
    measure, tie_break = SELECTION_RULES[rule]
    return {"rule": rule, "measure": measure, "tie_break": tie_break, "description": SELECTION_DESCRIPTIONS[rule]}
