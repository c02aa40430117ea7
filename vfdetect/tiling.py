"""Whole-volume inference by tiling: tile shapes and starts, tile plans, tile input windows, and
:func:`predict_volume`, the sliding window that runs a predictor over the plan.

Pure numpy (no TensorFlow): :func:`predict_volume` takes any callable ``predictor(hr, lr)``
(:data:`Predictor_fn`), so it is tested with stand-in callables as well as the Keras model.

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

Memory: the padded volume is never materialised; each tile's window is gathered from the unpadded
image through per-axis reflect index maps, so the peak is the input, the (X, Y, Z, 3) float32 output
and the tiles in flight. The tile size is chosen from a memory budget (:func:`choose_tile_shape`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.geometry import NetworkGeometry, corner_mean, extract_segments, pad_volume

Predictor_fn = Callable[[np.ndarray, np.ndarray], Any]
"""``predictor(hr, lr) -> probabilities``: HR segments ``(B, X, Y, Z, 1)`` and their LR context windows
to ``(B, ox, oy, oz, C)``."""

GIB = 1024**3
DEFAULT_MEMORY_BUDGET_BYTES = 4 * GIB
DEFAULT_BATCH_SIZE = 1
DEFAULT_MAX_TILE_OUTPUT = 66
RUNTIME_OVERHEAD_BYTES = int(1.0 * GIB)
"""What the process needs besides the arrays (interpreter, TensorFlow, the model): about 1 GiB."""
ACTIVATION_BYTES_PER_HR_VOXEL = 700
"""Peak working memory per HR tile voxel in the network (fp32 3D model, measured, with headroom)."""
N_CLASSES = 3


def round_up(value: int, step: int) -> int:
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
        shape.append(min(limit, round_up(math.ceil(int(size) / tiles), factor)))
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


def reflect_index_maps(shape: Sequence[int], geometry: NetworkGeometry) -> list[np.ndarray]:
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


def gather_window(
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


def tile_inputs(
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
    window = gather_window(image, index_maps, window_start, window_shape, fill_value)
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
    out: np.ndarray | None = None,
    computed: np.ndarray | None = None,
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
    1e-3). ``out`` (shape ``(*image.shape, C)``) receives the computed tiles in place of a new
    array (other voxels are left as they are), and a bool ``computed`` array (``image.shape``) is
    set True wherever a tile computed, for a later pass over more of the volume. See the module
    docstring for why the result does not depend on tiling.
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
    index_maps = reflect_index_maps(image.shape, geometry)
    if stats is not None:
        stats["tiles"] = len(tiles)
        stats["tile_output_shape"] = [int(n) for n in np.max([t.output_shape for t in tiles], axis=0)] if tiles else []
        stats["computed_voxels"] = int(sum(tile.voxels_inside(image.shape) for tile in tiles))
        stats["executed_hr_voxels"] = int(sum(np.prod(geometry.input_shape(tile.output_shape)) for tile in tiles))

    if out is None:
        probabilities = np.zeros((*image.shape, N_CLASSES), dtype=dtype)
        probabilities[..., 0] = 1.0
    else:
        probabilities = out
        if probabilities.shape != (*image.shape, N_CLASSES):
            raise VfdetectError(f"out has shape {probabilities.shape}, expected {(*image.shape, N_CLASSES)}")
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
                hr, lr = tile_inputs(image, index_maps, tile.start, hr_shape, geometry, float(fill_value))
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
                if computed is not None:
                    computed[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = True
            bar.update(len(batch))
    return probabilities
