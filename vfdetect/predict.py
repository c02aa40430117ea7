"""Whole-scan prediction: tiled inference, then vertebra and patient scores and the case outputs.

:func:`predict_volume` is the sliding-window core. It takes any callable ``predictor(hr, lr)`` that maps
a batch of HR segments ``(B, X, Y, Z, 1)`` and their LR context windows to probabilities
``(B, ox, oy, oz, C)`` (fully convolutional: ``o = X - rf + 1``), so it is tested with stand-in
callables as well as the Keras model.

Tiling (deviation from DeepMedic, on purpose). The volume is reflect-padded as in training
(:func:`vfdetect.geometry.pad_volume`'s indices), and each tile's LR context is cut with
:func:`vfdetect.geometry.extract_segments` exactly as for training segments. The LR grid's phase
follows the tile start (the LR output voxel ``j`` serves HR output voxels ``3j .. 3j + 2`` of its
tile), so DeepMedic's rule of shifting the last tile back to end at the volume's end changes the
prediction of that tile's voxels slightly with the tile size. Here every tile starts on a multiple
of the subsampling factor instead, and the last tile of an axis may run past the volume end: the
voxels beyond the padded volume take the LR fill value, which is exactly what the LR window reads
there anyway, and the outputs beyond the volume are dropped. Consequently the stitched map does not
depend on the tile size or the batch size (up to float rounding in the convolutions), and there
are no seams. Tile sizes are balanced per axis (``ceil(n / tiles)`` rounded up to the factor) so
little is computed beyond the volume.

Whole cases: :func:`load_predictor` loads the bundled default model (:mod:`vfdetect.models`), a run
folder (``model.keras`` and ``config.json`` with the ``variant`` and the ``spacing`` of the internal
frame) or a ``.keras`` file with its JSON configuration. :func:`predict_case` takes a NIfTI path, a
DICOM folder or an in-memory nibabel image, prepares it exactly as training did (internal frame,
z-score over the body mask, LR fill = corner mean), predicts inside the inference region, scores
the vertebrae (given centroids or :func:`vfdetect.aggregate.localise_vertebrae`) and the patient
(one rule: the highest vertebra score against the patient threshold), and writes the case folder;
:func:`predict_cases` runs a list of cases, skipping failures, and writes ``summary.csv``.

Inference region. Fractures only exist in vertebrae, so by default the network runs only where a
vertebra can be (:func:`inference_region`): boxes around given centroids (+-30 mm across, +-25 mm
along the spine, far more than the 10 mm scoring cube needs), or, without centroids, the vertebral
column found in bone by :func:`spine_region` and dilated by 25 mm. Only the output block is
restricted: every computed voxel still reads the real image around it, so inside the region the
map equals whole-volume inference exactly; outside it every voxel is background. A scan without
bone (a blank volume) has no spine region, no vertebrae and the warning "no spine found".
``PredictConfig(region="whole")`` gives whole-volume inference.
The network runs with BatchNorm folded into its convolutions (:func:`vfdetect.model.fold_batchnorm`),
in bfloat16 where the CPU computes it natively (:func:`resolve_precision`), else float32.

Memory: the padded volume is never materialised; each tile's window is gathered from the unpadded
image through per-axis reflect index maps, so the peak is the input, the (X, Y, Z, 3) float32 output
and the tiles in flight. The tile size is chosen from a memory budget (:func:`choose_tile_shape`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.geometry import NetworkGeometry, corner_mean, extract_segments, pad_volume

Predictor_fn = Callable[[np.ndarray, np.ndarray], Any]

GIB = 1024**3
DEFAULT_MEMORY_BUDGET_BYTES = 4 * GIB
DEFAULT_BATCH_SIZE = 1
DEFAULT_MAX_TILE_OUTPUT = 66
RUNTIME_OVERHEAD_BYTES = int(1.0 * GIB)
"""What the process needs besides the arrays (interpreter, TensorFlow, the model): about 1 GiB."""
ACTIVATION_BYTES_PER_HR_VOXEL = 700
"""Peak working memory per HR tile voxel in the network (fp32 3D model, measured, with headroom)."""
N_CLASSES = 3


# ----------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def tile_output_shape(
    volume_shape: Sequence[int], geometry: NetworkGeometry, max_output: Sequence[int]
) -> tuple[int, int, int]:
    """Per-axis tile output size: at most ``max_output`` (rounded down to the subsampling factor),
    balanced so the tiles of an axis cover it with the least spill past its end."""
    shape = []
    for size, limit, factor in zip(volume_shape, max_output, geometry.subsample_factor, strict=True):
        limit = (int(limit) // factor) * factor
        if limit < factor:
            raise VfdetectError(f"tile output {int(limit)} is smaller than the subsampling factor {factor}")
        tiles = math.ceil(int(size) / limit)
        shape.append(min(limit, _round_up(math.ceil(int(size) / tiles), factor)))
    return tuple(shape)  # type: ignore[return-value]


def tile_starts(volume_shape: Sequence[int], output_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Output-block starts (unpadded = padded HR start) of the tiles covering ``volume_shape``, x-major."""
    axes = [list(range(0, int(size), int(out))) for size, out in zip(volume_shape, output_shape, strict=True)]
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def choose_tile_shape(
    volume_shape: Sequence[int],
    geometry: NetworkGeometry,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    max_output: int = DEFAULT_MAX_TILE_OUTPUT,
    bytes_per_hr_voxel: int = ACTIVATION_BYTES_PER_HR_VOXEL,
    output_itemsize: int = 4,
) -> tuple[int, int, int]:
    """The largest HR tile shape (cubic output up to ``max_output``) whose batch fits the budget.

    Budget = input (float32) + output (3 channels of ``output_itemsize`` bytes) + runtime overhead + the batch of tiles
    in flight (``bytes_per_hr_voxel`` per HR voxel). Raises :class:`VfdetectError` when not even a
    small tile fits.
    """
    voxels = int(np.prod([int(v) for v in volume_shape]))
    fixed = voxels * (4 + output_itemsize * N_CLASSES) + RUNTIME_OVERHEAD_BYTES
    available = memory_budget_bytes - fixed
    factor = max(geometry.subsample_factor)
    for output in range((max_output // factor) * factor, factor - 1, -factor):
        out = tile_output_shape(volume_shape, geometry, (output,) * 3)
        hr = geometry.input_shape(out)
        if batch_size * int(np.prod(hr)) * bytes_per_hr_voxel <= available:
            return hr
    raise VfdetectError(
        f"a {tuple(volume_shape)} volume does not fit a memory budget of {memory_budget_bytes / GIB:.1f} GiB"
    )


def _reflect_index_maps(shape: Sequence[int], geometry: NetworkGeometry) -> list[np.ndarray]:
    """For each axis, the unpadded index of every padded index (the padding of :func:`pad_volume`)."""
    maps = []
    for axis, size in enumerate(shape):
        probe_shape = [1, 1, 1]
        probe_shape[axis] = int(size)
        probe = np.arange(int(size), dtype=np.int64).reshape(probe_shape)
        padded = pad_volume(probe, geometry)
        index = [0, 0, 0]
        index[axis] = slice(None)  # type: ignore[call-overload]
        maps.append(np.asarray(padded[tuple(index)], dtype=np.int64))
    return maps


def _gather_window(
    image: np.ndarray, index_maps: Sequence[np.ndarray], start: Sequence[int], shape: Sequence[int], fill_value: float
) -> np.ndarray:
    """The padded volume's block ``[start, start + shape)`` (padded coordinates), ``fill_value`` beyond it."""
    indices = []
    valid = []
    for axis in range(3):
        positions = np.arange(int(start[axis]), int(start[axis]) + int(shape[axis]))
        inside = (positions >= 0) & (positions < len(index_maps[axis]))
        indices.append(index_maps[axis][np.clip(positions, 0, len(index_maps[axis]) - 1)])
        valid.append(inside)
    window = image[np.ix_(*indices)].astype(np.float32, copy=False)
    if not all(v.all() for v in valid):
        window = np.array(window, dtype=np.float32, copy=True)
        window[~valid[0], :, :] = fill_value
        window[:, ~valid[1], :] = fill_value
        window[:, :, ~valid[2]] = fill_value
    return window


def _tile_inputs(
    image: np.ndarray,
    index_maps: Sequence[np.ndarray],
    start: Sequence[int],
    hr_shape: Sequence[int],
    geometry: NetworkGeometry,
    fill_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """HR tile and LR context for a tile starting at ``start`` (padded coordinates)."""
    lr_start = geometry.lr_start(start)
    lr_shape = geometry.lr_shape_for(hr_shape)
    lr_stop = [ls + (n - 1) * f + 1 for ls, n, f in zip(lr_start, lr_shape, geometry.subsample_factor, strict=True)]
    window_start = [min(s, ls) for s, ls in zip(start, lr_start, strict=True)]
    window_stop = [max(s + n, stop) for s, n, stop in zip(start, hr_shape, lr_stop, strict=True)]
    window_shape = [b - a for a, b in zip(window_start, window_stop, strict=True)]
    window = _gather_window(image, index_maps, window_start, window_shape, fill_value)
    local_start = [s - w for s, w in zip(start, window_start, strict=True)]
    return extract_segments(window, local_start, hr_shape, geometry, fill_value)


def _tiled_box(
    shape: Sequence[int], geometry: NetworkGeometry, mask: np.ndarray | None
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Start and size of the block to tile: the whole volume, or the mask's bounding box with its start
    rounded down to a multiple of the subsampling factor (so the LR phase, hence every value, is kept)."""
    if mask is None:
        return (0, 0, 0), tuple(int(n) for n in shape)  # type: ignore[return-value]
    if not mask.any():
        return (0, 0, 0), (0, 0, 0)
    start, stop = [], []
    for axis, factor in enumerate(geometry.subsample_factor):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start.append((int(present[0]) // factor) * factor)
        stop.append(int(present[-1]) + 1)
    return tuple(start), tuple(b - a for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class Tile:
    """One network call's output block: ``start`` (unpadded = padded HR start, multiples of the
    subsampling factor) and ``output_shape``; the HR tile is ``geometry.input_shape(output_shape)``."""

    start: tuple[int, int, int]
    output_shape: tuple[int, int, int]

    def voxels_inside(self, volume_shape: Sequence[int]) -> int:
        """Output voxels of this tile that lie inside the volume."""
        return int(np.prod([max(0, min(o, int(n) - s)) for s, o, n in zip(self.start, self.output_shape, volume_shape,
                                                                           strict=True)]))


def plan_tiles(
    volume_shape: Sequence[int], geometry: NetworkGeometry, max_output: Sequence[int], mask: np.ndarray | None = None
) -> list[Tile]:
    """The tiles :func:`predict_volume` computes, x-major.

    Without ``mask``: the volume cut into equal tiles of at most ``max_output`` (:func:`tile_output_shape`).
    With ``mask``: the mask's bounding box cut that way, tiles whose block holds no mask voxel dropped,
    and each remaining tile shrunk to the bounding box of its mask voxels (start rounded down to the
    subsampling factor, so every value stays that of whole-volume inference). Every mask voxel lies
    in exactly one tile's block.
    """
    shape = tuple(int(n) for n in volume_shape)
    origin, extent = _tiled_box(shape, geometry, mask)
    if min(extent) < 1:
        return []
    out_shape = tile_output_shape(extent, geometry, max_output)
    starts = [(x + origin[0], y + origin[1], z + origin[2]) for x, y, z in tile_starts(extent, out_shape)]
    if mask is None:
        return [Tile(start, out_shape) for start in starts]
    tiles = []
    factor = geometry.subsample_factor
    for start in starts:
        block = mask[tuple(slice(s, s + o) for s, o in zip(start, out_shape, strict=True))]
        if not block.any():
            continue
        new_start, new_shape = [], []
        for axis in range(3):
            present = np.flatnonzero(block.any(axis=tuple(a for a in range(3) if a != axis)))
            first = start[axis] + (int(present[0]) // factor[axis]) * factor[axis]
            new_start.append(first)
            new_shape.append(start[axis] + int(present[-1]) + 1 - first)
        tiles.append(Tile(tuple(new_start), tuple(new_shape)))  # type: ignore[arg-type]
    return tiles


def predict_volume(
    image: np.ndarray,
    predictor: Predictor_fn,
    geometry: NetworkGeometry,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mask: np.ndarray | None = None,
    fill_value: float | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    quiet: bool = True,
    dtype: Any = np.float32,
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Probabilities ``(X, Y, Z, C)`` (``dtype``, C = 3: background, normal, fracture) for a whole volume.

    ``image`` is the normalised scan in the internal frame ``[x, y, z]``. ``tile_shape`` is the HR
    input shape of a tile (its output, ``tile - rf + 1``, is rounded down to the subsampling factor
    and balanced per axis); by default the largest that fits ``memory_budget_bytes`` with
    ``batch_size`` tiles per call (:func:`choose_tile_shape`). ``fill_value`` (default: the mean of
    the 8 corner voxels, as in training) is what the LR context reads outside the padded volume.
    With ``mask`` (bool, same shape), only the mask's bounding box is tiled, tiles whose output block
    holds no mask voxel are skipped and the others are shrunk to their mask voxels' bounding box
    (:func:`plan_tiles`; starts stay on multiples of the subsampling factor, so the values do not
    change); every voxel no tile computed gets p(background) = 1; an empty mask computes nothing. A
    ``stats`` dict receives ``tiles``, ``tile_output_shape`` (the largest), ``computed_voxels``
    (output voxels inside the volume that a tile computed) and ``executed_hr_voxels``. ``dtype=np.float16`` halves the output's memory (probabilities to about
    1e-3). See the module docstring for why the result does not depend on tiling.
    """
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise VfdetectError(f"predict_volume needs a non-empty 3D volume, got shape {image.shape}")
    if batch_size < 1:
        raise VfdetectError("batch_size must be >= 1")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise VfdetectError(f"mask shape {mask.shape} differs from the volume shape {image.shape}")
    if fill_value is None:
        fill_value = corner_mean(image)
    dtype = np.dtype(dtype)
    if tile_shape is None:
        tile_shape = choose_tile_shape(image.shape, geometry, batch_size, memory_budget_bytes, output_itemsize=dtype.itemsize)
    limit = geometry.output_shape(tile_shape)
    tiles = plan_tiles(image.shape, geometry, limit, mask)
    index_maps = _reflect_index_maps(image.shape, geometry)
    if stats is not None:
        stats["tiles"] = len(tiles)
        stats["tile_output_shape"] = [int(n) for n in np.max([t.output_shape for t in tiles], axis=0)] if tiles else []
        stats["computed_voxels"] = int(sum(tile.voxels_inside(image.shape) for tile in tiles))
        stats["executed_hr_voxels"] = int(sum(np.prod(geometry.input_shape(tile.output_shape)) for tile in tiles))

    probabilities = np.zeros((*image.shape, N_CLASSES), dtype=dtype)
    probabilities[..., 0] = 1.0
    if not tiles:
        return probabilities
    from tqdm import tqdm

    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=quiet, leave=False) as bar:
        for first in range(0, len(tiles), batch_size):
            batch = tiles[first : first + batch_size]
            # One output shape per batch (the largest of its tiles; a larger block gives the same values),
            # and a fixed batch size (a compiled predictor then traces once): repeat the last tile.
            out_shape = tuple(int(n) for n in np.max([tile.output_shape for tile in batch], axis=0))
            hr_shape = geometry.input_shape(out_shape)
            padded = batch + [batch[-1]] * (batch_size - len(batch))
            hr_batch = np.empty((batch_size, *hr_shape, 1), dtype=np.float32)
            lr_batch = np.empty((batch_size, *geometry.lr_shape_for(hr_shape), 1), dtype=np.float32)
            for index, tile in enumerate(padded):
                hr, lr = _tile_inputs(image, index_maps, tile.start, hr_shape, geometry, float(fill_value))
                hr_batch[index, ..., 0] = hr
                lr_batch[index, ..., 0] = lr
            output = np.asarray(predictor(hr_batch, lr_batch))
            expected = (batch_size, *out_shape)
            if output.shape[:4] != expected or output.ndim != 5:
                raise VfdetectError(f"predictor returned shape {output.shape}, expected {expected} + (classes,)")
            if output.shape[4] != N_CLASSES:
                raise VfdetectError(f"predictor returned {output.shape[4]} classes, expected {N_CLASSES}")
            for index, tile in enumerate(batch):
                start = tile.start
                stop = [min(s + o, n) for s, o, n in zip(start, tile.output_shape, image.shape, strict=True)]
                block = output[index, : stop[0] - start[0], : stop[1] - start[1], : stop[2] - start[2]]
                probabilities[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = block
            bar.update(len(batch))
    return probabilities


# ----------------------------------------------------------------------------------------------
# The trained model
# ----------------------------------------------------------------------------------------------

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

    compiled = tf.function(call, jit_compile=False, reduce_retracing=True)

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


def resolve_model(model: str | Path | None = None, model_file: str = "model.keras") -> tuple[Path, Path, str | None]:
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
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError(config_path, "run folder has no config.json (not a training run?)")
        weights = path / model_file
        if not weights.is_file():
            raise InputError(weights, "trained model not found in the run folder")
        return weights, config_path, None
    if path.suffix == ".keras":
        if not path.is_file():
            raise InputError(path, "model file not found")
        for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
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
    model_file: str = "model.keras",
) -> Predictor:
    """Load a model and its configuration (everything inference needs).

    ``model``: None for the bundled default model (:mod:`vfdetect.models`; :class:`InputError` when
    this installation has none), a training run folder (``model_file`` and ``config.json``), or a
    ``.keras`` file whose configuration is the sibling ``<stem>.json`` or the ``config.json`` of its
    folder (see :func:`resolve_model`).
    """
    weights, config_path, name = resolve_model(model, model_file)
    config = _read_config(config_path, "model configuration")
    configure_threads(threads)
    from vfdetect.model import load_model

    network = load_model(weights)
    run_dir = weights.parent if config_path.name == "config.json" else None
    return Predictor(model=network, config=config, run_dir=run_dir, precision=precision, model_path=weights,
                     name=name or config.get("name"))


# ----------------------------------------------------------------------------------------------
# Where to run the network: the spine region
# ----------------------------------------------------------------------------------------------

REGION_MODES: tuple[str, ...] = ("spine", "whole")
"""``spine``: the network runs only where a vertebra can be (default); ``whole``: over the whole
volume (minus air tiles when ``PredictConfig.skip_air``)."""


@dataclass(frozen=True)
class SpineRegionConfig:
    """Parameters of the inference region (lengths in mm, on the internal frame).

    With centroids: a box of +-``box_across_mm`` (x, y) and +-``box_along_mm`` (z) around each.
    Without: :func:`spine_region` finds the vertebral column in bone (HU > ``bone_hu``) on a coarse
    grid of ``coarse_mm`` blocks (a block is bone when at least ``bone_fraction`` of it is, which
    also drops specks smaller than that), per axial slab of ``slab_mm``; see its docstring.
    """

    box_across_mm: float = 30.0
    box_along_mm: float = 25.0
    bone_hu: float = 200.0
    coarse_mm: float = 4.0
    bone_fraction: float = 0.1
    slab_mm: float = 20.0
    blob_sigma_mm: float = 8.0
    midline_sigma_mm: float = 40.0
    anterior_sigma_mm: float = 40.0
    min_column_density: float = 0.03
    max_jump_mm: float = 25.0
    reach_mm: float = 45.0
    margin_mm: float = 25.0

    def __post_init__(self) -> None:
        for name in ("box_across_mm", "box_along_mm", "coarse_mm", "slab_mm", "blob_sigma_mm", "midline_sigma_mm",
                     "anterior_sigma_mm", "max_jump_mm", "reach_mm"):
            if not getattr(self, name) > 0:
                raise VfdetectError(f"spine region {name} must be positive")
        if self.margin_mm < 0 or not 0.0 < self.bone_fraction <= 1.0 or self.min_column_density < 0:
            raise VfdetectError("spine region margin must be >= 0, bone_fraction in (0, 1], min_column_density >= 0")


def centroid_region(
    shape: Sequence[int], affine: np.ndarray, centres_mm: Sequence[Sequence[float]],
    across_mm: float = 30.0, along_mm: float = 25.0,
) -> np.ndarray:
    """Union of boxes of +-``across_mm`` (x, y) and +-``along_mm`` (z, world axes) around each centre,
    on a grid with an axis-aligned ``affine`` (the internal frame); parts outside the grid are dropped."""
    region = np.zeros(tuple(int(n) for n in shape), dtype=bool)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    half = np.array([across_mm, across_mm, along_mm], dtype=np.float64)
    for centre in centres_mm:
        corners = np.array([np.asarray(centre, dtype=np.float64) + sign * half for sign in (-1.0, 1.0)])
        voxels = corners @ inverse[:3, :3].T + inverse[:3, 3]
        low = np.clip(np.floor(voxels.min(axis=0)).astype(int), 0, region.shape)
        high = np.clip(np.ceil(voxels.max(axis=0)).astype(int) + 1, 0, region.shape)
        region[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = True
    return region


def _block_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    """Fraction of True voxels in each ``factor``-cube block (the last blocks padded with False)."""
    if factor == 1:
        return mask.astype(np.float32)
    padded_shape = [_round_up(n, factor) for n in mask.shape]
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    blocks = padded.reshape(padded_shape[0] // factor, factor, padded_shape[1] // factor, factor,
                            padded_shape[2] // factor, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _column_track(
    bone: np.ndarray, body: np.ndarray, slab: int, coarse_mm: float, config: SpineRegionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Per slab of ``slab`` coarse slices: the (x, y) of the vertebral column (coarse voxels) and
    whether bone was found there. Slabs without enough bone between found ones are interpolated,
    and picks jumping more than ``max_jump_mm`` from the running median are replaced by it."""
    from scipy import ndimage

    nx, ny, nz = bone.shape
    x_axis = np.arange(nx, dtype=np.float64)[:, None]
    y_axis = np.arange(ny, dtype=np.float64)[None, :]
    starts = list(range(0, nz, slab))
    picks = np.zeros((len(starts), 2))
    found = np.zeros(len(starts), dtype=bool)
    for index, z0 in enumerate(starts):
        density = ndimage.gaussian_filter(bone[:, :, z0 : z0 + slab].mean(axis=2), config.blob_sigma_mm / coarse_mm)
        inside = body[:, :, z0 : z0 + slab].any(axis=2)
        centre_x, centre_y = (np.argwhere(inside).mean(axis=0) if inside.any() else ((nx - 1) / 2, (ny - 1) / 2))
        # Midline, and behind the body's centre (internal frame: +y is anterior).
        midline = np.exp(-(((x_axis - centre_x) * coarse_mm) ** 2) / (2 * config.midline_sigma_mm**2))
        in_front = np.maximum(0.0, (y_axis - centre_y) * coarse_mm)
        posterior = np.exp(-(in_front**2) / (2 * config.anterior_sigma_mm**2))
        best = np.unravel_index(int(np.argmax(density * midline * posterior)), density.shape)
        picks[index] = best
        found[index] = density[best] >= config.min_column_density
    if not found.any():
        return picks, found
    valid = np.flatnonzero(found)
    span = np.arange(valid[0], valid[-1] + 1)
    for axis in range(2):
        picks[span, axis] = np.interp(span, valid, picks[valid, axis])
    found[span] = True
    median = np.stack([ndimage.median_filter(picks[span, axis], size=5, mode="mirror") for axis in range(2)], axis=1)
    jumps = np.linalg.norm(picks[span] - median, axis=1) * coarse_mm > config.max_jump_mm
    picks[span[jumps]] = median[jumps]
    return picks, found


def spine_region(
    hu: np.ndarray, spacing: float, body: np.ndarray | None = None, config: SpineRegionConfig = SpineRegionConfig()
) -> np.ndarray:
    """Where a vertebra can be in a scan on the internal frame (``[x, y, z]`` RAS, isotropic
    ``spacing`` mm); an all-False mask when no spine is found (no bone, e.g. a blank volume).

    Steps, on a coarse grid of about ``coarse_mm`` blocks: bone = blocks with at least
    ``bone_fraction`` of voxels above ``bone_hu`` (drops specks: a small opening); for each axial
    slab of ``slab_mm``, the bone density of the slab smoothed by ``blob_sigma_mm`` (a vertebra is
    the largest compact bone cross-section), weighted by a Gaussian of the distance to the body's
    mid-line (``midline_sigma_mm``) and one of the distance in front of the body's centre
    (``anterior_sigma_mm``; the column lies behind it), and its maximum is the column's track point
    (kept when the density there reaches ``min_column_density``). The track is interpolated over
    slabs without bone between slabs with bone and cleaned of jumps; the slab's bone within
    ``reach_mm`` of the track point (body, arch and processes) is the core, which is dilated by
    ``margin_mm`` in 3D (plus one coarse block for the grid's coarseness).
    """
    from scipy import ndimage

    hu = np.asarray(hu)
    factor = max(1, int(round(config.coarse_mm / spacing)))
    coarse_mm = factor * float(spacing)
    bone = _block_mean(hu > config.bone_hu, factor) >= config.bone_fraction
    region = np.zeros(hu.shape, dtype=bool)
    if not bone.any():
        return region
    body_coarse = bone if body is None else _block_mean(np.asarray(body, dtype=bool), factor) >= 0.5
    slab = max(1, int(round(config.slab_mm / coarse_mm)))
    picks, found = _column_track(bone.astype(np.float32), body_coarse, slab, coarse_mm, config)
    if not found.any():
        return region
    core = np.zeros(bone.shape, dtype=bool)
    xs = np.arange(bone.shape[0])[:, None]
    ys = np.arange(bone.shape[1])[None, :]
    reach = config.reach_mm / coarse_mm
    for index in np.flatnonzero(found):
        z0 = index * slab
        distance = np.hypot(xs - picks[index, 0], ys - picks[index, 1])
        slab_bone = bone[:, :, z0 : z0 + slab].any(axis=2) & (distance <= reach)
        slab_bone |= distance <= max(1.0, 8.0 / coarse_mm)
        core[:, :, z0 : z0 + slab] |= slab_bone[:, :, None]
    near = ndimage.distance_transform_edt(~core, sampling=coarse_mm) <= config.margin_mm + coarse_mm
    for axis in range(3):
        near = np.repeat(near, factor, axis=axis)
    region[...] = near[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return region


@dataclass(frozen=True)
class InferenceRegion:
    """Where :func:`predict_case` runs the network: ``mask`` (None: everywhere) and whether values
    outside it are forced to background (``restrict``), with a description for the report."""

    mode: str
    source: str
    mask: np.ndarray | None
    restrict: bool

    def describe(self, computed_voxels: int, total_voxels: int) -> dict[str, Any]:
        inside = total_voxels if self.mask is None else int(np.count_nonzero(self.mask))
        return {
            "mode": self.mode,
            "source": self.source,
            "region_fraction": round(inside / max(total_voxels, 1), 4),
            "computed_fraction": round(computed_voxels / max(total_voxels, 1), 4),
        }


def inference_region(
    mode: str,
    hu: np.ndarray,
    affine: np.ndarray,
    body: np.ndarray,
    centres_mm: Sequence[Sequence[float]] | None,
    skip_air: bool = True,
    config: SpineRegionConfig = SpineRegionConfig(),
) -> InferenceRegion:
    """The region for ``mode`` (:data:`REGION_MODES`): ``whole`` = the body's tiles (``skip_air``) or
    everything; ``spine`` = boxes around the given centres, or :func:`spine_region` (within the body
    mask when there is one) without them."""
    if mode not in REGION_MODES:
        raise VfdetectError(f"unknown region {mode!r}; choose one of {', '.join(REGION_MODES)}")
    if mode == "whole":
        use_body = skip_air and bool(body.any())
        return InferenceRegion("whole", "body" if use_body else "volume", body if use_body else None, restrict=False)
    if centres_mm is not None:
        mask = centroid_region(hu.shape, affine, centres_mm, config.box_across_mm, config.box_along_mm)
        return InferenceRegion("spine", "centroids", mask, restrict=True)
    spacing = float(np.sqrt(np.sum(np.asarray(affine)[:3, 0] ** 2)))
    mask = spine_region(hu, spacing, body, config)
    if body.any():
        mask &= body  # vertebrae lie inside the body: no need to compute the air around a cropped scan
    return InferenceRegion("spine", "bone", mask, restrict=True)


# ----------------------------------------------------------------------------------------------
# One case, many cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictConfig:
    """Settings of :func:`predict_case` (scores, thresholds, region, tiling, outputs).

    ``patient_threshold``: the patient is called "fracture" when its score (the highest vertebra
    score) reaches it; None takes the model's own (``patient_threshold`` in its configuration), else
    0.5 (:data:`vfdetect.aggregate.DEFAULT_PATIENT_THRESHOLD`). ``probability_threshold`` and
    ``component_thresholds`` only set where the report's secondary connected-component sizes are
    measured. ``region``: ``"spine"`` (default) runs the network only where a vertebra can be
    (:func:`inference_region`, tuned by ``spine_region``), ``"whole"`` over the whole volume
    (skipping air tiles with ``skip_air``). ``map_dtype`` is the dtype of the internal probability
    map (float16 halves its memory; the files store probabilities in steps of 1/255 anyway).
    ``memory_budget_bytes`` covers the map, the normalised scan, the body mask and the overlay's
    copy of the scan.
    """

    cube_edge_mm: float = 10.0
    sigma_mm: float | None = 5.0
    vertebra_threshold: float = 0.5
    patient_threshold: float | None = None
    probability_threshold: float = 0.5
    component_thresholds: tuple[float, ...] = ()
    anchor_level: str | None = None
    region: str = "spine"
    spine_region: SpineRegionConfig = SpineRegionConfig()
    tile_shape: tuple[int, int, int] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    skip_air: bool = True
    write_overlay: bool = True
    keep_maps: bool = False
    map_dtype: str = "float16"

    def __post_init__(self) -> None:
        from vfdetect.aggregate import COMPONENT_THRESHOLDS

        if not self.component_thresholds:
            object.__setattr__(self, "component_thresholds", COMPONENT_THRESHOLDS)
        if isinstance(self.spine_region, Mapping):
            object.__setattr__(self, "spine_region", SpineRegionConfig(**self.spine_region))
        if not 0.0 < self.probability_threshold <= 1.0:
            raise VfdetectError("the probability threshold must lie in (0, 1]")
        if self.patient_threshold is not None and not 0.0 < self.patient_threshold <= 1.0:
            raise VfdetectError("the patient threshold must lie in (0, 1]")
        if self.region not in REGION_MODES:
            raise VfdetectError(f"unknown region {self.region!r}; choose one of {', '.join(REGION_MODES)}")
        if self.cube_edge_mm <= 0:
            raise VfdetectError("the cube edge must be positive")
        if self.batch_size < 1:
            raise VfdetectError("batch_size must be >= 1")

    def resolved_patient_threshold(self, predictor: Predictor | None = None) -> float:
        """This config's patient threshold, else the model's, else the default 0.5."""
        from vfdetect.aggregate import DEFAULT_PATIENT_THRESHOLD

        if self.patient_threshold is not None:
            return float(self.patient_threshold)
        if predictor is not None and predictor.patient_threshold is not None:
            return predictor.patient_threshold
        return DEFAULT_PATIENT_THRESHOLD

    def thresholds(self, patient_threshold: float | None = None) -> dict[str, Any]:
        return {
            "vertebra": self.vertebra_threshold,
            "patient": self.patient_threshold if patient_threshold is None else patient_threshold,
            "component_probability": self.probability_threshold,
            "cube_edge_mm": self.cube_edge_mm,
            "sigma_mm": self.sigma_mm,
        }


NO_SPINE_WARNING = "no spine found: no vertebra given or localised, so there is no patient score or decision"


@dataclass
class CaseResult:
    """What :func:`predict_case` found for one scan.

    ``vertebrae``: one dict per vertebra (see :mod:`vfdetect.report`); ``patient_score``: the
    highest vertebra score (NaN without vertebrae); ``patient_fracture``: ``patient_score >=
    patient_threshold`` (None without vertebrae); ``report``: the report.json content; ``paths``:
    output name -> file (empty without an output folder); with ``PredictConfig(keep_maps=True)``,
    ``probabilities`` holds the internal-frame (X, Y, Z, 3) map (a :class:`vfdetect.volume.Volume`).
    """

    case: str
    vertebrae: list[dict[str, Any]]
    patient_score: float
    patient_fracture: bool | None
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    probabilities: Any = None
    patient_threshold: float = 0.5
    warnings: list[str] = field(default_factory=list)


def _case_name(image: Any, case: str | None) -> str:
    if case:
        return str(case)
    if isinstance(image, (str, Path)):
        name = Path(image).name
        for suffix in (".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        for suffix in ("_ct",):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return name or "case"
    return "case"


def _resolve_vertebrae(
    centroids: Any, scan: Any, grades: Mapping[int, int] | None, label_scheme: str
) -> list[Any] | None:
    from vfdetect.vertebrae import Vertebra, attach_grades, load_centroids

    if centroids is None:
        return None
    if isinstance(centroids, (str, Path)):
        vertebrae = load_centroids(centroids, scan.affine, scan.shape, label_scheme)
    else:
        vertebrae = list(centroids)
        if not all(isinstance(v, Vertebra) for v in vertebrae):
            raise VfdetectError("centroids must be a file (JSON or mask) or a list of Vertebra")
    if grades:
        vertebrae = attach_grades(vertebrae, grades)
    return vertebrae


def _score_case(
    probabilities: np.ndarray,
    affine: np.ndarray,
    grid: Any,
    given: list[Any] | None,
    config: PredictConfig,
    patient_threshold: float,
) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    """Vertebrae (given or localised), their report entries, and the patient part of the report."""
    from vfdetect import aggregate
    from vfdetect.volume import Volume, world_to_voxel

    fracture = Volume(probabilities[..., 2], affine)
    if given is None:
        vertebra_map = Volume(probabilities[..., 1] + probabilities[..., 2], affine)
        vertebrae = aggregate.localise_vertebrae(vertebra_map, anchor_level=config.anchor_level)
        source = "localised"
    else:
        vertebrae, source = given, "given"
    raw = aggregate.vertebra_scores(
        fracture, vertebrae, cube_edge_mm=config.cube_edge_mm, sigma_mm=config.sigma_mm,
        normal_probability=Volume(probabilities[..., 1], affine), vertebra_threshold=config.vertebra_threshold,
    )
    scores = []
    for vertebra, entry in zip(vertebrae, raw, strict=True):
        voxel = world_to_voxel(grid.affine, np.asarray(vertebra.position_mm))
        scores.append({
            "label": entry["label"],
            "name": entry["name"],
            "centroid_voxel": [round(float(v), 2) for v in voxel],
            "centroid_mm": [round(float(v), 2) for v in entry["centroid_mm"]],
            "fracture_probability": entry["fracture_probability"],
            "normal_probability": entry["normal_probability"],
            "predicted": entry["predicted"],
            "source": source,
            "grade": vertebra.grade,
        })
    component_thresholds = list(config.component_thresholds)
    largest = aggregate.largest_components(fracture, component_thresholds + [config.probability_threshold])
    score = aggregate.patient_score(scores)
    patient = {
        "patient_score": score,
        "patient_fracture": aggregate.patient_decision(score, patient_threshold),
        "patient_threshold": patient_threshold,
        "patient_rule": aggregate.patient_rule(patient_threshold),
        "largest_component_mm3": largest.pop(),
        "component_sizes": {"probability_thresholds": component_thresholds, "largest_component_mm3": largest},
    }
    return vertebrae, scores, patient


def _write_case(
    case_dir: Path,
    report: dict[str, Any],
    probabilities: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    grid: Any,
    vertebrae: Sequence[Any],
    overlay_hu: np.ndarray | None,
) -> dict[str, Path]:
    """Maps on the input grid, the overlay and report.csv (report.json is written by the caller)."""
    from vfdetect.report import render_overlay, write_report_csv
    from vfdetect.volume import save_on_grid, to_source, world_to_voxel

    case_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    vertebra_map = probabilities[..., 1] + probabilities[..., 2]
    stacked = np.stack([probabilities[..., 2], vertebra_map], axis=-1)
    on_grid = to_source(stacked, affine, grid, order=1)
    del stacked
    paths["probabilities"] = case_dir / "probabilities.nii.gz"
    save_on_grid(np.clip(on_grid, 0.0, 1.0), grid, paths["probabilities"], scale=1.0 / 255.0)
    del on_grid
    labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    paths["labels"] = case_dir / "labels.nii.gz"
    save_on_grid(to_source(labels, affine, grid, order=0).astype(np.uint8), grid, paths["labels"], dtype=np.uint8)
    del labels
    if overlay_hu is not None:
        paths["overlay"] = case_dir / "overlay.png"
        centres = np.array(
            [world_to_voxel(affine, np.asarray(v.position_mm)) for v in vertebrae], dtype=np.float64
        ).reshape(-1, 3)
        render_overlay(
            paths["overlay"], overlay_hu, probabilities[..., 2], spacing, report["vertebrae"], centres,
            f"{report['case']}: {patient_summary(report)}", vertebra_probability=vertebra_map,
        )
    paths["report_csv"] = case_dir / "report.csv"
    write_report_csv(paths["report_csv"], report)
    return paths


def patient_summary(report: Mapping[str, Any]) -> str:
    """One line with the patient verdict, its score against the threshold, and the vertebra count."""
    score = report.get("patient_score")
    threshold = float(report.get("patient_threshold", 0.5))
    count = len(report.get("vertebrae", []))
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return f"no spine found (no patient score); {count} vertebrae"
    verdict = "fracture" if float(score) >= threshold else "no fracture"
    return f"{verdict} (score {float(score):.3f} {'>=' if verdict == 'fracture' else '<'} {threshold:g}); {count} vertebrae"


def predict_case(
    predictor: Predictor,
    image: str | Path | Any,
    centroids: str | Path | Sequence[Any] | None = None,
    case: str | None = None,
    out_dir: str | Path | None = None,
    config: PredictConfig = PredictConfig(),
    quiet: bool = True,
    grades: Mapping[int, int] | None = None,
    label_scheme: str = "verse",
) -> CaseResult:
    """Predict one scan (NIfTI path, DICOM folder or in-memory nibabel image) and score it.

    Centroids come from a VerSe JSON or a vertebra mask (``centroids`` path), a list of
    :class:`vfdetect.vertebrae.Vertebra` (world mm, grades kept in the report; ``grades`` by label
    are attached when given; ``label_scheme`` is the numbering of a mask), or, when None, are
    localised from the probability map (:func:`vfdetect.aggregate.localise_vertebrae`, named from
    ``config.anchor_level`` if given). The network runs over ``config.region`` (see
    :func:`inference_region`); outside the spine region every voxel is background. The patient
    score is the highest vertebra score and the patient is "fracture" when it reaches the patient
    threshold (:meth:`PredictConfig.resolved_patient_threshold`); with no vertebra the score is NaN,
    the decision None, and the report carries the warning "no spine found".

    With ``out_dir``, writes ``out_dir/<case>/``: ``probabilities.nii.gz`` (input grid; uint8
    scaled 1/255; channel 0 p(fracture), channel 1 p(normal) + p(fracture)), ``labels.nii.gz``
    (argmax 0/1/2), ``report.json``, ``report.csv`` and ``overlay.png``, each atomically
    (report.json last).
    """
    from vfdetect import __version__
    from vfdetect.report import write_report_json
    from vfdetect.volume import Volume, body_mask, load_scan, normalise, to_internal

    timings: dict[str, float] = {}
    started = time.perf_counter()
    name = _case_name(image, case)
    scan, grid = load_scan(image)
    given = _resolve_vertebrae(centroids, scan, grades, label_scheme)
    internal = to_internal(scan, spacing=predictor.spacing, order=1)
    affine, spacing = internal.affine, tuple(float(v) for v in internal.spacing)
    del scan
    hu = np.asarray(internal.array, dtype=np.float32)
    del internal
    mask = body_mask(hu)
    normalised = normalise(hu, mask)
    timings["load_s"] = time.perf_counter() - started

    tick = time.perf_counter()
    region = inference_region(
        config.region, hu, affine, mask, None if given is None else [v.position_mm for v in given],
        skip_air=config.skip_air, config=config.spine_region,
    )
    timings["region_s"] = time.perf_counter() - tick
    overlay_hu = None
    if config.write_overlay and out_dir is not None:
        overlay_hu = np.clip(hu, -1024, 3071).astype(np.int16)
    del hu, mask
    held = (0 if region.mask is None else region.mask.nbytes) + (0 if overlay_hu is None else overlay_hu.nbytes)

    tick = time.perf_counter()
    stats: dict[str, Any] = {}
    probabilities = predict_volume(
        normalised, predictor.fn, predictor.geometry,  # type: ignore[arg-type]
        tile_shape=config.tile_shape, batch_size=config.batch_size, mask=region.mask,
        memory_budget_bytes=config.memory_budget_bytes - held, quiet=quiet, dtype=config.map_dtype, stats=stats,
    )
    if region.restrict and region.mask is not None:
        outside = ~region.mask
        for channel, value in enumerate((1.0, 0.0, 0.0)):
            probabilities[..., channel][outside] = value
        del outside
    del normalised
    timings["inference_s"] = time.perf_counter() - tick
    region_info = region.describe(stats["computed_voxels"], int(np.prod(probabilities.shape[:3])))
    region_info["tiles"] = stats["tiles"]
    del region

    tick = time.perf_counter()
    threshold = config.resolved_patient_threshold(predictor)
    vertebrae, scores, patient = _score_case(probabilities, affine, grid, given, config, threshold)
    warnings = [] if scores and not math.isnan(patient["patient_score"]) else [NO_SPINE_WARNING]
    timings["aggregation_s"] = time.perf_counter() - tick

    report: dict[str, Any] = {
        "case": name,
        **{key: patient[key] for key in ("patient_score", "patient_fracture", "patient_threshold", "patient_rule")},
        "thresholds": config.thresholds(threshold),
        "vertebrae": scores,
        "largest_component_mm3": patient["largest_component_mm3"],
        "component_sizes": patient["component_sizes"],
        "region": region_info,
        "warnings": warnings,
        "input": grid.source,
        "model": predictor.describe(),
        "version": __version__,
        "timings": timings,
    }
    paths: dict[str, Path] = {}
    if out_dir is not None:
        tick = time.perf_counter()
        case_dir = Path(out_dir) / name
        paths = _write_case(case_dir, report, probabilities, affine, spacing, grid, vertebrae, overlay_hu)
        timings["writing_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        paths["report"] = case_dir / "report.json"
        write_report_json(paths["report"], report)
    else:
        timings["total_s"] = time.perf_counter() - started

    return CaseResult(
        case=name,
        vertebrae=scores,
        patient_score=patient["patient_score"],
        patient_fracture=patient["patient_fracture"],
        report=report,
        paths=paths,
        probabilities=Volume(probabilities, affine) if config.keep_maps else None,
        patient_threshold=threshold,
        warnings=warnings,
    )


@dataclass
class CaseFailure:
    """A case that could not be predicted, and why."""

    case: str
    error: str


def predict_cases(
    run_dir: str | Path | Predictor | None,
    cases: Sequence[Any],
    out_dir: str | Path,
    config: PredictConfig = PredictConfig(),
    quiet: bool = False,
    failures: list[CaseFailure] | None = None,
    precision: str = "auto",
) -> list[CaseResult]:
    """Predict many cases (:class:`vfdetect.vertebrae.Case`, or paths / nibabel images) into ``out_dir``
    with ``run_dir``: a :class:`Predictor`, or anything :func:`load_predictor` takes (None: the bundled model).

    With ``failures`` (a list), a case that raises is recorded there and skipped and the others go
    on; without it the first error propagates. Writes
    ``out_dir/summary.csv`` (one row per vertebra over the successful cases) at the end.
    Manifest cases use their centroids file when they have one (grades go into the reports).
    """
    from tqdm import tqdm

    from vfdetect.report import write_summary_csv
    from vfdetect.vertebrae import Case

    predictor = run_dir if isinstance(run_dir, Predictor) else load_predictor(run_dir, precision=precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for item in tqdm(cases, desc="cases", unit="case", disable=quiet):
        if isinstance(item, Case):
            name, image = item.case, item.image
        else:
            name, image = _case_name(item, None), item
        try:
            if isinstance(item, Case):
                result = predict_case(
                    predictor, image, item.centroids, case=name, out_dir=out_dir, config=config,
                    grades=item.grades, label_scheme=item.label_scheme, quiet=quiet,
                )
            else:
                result = predict_case(predictor, image, None, case=name, out_dir=out_dir, config=config, quiet=quiet)
            results.append(result)
        except Exception as error:  # one bad scan must not stop a batch; the caller gets the reason
            if failures is None:
                raise
            message = str(error) if isinstance(error, VfdetectError) else f"{type(error).__name__}: {error}"
            failures.append(CaseFailure(name, message))
    write_summary_csv(out_dir / "summary.csv", [result.report for result in results])
    return results
