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

Whole cases: :func:`load_predictor` reads a run folder (``model.keras`` and ``config.json`` with the
``variant`` and the ``spacing`` of the internal frame), :func:`predict_case` takes a NIfTI path, a
DICOM folder or an in-memory nibabel image, prepares it exactly as training did (internal frame,
z-score over the body mask, LR fill = corner mean), predicts, scores the vertebrae (given centroids
or :func:`vfdetect.aggregate.localise_vertebrae`) and the patient, and writes the case folder;
:func:`predict_cases` runs a list of cases, skipping failures, and writes ``summary.csv``.
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
) -> np.ndarray:
    """Probabilities ``(X, Y, Z, C)`` (``dtype``, C = 3: background, normal, fracture) for a whole volume.

    ``image`` is the normalised scan in the internal frame ``[x, y, z]``. ``tile_shape`` is the HR
    input shape of a tile (its output, ``tile - rf + 1``, is rounded down to the subsampling factor
    and balanced per axis); by default the largest that fits ``memory_budget_bytes`` with
    ``batch_size`` tiles per call (:func:`choose_tile_shape`). ``fill_value`` (default: the mean of
    the 8 corner voxels, as in training) is what the LR context reads outside the padded volume.
    With ``mask`` (bool, same shape), tiles whose output block holds no mask voxel are skipped and
    get p(background) = 1. ``dtype=np.float16`` halves the output's memory (probabilities to about
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
    out_shape = tile_output_shape(image.shape, geometry, limit)
    hr_shape = geometry.input_shape(out_shape)
    index_maps = _reflect_index_maps(image.shape, geometry)
    starts = tile_starts(image.shape, out_shape)
    if mask is not None:
        starts = [
            s for s in starts if mask[s[0] : s[0] + out_shape[0], s[1] : s[1] + out_shape[1], s[2] : s[2] + out_shape[2]].any()
        ]

    probabilities = np.zeros((*image.shape, N_CLASSES), dtype=dtype)
    probabilities[..., 0] = 1.0
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
    """A trained model ready for inference, with its run folder's configuration."""

    model: Any
    config: dict[str, Any]
    run_dir: Path | None = None
    precision: str = "float32"
    fn: Predictor_fn | None = field(default=None, repr=False)

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
    def geometry(self) -> NetworkGeometry:
        from vfdetect.model import geometry_of

        return geometry_of(self.model)

    def describe(self) -> dict[str, Any]:
        """What the report says about the model."""
        keys = ("variant", "spacing", "trainable_parameters", "seed", "epochs")
        info = {key: self.config[key] for key in keys if key in self.config}
        info["run"] = None if self.run_dir is None else str(self.run_dir)
        info["precision"] = self.precision
        return info


def load_predictor(
    run_dir: str | Path, precision: str = "float32", threads: int | None = 2, model_file: str = "model.keras"
) -> Predictor:
    """Load ``run_dir/model.keras`` and ``run_dir/config.json`` (everything inference needs)."""
    import json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise InputError(config_path, "run folder has no config.json (not a training run?)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(config_path, f"cannot read the run configuration ({error})") from None
    if not isinstance(config, dict):
        raise InputError(config_path, "run configuration must be a JSON object")
    model_path = run_dir / model_file
    if not model_path.is_file():
        raise InputError(model_path, "trained model not found in the run folder")
    configure_threads(threads)
    from vfdetect.model import load_model

    model = load_model(model_path)
    return Predictor(model=model, config=config, run_dir=run_dir, precision=precision)


# ----------------------------------------------------------------------------------------------
# One case, many cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictConfig:
    """Settings of :func:`predict_case` (scores, thresholds, tiling, outputs).

    ``map_dtype`` is the dtype of the internal probability map (float16 halves its memory; the
    files store probabilities in steps of 1/255 anyway). ``memory_budget_bytes`` covers the map,
    the normalised scan, the body mask and the overlay's copy of the scan.
    """

    cube_edge_mm: float = 10.0
    sigma_mm: float | None = 5.0
    vertebra_threshold: float = 0.5
    probability_threshold: float = 0.5
    noise_threshold_mm3: float = 500.0
    component_thresholds: tuple[float, ...] = ()
    anchor_level: str | None = None
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
        if not 0.0 < self.probability_threshold <= 1.0:
            raise VfdetectError("the probability threshold must lie in (0, 1]")
        if self.noise_threshold_mm3 < 0:
            raise VfdetectError("the noise threshold must be >= 0 mm^3")
        if self.cube_edge_mm <= 0:
            raise VfdetectError("the cube edge must be positive")
        if self.batch_size < 1:
            raise VfdetectError("batch_size must be >= 1")

    def thresholds(self) -> dict[str, Any]:
        return {
            "probability": self.probability_threshold,
            "noise_mm3": self.noise_threshold_mm3,
            "vertebra": self.vertebra_threshold,
            "cube_edge_mm": self.cube_edge_mm,
            "sigma_mm": self.sigma_mm,
        }


@dataclass
class CaseResult:
    """What :func:`predict_case` found for one scan.

    ``vertebrae``: one dict per vertebra (see :mod:`vfdetect.report`); ``report``: the report.json
    content; ``paths``: output name -> file (empty without an output folder); with
    ``PredictConfig(keep_maps=True)``, ``probabilities`` holds the internal-frame (X, Y, Z, 3) map
    (a :class:`vfdetect.volume.Volume`).
    """

    case: str
    vertebrae: list[dict[str, Any]]
    patient_fracture_probability: float
    patient_fracture: bool
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    probabilities: Any = None


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
    ``config.anchor_level`` if given). With ``out_dir``, writes ``out_dir/<case>/``:
    ``probabilities.nii.gz`` (input grid; uint8 scaled 1/255; channel 0 p(fracture), channel 1
    p(normal) + p(fracture)), ``labels.nii.gz`` (argmax 0/1/2), ``report.json``, ``report.csv`` and
    ``overlay.png``, each atomically (report.json last).
    """
    from vfdetect import __version__, aggregate
    from vfdetect.report import render_overlay, write_report_csv, write_report_json
    from vfdetect.volume import (
        Volume,
        body_mask,
        load_scan,
        normalise,
        save_on_grid,
        to_internal,
        to_source,
        world_to_voxel,
    )

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
    overlay_hu = None
    if config.write_overlay and out_dir is not None:
        overlay_hu = np.clip(hu, -1024, 3071).astype(np.int16)
    del hu
    timings["load_s"] = time.perf_counter() - started
    held = mask.nbytes + (0 if overlay_hu is None else overlay_hu.nbytes)

    tick = time.perf_counter()
    probabilities = predict_volume(
        normalised,
        predictor.fn,  # type: ignore[arg-type]
        predictor.geometry,
        tile_shape=config.tile_shape,
        batch_size=config.batch_size,
        mask=mask if config.skip_air and mask.any() else None,
        memory_budget_bytes=config.memory_budget_bytes - held,
        quiet=quiet,
        dtype=config.map_dtype,
    )
    del normalised, mask
    timings["inference_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    fracture = Volume(probabilities[..., 2], affine)
    normal = Volume(probabilities[..., 1], affine)
    vertebra_map = probabilities[..., 1] + probabilities[..., 2]
    if given is None:
        vertebrae = aggregate.localise_vertebrae(Volume(vertebra_map, affine), anchor_level=config.anchor_level)
        source = "localised"
    else:
        vertebrae = given
        source = "given"
    scores = aggregate.vertebra_scores(
        fracture,
        vertebrae,
        cube_edge_mm=config.cube_edge_mm,
        sigma_mm=config.sigma_mm,
        normal_probability=normal,
        vertebra_threshold=config.vertebra_threshold,
    )
    component_thresholds = list(config.component_thresholds)
    largest = aggregate.largest_components(fracture, component_thresholds + [config.probability_threshold])
    largest_at_threshold = largest.pop()
    positive = aggregate.patient_positive(largest_at_threshold, config.noise_threshold_mm3)
    patient_probability = aggregate.patient_score(scores, fracture, config.cube_edge_mm, config.sigma_mm)
    for index, (vertebra, entry) in enumerate(zip(vertebrae, scores, strict=True)):
        voxel = world_to_voxel(grid.affine, np.asarray(vertebra.position_mm))
        scores[index] = {
            "label": entry["label"],
            "name": entry["name"],
            "centroid_voxel": [round(float(v), 2) for v in voxel],
            "centroid_mm": [round(float(v), 2) for v in entry["centroid_mm"]],
            "fracture_probability": entry["fracture_probability"],
            "normal_probability": entry["normal_probability"],
            "predicted": entry["predicted"],
            "source": source,
            "grade": vertebra.grade,
        }
    timings["aggregation_s"] = time.perf_counter() - tick

    report: dict[str, Any] = {
        "case": name,
        "patient_fracture_probability": patient_probability,
        "patient_fracture": positive,
        "patient_score": "max vertebra fracture_probability (max Gaussian-weighted cube mean of the map without vertebrae)",
        "thresholds": config.thresholds(),
        "largest_component_mm3": largest_at_threshold,
        "vertebrae": scores,
        "component_sizes": {"probability_thresholds": component_thresholds, "largest_component_mm3": largest},
        "input": grid.source,
        "model": predictor.describe(),
        "version": __version__,
        "timings": timings,
    }

    paths: dict[str, Path] = {}
    if out_dir is not None:
        tick = time.perf_counter()
        case_dir = Path(out_dir) / name
        case_dir.mkdir(parents=True, exist_ok=True)
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
            verdict = "FRACTURE" if positive else "no fracture"
            title = f"{name}: patient {verdict} (score {patient_probability:.2f}); {len(scores)} vertebrae ({source})"
            render_overlay(
                paths["overlay"], overlay_hu, probabilities[..., 2], spacing, scores, centres, title,
                vertebra_probability=vertebra_map,
            )
        paths["report_csv"] = case_dir / "report.csv"
        write_report_csv(paths["report_csv"], report)
        timings["writing_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        paths["report"] = case_dir / "report.json"
        write_report_json(paths["report"], report)
    else:
        timings["total_s"] = time.perf_counter() - started

    return CaseResult(
        case=name,
        vertebrae=scores,
        patient_fracture_probability=patient_probability,
        patient_fracture=positive,
        report=report,
        paths=paths,
        probabilities=Volume(probabilities, affine) if config.keep_maps else None,
    )


@dataclass
class CaseFailure:
    """A case that could not be predicted, and why."""

    case: str
    error: str


def predict_cases(
    run_dir: str | Path | Predictor,
    cases: Sequence[Any],
    out_dir: str | Path,
    config: PredictConfig = PredictConfig(),
    quiet: bool = False,
    failures: list[CaseFailure] | None = None,
    precision: str = "float32",
) -> list[CaseResult]:
    """Predict many cases (:class:`vfdetect.vertebrae.Case`, or paths / nibabel images) into ``out_dir``.

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
