"""One resolution of settings for every command: defaults, a settings file, the command line, a saved run.

Each command that takes settings (``train``, ``cv``, ``predict``, ``phantoms``) builds its settings
with :func:`resolve_settings` from layers given in order of precedence, the last winning:

    defaults  <-  settings file (``--config``, an experiment section)  <-  command line

and, where a saved run exists, the saved run takes the place of the file: ``train --resume`` uses
the run's ``config.json`` (the command line may still change what the run allows to change, e.g.
more epochs, which the training checks), ``predict`` reads the model's own configuration (the
command line's thresholds override the model's). A key that is not a known setting is refused in
every layer, with the file named: a misspelt setting is an error, never silently ignored.

Only the values are resolved here; each command's config dataclass then validates their ranges.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from vfdetect.errors import InputError, VfdetectError

__all__ = [
    "Layer",
    "dataclass_keys",
    "read_settings_file",
    "resolve_settings",
    "check_sections",
    "MODEL_CONFIG_KEYS",
    "MODEL_VARIANTS",
    "check_model_config",
]


@dataclass(frozen=True)
class Layer:
    """One source of settings: ``source`` is the file they come from (a :class:`Path`) or a description
    (``"command line"``); ``None`` values mean "not given" and are dropped."""

    source: Path | str
    values: Mapping[str, Any]


def dataclass_keys(config_class: type) -> frozenset[str]:
    """The field names of a settings dataclass."""
    if not is_dataclass(config_class):
        raise VfdetectError(f"{config_class!r} is not a settings dataclass")
    return frozenset(field.name for field in fields(config_class))


def read_settings_file(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """The JSON object in ``path``; :class:`InputError` naming the file when it is missing, unreadable
    or not an object."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(path, f"unreadable JSON ({error})") from None
    if not isinstance(values, dict):
        raise InputError(path, f"{what} must be a JSON object")
    return values


def _refuse(source: Path | str, problem: str) -> VfdetectError:
    if isinstance(source, Path):
        return InputError(source, problem)
    return VfdetectError(f"{source}: {problem}")


def resolve_settings(known: Collection[str], layers: Sequence[Layer], what: str = "setting(s)") -> dict[str, Any]:
    """Merge ``layers`` (later ones win) into one dictionary of settings.

    Keys outside ``known`` are refused in every layer with an error naming the layer's file (or
    description) and listing the known keys; ``None`` values are not given and do not override.
    """
    known = frozenset(known)
    merged: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer.values) - known)
        if unknown:
            raise _refuse(
                layer.source, f"unknown {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        merged.update({key: value for key, value in layer.values.items() if value is not None})
    return merged


def check_sections(path: Path, document: Mapping[str, Any], sections: Mapping[str, Collection[str] | None]) -> None:
    """Refuse keys of ``document`` (read from ``path``) that are not in ``sections``, and unknown keys
    of each section whose known keys are given (``None``: a plain value, not checked further)."""
    unknown = sorted(set(document) - set(sections))
    if unknown:
        raise InputError(path, f"unknown section(s): {', '.join(unknown)} (known: {', '.join(sorted(sections))})")
    for name, keys in sections.items():
        if keys is None or name not in document:
            continue
        values = document[name]
        if not isinstance(values, Mapping):
            raise InputError(path, f"'{name}' must be an object")
        resolve_settings(keys, [Layer(path, values)], what=f"'{name}' setting(s)")


MODEL_VARIANTS: tuple[str, ...] = ("3d", "5slices", "1slice")

MODEL_CONFIG_KEYS: frozenset[str] = frozenset({
    # written by `vfdetect train` into a run's config.json
    "format", "variant", "spacing", "trainable_parameters", "class_names", "label_values", "ignored_label_value",
    "min_grade", "checkpoint_selection", "model", "geometry", "segment_shape", "output_shape", "lr_shape",
    "validation_segment_shape", "inference_segment_shape", "input", "output", "train_config", "training_cases",
    "validation_cases", "validation_on_training_cases", "data_hash", "created", "vfdetect_version",
    # a bundled model's JSON (vfdetect.models)
    "name", "headline", "card", "default", "patient_threshold", "patient_threshold_rule", "seed", "epochs",
    "recipe", "trained_on", "held_out", "description", "source_run",
})
"""Keys a model configuration (a run's ``config.json``, a bundled model's JSON) may hold."""


def check_model_config(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a model configuration with unknown keys, an unknown ``variant``, or a bad ``spacing`` or
    ``patient_threshold`` (:class:`InputError` naming ``path``)."""
    resolve_settings(MODEL_CONFIG_KEYS, [Layer(path, config)], what="model configuration key(s)")
    variant = config.get("variant", "3d")
    if variant not in MODEL_VARIANTS:
        raise InputError(path, f"unknown variant {variant!r} (known: {', '.join(MODEL_VARIANTS)})")
    spacing = config.get("spacing", 1.0)
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not spacing > 0:
        raise InputError(path, f"spacing must be a positive number of mm, got {spacing!r}")
    threshold = config.get("patient_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise InputError(path, f"patient_threshold must be a number in [0, 1], got {threshold!r}")
