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
``precision="bfloat16"`` runs :func:`fold_model`'s copy with BatchNorm folded into the convolutions.

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
    With ``mask`` (bool, same shape), only the mask's bounding box is tiled (tiles start on multiples
    of the subsampling factor, so the values do not change), tiles whose output block holds no mask
    voxel are skipped, and every voxel no tile computed gets p(background) = 1; an empty mask computes
    nothing. A ``stats`` dict receives ``tiles``, ``tile_output_shape`` and ``computed_voxels``
    (output voxels inside the volume that a tile computed). ``dtype=np.float16`` halves the output's memory (probabilities to about
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
    origin, extent = _tiled_box(image.shape, geometry, mask)
    out_shape = tile_output_shape(extent if min(extent) > 0 else image.shape, geometry, limit)
    hr_shape = geometry.input_shape(out_shape)
    index_maps = _reflect_index_maps(image.shape, geometry)
    starts = [
        (x + origin[0], y + origin[1], z + origin[2]) for x, y, z in tile_starts(extent, out_shape)
    ] if min(extent) > 0 else []
    if mask is not None:
        starts = [
            s for s in starts if mask[s[0] : s[0] + out_shape[0], s[1] : s[1] + out_shape[1], s[2] : s[2] + out_shape[2]].any()
        ]
    if stats is not None:
        stats["tiles"] = len(starts)
        stats["tile_output_shape"] = list(out_shape)
        stats["computed_voxels"] = int(sum(
            np.prod([min(o, n - s) for s, o, n in zip(start, out_shape, image.shape, strict=True)]) for start in starts
        ))

    probabilities = np.zeros((*image.shape, N_CLASSES), dtype=dtype)
    probabilities[..., 0] = 1.0
    if not starts:
        return probabilities
    from tqdm import tqdm

    with tqdm(total=len(starts), desc="tiles", unit="tile", disable=quiet, leave=False) as bar:
        for first in range(0, len(starts), batch_size):
            batch_starts = starts[first : first + batch_size]
            # Keep the batch shape fixed (a compiled predictor then traces once): repeat the last tile.
            padded_starts = batch_starts + [batch_starts[-1]] * (batch_size - len(batch_starts))
            hr_batch = np.empty((batch_size, *hr_shape, 1), dtype=np.float32)
            lr_batch = np.empty((batch_size, *geometry.lr_shape_for(hr_shape), 1), dtype=np.float32)
            for index, start in enumerate(padded_starts):
                hr, lr = _tile_inputs(image, index_maps, start, hr_shape, geometry, float(fill_value))
                hr_batch[index, ..., 0] = hr
                lr_batch[index, ..., 0] = lr
            output = np.asarray(predictor(hr_batch, lr_batch))
            expected = (batch_size, *out_shape)
            if output.shape[:4] != expected or output.ndim != 5:
                raise VfdetectError(f"predictor returned shape {output.shape}, expected {expected} + (classes,)")
            if output.shape[4] != N_CLASSES:
                raise VfdetectError(f"predictor returned {output.shape[4]} classes, expected {N_CLASSES}")
            for index, start in enumerate(batch_starts):
                stop = [min(s + o, n) for s, o, n in zip(start, out_shape, image.shape, strict=True)]
                block = output[index, : stop[0] - start[0], : stop[1] - start[1], : stop[2] - start[2]]
                probabilities[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = block
            bar.update(len(batch_starts))
    return probabilities


# ----------------------------------------------------------------------------------------------
# The trained model
# ----------------------------------------------------------------------------------------------

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
"""Inference precisions: the model as trained, or a bf16 copy with BatchNorm folded into the convolutions."""


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


def keras_predictor(model: Any, precision: str = "float32") -> Predictor_fn:
    """A ``predictor(hr, lr) -> probabilities`` callable around a Keras model (graph mode, no XLA).

    ``precision="bfloat16"`` runs the folded bf16 copy of :func:`fold_model`.
    """
    import tensorflow as tf

    if precision not in PRECISIONS:
        raise VfdetectError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16":
        call = fold_model(model, compute_dtype="bfloat16")
    else:

        def call(hr: Any, lr: Any) -> Any:
            return model([hr, lr], training=False)

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
    precision: str = "float32"
    fn: Predictor_fn | None = field(default=None, repr=False)
    model_path: Path | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.fn is None:
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
    precision: str = "float32",
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
    precision: str = "float32",
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


# ----------------------------------------------------------------------------------------------
# Folded inference copy (BatchNorm folded into the convolutions, optional bf16)
# ----------------------------------------------------------------------------------------------


def _batchnorm_affine(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BatchNorm as ``x * scale + shift`` (float64)."""
    weights = {w.path.split("/")[-1]: np.asarray(w.numpy(), dtype=np.float64) for w in layer.weights}
    gamma = weights.get("gamma", 1.0)
    beta = weights.get("beta", 0.0)
    scale = gamma / np.sqrt(weights["moving_variance"] + float(layer.epsilon))
    return scale, beta - weights["moving_mean"] * scale


def fold_model(model: Any, compute_dtype: str = "bfloat16") -> Callable[[Any, Any], Any]:
    """An inference-only function ``(hr, lr) -> probabilities`` equivalent to ``model(..., training=False)``.

    The blocks are pre-activation (BN -> PReLU -> conv), so a BatchNorm cannot be folded into the
    convolution *after* it (the PReLU sits between them); but the tensor a BatchNorm normalises is
    the output of the previous convolution, and conv followed by an affine per-channel map is again a
    convolution with a bias. So each BN is folded into the *preceding* conv (kernel times scale, bias
    = shift), wherever that conv's raw output is not needed elsewhere. Raw outputs that feed a
    residual connection (pathway layers 2, 4, 6; the concatenated features for FC 2), and outputs
    that receive a residual (layers 4, 6, 8, FC 2), keep an explicit scale-and-shift after the add.
    The learned input bias of each pathway's first block is folded into its conv as a constant bias
    (exact for valid convolutions). The subsampled pathway's last BN (part of the concatenated
    features' BN) commutes with the upsampling by repetition. Dropout is the identity at inference.
    Convolutions run in ``compute_dtype`` (``"bfloat16"`` or ``"float32"``) with float32 weights
    folded in float64 first; the class bias and softmax run in float32.
    """
    import tensorflow as tf

    from vfdetect.model import geometry_of

    config = model.deepmedic_config
    dtype = tf.dtypes.as_dtype(compute_dtype)
    depth = len(config.kernels)
    residual = set(config.residual_layers)
    needed_raw = {layer - 2 for layer in residual}

    def layer(name: str) -> Any:
        return model.get_layer(name)

    def kernel(name: str) -> np.ndarray:
        return np.asarray(layer(name).kernel.numpy(), dtype=np.float64)

    def alpha(name: str) -> np.ndarray:
        return np.asarray(layer(name).alpha.numpy(), dtype=np.float64).reshape(-1)

    fc_scale, fc_shift = _batchnorm_affine(layer("fc_1_bn"))
    fc_needed_raw = {n - 2 for n in config.fc_residual_layers}
    normal_width = config.widths[-1]

    def pathway_plan(name: str, feature_slice: slice) -> list[dict[str, Any]]:
        plan = []
        for number in range(1, depth + 1):
            weights = kernel(f"{name}_{number}_conv")
            bias = np.zeros(weights.shape[-1])
            if number == 1 and config.input_bias:
                input_bias = float(np.asarray(layer(f"{name}_1_input_bias").bias.numpy()).reshape(-1)[0])
                bias = bias + input_bias * weights.sum(axis=(0, 1, 2, 3))
            if number < depth:
                scale, shift = _batchnorm_affine(layer(f"{name}_{number + 1}_bn"))
            else:
                scale, shift = fc_scale[feature_slice], fc_shift[feature_slice]
            step: dict[str, Any] = {"number": number, "residual": number in residual}
            fold = number not in residual and number not in needed_raw
            if number == depth and 0 in fc_needed_raw:
                fold = False  # the raw features feed an FC residual
            if fold:
                step["kernel"] = weights * scale
                step["bias"] = bias * scale + shift
                step["scale"] = None
            else:
                step["kernel"] = weights
                step["bias"] = bias if np.any(bias) else None
                step["scale"], step["shift"] = scale, shift
            if number in residual:
                kernels = config.kernels[number - 2 : number]
                crop = []
                for axis in range(3):
                    total = sum(k[axis] - 1 for k in kernels)
                    crop.append((total // 2, total - total // 2))
                step["crop"] = crop
            if number < depth:
                step["alpha"] = alpha(f"{name}_{number + 1}_prelu")
            plan.append(step)
        return plan

    normal_plan = pathway_plan("normal", slice(0, normal_width))
    subsampled_plan = pathway_plan("subsampled", slice(normal_width, None))
    fc_alpha = alpha("fc_1_prelu")
    fc_plan = []
    fc_widths = (*config.fc_widths, config.num_classes)
    names = [f"fc_{n}" for n in range(1, len(config.fc_widths) + 1)] + ["classifier"]
    fc_residual = set(config.fc_residual_layers)
    for index, name in enumerate(names):
        number = index + 1
        weights = kernel(f"{name}_conv")
        step: dict[str, Any] = {"number": number, "residual": number in fc_residual, "scale": None, "bias": None}
        if number < len(fc_widths):
            scale, shift = _batchnorm_affine(layer(f"{names[index + 1]}_bn"))
            step["alpha"] = alpha(f"{names[index + 1]}_prelu")
            if number not in fc_residual and number not in fc_needed_raw:
                weights, step["bias"] = weights * scale, shift
            else:
                step["scale"], step["shift"] = scale, shift
        step["kernel"] = weights
        fc_plan.append(step)
    class_bias = np.asarray(layer("class_bias").bias.numpy(), dtype=np.float32)
    factor = tuple(config.subsample_factor)
    del fc_widths

    def constant(value: np.ndarray | None, cast: Any = dtype) -> Any:
        return None if value is None else tf.constant(np.asarray(value, dtype=np.float32), dtype=cast)

    def to_tensors(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for step in plan:
            converted = dict(step)
            for key in ("kernel", "bias", "scale", "shift", "alpha"):
                if key in step:
                    converted[key] = constant(step[key])
            out.append(converted)
        return out

    normal_steps = to_tensors(normal_plan)
    subsampled_steps = to_tensors(subsampled_plan)
    fc_steps = to_tensors(fc_plan)
    fc_alpha_t = constant(fc_alpha)
    class_bias_t = tf.constant(class_bias)

    def prelu(x: Any, slope: Any) -> Any:
        return tf.maximum(x, 0) + slope * tf.minimum(x, 0)

    def add_residual(x: Any, earlier: Any, crop: Sequence[tuple[int, int]] | None) -> Any:
        if crop is not None:
            earlier = earlier[
                :,
                crop[0][0] : earlier.shape[1] - crop[0][1],
                crop[1][0] : earlier.shape[2] - crop[1][1],
                crop[2][0] : earlier.shape[3] - crop[2][1],
                :,
            ]
        channels, earlier_channels = x.shape[-1], earlier.shape[-1]
        if earlier_channels > channels:
            earlier = earlier[..., :channels]
        elif earlier_channels < channels:
            earlier = tf.pad(earlier, [[0, 0]] * 4 + [[0, channels - earlier_channels]])
        return x + earlier

    def run_pathway(x: Any, steps: list[dict[str, Any]]) -> tuple[Any, Any]:
        """Returns (raw output of the last layer, its scaled-and-shifted version)."""
        raw = [x]  # raw[k]: raw output of layer k (None where folded)
        activated = x
        affine = None
        for step in steps:
            t = tf.nn.conv3d(activated, step["kernel"], strides=[1, 1, 1, 1, 1], padding="VALID")
            if step["bias"] is not None:
                t = tf.nn.bias_add(t, step["bias"])
            if step["residual"]:
                t = add_residual(t, raw[step["number"] - 2], step["crop"])
            if step["scale"] is None:
                raw.append(None)
                affine = t
            else:
                raw.append(t)
                affine = t * step["scale"] + step["shift"]
            if "alpha" in step:
                activated = prelu(affine, step["alpha"])
        return raw[-1], affine

    def run(hr: Any, lr: Any) -> Any:
        hr = tf.cast(hr, dtype)
        lr = tf.cast(lr, dtype)
        normal_raw, normal_affine = run_pathway(hr, normal_steps)
        sub_raw, sub_affine = run_pathway(lr, subsampled_steps)
        size = tf.shape(normal_raw)

        def upsample(t: Any) -> Any:
            for axis, f in enumerate(factor):
                if f > 1:
                    t = tf.repeat(t, f, axis=axis + 1)
            return t[:, : size[1], : size[2], : size[3], :]

        features_raw = tf.concat([normal_raw, upsample(sub_raw)], axis=-1)
        features_affine = tf.concat([normal_affine, upsample(sub_affine)], axis=-1)
        raw = [features_raw]
        activated = prelu(features_affine, fc_alpha_t)
        x = None
        for step in fc_steps:
            x = tf.nn.conv3d(activated, step["kernel"], strides=[1, 1, 1, 1, 1], padding="VALID")
            if step["bias"] is not None:
                x = tf.nn.bias_add(x, step["bias"])
            if step["residual"]:
                x = add_residual(x, raw[step["number"] - 2], None)
            raw.append(x)
            if "alpha" in step:
                affine = x if step["scale"] is None else x * step["scale"] + step["shift"]
                activated = prelu(affine, step["alpha"])
        logits = tf.cast(x, tf.float32) + class_bias_t
        return tf.nn.softmax(logits, axis=-1)

    geometry_of(model)  # a vfdetect network
    return run
