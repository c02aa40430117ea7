"""Domain randomisation of training scans: intensity, gamma, blur, thick slices, noise, bias field.

A :class:`Randomisation` is drawn per sample (:func:`draw_randomisation`) from the ranges of a
:class:`vfdetect.sampling.SamplingConfig`; :func:`randomised_window` reads a window of the randomised
scan, the same randomisation for both pathways of a sample. Numpy only, arrays ``[x, y, z]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vfdetect.errors import VfdetectError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from vfdetect.sampling import SamplingConfig

PROBABILITY_FIELDS = (
    "intensity_probability",
    "gamma_probability",
    "blur_probability",
    "thick_slice_probability",
    "noise_probability",
    "bias_probability",
)
"""The :class:`vfdetect.sampling.SamplingConfig` settings giving the probability of each randomisation step."""



_BIAS_WAVES = 2  # plane waves per bias field (gain and offset each)


@dataclass(frozen=True)
class Randomisation:
    """One drawn domain randomisation of a scan, in the normalised intensity unit.

    Applied in the order of an acquisition: Gaussian blur (``blur_sigma`` voxels, 0 for none) and
    thick slices along ``slice_axis`` (``None`` for none; slabs of ``slice_thickness`` voxels whose
    centres lie at ``slice_phase + k * slice_thickness``), then additive noise (``noise_sd``,
    correlation ``noise_correlation`` voxels), then the bias field ``I (1 + g) + o`` of the plane
    waves ``bias_waves`` (each ``(kx, ky, kz, phase, gain amplitude, offset amplitude)``, wave
    vector in radians per voxel), then ``scale * I + offset``, then the gamma curve over
    ``gamma_window``. Positions are padded coordinates of the volume being sampled.
    """

    scale: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    gamma_window: tuple[float, float] = (-3.0, 5.0)
    blur_sigma: float = 0.0
    slice_axis: int | None = None
    slice_thickness: float = 1.0
    slice_phase: float = 0.0
    noise_sd: float = 0.0
    noise_correlation: float = 0.0
    bias_waves: tuple[tuple[float, float, float, float, float, float], ...] = ()

    def point_transform(self, values: np.ndarray | float) -> np.ndarray:
        """The position-independent part: ``scale * I + offset`` then the gamma curve."""
        values = np.asarray(values, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.gamma == 1.0:
            return values
        low, high = self.gamma_window
        u = (values - np.float32(low)) / np.float32(high - low)
        inside = (u > 0) & (u < 1)
        curved = np.where(inside, np.power(np.clip(u, 0, 1), np.float32(self.gamma)), u)
        return (curved * np.float32(high - low) + np.float32(low)).astype(np.float32)


def _uniform(rng_values: np.ndarray, index: int, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(low + (high - low) * rng_values[index])


def _log_uniform(rng_values: np.ndarray, index: int, bounds: tuple[float, float]) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return float(math.exp(low + (high - low) * rng_values[index]))


def draw_randomisation(config: SamplingConfig, rng: np.random.Generator) -> Randomisation:
    """Draw one :class:`Randomisation` from ``config``'s probabilities and ranges.

    Always consumes the same number of draws from ``rng``, whichever augmentations are switched on.
    """
    u = rng.random(15 + 4 * 2 * _BIAS_WAVES)
    directions = rng.normal(size=(2 * _BIAS_WAVES, 3))
    on = u[:6] < np.asarray([getattr(config, name) for name in PROBABILITY_FIELDS])
    intensity, gamma, blur, thick, noise, bias = (bool(v) for v in on)
    thickness = _uniform(u, 8, config.slice_thickness) if thick else 1.0
    waves: list[tuple[float, float, float, float, float, float]] = []
    if bias:
        for wave in range(2 * _BIAS_WAVES):
            base = 15 + 4 * wave
            wavelength = _uniform(u, base, config.bias_wavelength)
            direction = directions[wave] / max(float(np.linalg.norm(directions[wave])), 1e-12)
            k = direction * (2 * math.pi / wavelength)
            amplitude = float(u[base + 2]) / _BIAS_WAVES
            gain = config.bias_gain * amplitude if wave < _BIAS_WAVES else 0.0
            offset = config.bias_offset * amplitude if wave >= _BIAS_WAVES else 0.0
            waves.append((float(k[0]), float(k[1]), float(k[2]), float(2 * math.pi * u[base + 1]), gain, offset))
    return Randomisation(
        scale=_log_uniform(u, 6, config.intensity_scale) if intensity else 1.0,
        offset=_uniform(u, 7, config.intensity_offset) if intensity else 0.0,
        gamma=_log_uniform(u, 9, config.gamma_range) if gamma else 1.0,
        gamma_window=config.gamma_window,
        blur_sigma=_uniform(u, 10, config.blur_sigma) if blur else 0.0,
        slice_axis=min(2, int(3 * u[11])) if thickness > 1.0 else None,
        slice_thickness=thickness,
        slice_phase=float(u[12] * thickness),
        noise_sd=_uniform(u, 13, config.noise_sd) if noise else 0.0,
        noise_correlation=_uniform(u, 14, config.noise_correlation) if noise else 0.0,
        bias_waves=tuple(waves),
    )


@dataclass(frozen=True)
class _AxisOperator:
    """A linear map along one axis from source positions ``[low, low + width)`` to output positions.

    ``matrix`` (outputs x width) or, for a pure selection, ``indices`` (absolute positions).
    """

    low: int
    width: int
    matrix: np.ndarray | None = None
    indices: np.ndarray | None = None


def _selection(positions: np.ndarray, size: int) -> _AxisOperator:
    indices = np.clip(positions, 0, size - 1)
    low = int(indices.min())
    return _AxisOperator(low, int(indices.max()) - low + 1, indices=indices)


def _dense(rows: np.ndarray, columns: np.ndarray, weights: np.ndarray, n_rows: int, size: int) -> _AxisOperator:
    """Operator from (row, absolute column, weight) triples; columns clamped to ``[0, size)``."""
    columns = np.clip(columns, 0, size - 1)
    low = int(columns.min())
    width = int(columns.max()) - low + 1
    matrix = np.zeros((n_rows, width), dtype=np.float64)
    np.add.at(matrix, (rows, columns - low), weights)
    return _AxisOperator(low, width, matrix=matrix)


def _gaussian_kernel(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, weights / weights.sum()


def _gaussian_operator(positions: np.ndarray, size: int, sigma: float) -> _AxisOperator:
    """Gaussian smoothing evaluated at ``positions`` (nearest-edge extension of the volume)."""
    if sigma <= 0:
        return _selection(positions, size)
    offsets, weights = _gaussian_kernel(sigma)
    centres = np.clip(positions, 0, size - 1)
    rows = np.repeat(np.arange(len(positions)), len(offsets))
    columns = (centres[:, None] + offsets[None, :]).ravel()
    return _dense(rows, columns, np.tile(weights, len(positions)), len(positions), size)


def _thick_slice_operator(positions: np.ndarray, size: int, thickness: float, phase: float) -> _AxisOperator:
    """Box averages over slabs ``[c - T/2, c + T/2]`` (``c = phase + k T``), interpolated linearly.

    Voxel ``j`` covers ``[j - 1/2, j + 1/2]``; each output mixes the two slabs around its position.
    """
    centres = np.clip(positions, 0, size - 1).astype(np.float64)
    below = np.floor((centres - phase) / thickness)
    fraction = (centres - phase) / thickness - below
    reach = int(math.ceil(thickness / 2 + 1))
    offsets = np.arange(-reach, reach + 1)
    rows_list, columns_list, weights_list = [], [], []
    for slab, share in ((below, 1 - fraction), (below + 1, fraction)):
        slab_centre = phase + slab * thickness
        voxels = np.round(slab_centre)[:, None] + offsets[None, :]
        overlap = np.minimum(voxels + 0.5, slab_centre[:, None] + thickness / 2) - np.maximum(
            voxels - 0.5, slab_centre[:, None] - thickness / 2
        )
        weights = np.clip(overlap, 0, None) / thickness * share[:, None]
        rows_list.append(np.repeat(np.arange(len(positions)), len(offsets)))
        columns_list.append(voxels.astype(np.int64).ravel())
        weights_list.append(weights.ravel())
    return _dense(
        np.concatenate(rows_list), np.concatenate(columns_list), np.concatenate(weights_list), len(positions), size
    )


def _compose(outer: _AxisOperator, inner_for: Any, size: int) -> _AxisOperator:
    """``outer`` after the operator ``inner_for(positions)`` that produces its source positions."""
    assert outer.matrix is not None
    inner = inner_for(np.arange(outer.low, outer.low + outer.width))
    if inner.indices is not None:  # a selection of the same (in-range) positions
        return outer
    product = outer.matrix @ inner.matrix
    return _AxisOperator(inner.low, inner.width, matrix=product)


def _image_operator(positions: np.ndarray, size: int, axis: int, randomisation: Randomisation) -> _AxisOperator:
    blur = randomisation.blur_sigma
    if randomisation.slice_axis != axis:
        return _gaussian_operator(positions, size, blur)
    thick = _thick_slice_operator(positions, size, randomisation.slice_thickness, randomisation.slice_phase)
    return _compose(thick, lambda inner: _gaussian_operator(inner, size, blur), size)


def _apply_operators(source: np.ndarray, origin: Sequence[int], operators: Sequence[_AxisOperator]) -> np.ndarray:
    """Apply one :class:`_AxisOperator` per axis to ``source`` (whose voxel 0 sits at ``origin``)."""
    block = source[
        tuple(slice(op.low - o, op.low - o + op.width) for op, o in zip(operators, origin, strict=True))
    ]
    if any(n != op.width for n, op in zip(block.shape, operators, strict=True)):
        raise VfdetectError("the source array does not cover the operators' positions")
    for axis, op in enumerate(operators):  # selections first: they only shrink the block
        if op.indices is not None:
            local = op.indices - op.low
            steps = np.diff(local)
            if len(local) > 1 and steps[0] > 0 and np.all(steps == steps[0]):  # a strided view, no copy
                index: list[slice] = [slice(None)] * block.ndim
                index[axis] = slice(int(local[0]), int(local[-1]) + 1, int(steps[0]))
                block = block[tuple(index)]
            else:
                block = np.take(block, local, axis=axis)
    block = np.asarray(block, dtype=np.float32)
    for axis, op in enumerate(operators):
        if op.matrix is not None:
            moved = np.moveaxis(block, axis, -1) @ op.matrix.T.astype(np.float32)
            block = np.moveaxis(moved, -1, axis)
    return np.ascontiguousarray(block)


def _noise_operators(positions: Sequence[np.ndarray], size: Sequence[int], sigma: float) -> list[_AxisOperator]:
    return [_gaussian_operator(p, n, sigma) for p, n in zip(positions, size, strict=True)]


def noise_box(
    randomisation: Randomisation, padded_shape: Sequence[int], windows: Sequence[Sequence[np.ndarray]]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Origin and shape of the white-noise block that the noise of all ``windows`` reads.

    Each window is three arrays of positions (padded coordinates), as for :func:`randomised_window`.
    """
    size = tuple(int(n) for n in padded_shape[:3])
    lows, highs = [], []
    for positions in windows:
        ops = _noise_operators(positions, size, randomisation.noise_correlation)
        lows.append([op.low for op in ops])
        highs.append([op.low + op.width for op in ops])
    low = np.min(lows, axis=0)
    high = np.max(highs, axis=0)
    return tuple(int(v) for v in low), tuple(int(v) for v in high - low)  # type: ignore[return-value]


def _bias(randomisation: Randomisation, positions: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Gain ``g`` and offset ``o`` fields on the grid of ``positions`` (zero arrays when no waves)."""
    shape = tuple(len(p) for p in positions)
    gain = np.zeros(shape, dtype=np.float32)
    offset = np.zeros(shape, dtype=np.float32)
    for kx, ky, kz, phase, gain_amplitude, offset_amplitude in randomisation.bias_waves:
        px, py, pz = (np.asarray(p, dtype=np.float64) for p in positions)
        wave = (
            np.exp(1j * (kx * px + phase))[:, None, None]
            * np.exp(1j * ky * py)[None, :, None]
            * np.exp(1j * kz * pz)[None, None, :]
        ).real.astype(np.float32)
        if gain_amplitude:
            gain += np.float32(gain_amplitude) * wave
        if offset_amplitude:
            offset += np.float32(offset_amplitude) * wave
    return gain, offset


def randomised_window(
    padded: np.ndarray,
    fill_value: float,
    randomisation: Randomisation,
    positions: Sequence[np.ndarray],
    white_noise: np.ndarray | None = None,
    noise_origin: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """The randomised volume sampled on the grid ``positions[0] x positions[1] x positions[2]``.

    ``positions`` are integer padded coordinates per axis (e.g. an HR segment's range or an LR
    window's every ``factor``-th voxel). The value at a position is the one the whole randomised
    volume has there (filters extend the volume by its edge voxels), so HR segments and LR windows
    read from it agree wherever they meet; positions outside ``padded`` get ``fill_value`` through
    the point transform (scale, offset, gamma) only, as the fill of a randomised scan would be.
    ``white_noise`` (with its voxel 0 at ``noise_origin``) must cover :func:`noise_box` when the
    randomisation adds noise.
    """
    size = tuple(int(n) for n in padded.shape[:3])
    grid = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positions]
    operators = [_image_operator(p, n, axis, randomisation) for axis, (p, n) in enumerate(zip(grid, size, strict=True))]
    values = _apply_operators(padded, (0, 0, 0), operators)
    if randomisation.noise_sd > 0:
        if white_noise is None:
            raise VfdetectError("randomised_window needs white_noise for a randomisation with noise")
        noise_ops = _noise_operators(grid, size, randomisation.noise_correlation)
        norm = 1.0
        if randomisation.noise_correlation > 0:
            _, weights = _gaussian_kernel(randomisation.noise_correlation)
            norm = float(np.sqrt(np.sum(weights**2))) ** 3
        values += np.float32(randomisation.noise_sd / norm) * _apply_operators(white_noise, noise_origin, noise_ops)
    if randomisation.bias_waves:
        gain, offset = _bias(randomisation, grid)
        values = values * (1 + gain) + offset
    values = randomisation.point_transform(values)
    outside = [(p < 0) | (p >= n) for p, n in zip(grid, size, strict=True)]
    if any(mask.any() for mask in outside):
        mask = outside[0][:, None, None] | outside[1][None, :, None] | outside[2][None, None, :]
        values[mask] = randomisation.point_transform(float(fill_value))
    return values.astype(np.float32, copy=False)
