"""The trained model for inference: finding it, loading it, and a ``predictor(hr, lr)`` callable around it.

:func:`load_predictor` loads the bundled default model (:mod:`vfdetect.models`), a run folder
(``model.keras`` and ``config.json`` with the ``variant`` and the ``spacing`` of the internal frame,
:class:`vfdetect.layout.RunFolder`) or a ``.keras`` file with its JSON configuration. The network
runs with BatchNorm folded into its convolutions (:func:`vfdetect.model.fold_batchnorm`), in
bfloat16 where the CPU computes it natively (:func:`resolve_precision`), else float32.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.geometry import NetworkGeometry
from vfdetect.layout import RunFolder
from vfdetect.tiling import Predictor_fn

MODEL_FILE = RunFolder(Path()).model.name
"""The trained model's file name in a run folder."""

PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
"""Inference precisions: ``auto`` (bfloat16 where the CPU computes it natively, else float32),
float32, or bfloat16 (convolutions in bf16, softmax in float32). BatchNorm is folded in all of them."""

BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: without them TensorFlow emulates bf16
and it is slower than float32."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags listed in ``cpuinfo`` (empty where the file is unreadable, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(precision: str = "auto", flags: frozenset[str] | None = None, gpu: bool = False) -> str:
    """The precision ``"auto"`` stands for: ``"bfloat16"`` on a CPU with native bf16 arithmetic
    (:data:`BF16_CPU_FLAGS`), else ``"float32"`` (on GPUs as well, where bf16 scores were not checked).
    Other values are returned as they are (validated).

    bf16 inference changes vertebra scores by about 1e-3 (checked against float32 on phantoms; the
    default requires at most 0.01), and runs about 1.4x faster on AVX512-BF16 CPUs.
    """
    if precision not in PRECISIONS:
        raise VfdetectError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if gpu:
        return "float32"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


def configure_threads(intra_op: int | None = 2, inter_op: int | None = 1) -> None:
    """Set TensorFlow's CPU thread pools (no effect once TensorFlow has started executing)."""
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra_op))
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter_op))
    except RuntimeError:
        pass


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def keras_predictor(model: Any, precision: str = "auto", fold: bool = True) -> Predictor_fn:
    """A ``predictor(hr, lr) -> probabilities`` callable around a DeepMedic model (graph mode, no XLA).

    By default the network runs with BatchNorm folded into the convolutions
    (:func:`vfdetect.model.fold_batchnorm`), in ``precision`` (:func:`resolve_precision`);
    ``fold=False`` runs the model itself (float32 only).
    """
    import tensorflow as tf

    from vfdetect.model import fold_batchnorm

    precision = resolve_precision(precision, gpu=precision == "auto" and _gpu_visible())
    if not fold and precision != "float32":
        raise VfdetectError("an unfolded model runs in float32 only")
    network = fold_batchnorm(model, "mixed_bfloat16" if precision == "bfloat16" else "float32") if fold else model

    def call(hr: Any, lr: Any) -> Any:
        return network([hr, lr], training=False)

    # One graph for every tile shape, traced here (at load time) rather than at the first tile.
    segment = tf.TensorSpec([None, None, None, None, 1], tf.float32)
    compiled = tf.function(call, jit_compile=False, input_signature=[segment, segment])
    compiled.get_concrete_function()

    def predictor(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(tf.constant(hr), tf.constant(lr)), dtype=np.float32)

    return predictor


@dataclass
class Predictor:
    """A trained model ready for inference, with its configuration (a run's ``config.json`` or a
    bundled model's JSON). ``model`` may be None when ``fn`` is given (a stand-in for tests); the
    geometry then follows the configured ``variant``."""

    model: Any
    config: dict[str, Any]
    run_dir: Path | None = None
    precision: str = "auto"
    fn: Predictor_fn | None = field(default=None, repr=False)
    model_path: Path | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.fn is None:
            self.precision = resolve_precision(self.precision, gpu=self.precision == "auto" and _gpu_visible())
            self.fn = keras_predictor(self.model, self.precision)

    @property
    def variant(self) -> str:
        return str(self.config.get("variant", "3d"))

    @property
    def spacing(self) -> float:
        return float(self.config.get("spacing", 1.0))

    @property
    def patient_threshold(self) -> float | None:
        """The model's own patient threshold (``patient_threshold`` in its configuration), if any."""
        value = self.config.get("patient_threshold")
        return None if value is None else float(value)

    @property
    def geometry(self) -> NetworkGeometry:
        if self.model is None:
            from vfdetect.geometry import geometry_for

            return geometry_for(self.variant)
        from vfdetect.model import geometry_of

        return geometry_of(self.model)

    def describe(self) -> dict[str, Any]:
        """What the report says about the model."""
        keys = ("variant", "spacing", "trainable_parameters", "seed", "epochs", "patient_threshold")
        info = {key: self.config[key] for key in keys if key in self.config}
        info["name"] = self.name
        info["run"] = None if self.run_dir is None else str(self.run_dir)
        info["file"] = None if self.model_path is None else str(self.model_path)
        info["precision"] = self.precision
        return info


def _read_config(path: Path, what: str) -> dict[str, Any]:
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the {what} ({error})") from None
    if not isinstance(config, dict):
        raise InputError(path, f"the {what} must be a JSON object")
    return config


def resolve_model(model: str | Path | None = None, model_file: str = MODEL_FILE) -> tuple[Path, Path, str | None]:
    """``(weights, config, name)`` of a model given as None (the bundled default), a run folder
    (``config.json`` + ``model_file``) or a ``.keras`` file (configuration from the sibling
    ``<stem>.json``, else the ``config.json`` of the folder it sits in)."""
    if model is None:
        from vfdetect.models import default_model

        bundled = default_model()
        if not bundled.weights.is_file():
            raise InputError(bundled.weights, "bundled model weights are missing")
        return bundled.weights, bundled.config_path, bundled.name
    path = Path(model)
    if path.is_dir():
        config_path = RunFolder(path).config
        if not config_path.is_file():
            raise InputError(config_path, "run folder has no config.json (not a training run?)")
        weights = path / model_file
        if not weights.is_file():
            raise InputError(weights, "trained model not found in the run folder")
        return weights, config_path, None
    if path.suffix == ".keras":
        if not path.is_file():
            raise InputError(path, "model file not found")
        for candidate in (path.with_suffix(".json"), RunFolder(path.parent).config):
            if candidate.is_file():
                return path, candidate, None
        raise InputError(path, f"no configuration beside the model (expected {path.stem}.json or config.json)")
    if not path.exists():
        raise InputError(path, "model not found (give a run folder or a .keras file)")
    raise InputError(path, "not a model: give a run folder (config.json + model.keras) or a .keras file")


def load_predictor(
    model: str | Path | None = None,
    precision: str = "auto",
    threads: int | None = 2,
    model_file: str = MODEL_FILE,
) -> Predictor:
    """Load a model and its configuration (everything inference needs).

    ``model``: None for the bundled default model (:mod:`vfdetect.models`; :class:`InputError` when
    this installation has none), a training run folder (``model_file`` and ``config.json``), or a
    ``.keras`` file whose configuration is the sibling ``<stem>.json`` or the ``config.json`` of its
    folder (see :func:`resolve_model`).
    """
    from vfdetect.startup import finish_tensorflow_import

    weights, config_path, name = resolve_model(model, model_file)
    config = _read_config(config_path, "model configuration")
    finish_tensorflow_import()  # when the command line started it in the background
    configure_threads(threads)
    from vfdetect.model import load_model

    network = load_model(weights)
    run_dir = weights.parent if config_path.name == RunFolder(weights.parent).config.name else None
    return Predictor(model=network, config=config, run_dir=run_dir, precision=precision, model_path=weights,
                     name=name or config.get("name"))


@dataclass
class PendingPredictor:
    """A model being loaded in a background thread (:func:`load_predictor_in_background`): its
    configuration (hence the internal grid's ``spacing``) is known at once, so a case can be read,
    resampled and given its region while TensorFlow and the network load; :meth:`result` waits."""

    config: dict[str, Any]
    future: Future[Predictor]

    @property
    def spacing(self) -> float:
        return float(self.config.get("spacing", 1.0))

    def result(self) -> Predictor:
        """The loaded predictor; a failure to load is raised as :class:`ModelLoadError`."""
        try:
            return self.future.result()
        except VfdetectError as error:
            raise ModelLoadError(str(error)) from error
        except Exception as error:
            raise ModelLoadError(f"cannot load the model: {type(error).__name__}: {error}") from error


class ModelLoadError(VfdetectError):
    """The model could not be loaded: every case would fail, so batch prediction stops."""


def load_predictor_in_background(
    model: str | Path | None = None,
    precision: str = "auto",
    threads: int | None = 2,
    model_file: str = MODEL_FILE,
) -> PendingPredictor:
    """:func:`load_predictor` in a daemon thread. The model's files and configuration are checked
    here, at once (an :class:`InputError` names a missing or unreadable one); loading the network
    (and finishing a background TensorFlow import) happens in the thread."""
    import threading

    weights, config_path, _ = resolve_model(model, model_file)
    config = _read_config(config_path, "model configuration")
    future: Future[Predictor] = Future()

    def run() -> None:
        try:
            future.set_result(load_predictor(model, precision=precision, threads=threads, model_file=model_file))
        except BaseException as error:  # handed to the caller by PendingPredictor.result
            future.set_exception(error)

    threading.Thread(target=run, name="vfdetect-load-model", daemon=True).start()
    return PendingPredictor(config, future)


def ready(predictor: Predictor | PendingPredictor) -> Predictor:
    """``predictor`` itself, or the predictor a :class:`PendingPredictor` is loading (waits)."""
    return predictor.result() if isinstance(predictor, PendingPredictor) else predictor
