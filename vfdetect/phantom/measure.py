"""Morphometry of vertebral bodies and soft-tissue HU, from any label mask and CT (real or phantom).

:func:`measure_vertebral_bodies` measures body heights, depth, width, disc heights, tissue HU and
trabecular texture; :func:`measure_soft_tissue` muscle and fat HU. This is how the phantoms were
calibrated against real CT (``experiments/calibration``) and how the tests check every fracture's
height loss against its grade.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from vfdetect.phantom.grid import _unit


@dataclass(frozen=True)
class BodyMeasurement:
    """Morphometry and HU of one vertebral body, mm and HU; NaN where the scan cuts it off.

    Heights are measured along the local spine axis (from the neighbouring centroids) in the
    mid-sagittal plane at the posterior, middle and anterior points (at 75 % of the half-depth from
    the body's middle); ``disc_height_below_mm`` is the gap to the next caudal body along the line
    joining the centroids. ``trabecular_hu`` is the median HU of the body interior >= 3 mm from its
    surface, ``cortex_hu`` the mean and ``cortex_p90_hu`` the 90th percentile of the body's rim
    voxels, ``disc_hu`` the mean HU in the middle third of the disc below.

    Texture of the trabecular bone: ``trabecular_sd_hu`` is the median, over the interior voxels,
    of the HU standard deviation in a window of about 3 x 3 x 3 mm (at least 2 voxels a side)
    around each (noise included, as the network sees it); ``trabecular_psd_slope`` the slope of log power against log spatial
    frequency (0.08-0.42 cycles/mm) of a Hann-windowed 12 mm cube sampled at 1 mm in the middle of
    the body (steeper: smoother, coarser texture; NaN where the cube does not fit in the body).
    """

    label: int
    height_posterior_mm: float
    height_middle_mm: float
    height_anterior_mm: float
    depth_mm: float
    width_mm: float
    disc_height_below_mm: float = float("nan")
    trabecular_hu: float = float("nan")
    cortex_hu: float = float("nan")
    cortex_p90_hu: float = float("nan")
    disc_hu: float = float("nan")
    trabecular_sd_hu: float = float("nan")
    trabecular_psd_slope: float = float("nan")

    @property
    def heights(self) -> tuple[float, float, float]:
        return (self.height_posterior_mm, self.height_middle_mm, self.height_anterior_mm)

    def height_loss(self, reference_height_mm: float) -> float:
        """1 - (smallest Genant height) / ``reference_height_mm``."""
        return 1.0 - min(self.heights) / reference_height_mm


class _LineSampler:
    """Trilinear samples of a volume at world points; NaN outside the grid."""

    def __init__(self, array: np.ndarray, affine: np.ndarray) -> None:
        self.array = np.asarray(array, dtype=np.float32)
        self.inverse = np.linalg.inv(np.asarray(affine, dtype=float))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        voxels = points @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        return ndimage.map_coordinates(self.array, voxels.T, order=1, mode="constant", cval=np.nan)

    def exit_distance(self, origin: np.ndarray, direction: np.ndarray, step: float = 0.1, reach: float = 90.0) -> float:
        """Distance from ``origin`` along ``direction`` to where the indicator drops below 0.5."""
        distances = np.arange(0.0, reach, step)
        values = self(origin[None, :] + distances[:, None] * direction[None, :])
        if not values[0] >= 0.5:
            return float("nan")
        below = np.flatnonzero(~(values >= 0.5))
        if below.size == 0:
            return float("nan")
        i = int(below[0])
        if not np.isfinite(values[i]):
            return float("nan")
        fraction = (values[i - 1] - 0.5) / (values[i - 1] - values[i])
        return float(distances[i - 1] + fraction * step)


def _height_at(sampler: _LineSampler, point: np.ndarray, superior: np.ndarray, lateral: np.ndarray, step_mm: float) -> float:
    """Median over three parallel lines (1.5 mm apart laterally) of the body's extent along ``superior``."""
    values = []
    for side in (-1.5, 0.0, 1.5):
        origin = point + lateral * side
        values.append(sampler.exit_distance(origin, superior, step_mm) + sampler.exit_distance(origin, -superior, step_mm))
    return float(np.median(values))


def _neighbour_axis(label: int, centroids: Mapping[int, np.ndarray]) -> np.ndarray:
    order = sorted(centroids, key=_rank)
    i = order.index(label)
    above = centroids[order[i - 1]] if i > 0 else centroids[label]
    below = centroids[order[i + 1]] if i + 1 < len(order) else centroids[label]
    if np.allclose(above, below):
        return np.array([0.0, 0.0, 1.0])
    axis = _unit(np.asarray(above, dtype=float) - np.asarray(below, dtype=float))
    return axis if axis[2] >= 0 else -axis


def _rank(label: int) -> int:
    from vfdetect.vertebrae import spine_rank

    return spine_rank(label)


def measure_vertebral_bodies(labels: np.ndarray, affine: np.ndarray, centroids: Mapping[int, Sequence[float]],
                             hu: np.ndarray | None = None, step_mm: float = 0.1) -> dict[int, BodyMeasurement]:
    """Measure every vertebral body named in ``centroids`` (world mm body centroids).

    ``labels`` is a whole-vertebra label image (VerSe numbering) on the grid ``affine``; ``hu``
    an optional CT on the same grid for the tissue HU. Lines are sampled with trilinear
    interpolation of each vertebra's indicator, so heights are sub-voxel on fine grids.
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    points = {int(k): np.asarray(v, dtype=float) for k, v in centroids.items()}
    order = sorted(points, key=_rank)
    results: dict[int, BodyMeasurement] = {}
    hu_sampler = _LineSampler(hu, affine) if hu is not None else None
    for label in order:
        indicator = labels == label
        if not indicator.any():
            continue
        box = ndimage.find_objects(indicator.astype(np.uint8))[0]
        pad = [slice(max(0, s.start - 2), min(n, s.stop + 2)) for s, n in zip(box, labels.shape, strict=True)]
        sub_affine = affine.copy()
        sub_affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in pad]) + affine[:3, 3]
        sub_indicator = indicator[tuple(pad)]
        sampler = _LineSampler(sub_indicator, sub_affine)
        centre = points[label]
        superior = _neighbour_axis(label, points)
        voxels = np.argwhere(sub_indicator)
        mass = (sub_affine[:3, :3] @ voxels.mean(axis=0)) + sub_affine[:3, 3]
        anterior = centre - mass
        anterior = anterior - superior * (anterior @ superior)
        if np.linalg.norm(anterior) < 1e-3:
            anterior = np.array([0.0, 1.0, 0.0]) - superior * superior[1]
        anterior = _unit(anterior)
        lateral = np.cross(anterior, superior)
        forward = sampler.exit_distance(centre, anterior, step_mm)
        backward = sampler.exit_distance(centre, -anterior, step_mm)
        middle = centre + anterior * 0.5 * (forward - backward)
        half = 0.5 * (forward + backward)

        posterior_h, middle_h, anterior_h = (
            _height_at(sampler, middle + anterior * offset, superior, lateral, step_mm) for offset in (-0.75 * half, 0.0, 0.75 * half)
        )
        widths = []
        for offset in (-2.0, 0.0, 2.0):
            origin = middle + superior * offset
            widths.append(sampler.exit_distance(origin, lateral, step_mm) + sampler.exit_distance(origin, -lateral, step_mm))
        width = float(np.median(widths))
        measurement = BodyMeasurement(label, posterior_h, middle_h, anterior_h, 2 * half, width)
        i = order.index(label)
        if i + 1 < len(order) and (labels == order[i + 1]).any():
            below_label = order[i + 1]
            segment = points[below_label] - centre
            length = float(np.linalg.norm(segment))
            direction = segment / length
            leave = sampler.exit_distance(centre, direction, step_mm, reach=length)
            below_sampler = _LineSampler(labels == below_label, affine)
            enter = length - below_sampler.exit_distance(points[below_label], -direction, step_mm, reach=length)
            gap = (enter - leave) * abs(float(direction @ superior))
            disc_hu = float("nan")
            if hu_sampler is not None and np.isfinite(gap) and gap > 0:
                samples = []
                for fraction in np.linspace(0.35, 0.65, 4):
                    origin = centre + direction * (leave + fraction * (enter - leave))
                    for da in (-4.0, 0.0, 4.0):
                        for dl in (-4.0, 0.0, 4.0):
                            samples.append(origin + anterior * da + lateral * dl)
                disc_hu = float(np.nanmean(hu_sampler(np.array(samples))))
            measurement = replace(measurement, disc_height_below_mm=float(gap), disc_hu=disc_hu)
        if hu is not None and np.isfinite(half) and np.isfinite(middle_h) and np.isfinite(width):
            region = tuple(pad)
            inside_distance = ndimage.distance_transform_edt(sub_indicator, sampling=spacing)
            grid_points = np.argwhere(np.ones(sub_indicator.shape, dtype=bool))
            world = grid_points @ sub_affine[:3, :3].T + sub_affine[:3, 3]
            offset = world - middle
            t = (offset @ superior).reshape(sub_indicator.shape)
            a = (offset @ anterior).reshape(sub_indicator.shape)
            lat = (offset @ lateral).reshape(sub_indicator.shape)
            ellipsoid = (t / (0.5 * middle_h)) ** 2 + (a / half) ** 2 + (lat / (0.5 * width)) ** 2
            ct = np.asarray(hu)[region]
            core = sub_indicator & (inside_distance >= 3.0) & (ellipsoid < 1.0)
            rim = sub_indicator & (inside_distance <= max(1.5, float(spacing.min()) + 1e-3)) & (ellipsoid < 1.3) & (a > -half + 1.0)
            if core.any():
                measurement = replace(measurement, trabecular_hu=float(np.median(ct[core])),
                                      trabecular_sd_hu=_local_sd(ct, core, spacing))
            if hu_sampler is not None:
                frame = np.stack([superior, anterior, lateral])
                measurement = replace(measurement, trabecular_psd_slope=_spectrum_slope(hu_sampler, sampler, middle, frame))
            if rim.any():
                measurement = replace(measurement, cortex_hu=float(np.mean(ct[rim])),
                                      cortex_p90_hu=float(np.percentile(ct[rim], 90)))
        results[label] = measurement
    return results


def _local_sd(ct: np.ndarray, core: np.ndarray, spacing: np.ndarray, window_mm: float = 3.0) -> float:
    """Median over ``core`` voxels of the HU standard deviation in a ~``window_mm`` box around each."""
    size = [max(2, int(round(window_mm / float(s)))) for s in spacing]
    values = np.asarray(ct, dtype=np.float64)
    mean = ndimage.uniform_filter(values, size=size)
    square = ndimage.uniform_filter(values * values, size=size)
    inner = ndimage.binary_erosion(core, structure=np.ones(size, dtype=bool))
    if not inner.any():
        return float("nan")
    return float(np.median(np.sqrt(np.clip(square - mean * mean, 0.0, None))[inner]))


def _spectrum_slope(hu_sampler: _LineSampler, indicator: _LineSampler, middle: np.ndarray, frame: np.ndarray,
                    side: int = 12, band: tuple[float, float] = (0.08, 0.42)) -> float:
    """Log-log slope of the radially averaged power spectrum of a 1 mm cube in the body's frame."""
    steps = np.arange(side, dtype=float) - 0.5 * (side - 1)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    points = middle[None, :] + grid @ frame
    inside = indicator(points)
    values = hu_sampler(points)
    if not (np.all(inside >= 0.5) and np.all(np.isfinite(values))):
        return float("nan")
    cube = values.reshape(side, side, side)
    hann = np.hanning(side + 2)[1:-1]
    window = hann[:, None, None] * hann[None, :, None] * hann[None, None, :]
    power = np.abs(np.fft.fftn((cube - cube.mean()) * window)) ** 2
    frequencies = np.fft.fftfreq(side)
    fx, fy, fz = np.meshgrid(frequencies, frequencies, frequencies, indexing="ij")
    radius = np.sqrt(fx**2 + fy**2 + fz**2).ravel()
    edges = np.arange(0.5, side // 2 + 1) / side
    index = np.digitize(radius, edges)
    centres, means = [], []
    for i in range(1, len(edges)):
        chosen = index == i
        centre = 0.5 * (edges[i - 1] + edges[i])
        if chosen.any() and band[0] <= centre <= band[1]:
            centres.append(centre)
            means.append(float(power.ravel()[chosen].mean()))
    if len(centres) < 3 or min(means) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def measure_soft_tissue(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                        centroids: Mapping[int, Sequence[float]]) -> dict[str, float]:
    """Median HU of paraspinal muscle and of body fat, and the HU spread within muscle.

    Muscle: 6 mm spheres 30 mm behind each body's posterior wall and 25 mm to each side (the
    erector spinae), voxels within the muscle window -29..150 HU. Fat: voxels of the image smoothed
    by a 3-voxel box filter within the fat window -190..-30 HU. ``muscle_sd_hu`` approximates image
    noise plus texture.
    """
    hu = np.asarray(hu, dtype=np.float32)
    affine = np.asarray(affine, dtype=float)
    measurements = measure_vertebral_bodies(labels, affine, centroids)
    points = {int(k): np.asarray(v, dtype=float) for k, v in centroids.items()}
    sampler = _LineSampler(hu, affine)
    samples = []
    offsets = np.array([(a, b, c) for a in range(-6, 7, 2) for b in range(-6, 7, 2) for c in range(-6, 7, 2)
                        if a * a + b * b + c * c <= 36], dtype=float)
    for label, measurement in measurements.items():
        if not np.isfinite(measurement.depth_mm):
            continue
        superior = _neighbour_axis(label, points)
        voxels = np.argwhere(labels == label)
        mass = (affine[:3, :3] @ voxels.mean(axis=0)) + affine[:3, 3]
        anterior = _unit((points[label] - mass) - superior * ((points[label] - mass) @ superior))
        lateral = np.cross(anterior, superior)
        back = points[label] - anterior * (0.5 * measurement.depth_mm + 30.0)
        for side in (-25.0, 25.0):
            samples.append(sampler(back + lateral * side + offsets))
    values = np.concatenate(samples) if samples else np.array([np.nan])
    values = values[np.isfinite(values) & (values >= -29) & (values <= 150)]
    # Fat on a 3-voxel box-smoothed image, so that noise in muscle does not leak into the fat window.
    smoothed = ndimage.uniform_filter(hu, size=3)
    fat = smoothed[(smoothed > -500) & (smoothed >= -190) & (smoothed <= -30)]
    return {
        "muscle_hu": float(np.median(values)) if values.size else float("nan"),
        "muscle_sd_hu": float(np.std(values)) if values.size else float("nan"),
        "fat_hu": float(np.median(fat)) if fat.size else float("nan"),
    }
