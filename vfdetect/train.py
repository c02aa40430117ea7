"""Training of the dual-pathway network with DeepMedic's regime, resumable and distributable.

The regime follows ``deepmedic_spec.md`` section 4 and the paper's section 3.2:

* **Loss**: cross-entropy averaged over every output voxel of the batch, plus the model's own
  kernel regularisers (L1 1e-6 and L2 1e-4 on conv kernels only, added by :mod:`vfdetect.model`).
  Voxels labelled :data:`vfdetect.labels.IGNORE` (255; any value >= 3), vertebrae of unknown
  class, add no loss and are left out of the training accuracy (:func:`voxel_cross_entropy`).
* **Optimizer**: RMSProp with learning rate 1e-3, rho 0.9, epsilon 1e-4 *inside* the square root
  and Nesterov momentum 0.6 (:class:`NesterovRMSprop`).
* **Schedule**: ``epochs`` x ``subepochs`` x ``segments_per_subepoch`` (35 x 20 x 1000 by default,
  batch 10: 70,000 iterations). One Keras "epoch" is one subepoch; after every ``subepochs`` of
  them the epoch ends: validation, the plateau rule for the learning rate
  (:class:`PlateauSchedule`, DeepMedic's "auto" rule applied to the selection measure below:
  halve when it has not improved for ``lr_patience`` epochs) and the saved models.
* **Validation**: ``validation_fraction`` of the cases (seeded, stratified by whether a case has a
  vertebra of Genant grade >= ``min_grade``) are held out. Two fixed sets of segments are drawn
  from them once per run (the same segments every epoch, so epochs compare like with like):

  - ``validation_segments`` receptive-field-sized segments centred uniformly over the cases: the
    voxel accuracy, overall and per class (almost all background, so blind to fractures);
  - ``balanced_validation_segments`` training-sized segments drawn class-balanced with the
    training ``class_weights`` (:func:`vfdetect.sampling.draw_subepoch`, no augmentation):
    on their voxels whose true label is a vertebra class, the recall of the normal and of the
    fracture class and the fracture-vs-normal AUC of ``p(fracture) / (p(normal) + p(fracture))``
    (:func:`vertebra_metrics`).

* **Checkpoint selection** (:func:`selection_rule`, :func:`selection_key`): ``model.keras`` is the
  epoch with the highest fracture-vs-normal voxel AUC, ties broken by the mean of the two
  vertebra recalls, the earliest epoch winning exact ties. When the balanced segments hold no
  fractured (or no normal) vertebra voxel, the measure is the mean recall of the vertebra
  classes present (ties: overall accuracy); with no vertebra voxel at all, the overall accuracy.
  The rule, chosen once per run, is written to ``config.json`` and ``report.json``; the
  learning-rate plateau rule follows the same measure.

Run folder (:func:`run_training`)::

    config.json        everything needed to rebuild the network and to predict with it
    model.keras        the model of the epoch chosen by the checkpoint selection rule (float32, no optimizer)
    model_last.keras   the model after the last finished epoch
    log.csv            one row per epoch: loss, accuracies (per class too), vertebra recalls, fracture
                       AUC, selection measure, learning rate, times
    tensorboard/       TensorBoard scalars per subepoch and per epoch
    report.json        versions, seed, data hash, strategy, timings
    checkpoint/last.npz  model and optimizer state plus the loop state, written after every subepoch

Every file is written atomically. A run killed at any moment resumes from its last checkpoint
(``resume=True``) and ends where an uninterrupted run would: the segments of each subepoch are a
pure function of ``(seed, epoch, subepoch)`` (:func:`vfdetect.sampling.subepoch_rng`), the
validation segments a function of the seed, and the checkpoint holds every model variable (dropout
seed state included), every optimizer variable, the learning-rate schedule and the per-epoch log.

Distribution (:func:`make_strategy`): ``"auto"`` uses ``MultiWorkerMirroredStrategy`` when
``TF_CONFIG`` is set, ``MirroredStrategy`` when several GPUs are visible and the default strategy
otherwise. ``batch_size`` is the global batch, split between replicas. Every worker draws the same
segments (same seed) and tf.data shards them by data; the chief writes to the run folder, worker
``i`` to ``RUN/workers/<type>-<i>/`` (every worker runs the same saving code, as collective reads
require).

Tensors are ``(batch, x, y, z, channel)``; arrays ``[x, y, z]`` in the internal frame.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

from vfdetect import __version__
from vfdetect.errors import InputError, VfdetectError, refuse_unknown_fields
from vfdetect.fileio import atomic_path, write_json_atomic, write_text_atomic
from vfdetect.labels import FRACTURE, GENANT_GRADES_COUNTED, IGNORE, NORMAL
from vfdetect.sampling import SamplingConfig
from vfdetect.vertebrae import Case

VARIANTS: tuple[str, ...] = ("3d", "5slices", "1slice")
PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16")
STRATEGIES: tuple[str, ...] = ("auto", "default", "mirrored", "multiworker")
CLASS_NAMES: tuple[str, ...] = ("background", "normal vertebra", "fractured vertebra")
CLASS_KEYS: tuple[str, ...] = ("background", "normal", "fracture")
RUN_FORMAT = "vfdetect-run/1"
CHECKPOINT_FORMAT = "vfdetect-checkpoint/2"
N_CLASSES = len(CLASS_NAMES)
_LOGGER = logging.getLogger(__name__)
INFERENCE_SEGMENT_SHAPE: tuple[int, int, int] = (45, 45, 45)

LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "loss",
    "train_accuracy",
    "val_accuracy",
    "val_accuracy_background",
    "val_accuracy_normal",
    "val_accuracy_fracture",
    "val_recall_normal",
    "val_recall_fracture",
    "val_mean_recall",
    "val_fracture_auc",
    "selection_measure",
    "selected",
    "learning_rate",
    "lr_halved",
    "epoch_time_s",
    "train_time_s",
    "validation_time_s",
    "segments_per_s",
    "elapsed_s",
)


class TrainConfigError(VfdetectError, ValueError):
    """A training setting that is out of range or inconsistent."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer) or int(value) != value or value < 1:
        raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TrainConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the paper's regime (DeepMedic's numbers).

    Attributes:
        variant: network variant, ``"3d"``, ``"5slices"`` or ``"1slice"`` (the paper's Table 1).
        epochs, subepochs, segments_per_subepoch: the schedule (35 x 20 x 1000).
        batch_size: global training batch (10), split between replicas when distributed.
        seed: base seed of the split, the segment draws, the validation segments and the weights.
        learning_rate, rho, epsilon, momentum, nesterov: RMSProp as DeepMedic (epsilon inside the
            square root, Nesterov momentum).
        lr_patience: epochs without a gain of the selection measure (see the module docstring;
            DeepMedic uses the validation accuracy) before the learning rate is divided by
            ``lr_factor`` (DeepMedic's "auto" rule; its shipped configuration waits 10).
        lr_min_increase: a gain must exceed this to count as an improvement (DeepMedic: 0).
        validation_fraction: share of the cases held out for validation (seeded, stratified).
        validation_segments: receptive-field-sized validation segments per epoch (uniform centres).
        balanced_validation_segments: training-sized validation segments drawn class-balanced
            (training ``class_weights``, no augmentation) for the vertebra recalls and the
            fracture AUC that select ``model.keras``.
        validation_batch_size: batch used to predict the validation segments.
        min_grade: lowest Genant grade counted as a fracture; a case with such a vertebra is a
            fracture case for the stratified split. Must match the label images'
            ``LabelConfig.min_grade`` (checked against ``label_config.json`` in the label folder).
        precision: ``"float32"`` or ``"mixed_bfloat16"`` (saved models are always float32).
        strategy: ``"auto"``, ``"default"``, ``"mirrored"`` or ``"multiworker"``.
        spacing: isotropic voxel size (mm) of the internal frame the network works in.
        sampling: how segments are drawn and augmented (:class:`vfdetect.sampling.SamplingConfig`).
        model_options: extra keyword arguments of :func:`vfdetect.model.build_model` (widths, ...).
    """

    variant: str = "3d"
    epochs: int = 35
    subepochs: int = 20
    segments_per_subepoch: int = 1000
    batch_size: int = 10
    seed: int = 0
    learning_rate: float = 1e-3
    rho: float = 0.9
    epsilon: float = 1e-4
    momentum: float = 0.6
    nesterov: bool = True
    lr_patience: int = 10
    lr_factor: float = 2.0
    lr_min_increase: float = 0.0
    validation_fraction: float = 0.15
    validation_segments: int = 3000
    balanced_validation_segments: int = 500
    validation_batch_size: int = 50
    min_grade: int = 1
    precision: str = "float32"
    strategy: str = "auto"
    spacing: float = 1.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise TrainConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in ("epochs", "subepochs", "segments_per_subepoch", "batch_size", "lr_patience",
                     "validation_segments", "balanced_validation_segments", "validation_batch_size", "min_grade"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.batch_size > self.segments_per_subepoch:
            raise TrainConfigError(
                f"batch_size ({self.batch_size}) must not exceed segments_per_subepoch ({self.segments_per_subepoch})"
            )
        if self.min_grade not in GENANT_GRADES_COUNTED:
            raise TrainConfigError(f"min_grade must be 1, 2 or 3, got {self.min_grade!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise TrainConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        for name in ("learning_rate", "rho", "epsilon", "momentum", "lr_factor", "lr_min_increase",
                     "validation_fraction", "spacing"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        checks = (
            ("learning_rate", 0.0 < self.learning_rate < math.inf),
            ("rho", 0.0 < self.rho < 1.0),
            ("epsilon", 0.0 < self.epsilon < math.inf),
            ("momentum", 0.0 <= self.momentum < 1.0),
            ("lr_factor", 1.0 < self.lr_factor < math.inf),
            ("lr_min_increase", 0.0 <= self.lr_min_increase < 1.0),
            ("validation_fraction", 0.0 <= self.validation_fraction < 1.0),
            ("spacing", 0.0 < self.spacing < math.inf),
        )
        for name, ok in checks:
            if not ok:
                raise TrainConfigError(f"{name} is out of range: {getattr(self, name)!r}")
        if not isinstance(self.nesterov, bool):
            raise TrainConfigError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise TrainConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if isinstance(self.sampling, Mapping):
            object.__setattr__(self, "sampling", SamplingConfig.from_dict(self.sampling))
        if not isinstance(self.sampling, SamplingConfig):
            raise TrainConfigError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        options = dict(self.model_options)
        try:
            json.dumps(options)
        except (TypeError, ValueError) as error:
            raise TrainConfigError(f"model_options must be JSON-serialisable: {error}") from None
        for reserved in ("variant", "precision", "seed"):
            if reserved in options:
                raise TrainConfigError(f"set {reserved} with TrainConfig.{reserved}, not model_options")
        object.__setattr__(self, "model_options", options)

    @property
    def total_subepochs(self) -> int:
        """Subepochs of the whole run."""
        return self.epochs * self.subepochs

    @property
    def batches_per_subepoch(self) -> int:
        """Full batches trained per subepoch (a leftover partial batch is not drawn into a batch)."""
        return self.segments_per_subepoch // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary; :meth:`from_dict` is its inverse."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["sampling"] = self.sampling.to_dict()
        values["model_options"] = json.loads(json.dumps(dict(self.model_options)))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict`'s output; unknown keys are refused."""
        refuse_unknown_fields(cls, values, "training setting(s)", TrainConfigError)
        values = dict(values)
        if "sampling" in values:
            values["sampling"] = SamplingConfig.from_dict(values["sampling"])
        return cls(**values)

    def to_json(self) -> str:
        """The config as a JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the settings that differ between two configs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [name for name in mine if mine[name] != theirs[name]]


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# --------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="vfdetect")
class NesterovRMSprop(keras.optimizers.RMSprop):
    """RMSProp with Nesterov momentum and epsilon inside the square root, as DeepMedic trains.

    Per variable, with gradient ``g``, accumulator ``a`` and momentum buffer ``m``::

        a <- rho * a + (1 - rho) * g**2
        step = lr * g / sqrt(a + epsilon)
        m <- momentum * m + step
        w <- w - (momentum * m + step)

    DeepMedic writes the same with ``v = -m``: ``v <- mu v - step; w <- w + mu v - step``
    (non-normalised momentum). Keras' own RMSprop applies classic momentum (``w <- w - m``); this
    subclass only changes that last line, so slots, serialisation and distribution behave as in Keras.
    With ``nesterov=False`` or ``momentum=0`` it is Keras' RMSprop.
    """

    def __init__(
        self,
        learning_rate: float = 1e-3,
        rho: float = 0.9,
        momentum: float = 0.6,
        epsilon: float = 1e-4,
        centered: bool = False,
        nesterov: bool = True,
        name: str = "nesterov_rmsprop",
        **kwargs: Any,
    ) -> None:
        if centered:
            raise ValueError("NesterovRMSprop does not implement the centered variant")
        super().__init__(
            learning_rate=learning_rate, rho=rho, momentum=momentum, epsilon=epsilon, centered=False, name=name, **kwargs
        )
        self.nesterov = bool(nesterov)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one update to ``variable`` (see the class docstring)."""
        if not self.nesterov or self.momentum <= 0:
            super().update_step(gradient, variable, learning_rate)
            return
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        accumulator = self._velocities[index]
        momentum_buffer = self._momentums[index]
        self.assign(
            accumulator,
            ops.add(ops.multiply(self.rho, accumulator), ops.multiply(1.0 - self.rho, ops.square(gradient))),
        )
        step = ops.divide(ops.multiply(lr, gradient), ops.sqrt(ops.add(accumulator, self.epsilon)))
        self.assign(momentum_buffer, ops.add(ops.multiply(self.momentum, momentum_buffer), step))
        self.assign_sub(variable, ops.add(ops.multiply(self.momentum, momentum_buffer), step))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["nesterov"] = self.nesterov
        return config


@dataclass
class PlateauSchedule:
    """DeepMedic's "auto" learning-rate rule, driven by a validation score of each epoch (higher is better).

    DeepMedic feeds it the validation accuracy; :func:`run_training` feeds it the selection measure
    of :func:`selection_key` (the fracture-vs-normal voxel AUC by default), so the rate is lowered
    when the measure that picks ``model.keras`` stalls.

    At the end of epoch ``e`` (0-based): if the score beats the best so far by more than
    ``min_increase``, ``e`` becomes the best epoch (a NaN score never does). If ``e >= best_epoch + patience`` and
    ``e >= last_lowered + patience``, the rate is divided by ``factor`` and ``last_lowered = e``
    (``last_lowered`` starts at 0, so the first halving comes no earlier than epoch ``patience``).
    """

    learning_rate: float
    patience: int = 10
    factor: float = 2.0
    min_increase: float = 0.0
    best_score: float | None = None
    best_epoch: int = -1
    last_lowered: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch ``epoch``'s validation score; return True when the rate was lowered."""
        if math.isfinite(score) and (self.best_score is None or score > self.best_score + self.min_increase):
            self.best_score = float(score)
            self.best_epoch = int(epoch)
        if epoch >= self.best_epoch + self.patience and epoch >= self.last_lowered + self.patience:
            self.learning_rate = self.learning_rate / self.factor
            self.last_lowered = int(epoch)
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PlateauSchedule:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(values))


def voxel_cross_entropy(labels: Any, probabilities: Any) -> Any:
    """Cross-entropy per output voxel, ``-log p_label`` (probabilities clipped), 0 where ignored.

    ``labels`` (batch, x, y, z) integers, ``probabilities`` (batch, x, y, z, 3) softmax output;
    returns (batch, x, y, z) float32 whatever the model's compute dtype. A label >= 3 (the label
    images' :data:`vfdetect.labels.IGNORE`, 255: a vertebra of unknown class) gets loss 0. The
    training loss divides the sum by every output voxel of the batch, ignored ones included, so an
    ignored voxel only removes its own term.
    """
    probabilities = ops.cast(probabilities, "float32")
    labels = ops.cast(labels, "int32")
    known = ops.less(labels, N_CLASSES)
    per_voxel = keras.losses.sparse_categorical_crossentropy(
        ops.where(known, labels, 0), probabilities, from_logits=False
    )
    return ops.where(known, per_voxel, ops.zeros_like(per_voxel))


# --------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRole:
    """Who this process is in a (possibly multi-worker) run."""

    is_chief: bool = True
    task_type: str = "chief"
    task_id: int = 0
    num_workers: int = 1

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.task_id}"


def _tf_config() -> dict[str, Any] | None:
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise VfdetectError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(value, dict) or "cluster" not in value:
        raise VfdetectError("TF_CONFIG must hold a 'cluster' entry")
    return value


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for ``name`` (see the module docstring for ``"auto"``).

    Call it before any other TensorFlow operation of the process: multi-worker collectives can only
    be configured at program start.
    """
    if name not in STRATEGIES:
        raise TrainConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if _tf_config() is not None:
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        if _tf_config() is None:
            raise VfdetectError("the multiworker strategy needs TF_CONFIG describing the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """This process's role: the chief writes the run folder, other workers a subfolder of it."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole()
    resolver = strategy.cluster_resolver
    task_type, task_id = str(resolver.task_type), int(resolver.task_id)
    jobs = resolver.cluster_spec().as_dict()
    num_workers = sum(len(tasks) for job, tasks in jobs.items() if job in ("chief", "worker"))
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in jobs)
    return WorkerRole(is_chief=is_chief, task_type=task_type, task_id=task_id, num_workers=num_workers)


# --------------------------------------------------------------------------------------------
# Cases: split, loading, hashing
# --------------------------------------------------------------------------------------------


def has_fracture(case: Case, min_grade: int = 1) -> bool:
    """True when a vertebra of ``case`` has Genant grade >= ``min_grade`` (ungraded ones do not count)."""
    return any(grade is not None and int(grade) >= min_grade for grade in case.grades.values())


def split_cases(
    cases: Sequence[Case], validation_fraction: float, seed: int, min_grade: int = 1
) -> tuple[list[Case], list[Case]]:
    """Seeded split into training and validation cases, stratified by "has a fractured vertebra".

    A case is a fracture case when a vertebra has Genant grade >= ``min_grade`` (:func:`has_fracture`;
    use the ``min_grade`` the label images were made with). ``round(fraction * n)`` cases (at least
    one when the fraction is positive) are held out, shared between cases with and without
    fractures in proportion; the rest train. With a fraction of 0 nothing is held out (validation
    then uses the training cases).
    """
    cases = list(cases)
    if validation_fraction <= 0:
        return cases, []
    if len(cases) < 2:
        raise VfdetectError(
            f"holding out {validation_fraction:.0%} of the cases for validation needs at least 2 cases, got {len(cases)}"
        )
    rng = np.random.default_rng([seed, 0x5EED])
    n_validation = min(len(cases) - 1, max(1, round(validation_fraction * len(cases))))
    fractured = [c for c in cases if has_fracture(c, min_grade)]
    intact = [c for c in cases if not has_fracture(c, min_grade)]
    n_fractured = min(len(fractured), round(n_validation * len(fractured) / len(cases)))
    n_intact = min(len(intact), n_validation - n_fractured)
    n_fractured = n_validation - n_intact
    held_out = {
        c.case
        for group, n in ((fractured, n_fractured), (intact, n_intact))
        for c in (group[int(i)] for i in rng.permutation(len(group))[:n])
    }
    return [c for c in cases if c.case not in held_out], [c for c in cases if c.case in held_out]


def _hash_path(path: Path, digest: Any) -> None:
    """Feed a file's bytes (or every file of a folder, sorted) into ``digest``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)


def data_hash(cases: Sequence[Case], labels_dir: Path) -> str:
    """SHA-256 over the cases' names, grades, scans and label images (contents, not paths)."""
    from vfdetect.labels import label_path

    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case):
        digest.update(f"case {case.case} grades {sorted(case.grades.items())}\n".encode())
        _hash_path(Path(case.image), digest)
        labels = label_path(Path(labels_dir), case.case)
        if labels.is_file():
            _hash_path(labels, digest)
    return digest.hexdigest()


def _load_cases(cases: Sequence[Case], labels_dir: Path, spacing: float, quiet: bool, what: str) -> list[Any]:
    from vfdetect.sampling import load_training_case

    loaded = []
    for case in tqdm(cases, desc=f"loading {what} cases", unit="case", disable=quiet, leave=False):
        loaded.append(load_training_case(case, labels_dir, spacing=spacing))
    return loaded


# --------------------------------------------------------------------------------------------
# Model, checkpoint and exports
# --------------------------------------------------------------------------------------------


def model_arguments(config: TrainConfig, precision: str = "float32") -> dict[str, Any]:
    """Keyword arguments of :func:`vfdetect.model.build_model` for ``config`` (seeded weights and dropout)."""
    return {**dict(config.model_options), "precision": precision, "seed": config.seed}


def network_geometry(config: TrainConfig) -> Any:
    """The :class:`vfdetect.geometry.NetworkGeometry` of ``config``'s network, without building it."""
    from vfdetect.model import DeepMedicConfig

    return DeepMedicConfig.from_dict({"variant": config.variant, **dict(config.model_options)}).geometry


def build_network(config: TrainConfig, precision: str = "float32") -> keras.Model:
    """The network of ``config`` (variant and ``model_options``), weights and dropout seeded by ``config.seed``."""
    from vfdetect.model import build_model

    return build_model(config.variant, **model_arguments(config, precision))


def _variable_values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _assign_values(variables: Sequence[Any], values: Sequence[np.ndarray], what: str, path: Path) -> None:
    if len(variables) != len(values):
        raise InputError(path, f"checkpoint holds {len(values)} {what} variables, the network has {len(variables)}")
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise InputError(path, f"checkpoint {what} variable {variable.path} has shape {value.shape}, expected {tuple(variable.shape)}")
        variable.assign(value.astype(variable.dtype))


def save_checkpoint(path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: Mapping[str, Any]) -> None:
    """Write model variables (dropout seed state included), optimizer variables and ``state`` to one npz."""
    arrays: dict[str, np.ndarray] = {}
    for i, value in enumerate(_variable_values(model.variables)):
        arrays[f"model_{i:04d}"] = value
    for i, value in enumerate(_variable_values(optimizer.variables)):
        arrays[f"optimizer_{i:04d}"] = value
    header = {"format": CHECKPOINT_FORMAT, "model_variables": len(model.variables),
              "optimizer_variables": len(optimizer.variables),
              "model_paths": [v.path for v in model.variables], "state": dict(state)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]


def read_checkpoint(path: Path) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray]]:
    """``(header, model values, optimizer values)`` of a checkpoint written by :func:`save_checkpoint`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            model_values = [data[f"model_{i:04d}"] for i in range(header["model_variables"])]
            optimizer_values = [data[f"optimizer_{i:04d}"] for i in range(header["optimizer_variables"])]
    except (OSError, KeyError, ValueError) as error:
        raise InputError(path, f"unreadable checkpoint: {error}") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, f"not a {CHECKPOINT_FORMAT} checkpoint")
    return header, model_values, optimizer_values


def _save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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


class _Validator:
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


# --------------------------------------------------------------------------------------------
# Run folder files
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _write_log(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in rows:
        writer.writerow([_format_value(row.get(column)) for column in LOG_COLUMNS])
    write_text_atomic(path, buffer.getvalue())


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a run's ``log.csv`` as numbers (NaN for empty cells)."""
    with open(path, newline="") as handle:
        return [
            {key: (float(value) if value != "" else math.nan) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _scalar_metadata() -> bytes:
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    return metadata.SerializeToString()


def write_scalars(writer: Any, step: int, values: Mapping[str, float]) -> None:
    """Write finite scalars as TensorBoard "scalars" events at ``step``.

    Uses the core ``tf.summary.write`` op with the scalars plugin's metadata, so the event files are
    written without the ``tensorboard`` package (needed only to view them).
    """
    metadata = _scalar_metadata()
    with writer.as_default():
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                tf.summary.write(tag, tf.constant(float(value), dtype=tf.float32), step=int(step), metadata=metadata)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "vfdetect": __version__,
        "platform": platform.platform(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_description(
    config: TrainConfig,
    trainable_parameters: int,
    training_cases: Sequence[Case],
    validation_cases: Sequence[Case],
    validation_on_training: bool,
    hash_of_data: str,
    rule: str,
) -> dict[str, Any]:
    geometry = network_geometry(config)
    hr_shape = config.sampling.hr_shape
    output_shape = geometry.output_shape(hr_shape)
    return {
        "format": RUN_FORMAT,
        "variant": config.variant,
        "spacing": config.spacing,
        "trainable_parameters": int(trainable_parameters),
        "class_names": list(CLASS_NAMES),
        "label_values": {name: value for value, name in enumerate(CLASS_NAMES)},
        "ignored_label_value": IGNORE,
        "min_grade": config.min_grade,
        "checkpoint_selection": _selection_summary(rule),
        "model": {"builder": "vfdetect.model.build_model", "variant": config.variant,
                  "arguments": model_arguments(config, "float32"), "file": "model.keras"},
        "geometry": {
            "kernels": [list(k) for k in geometry.kernels],
            "subsample_factor": list(geometry.subsample_factor),
            "receptive_field": list(geometry.receptive_field),
            "margin": [list(m) for m in geometry.margin()],
        },
        "segment_shape": list(hr_shape),
        "output_shape": list(output_shape),
        "lr_shape": list(geometry.lr_input_shape(output_shape)),
        "validation_segment_shape": list(geometry.receptive_field),
        "inference_segment_shape": list(INFERENCE_SEGMENT_SHAPE),
        "input": {
            "frame": "canonical RAS, axis-aligned, isotropic spacing; arrays [x, y, z]",
            "tensor_layout": "(batch, x, y, z, channel)",
            "resampling": "linear for the scan (vfdetect.volume.to_internal, order 1)",
            "normalisation": "z-score over the body mask (HU > -500, largest component, holes filled): "
                             "vfdetect.volume.normalise",
            "padding": "numpy 'reflect' by the network margin per axis (vfdetect.geometry.pad_volume)",
            "lr_fill": "mean of the 8 corner voxels of the normalised internal-frame volume",
        },
        "output": "softmax probabilities, channels (background, normal vertebra, fractured vertebra)",
        "train_config": config.to_dict(),
        "training_cases": [c.case for c in training_cases],
        "validation_cases": [c.case for c in validation_cases],
        "validation_on_training_cases": validation_on_training,
        "data_hash": hash_of_data,
        "created": _now(),
        "vfdetect_version": __version__,
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _selection_summary(rule: str) -> dict[str, str]:
    measure, tie_break = SELECTION_RULES[rule]
    return {"rule": rule, "measure": measure, "tie_break": tie_break, "description": SELECTION_DESCRIPTIONS[rule]}


def _new_state(config: TrainConfig, hash_of_data: str, rule: str) -> dict[str, Any]:
    return {
        "next_subepoch": 0,  # global index: epoch * subepochs + subepoch
        "schedule": PlateauSchedule(config.learning_rate, config.lr_patience, config.lr_factor,
                                    config.lr_min_increase).to_dict(),
        "epoch_partial": {"losses": [], "accuracies": [], "train_time_s": 0.0, "started_elapsed_s": 0.0},
        "log": [],
        "selection_rule": rule,
        "best_epoch": None,  # 0-based index into "log" of the epoch saved as model.keras
        "elapsed_s": 0.0,
        "train_time_s": 0.0,
        "validation_time_s": 0.0,
        "segments_trained": 0,
        "steady_segments": 0,
        "steady_time_s": 0.0,
        "data_hash": hash_of_data,
        "sessions": [],
    }


class _StepRunner:
    """One distributed training step: forward, cross-entropy + regularisers, gradients, update.

    Each replica divides its summed voxel losses by the voxels of the *global* batch and its share
    of the regularisers by the number of replicas; the optimizer sums the gradients over replicas
    (Keras' all-reduce), so the update equals that of one device on the whole batch. Returns the
    global loss, the number of correctly classified output voxels and the number of output voxels
    with a known class (labels < 3; ignored voxels count in neither).
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy,
                 global_batch: int, voxels_per_segment: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.voxels_per_segment = int(voxels_per_segment)
        self.global_voxels = float(global_batch * voxels_per_segment)
        self.step = tf.function(self._step, jit_compile=False)
        self._average: Any = None

    def _replica_step(self, inputs: Any, labels: Any) -> tuple[Any, Any, Any]:
        replicas = float(tf.distribute.get_replica_context().num_replicas_in_sync)
        with tf.GradientTape() as tape:
            probabilities = self.model(list(inputs), training=True)
            per_voxel = voxel_cross_entropy(labels, probabilities)
            loss = tf.reduce_sum(per_voxel) / self.global_voxels
            if self.model.losses:
                loss += tf.add_n([tf.cast(term, tf.float32) for term in self.model.losses]) / replicas
        variables = self.model.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        labels = tf.cast(labels, tf.int32)
        known = tf.less(labels, N_CLASSES)
        correct = tf.reduce_sum(tf.cast(tf.logical_and(tf.equal(predicted, labels), known), tf.float32))
        return loss, correct, tf.reduce_sum(tf.cast(known, tf.float32))

    def average_statistics(self) -> None:
        """Replace the batch-norm moving statistics by their mean over all replicas.

        Normalisation uses each replica's own batch statistics (as DeepMedic on one device), so the
        moving averages drift apart between workers while the trained weights stay identical;
        averaging them after every subepoch gives every worker the same model. No-op on one replica.
        """
        if self.strategy.num_replicas_in_sync == 1:
            return
        if self._average is None:
            statistics = [v for v in self.model.non_trainable_variables
                          if "moving_mean" in v.path or "moving_variance" in v.path]

            def average() -> None:
                values = self.strategy.run(lambda: [tf.identity(v.value) for v in statistics])
                for variable, value in zip(statistics, values, strict=True):
                    variable.assign(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))

            self._average = tf.function(average, jit_compile=False)
        self._average()

    def _step(self, iterator: Any) -> tuple[Any, Any, Any]:
        inputs, labels = next(iterator)
        results = self.strategy.run(self._replica_step, args=(inputs, labels))
        return tuple(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results)


class _Run:
    """State and side effects of one training process (see :func:`run_training`)."""

    def __init__(self, config: TrainConfig, out_dir: Path, quiet: bool) -> None:
        self.config = config
        self.out_dir = out_dir
        self.quiet = quiet
        self.checkpoint_path = out_dir / "checkpoint" / "last.npz"
        self.state: dict[str, Any] = {}
        self.model: keras.Model
        self.optimizer: keras.optimizers.Optimizer
        self.export_model: keras.Model
        self.validator: _Validator
        self.writer: Any = None
        self.session_started = time.perf_counter()
        self.elapsed_at_session_start = 0.0
        self.report: dict[str, Any] = {}

    # -- per subepoch -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_at_session_start + time.perf_counter() - self.session_started

    def end_subepoch(self, global_subepoch: int, loss: float, accuracy: float, train_time: float,
                     first_of_session: bool = False) -> None:
        config, state = self.config, self.state
        epoch, subepoch = divmod(global_subepoch, config.subepochs)
        partial = state["epoch_partial"]
        if subepoch == 0:
            partial.update(losses=[], accuracies=[], train_time_s=0.0, started_elapsed_s=state["elapsed_s"])
        partial["losses"].append(loss)
        partial["accuracies"].append(accuracy)
        partial["train_time_s"] += train_time
        segments = config.batches_per_subepoch * config.batch_size
        state["segments_trained"] += segments
        state["train_time_s"] += train_time
        if not first_of_session:  # the first subepoch of a process also traces the graph
            state["steady_segments"] += segments
            state["steady_time_s"] += train_time
        state["next_subepoch"] = global_subepoch + 1
        write_scalars(self.writer, global_subepoch + 1, {
            "subepoch/loss": loss,
            "subepoch/train_accuracy": accuracy,
            "subepoch/segments_per_s": segments / max(train_time, 1e-9),
        })
        if subepoch == config.subepochs - 1:
            self.end_epoch(epoch)
        state["elapsed_s"] = self.elapsed()
        self.save_checkpoint()

    def train(self, dataset: tf.data.Dataset, strategy: tf.distribute.Strategy, runner: _StepRunner) -> None:
        """Train from the state's next subepoch to the end of the schedule."""
        config, state = self.config, self.state
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        first = int(state["next_subepoch"])
        for global_subepoch in range(first, config.total_subepochs):
            epoch, subepoch = divmod(global_subepoch, config.subepochs)
            started = time.perf_counter()
            loss_sum, correct_sum, known_sum = 0.0, 0.0, 0.0
            with tqdm(total=config.batches_per_subepoch, unit="batch", disable=self.quiet, leave=False,
                      desc=f"epoch {epoch + 1}/{config.epochs} subepoch {subepoch + 1}/{config.subepochs}") as bar:
                for batch in range(config.batches_per_subepoch):
                    loss, correct, known = runner.step(iterator)
                    loss_sum += float(loss)
                    correct_sum += float(correct)
                    known_sum += float(known)
                    bar.update(1)
                    if batch % 10 == 9:
                        bar.set_postfix(loss=f"{loss_sum / (batch + 1):.4f}",
                                        acc=f"{correct_sum / max(known_sum, 1.0):.3f}", refresh=False)
            runner.average_statistics()
            self.end_subepoch(global_subepoch, loss_sum / config.batches_per_subepoch,
                              correct_sum / known_sum if known_sum else math.nan, time.perf_counter() - started,
                              first_of_session=global_subepoch == first)

    def end_epoch(self, epoch: int) -> None:
        config, state = self.config, self.state
        partial = state["epoch_partial"]
        self.export_model.set_weights(self.model.get_weights())
        started = time.perf_counter()
        scores = self.validator()
        validation_time = time.perf_counter() - started
        state["validation_time_s"] += validation_time
        rule = state["selection_rule"]
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.nanmean(partial["losses"])),
            "train_accuracy": float(np.nanmean(partial["accuracies"])),
            "val_accuracy": scores["accuracy"],
            "val_accuracy_background": scores["background"],
            "val_accuracy_normal": scores["normal"],
            "val_accuracy_fracture": scores["fracture"],
            "val_recall_normal": scores["recall_normal"],
            "val_recall_fracture": scores["recall_fracture"],
            "val_mean_recall": scores["mean_recall"],
            "val_fracture_auc": scores["fracture_auc"],
        }
        row["selection_measure"] = row[SELECTION_RULES[rule][0]]
        row = {k: _json_number(v) if isinstance(v, float) else v for k, v in row.items()}
        schedule = PlateauSchedule.from_dict(state["schedule"])
        learning_rate = schedule.learning_rate
        measure = row["selection_measure"]
        lowered = schedule.update(epoch, math.nan if measure is None else measure)
        state["schedule"] = schedule.to_dict()
        if lowered:
            self.optimizer.learning_rate.assign(schedule.learning_rate)
        best = state["best_epoch"]
        selected = best is None or selection_key(row, rule) > selection_key(state["log"][best], rule)
        if selected:
            state["best_epoch"] = len(state["log"])
            _save_model(self.export_model, self.out_dir / "model.keras")
        _save_model(self.export_model, self.out_dir / "model_last.keras")
        elapsed = self.elapsed()
        segments = config.subepochs * config.batches_per_subepoch * config.batch_size
        row.update({
            "selected": int(selected),
            "learning_rate": learning_rate,
            "lr_halved": int(lowered),
            "epoch_time_s": elapsed - partial["started_elapsed_s"],
            "train_time_s": partial["train_time_s"],
            "validation_time_s": validation_time,
            "segments_per_s": segments / max(partial["train_time_s"], 1e-9),
            "elapsed_s": elapsed,
        })
        state["log"].append({k: _json_number(v) if isinstance(v, float) else v for k, v in row.items()})
        _write_log(self.out_dir / "log.csv", state["log"])
        keys = ("loss", "train_accuracy", "val_accuracy", "val_accuracy_background", "val_accuracy_normal",
                "val_accuracy_fracture", "val_recall_normal", "val_recall_fracture", "val_mean_recall",
                "val_fracture_auc", "selection_measure", "learning_rate", "segments_per_s")
        write_scalars(self.writer, epoch + 1, {f"epoch/{key}": row[key] for key in keys})
        self.writer.flush()

    def save_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.state)
        self.write_report(status="running")

    def write_report(self, status: str) -> None:
        state = self.state
        best = state["best_epoch"]
        rule = state["selection_rule"]
        measure, tie_break = SELECTION_RULES[rule]
        best_row = state["log"][best] if best is not None else {}
        self.report.update(
            status=status,
            updated=_now(),
            subepochs_done=state["next_subepoch"],
            epochs_done=len(state["log"]),
            best_epoch=None if best is None else best + 1,
            checkpoint_selection={
                **_selection_summary(rule),
                "best_epoch": None if best is None else best + 1,
                "measure_value": best_row.get(measure),
                "tie_break_value": best_row.get(tie_break),
                "val_accuracy": best_row.get("val_accuracy"),
            },
            final_learning_rate=PlateauSchedule.from_dict(state["schedule"]).learning_rate,
            timings={
                "elapsed_s": state["elapsed_s"],
                "train_s": state["train_time_s"],
                "validation_s": state["validation_time_s"],
                "segments_trained": state["segments_trained"],
                "segments_per_s": state["segments_trained"] / max(state["train_time_s"], 1e-9),
                "segments_per_s_after_first_subepoch": (
                    state["steady_segments"] / state["steady_time_s"] if state["steady_time_s"] > 0 else None
                ),
                "sessions": state["sessions"],
            },
        )
        write_json_atomic(self.out_dir / "report.json", self.report)


def _restore(path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, hash_of_data: str) -> dict[str, Any]:
    """Load a checkpoint's variables into ``model`` and ``optimizer``; return its loop state."""
    header, model_values, optimizer_values = read_checkpoint(path)
    if header["state"].get("data_hash") != hash_of_data:
        raise InputError(path, "the training data differ from those the run started with")
    _assign_values(model.variables, model_values, "model", path)
    _assign_values(optimizer.variables, optimizer_values, "optimizer", path)
    state: dict[str, Any] = header["state"]
    optimizer.learning_rate.assign(PlateauSchedule.from_dict(state["schedule"]).learning_rate)
    return state


def _compatible(saved: TrainConfig, config: TrainConfig, path: Path) -> None:
    differing = [name for name in saved.differences(config) if name not in ("epochs", "strategy")]
    if differing:
        raise InputError(
            path,
            f"the run was started with other settings ({', '.join(differing)}); resume with the same ones "
            "(only --epochs and --strategy may change)",
        )


def run_training(
    cases: Sequence[Case],
    labels_dir: Path,
    run_dir: Path,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    quiet: bool = False,
    validation_cases: Sequence[Case] | None = None,
) -> Path:
    """Train a network on ``cases`` (label images in ``labels_dir``) into the run folder ``run_dir``.

    ``validation_cases`` replaces the seeded hold-out split (then every case of ``cases`` trains).
    With ``resume`` the run continues from ``run_dir``'s last checkpoint (starting afresh when there
    is none); settings must match the run's ``config.json`` except ``epochs`` (which may grow) and
    ``strategy``. ``config.min_grade`` must equal the ``min_grade`` recorded in
    ``labels_dir/label_config.json`` when that file exists. Returns ``run_dir``.
    """
    run_dir, labels_dir = Path(run_dir), Path(labels_dir)
    cases = list(cases)
    if not cases:
        raise VfdetectError("no training cases given")
    if not labels_dir.is_dir():
        raise InputError(labels_dir, "label folder not found")
    from vfdetect.labels import LABEL_CONFIG_FILE, read_label_min_grade

    label_min_grade = read_label_min_grade(labels_dir)
    if label_min_grade is not None and label_min_grade != config.min_grade:
        raise InputError(
            labels_dir / LABEL_CONFIG_FILE,
            f"the label images count grade >= {label_min_grade} as fractured, the training asks for min_grade "
            f"{config.min_grade}; train with the same min_grade or synthesise the labels again with it",
        )
    strategy = make_strategy(config.strategy)  # before any other TensorFlow operation
    role = worker_role(strategy)
    out_dir = run_dir if role.is_chief else run_dir / "workers" / role.name
    config_path = out_dir / "config.json"
    run = _Run(config, out_dir, quiet=quiet or not role.is_chief)

    existing = config_path.is_file() or run.checkpoint_path.is_file()
    if existing and not resume:
        raise InputError(run_dir, "already holds a training run; resume it (--resume) or choose another folder")
    if resume and config_path.is_file():
        try:
            saved = TrainConfig.from_dict(json.loads(config_path.read_text())["train_config"])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise InputError(config_path, f"unreadable run configuration: {error}") from None
        _compatible(saved, config, config_path)

    if validation_cases is None:
        training_cases, held_out = split_cases(cases, config.validation_fraction, config.seed, config.min_grade)
    else:
        training_cases, held_out = cases, list(validation_cases)
    validation_on_training = not held_out
    hash_of_data = data_hash([*training_cases, *held_out], labels_dir)

    from vfdetect.sampling import (
        TrainingSampler,
        draw_subepoch,
        make_dataset,
        subepoch_rng,
        uniform_validation_segments,
    )

    load_started = time.perf_counter()
    geometry = network_geometry(config)
    train_loaded = _load_cases(training_cases, labels_dir, config.spacing, run.quiet, "training")
    sampler = TrainingSampler(train_loaded, geometry, config.sampling, config.segments_per_subepoch, config.seed)
    val_loaded = _load_cases(held_out, labels_dir, config.spacing, run.quiet, "validation") if held_out else train_loaded
    validation_segments = uniform_validation_segments(
        val_loaded, geometry, config.validation_segments, subepoch_rng(config.seed, 0, 0, validation=True)
    )
    balanced_segments = draw_subepoch(
        val_loaded, geometry, balanced_sampling(config.sampling, len(val_loaded)),
        config.balanced_validation_segments, subepoch_rng(config.seed, 0, 1, validation=True),
    )
    del val_loaded
    rule = selection_rule(balanced_segments["labels"])
    if rule != "fracture_auc" and not run.quiet:
        _LOGGER.warning("checkpoint selection: %s", SELECTION_DESCRIPTIONS[rule])
    load_time = time.perf_counter() - load_started

    with strategy.scope():
        model = build_network(config, config.precision)
        optimizer = NesterovRMSprop(
            learning_rate=config.learning_rate, rho=config.rho, momentum=config.momentum,
            epsilon=config.epsilon, nesterov=config.nesterov,
        )
        optimizer.build(model.trainable_variables)
    export_model = build_network(config, "float32")
    from vfdetect.model import count_trainable_parameters

    trainable = int(count_trainable_parameters(export_model))
    run.model, run.optimizer, run.export_model = model, optimizer, export_model
    run.validator = _Validator(export_model, validation_segments, balanced_segments, config.validation_batch_size)

    state = _new_state(config, hash_of_data, rule)
    if resume and run.checkpoint_path.is_file():
        state = _restore(run.checkpoint_path, model, optimizer, hash_of_data)
    run.state = state
    run.elapsed_at_session_start = float(state["elapsed_s"])
    run.session_started = time.perf_counter()
    state["sessions"].append({"started": _now(), "at_subepoch": state["next_subepoch"], "load_s": load_time})

    description = _run_description(config, trainable, training_cases, held_out, validation_on_training, hash_of_data,
                                   rule)
    if config_path.is_file():
        saved_description = json.loads(config_path.read_text())
        description["created"] = saved_description.get("created", description["created"])
    write_json_atomic(config_path, description)
    run.report = {
        "format": RUN_FORMAT,
        "versions": _versions(),
        "seed": config.seed,
        "data_hash": hash_of_data,
        "cases": {"training": len(training_cases), "validation": len(held_out)},
        "strategy": {"name": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync),
                     "workers": role.num_workers, "role": role.name},
        "precision": config.precision,
        "jit_compile": False,
        "command": " ".join(sys.argv),
    }
    run.writer = tf.summary.create_file_writer(str(out_dir / "tensorboard"))

    start = int(state["next_subepoch"])
    if start < config.total_subepochs:
        dataset = make_dataset(
            sampler, config.batch_size, config.subepochs,
            start=divmod(start, config.subepochs), epochs=config.epochs,
        )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
        runner = _StepRunner(model, optimizer, strategy, config.batch_size, int(np.prod(sampler.output_shape)))
        run.train(dataset, strategy, runner)
    state["elapsed_s"] = run.elapsed()
    finished = state["next_subepoch"] >= config.total_subepochs
    run.write_report(status="finished" if finished else "interrupted")
    run.writer.close()
    return run_dir
