"""Size arithmetic of the dual-pathway network: receptive field, segments, context windows, tiles.

Pure numpy (no TensorFlow), so sampling, inference and the command line can use it cheaply.

Everything is indexed ``[x, y, z]`` (canonical RAS: x left -> right, y posterior -> anterior,
z inferior -> superior); kernel shapes are written in the same ``(x, y, z)`` order. Convolutions are
valid with stride 1, so a segment of ``n`` voxels gives ``n - rf + 1`` output voxels per axis, where
``rf = 1 + sum(k - 1)`` is the receptive field of the pathway.

Coordinates used below:

* **unpadded**: indices into the volume itself;
* **padded**: indices into :func:`pad_volume`'s output, which adds ``margin()[axis][0]`` voxels before
  (reflected) and ``margin()[axis][1]`` after, so that every voxel of the volume can be the centre
  of an output voxel. Segment starts, sampling centres and tile starts are padded coordinates.

The low-resolution (LR) pathway reads a larger window of the padded volume by **decimation**
(every ``factor``-th voxel, no averaging), placed with DeepMedic's alignment: LR output voxel ``j``
is centred on HR output voxel ``factor * j``; after upsampling by repetition it also serves HR output
voxels ``factor * j + 1 .. factor * j + factor - 1``. The window starts
``(factor - 1) * (rf - 1) / 2`` HR voxels before the HR segment (``hr_start + 1 - rf`` for factor 3)
and has ``ceil(out / factor) + rf - 1`` samples per axis. Samples falling outside the padded volume
take a fill value, normally :func:`corner_mean` of the volume (air for CT).

Subsampling factor of the slice variants: ``1slice`` and ``5slices`` use a factor of **1 along x**
(``(1, 3, 3)``) and 3 in the sagittal plane. With the paper's blanket factor 3 along x as well, the
LR pathway of an HR output voxel would read a sagittal slice 0, 1 or 2 voxels away from the voxel's
own slice, depending on its phase; a factor of 1 keeps both pathways on the voxel's own slice
(``1slice``) or on the same 5 slices (``5slices``), which is what the paper's Table 1 describes
("only the 3D model is allowed to learn features outside the sagittal plane"). It costs more LR
compute for those two variants and changes no parameter count. ``geometry_for(variant,
subsample_factor=(3, 3, 3))`` gives the blanket-factor alternative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vfdetect.errors import VfdetectError

Shape3 = tuple[int, int, int]

VARIANTS: tuple[str, ...] = ("3d", "5slices", "1slice")
"""Network variants of the paper's Table 1."""

VARIANT_KERNELS: dict[str, tuple[Shape3, ...]] = {
    "3d": ((3, 3, 3),) * 8,
    "5slices": ((5, 3, 3),) + ((1, 3, 3),) * 7,
    "1slice": ((1, 3, 3),) * 8,
}
"""Kernel shapes ``(x, y, z)`` of the 8 conv layers of each pathway, per variant."""

VARIANT_SUBSAMPLE_FACTOR: dict[str, Shape3] = {
    "3d": (3, 3, 3),
    "5slices": (1, 3, 3),
    "1slice": (1, 3, 3),
}
"""Default LR subsampling factor per variant (see the module docstring for the slice variants)."""


class GeometryError(VfdetectError, ValueError):
    """A size or position that the network geometry cannot serve (segment smaller than the RF, ...)."""


def _as_shape3(values: Sequence[int] | np.ndarray, what: str) -> Shape3:
    """Return ``values`` as a tuple of three Python ints, or raise :class:`GeometryError`."""
    items = tuple(int(v) for v in np.asarray(values).reshape(-1))
    if len(items) != 3:
        raise GeometryError(f"{what} needs 3 values (x, y, z), got {len(items)}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class NetworkGeometry:
    """Geometry of a dual-pathway network with valid, stride-1 convolutions.

    ``kernels`` are the ``(x, y, z)`` kernel shapes of the conv layers of one pathway (both pathways
    share them); ``subsample_factor`` is the decimation factor of the LR pathway per axis (odd).
    """

    kernels: tuple[Shape3, ...]
    subsample_factor: Shape3 = (3, 3, 3)

    def __post_init__(self) -> None:
        if len(self.kernels) == 0:
            raise GeometryError("a pathway needs at least one conv layer")
        kernels = tuple(_as_shape3(kernel, "a kernel shape") for kernel in self.kernels)
        for kernel in kernels:
            if any(k < 1 or k % 2 == 0 for k in kernel):
                raise GeometryError(f"kernel sizes must be odd and positive, got {kernel}")
        factor = _as_shape3(self.subsample_factor, "subsample_factor")
        if any(f < 1 or f % 2 == 0 for f in factor):
            raise GeometryError(f"subsample factors must be odd and positive, got {factor}")
        object.__setattr__(self, "kernels", kernels)
        object.__setattr__(self, "subsample_factor", factor)

    @property
    def receptive_field(self) -> Shape3:
        """Receptive field per axis in voxels of the pathway's own grid: ``1 + sum(k - 1)``."""
        return tuple(1 + sum(kernel[axis] - 1 for kernel in self.kernels) for axis in range(3))  # type: ignore[return-value]

    @property
    def lr_receptive_field_hr(self) -> Shape3:
        """Extent of the LR pathway's receptive field in HR voxels: ``1 + (rf - 1) * factor``."""
        return tuple(1 + (rf - 1) * f for rf, f in zip(self.receptive_field, self.subsample_factor, strict=True))  # type: ignore[return-value]

    @property
    def lr_offset(self) -> Shape3:
        """Start of the LR window relative to the HR segment start, in HR voxels (<= 0).

        ``-(factor - 1) * (rf - 1) / 2``, i.e. ``1 - rf`` for factor 3 (DeepMedic's alignment).
        """
        return tuple(-((f - 1) * (rf - 1)) // 2 for rf, f in zip(self.receptive_field, self.subsample_factor, strict=True))  # type: ignore[return-value]

    def output_shape(self, input_shape: Sequence[int]) -> Shape3:
        """Output size for an HR input segment: ``in - rf + 1`` per axis (at least the RF is needed)."""
        shape = _as_shape3(input_shape, "input_shape")
        if any(n < rf for n, rf in zip(shape, self.receptive_field, strict=True)):
            raise GeometryError(f"segment {shape} is smaller than the receptive field {self.receptive_field}")
        return tuple(n - rf + 1 for n, rf in zip(shape, self.receptive_field, strict=True))  # type: ignore[return-value]

    def input_shape(self, output_shape: Sequence[int]) -> Shape3:
        """HR segment size giving ``output_shape``: ``out + rf - 1`` per axis."""
        shape = _as_shape3(output_shape, "output_shape")
        if any(n < 1 for n in shape):
            raise GeometryError(f"output shape must be positive, got {shape}")
        return tuple(n + rf - 1 for n, rf in zip(shape, self.receptive_field, strict=True))  # type: ignore[return-value]

    def lr_input_shape(self, output_shape: Sequence[int]) -> Shape3:
        """LR window size for an output block: ``ceil(out / factor) + rf - 1`` per axis (LR voxels)."""
        shape = _as_shape3(output_shape, "output_shape")
        if any(n < 1 for n in shape):
            raise GeometryError(f"output shape must be positive, got {shape}")
        return tuple(
            math.ceil(n / f) + rf - 1
            for n, f, rf in zip(shape, self.subsample_factor, self.receptive_field, strict=True)
        )  # type: ignore[return-value]

    def lr_shape_for(self, hr_shape: Sequence[int]) -> Shape3:
        """LR window size that goes with an HR segment of ``hr_shape``."""
        return self.lr_input_shape(self.output_shape(hr_shape))

    def margin(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Voxels (before, after) per axis that a segment has beyond its output block.

        ``((rf - 1) // 2, rest)``: also the reflect padding of :func:`pad_volume`, e.g. 8 and 8 for RF 17.
        """
        return tuple(((rf - 1) // 2, rf - 1 - (rf - 1) // 2) for rf in self.receptive_field)  # type: ignore[return-value]

    def segment_start(self, centre: Sequence[int], hr_shape: Sequence[int]) -> Shape3:
        """Start of the HR segment centred on ``centre``: ``centre - (seg - 1) // 2`` per axis.

        For an even segment size the centre is the voxel just before the middle.
        """
        centre3 = _as_shape3(centre, "centre")
        shape = _as_shape3(hr_shape, "hr_shape")
        return tuple(c - (n - 1) // 2 for c, n in zip(centre3, shape, strict=True))  # type: ignore[return-value]

    def output_start(self, hr_start: Sequence[int]) -> Shape3:
        """Where the output block of a segment starting at ``hr_start`` lies (same coordinates)."""
        start = _as_shape3(hr_start, "hr_start")
        return tuple(s + before for s, (before, _) in zip(start, self.margin(), strict=True))  # type: ignore[return-value]

    def output_slices(self, hr_start: Sequence[int], hr_shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """Slices (in the segment's coordinates, usually padded) covered by the segment's output block."""
        out = self.output_shape(hr_shape)
        start = self.output_start(hr_start)
        return tuple(slice(s, s + n) for s, n in zip(start, out, strict=True))  # type: ignore[return-value]

    def label_block_slices(self, centre: Sequence[int], hr_shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """Slices of the label block for a segment centred on ``centre``: ``[c - (out - 1) // 2, +out)``.

        Same coordinates as ``centre`` (padded). For a centre allowed by :func:`valid_centre_mask` on a
        volume padded by :func:`pad_volume`, the block lies inside the unpadded volume: subtract
        ``margin()[axis][0]`` to index the unpadded label image.
        """
        return self.output_slices(self.segment_start(centre, hr_shape), hr_shape)

    def lr_start(self, hr_start: Sequence[int]) -> Shape3:
        """Start of the LR window (HR voxel coordinates) for an HR segment starting at ``hr_start``."""
        start = _as_shape3(hr_start, "hr_start")
        return tuple(s + o for s, o in zip(start, self.lr_offset, strict=True))  # type: ignore[return-value]


def geometry_for(variant: str, subsample_factor: Sequence[int] | None = None) -> NetworkGeometry:
    """Geometry of one of the paper's variants: ``"3d"``, ``"5slices"`` or ``"1slice"``.

    ``subsample_factor`` overrides the variant's default LR factor (see the module docstring).
    """
    if variant not in VARIANT_KERNELS:
        raise VfdetectError(f"unknown network variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    factor = VARIANT_SUBSAMPLE_FACTOR[variant] if subsample_factor is None else _as_shape3(subsample_factor, "subsample_factor")
    return NetworkGeometry(kernels=VARIANT_KERNELS[variant], subsample_factor=factor)


def pad_volume(array: np.ndarray, geometry: NetworkGeometry, min_shape: Sequence[int] | None = None) -> np.ndarray:
    """Reflect-pad the three spatial axes of ``array`` by ``geometry.margin()`` (trailing axes untouched).

    With ``min_shape`` (e.g. the segment or tile size), axes still shorter than it afterwards get extra
    reflect padding at the end, as DeepMedic does for volumes smaller than a segment.
    """
    array = np.asarray(array)
    if array.ndim < 3:
        raise GeometryError(f"need a 3D volume (optionally with trailing axes), got shape {array.shape}")
    widths = [list(pair) for pair in geometry.margin()]
    if min_shape is not None:
        minimum = _as_shape3(min_shape, "min_shape")
        for axis in range(3):
            padded = array.shape[axis] + widths[axis][0] + widths[axis][1]
            widths[axis][1] += max(0, minimum[axis] - padded)
    pad_width = [tuple(w) for w in widths] + [(0, 0)] * (array.ndim - 3)
    if all(w == (0, 0) for w in pad_width):
        return array.copy()
    return np.pad(array, pad_width, mode="reflect")


def unpad_volume(padded: np.ndarray, geometry: NetworkGeometry, shape: Sequence[int]) -> np.ndarray:
    """Undo :func:`pad_volume`: the ``shape`` voxels after the leading margin of each spatial axis."""
    size = _as_shape3(shape, "shape")
    index = tuple(slice(before, before + n) for (before, _), n in zip(geometry.margin(), size, strict=True))
    result = padded[index]
    if result.shape[:3] != size:
        raise GeometryError(f"padded array {padded.shape} does not contain an unpadded volume of shape {size}")
    return result


def corner_mean(array: np.ndarray) -> float:
    """Mean of the 8 corner voxels of a 3D volume (over all trailing channels): the LR fill value."""
    array = np.asarray(array)
    if array.ndim < 3 or min(array.shape[:3]) < 1:
        raise GeometryError(f"need a non-empty 3D volume, got shape {array.shape}")
    corners = array[np.ix_([0, -1], [0, -1], [0, -1])]
    return float(np.mean(corners, dtype=np.float64))


def _decimated_window(
    padded: np.ndarray, start: Shape3, shape: Shape3, step: Shape3, fill_value: float, out: np.ndarray | None = None
) -> np.ndarray:
    """Samples ``padded[start + step * i]`` for ``i < shape`` per axis, ``fill_value`` outside the array."""
    if out is None:
        out = np.empty(shape + padded.shape[3:], dtype=padded.dtype)
    source: list[slice] = []
    target: list[slice] = []
    for axis in range(3):
        first, count, stride, size = start[axis], shape[axis], step[axis], padded.shape[axis]
        lo = 0 if first >= 0 else (-first + stride - 1) // stride  # first i with first + stride * i >= 0
        hi = min(count, (size - 1 - first) // stride + 1) if size - 1 - first >= 0 else 0
        if hi <= lo:
            out[...] = fill_value
            return out
        source.append(slice(first + stride * lo, first + stride * (hi - 1) + 1, stride))
        target.append(slice(lo, hi))
    inside = tuple(target)
    covers_all = all(t.start == 0 and t.stop == n for t, n in zip(target, shape, strict=True))
    if not covers_all:
        out[...] = fill_value
    out[inside] = padded[tuple(source)]
    return out


def extract_segments(
    padded: np.ndarray,
    hr_start: Sequence[int],
    hr_shape: Sequence[int],
    geometry: NetworkGeometry,
    fill_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """HR segment at ``hr_start`` (padded coordinates) and its LR context window.

    Returns copies ``(hr, lr)`` with shapes ``hr_shape`` and ``geometry.lr_shape_for(hr_shape)`` (plus any
    trailing axes of ``padded``). The HR segment must lie inside ``padded``; the LR window takes every
    ``factor``-th voxel from ``geometry.lr_start(hr_start)`` and ``fill_value`` where it leaves ``padded``.
    """
    padded = np.asarray(padded)
    start = _as_shape3(hr_start, "hr_start")
    shape = _as_shape3(hr_shape, "hr_shape")
    if any(s < 0 or s + n > size for s, n, size in zip(start, shape, padded.shape[:3], strict=True)):
        raise GeometryError(f"segment of shape {shape} at {start} leaves the padded volume of shape {padded.shape[:3]}")
    hr = padded[tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))].copy()
    lr = _decimated_window(padded, geometry.lr_start(start), geometry.lr_shape_for(shape), geometry.subsample_factor, fill_value)
    return hr, lr


def extract_segment_batch(
    padded: np.ndarray,
    hr_starts: np.ndarray | Sequence[Sequence[int]],
    hr_shape: Sequence[int],
    geometry: NetworkGeometry,
    fill_value: float,
    dtype: np.dtype | type | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_segments` for many starts ``(N, 3)`` of one volume, stacked into ``(N, ...)`` arrays."""
    padded = np.asarray(padded)
    starts = np.asarray(hr_starts, dtype=np.int64).reshape(-1, 3)
    shape = _as_shape3(hr_shape, "hr_shape")
    lr_shape = geometry.lr_shape_for(shape)
    dtype = padded.dtype if dtype is None else np.dtype(dtype)
    trailing = padded.shape[3:]
    hr_batch = np.empty((len(starts), *shape, *trailing), dtype=dtype)
    lr_batch = np.empty((len(starts), *lr_shape, *trailing), dtype=dtype)
    for index, start in enumerate(starts):
        start3 = _as_shape3(start, "hr_start")
        if any(s < 0 or s + n > size for s, n, size in zip(start3, shape, padded.shape[:3], strict=True)):
            raise GeometryError(
                f"segment of shape {shape} at {start3} leaves the padded volume of shape {padded.shape[:3]}"
            )
        hr_batch[index] = padded[tuple(slice(s, s + n) for s, n in zip(start3, shape, strict=True))]
        _decimated_window(padded, geometry.lr_start(start3), lr_shape, geometry.subsample_factor, fill_value, out=lr_batch[index])
    return hr_batch, lr_batch


def centre_bounds(shape: Sequence[int], hr_shape: Sequence[int]) -> tuple[Shape3, Shape3]:
    """Smallest and largest valid centre per axis (inclusive) for segments of ``hr_shape`` in ``shape``.

    A centre ``c`` is valid when its segment ``[c - (seg - 1) // 2, +seg)`` fits: ``(seg - 1) // 2 <= c <=
    size - 1 - seg // 2``. Where no centre fits, the lower bound exceeds the upper one.
    """
    size = _as_shape3(shape, "shape")
    seg = _as_shape3(hr_shape, "hr_shape")
    lower = tuple((n - 1) // 2 for n in seg)
    upper = tuple(d - 1 - n // 2 for d, n in zip(size, seg, strict=True))
    return lower, upper  # type: ignore[return-value]


def valid_centre_mask(shape: Sequence[int], hr_shape: Sequence[int]) -> np.ndarray:
    """Boolean mask over ``shape`` (a padded volume) of the centres whose HR segment fits entirely.

    Voxels within ``(seg - 1) // 2`` of the start and ``seg // 2`` of the end of each axis are excluded
    (the same for odd sizes; for even sizes the centre sits one voxel toward the start).
    """
    size = _as_shape3(shape, "shape")
    lower, upper = centre_bounds(size, hr_shape)
    mask = np.zeros(size, dtype=bool)
    if all(lo <= hi for lo, hi in zip(lower, upper, strict=True)):
        mask[lower[0] : upper[0] + 1, lower[1] : upper[1] + 1, lower[2] : upper[2] + 1] = True
    return mask
