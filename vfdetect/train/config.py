"""Settings of a training run (:class:`TrainConfig`) and the network they describe."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from vfdetect.errors import VfdetectError, refuse_unknown_fields
from vfdetect.labels import GENANT_GRADES_COUNTED
from vfdetect.sampling import SamplingConfig

VARIANTS: tuple[str, ...] = ("3d", "5slices", "1slice")
PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16")
STRATEGIES: tuple[str, ...] = ("auto", "default", "mirrored", "multiworker")
CLASS_NAMES: tuple[str, ...] = ("background", "normal vertebra", "fractured vertebra")
CLASS_KEYS: tuple[str, ...] = ("background", "normal", "fracture")
N_CLASSES = len(CLASS_NAMES)
INFERENCE_SEGMENT_SHAPE: tuple[int, int, int] = (45, 45, 45)


class TrainConfigError(VfdetectError, ValueError):
    """A training setting that is out of range or inconsistent."""



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
