"""Where to run the network: the inference region of a scan (around given centroids, or the spine found in bone).

Inference region. Fractures only exist in vertebrae, so by default the network runs only where a
vertebra can be (:func:`inference_region`): boxes around given centroids (+-30 mm across, +-25 mm
along the spine, far more than the 10 mm scoring cube needs), or, without centroids, the bone of
the vertebral column found by :func:`spine_region`, dilated by a few millimetres, and then grown
where the network's own output asks for it (:func:`region_growth`): wherever the computed map
shows a vertebra (or a fracture) near the region's edge, the region is extended around it and the
new voxels computed, until everything the network found lies inside with a guard band. Only the
output block is restricted: every computed voxel still reads the real image around it, so inside
the region the map equals whole-volume inference exactly; outside it every voxel is background. A
scan without bone (a blank volume) has no spine region, no vertebrae and the warning "no spine
found". ``PredictConfig(region="whole")`` gives whole-volume inference.

Numpy/scipy only, on the internal frame (axis-aligned affine, arrays ``[x, y, z]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.tiling import round_up

REGION_MODES: tuple[str, ...] = ("spine", "whole")
"""``spine``: the network runs only where a vertebra can be (default); ``whole``: over the whole
volume (minus air tiles when ``PredictConfig.skip_air``)."""


@dataclass(frozen=True)
class SpineRegionConfig:
    """Parameters of the inference region (lengths in mm, on the internal frame).

    With centroids: a box of +-``box_across_mm`` (x, y) and +-``box_along_mm`` (z) around each.
    Without: :func:`spine_region` finds the vertebral column in bone (HU > ``bone_hu``) on a coarse
    grid of ``coarse_mm`` blocks (a block is bone when at least ``bone_fraction`` of it is, which
    also drops specks smaller than that), per axial slab of ``slab_mm``; see its docstring. The
    column's bone is dilated by ``margin_mm``.

    Growth (:func:`region_growth`, without centroids): after each pass, blocks of the region within
    ``grow_guard_mm`` of its edge where the network gives p(background) <= 1 - ``grow_threshold``
    are surrounded by ``grow_mm`` more region; and the first time nothing is left to enclose, the
    chain of bodies localised so far is extended at both ends by a centroid box where the next body
    would be (:func:`chain_extension`; one step beyond the end, as far as the last two bodies are
    apart, or ``extend_step_mm`` along z from a single body). At most ``grow_rounds`` rounds in all.
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
    reach_mm: float = 35.0
    anterior_reach_mm: float = 45.0
    margin_mm: float = 5.0
    grow_threshold: float = 0.3
    grow_guard_mm: float = 6.0
    grow_mm: float = 20.0
    grow_rounds: int = 6
    extend_step_mm: float = 35.0

    def __post_init__(self) -> None:
        for name in ("box_across_mm", "box_along_mm", "coarse_mm", "slab_mm", "blob_sigma_mm", "midline_sigma_mm",
                     "anterior_sigma_mm", "max_jump_mm", "reach_mm", "anterior_reach_mm"):
            if not getattr(self, name) > 0:
                raise VfdetectError(f"spine region {name} must be positive")
        if self.margin_mm < 0 or not 0.0 < self.bone_fraction <= 1.0 or self.min_column_density < 0:
            raise VfdetectError("spine region margin must be >= 0, bone_fraction in (0, 1], min_column_density >= 0")
        if (not 0.0 < self.grow_threshold < 1.0 or self.grow_guard_mm < 0 or self.grow_mm <= 0 or self.grow_rounds < 0
                or self.extend_step_mm <= 0):
            raise VfdetectError("spine region growth: threshold in (0, 1), guard >= 0, grow_mm and extend_step_mm > 0, "
                                "rounds >= 0")


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


def _block_mean(mask: np.ndarray, factor: int, pad: bool = False) -> np.ndarray:
    """Fraction of True voxels in each ``factor``-cube block (the last blocks padded with ``pad``)."""
    if factor == 1:
        return mask.astype(np.float32)
    padded_shape = [round_up(n, factor) for n in mask.shape]
    padded = np.full(padded_shape, float(pad), dtype=np.float32)
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
    ``reach_mm`` of the track point (``anterior_reach_mm`` in front of it, where the body lies: on
    real scans the track point sits up to about 37 mm behind the body's centroid) is the core,
    which is dilated by ``margin_mm`` in 3D (plus one coarse block for the grid's coarseness).
    The core need not hold every body whole: :func:`region_growth` adds what the network finds
    at its edge.
    """
    from scipy import ndimage

    hu = np.asarray(hu)
    factor, coarse_mm = _coarse_factor(spacing, config)
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
    # Distances in units of the reach: ``anterior_reach_mm`` in front of the track point (+y), where
    # the vertebral body lies, ``reach_mm`` elsewhere.
    for index in np.flatnonzero(found):
        z0 = index * slab
        across = (xs - picks[index, 0]) * coarse_mm / config.reach_mm
        ahead = (ys - picks[index, 1]) * coarse_mm
        ahead = ahead / np.where(ahead > 0, config.anterior_reach_mm, config.reach_mm)
        distance = np.hypot(xs - picks[index, 0], ys - picks[index, 1])
        slab_bone = bone[:, :, z0 : z0 + slab].any(axis=2) & (np.hypot(across, ahead) <= 1.0)
        slab_bone |= distance <= max(1.0, 8.0 / coarse_mm)
        core[:, :, z0 : z0 + slab] |= slab_bone[:, :, None]
    near = ndimage.distance_transform_edt(~core, sampling=coarse_mm) <= config.margin_mm + coarse_mm
    for axis in range(3):
        near = np.repeat(near, factor, axis=axis)
    region[...] = near[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return region


def _coarse_factor(spacing: float, config: SpineRegionConfig) -> tuple[int, float]:
    factor = max(1, int(round(config.coarse_mm / spacing)))
    return factor, factor * float(spacing)


def region_growth(
    region: np.ndarray,
    p_background: np.ndarray,
    spacing: float,
    allowed: np.ndarray | None = None,
    config: SpineRegionConfig = SpineRegionConfig(),
) -> np.ndarray | None:
    """Voxels to add to a computed ``region`` so that what the network found in it is enclosed, or
    None when nothing needs adding.

    ``p_background`` is the computed map's p(background) (same shape as ``region``); a voxel is
    found (a vertebra or a fracture) where it is at most ``1 - grow_threshold``. On blocks of
    ``coarse_mm``: the blocks holding a found voxel of the region and lying within
    ``grow_guard_mm`` of the region's edge (not the volume's edge, beyond which nothing can be
    computed) are surrounded by ``grow_mm``; of that, the voxels outside the region and inside
    ``allowed`` (the body; None: anywhere) are returned. Localisation smooths p(vertebra) by 1.5
    mm and thresholds it at 0.5, and scores average a 10 mm cube around a centroid, so a body
    enclosed this way is localised and scored as in whole-volume inference.
    """
    from scipy import ndimage

    region = np.asarray(region, dtype=bool)
    factor, coarse_mm = _coarse_factor(spacing, config)
    # Found voxels and the region on a lattice of every other voxel (a body is far thicker than
    # that), in blocks of ``factor`` voxels: 8x less to read from the full-size map.
    step = 2 if factor % 2 == 0 else 1
    sampled = np.asarray(region[::step, ::step, ::step])
    if not sampled.any():
        return None
    found = sampled & (np.asarray(p_background[::step, ::step, ::step], dtype=np.float32) <= 1.0 - config.grow_threshold)
    if not found.any():
        return None
    blocks = factor // step
    inside = _block_mean(sampled, blocks, pad=True) >= 1.0  # blocks wholly in the region (or beyond the volume)
    depth = ndimage.distance_transform_edt(inside, sampling=coarse_mm)
    hits = (_block_mean(found, blocks) > 0) & (depth <= config.grow_guard_mm)
    if not hits.any():
        return None
    near = ndimage.distance_transform_edt(~hits, sampling=coarse_mm) <= config.grow_mm
    # Back to full size a slab of blocks at a time, so that the result is the only full-size array
    # (on a 512 x 512 x 600 scan each is 157 MB); ``near & ~region`` is ``near > region`` on booleans.
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    add = np.zeros(region.shape, dtype=bool)
    for index in range(near.shape[0]):
        start, stop = index * factor, min((index + 1) * factor, region.shape[0])
        if start >= stop:
            break
        slab = np.repeat(np.repeat(near[index], factor, axis=0), factor, axis=1)[: region.shape[1], : region.shape[2]]
        np.greater(slab[None], region[start:stop], out=add[start:stop])
        if allowed is not None:
            add[start:stop] &= allowed[start:stop]
    return add if add.any() else None


def chain_extension(
    centres_mm: Sequence[Sequence[float] | np.ndarray],
    region: np.ndarray,
    affine: np.ndarray,
    allowed: np.ndarray | None = None,
    config: SpineRegionConfig = SpineRegionConfig(),
) -> np.ndarray | None:
    """Voxels to add to ``region`` where the vertebral column would continue beyond the bodies found
    so far, or None when there is nothing new to compute.

    ``centres_mm`` are the bodies' centroids (world mm) ordered along the spine. Beyond each end the
    next body is expected one step further, the step being the vector between the last two bodies
    (or ``extend_step_mm`` along world z from a lone body); a centroid box (``box_across_mm``,
    ``box_along_mm``, :func:`centroid_region`) around that point, minus the region and outside
    ``allowed`` (the body; None: anywhere), is returned. Where the column ends (or leaves the field
    of view) the network finds nothing there, and the next call proposes the same boxes, already
    in the region: None.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    if len(centres) == 0:
        return None
    targets = []
    for end, inner, sign in ((0, 1, 1.0), (len(centres) - 1, len(centres) - 2, -1.0)):
        if len(centres) > 1:
            step = centres[end] - centres[inner]
        else:
            step = np.array([0.0, 0.0, sign * config.extend_step_mm])
        targets.append(centres[end] + step)
    add = centroid_region(region.shape, affine, targets, config.box_across_mm, config.box_along_mm)
    np.greater(add, region, out=add)  # add & ~region without a second full-size array
    if allowed is not None:
        add &= np.asarray(allowed, dtype=bool)
    return add if add.any() else None


@dataclass(frozen=True)
class InferenceRegion:
    """Where :func:`predict_case` runs the network: ``mask`` (None: everywhere), whether values
    outside it are forced to background (``restrict``) and whether it grows where the network finds
    a vertebra at its edge (``grows``, :func:`region_growth`), with a description for the report."""

    mode: str
    source: str
    mask: np.ndarray | None
    restrict: bool
    grows: bool = False

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
    return InferenceRegion("spine", "bone", mask, restrict=True, grows=config.grow_rounds > 0)
