"""Run folder files: checkpoints, saved models, the epoch log, TensorBoard scalars, run description."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vfdetect import __version__
from vfdetect.errors import InputError
from vfdetect.fileio import atomic_path, write_text_atomic
from vfdetect.labels import IGNORE
from vfdetect.layout import RunFolder
from vfdetect.train.config import (
    CLASS_NAMES,
    INFERENCE_SEGMENT_SHAPE,
    TrainConfig,
    model_arguments,
    network_geometry,
)
from vfdetect.train.optim import PlateauSchedule
from vfdetect.train.selection import selection_summary
from vfdetect.vertebrae import Case

RUN_FORMAT = "vfdetect-run/1"
CHECKPOINT_FORMAT = "vfdetect-checkpoint/2"

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


def save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_log(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
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


def json_number(value: float | None) -> float | None:
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


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "vfdetect": __version__,
        "platform": platform.platform(),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_description(
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
        "checkpoint_selection": selection_summary(rule),
        "model": {"builder": "vfdetect.model.build_model", "variant": config.variant,
                  "arguments": model_arguments(config, "float32"), "file": RunFolder(Path()).model.name},
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
                             "vfdetect.body.normalise",
            "padding": "numpy 'reflect' by the network margin per axis (vfdetect.geometry.pad_volume)",
            "lr_fill": "mean of the 8 corner voxels of the normalised internal-frame volume",
        },
        "output": "softmax probabilities, channels (background, normal vertebra, fractured vertebra)",
        "train_config": config.to_dict(),
        "training_cases": [c.case for c in training_cases],
        "validation_cases": [c.case for c in validation_cases],
        "validation_on_training_cases": validation_on_training,
        "data_hash": hash_of_data,
        "created": utc_now(),
        "vfdetect_version": __version__,
    }


def restore_checkpoint(path: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, hash_of_data: str) -> dict[str, Any]:
    """Load a checkpoint's variables into ``model`` and ``optimizer``; return its loop state."""
    header, model_values, optimizer_values = read_checkpoint(path)
    if header["state"].get("data_hash") != hash_of_data:
        raise InputError(path, "the training data differ from those the run started with")
    _assign_values(model.variables, model_values, "model", path)
    _assign_values(optimizer.variables, optimizer_values, "optimizer", path)
    state: dict[str, Any] = header["state"]
    optimizer.learning_rate.assign(PlateauSchedule.from_dict(state["schedule"]).learning_rate)
    return state
