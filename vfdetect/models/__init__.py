"""Trained models shipped inside the package, and how to find them.

Each bundled model is a pair of files in this folder: ``<name>.keras`` (the weights, Keras v3
format) and ``<name>.json`` (the training run's ``config.json`` with four more keys: ``name``,
``headline`` (one line for listings), ``patient_threshold`` (the patient decision threshold on the
maximum vertebra score, see :mod:`vfdetect.aggregate`) and ``card`` (the file name of a model card
beside it, e.g. ``MODEL_CARD.md``)). The default model is the one whose JSON says
``"default": true``, else the first by name.

The files are found through :mod:`importlib.resources`, so an installed wheel works as well as a
source checkout; ``MODELS_DIR`` (None: the package's own folder) points the registry elsewhere.
A checkout without weights simply has no bundled model: :func:`default_model` then raises
:class:`vfdetect.errors.InputError` saying to pass a model explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from vfdetect.errors import InputError

MODELS_DIR: Path | None = None
"""Folder searched for bundled models; None means this package's own folder (the installed files)."""

NO_BUNDLED_MODEL = "no bundled model in this installation; pass --model RUN_OR_FILE"

_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


@dataclass(frozen=True)
class BundledModel:
    """One bundled model: its weights file, its configuration and its listing line."""

    name: str
    weights: Path
    config_path: Path
    config: dict[str, Any] = field(repr=False)
    headline: str = ""
    card: Path | None = None
    default: bool = False

    @property
    def patient_threshold(self) -> float | None:
        value = self.config.get("patient_threshold")
        return None if value is None else float(value)


def _folder() -> Traversable:
    if MODELS_DIR is not None:
        return Path(MODELS_DIR)
    return resources.files(__name__)


def _as_path(entry: Traversable) -> Path:
    """A real file path for a package resource (extracted for the process's lifetime if zipped)."""
    if isinstance(entry, Path):
        return entry
    return Path(_extracted.enter_context(resources.as_file(entry)))


def _read(entry: Traversable, folder: Traversable) -> BundledModel:
    stem = entry.name[: -len(".json")]
    path = _as_path(entry)
    try:
        config = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the bundled model's configuration ({error})") from None
    if not isinstance(config, dict):
        raise InputError(path, "a bundled model's configuration must be a JSON object")
    weights = folder / f"{stem}.keras"
    card_name = config.get("card")
    card = folder / str(card_name) if card_name else None
    return BundledModel(
        name=str(config.get("name") or stem),
        weights=_as_path(weights),
        config_path=path,
        config=config,
        headline=str(config.get("headline", "")).strip(),
        card=_as_path(card) if card is not None and card.is_file() else None,
        default=bool(config.get("default", False)),
    )


def bundled_models() -> list[BundledModel]:
    """The bundled models (a ``<name>.json`` with its ``<name>.keras``), sorted by file name."""
    folder = _folder()
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if not entry.name.endswith(".json") or not entry.is_file():
            continue
        if not (folder / f"{entry.name[: -len('.json')]}.keras").is_file():
            continue
        found.append(_read(entry, folder))
    return found


def default_model() -> BundledModel:
    """The bundled model used when none is named; :class:`InputError` when there is none."""
    models = bundled_models()
    if not models:
        raise InputError(None, NO_BUNDLED_MODEL)
    marked = [model for model in models if model.default]
    return (marked or models)[0]


def default_model_path() -> Path:
    """The weights file (``<name>.keras``) of :func:`default_model`."""
    return default_model().weights
