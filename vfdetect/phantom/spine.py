"""Rendering of the spine onto a grid: vertebrae, discs and spinal canal, and vertebra label images.

Each vertebra is a body (cortical shell, trabecular texture, sclerotic endplates, fracture band,
osteophytes) plus pedicles, arch and processes, drawn as signed distances in its own frame;
labels go to the nearest vertebra. :func:`render_labels` and :func:`render_vertebra_labels`
re-render a model's labels on any axis-aligned grid (used to measure the bodies on fine grids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.phantom.anatomy import SpineModel, VertebraShape
from vfdetect.phantom.config import _LUMBAR, _SACRAL
from vfdetect.phantom.grid import _capsule, _ellipse_sdf, _Grid, _smooth_field, _unit

_Part = tuple[tuple[float, float, float], tuple[float, float, float], object]


def _vertebra_parts(shape: VertebraShape) -> list[_Part]:
    """The vertebra's solid parts other than the body: (local box low, high, signed-distance function).

    Local coordinates are (superior, anterior, lateral) mm from ``shape.centre``.
    """
    h, wd = shape.height, shape.width
    lumbar = shape.label in _LUMBAR or shape.label in _SACRAL
    sacral = shape.label in _SACRAL
    canal_v = shape.posterior_wall - shape.canal_ap
    lam = 5.0 if lumbar else 4.0
    ped_r = (5.5 if lumbar else 4.0) * wd / 45.0 + 1.5
    ped_w = shape.canal_lr + 0.5 * ped_r
    parts: list[_Part] = []

    def capsule(start: tuple[float, float, float], stop: tuple[float, float, float], radius: float,
                stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        reach = [radius / s for s in stretch]
        low = tuple(min(a, b) - r - 1.0 for a, b, r in zip(start, stop, reach, strict=True))
        high = tuple(max(a, b) + r + 1.0 for a, b, r in zip(start, stop, reach, strict=True))
        parts.append((low, high, lambda u, v, w: _capsule(u, v, w, start, stop, radius, stretch)))  # type: ignore[arg-type]

    for side in (-1.0, 1.0):
        capsule((0.15 * h, shape.posterior_wall + 5, side * ped_w), (0.15 * h, canal_v - 0.3 * shape.canal_ap, side * ped_w),
                ped_r, (0.7, 1.0, 1.0))
        if not sacral:
            # Superior articular process (lateral) meets the inferior one of the level above
            # (medial, further back) at a facet joint with a narrow gap.
            capsule((0.0, canal_v - 0.2 * shape.canal_ap, side * (shape.canal_lr + 6.5)),
                    (0.8 * h, canal_v - 0.3 * shape.canal_ap, side * (shape.canal_lr + 7.0)), 3.6)
            capsule((-0.1 * h, canal_v - 0.5 * shape.canal_ap - 2.0, side * (shape.canal_lr + 1.5)),
                    (-0.75 * h, canal_v - 0.6 * shape.canal_ap - 3.0, side * (shape.canal_lr + 1.0)), 3.4)
            tp_length, tp_back = 0.5 * wd + (26.0 if lumbar else 20.0), (2.0 if lumbar else 12.0)
            capsule((0.15 * h, canal_v, side * (shape.canal_lr + 4)), (0.1 * h, canal_v - tp_back, side * tp_length), 4.0)
        else:  # sacral ala reaching out to the sacroiliac joint
            radius = 13.0 if shape.label == 26 else 9.0
            capsule((0.0, -0.1 * shape.depth, side * 0.3 * wd), (0.05 * h, canal_v, side * (0.5 * wd + 38.0)), radius, (1.0, 0.8, 1.0))
    ring_low = (-0.6 * h - 1, canal_v - shape.canal_ap - lam - 1, -shape.canal_lr - lam - 1)
    ring_high = (0.35 * h + 1, canal_v, shape.canal_lr + lam + 1)

    def arch(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        outer = _ellipse_sdf(v - canal_v, w, shape.canal_ap + lam, shape.canal_lr + lam)
        inner = _ellipse_sdf(v - canal_v, w, shape.canal_ap, shape.canal_lr)
        return np.maximum(np.maximum(outer, -inner), np.maximum(np.maximum(v - (canal_v - 0.1 * shape.canal_ap), u - 0.35 * h), -0.6 * h - u))

    parts.append((ring_low, ring_high, arch))
    slope = math.radians(shape.spinous_slope_deg)
    sp_start = canal_v - shape.canal_ap - lam + 2.0
    capsule((-0.1 * h, sp_start, 0.0),
            (-0.1 * h - shape.spinous_length * math.sin(slope), sp_start - shape.spinous_length * math.cos(slope), 0.0),
            5.5 if lumbar else 4.0, (0.5 if lumbar else 0.75, 1.0, 1.8))
    return parts


def _body_sdf(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Signed distance (mm, negative inside) of the body, top endplate collapse, endplate heights."""
    h = shape.height
    section = _body_section(shape, u, v, w)
    top, bottom = shape.endplate_losses(v, w)
    total = np.minimum(top + bottom, 0.9)
    top = np.minimum(top, total)
    z_top = h * (0.5 - top)
    z_bottom = -h * (0.5 - (total - top))
    return np.maximum(section, np.maximum(u - z_top, z_bottom - u)), top, z_top, z_bottom


def _body_section(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to the body's horizontal section (its side wall), ignoring the endplates."""
    waist = 1.0 - 0.06 * np.clip(1.0 - (2.0 * u / shape.height) ** 2, 0.0, 1.0)
    return np.maximum(_ellipse_sdf(v, w, 0.5 * shape.depth, 0.5 * shape.width * waist), shape.posterior_wall - 0.004 * w * w - v)


def _local_box(grid: _Grid, shape: VertebraShape, low: Sequence[float], high: Sequence[float]) -> tuple[slice, slice, slice] | None:
    corners = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])])
    world = shape.centre + corners @ shape.frame
    return grid.box(world.min(axis=0), world.max(axis=0))


def _relative(inner: tuple[slice, slice, slice], outer: tuple[slice, slice, slice]) -> tuple[slice, slice, slice] | None:
    out = []
    for a, b in zip(inner, outer, strict=True):
        start, stop = max(a.start, b.start) - b.start, min(a.stop, b.stop) - b.start
        if stop <= start:
            return None
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def _vertebra_extent(shape: VertebraShape) -> tuple[np.ndarray, np.ndarray]:
    reach_back = shape.depth * 0.44 + 2 * shape.canal_ap + 8 + shape.spinous_length
    reach_side = 0.5 * shape.width + (52.0 if shape.label in _SACRAL else 31.0)
    drop = shape.spinous_length * math.sin(math.radians(shape.spinous_slope_deg))
    corners = []
    for du in (-0.7 * shape.height - drop - 6, 0.8 * shape.height + 6):
        for dv in (-reach_back, 0.5 * shape.depth + 3 + shape.osteophyte_mm):
            for dw in (-reach_side, reach_side):
                corners.append(shape.centre + du * shape.frame[0] + dv * shape.frame[1] + dw * shape.frame[2])
    corners_array = np.array(corners)
    return corners_array.min(axis=0), corners_array.max(axis=0)


def _render_column(grid: _Grid, model: SpineModel, hu: np.ndarray | None, rng: np.random.Generator | None = None) -> None:
    """Discs between neighbouring bodies and the fluid of the spinal canal (drawn before bone).

    The disc below a vertebra follows its ``disc_state``: a degenerated disc may hold a gas cleft
    (vacuum phenomenon) or calcifications; any disc has a slightly denser annulus than nucleus.
    """
    if hu is None:
        return
    for below, above in zip(model.vertebrae[1:], model.vertebrae[:-1], strict=True):
        centre = 0.5 * (below.centre + above.centre)
        superior = _unit(above.centre - below.centre)
        anterior = _unit(below.frame[1] + above.frame[1])
        anterior = _unit(anterior - superior * (anterior @ superior))
        frame = np.stack([superior, anterior, np.cross(anterior, superior)])
        half = 0.5 * float(np.linalg.norm(above.centre - below.centre))
        depth = 0.5 * (below.depth + above.depth)
        width = 0.5 * (below.width + above.width)
        canal_ap, canal_lr = 0.5 * (below.canal_ap + above.canal_ap), 0.5 * (below.canal_lr + above.canal_lr)
        reach = np.array([half + 2, 0.5 * depth + 4, 0.5 * width + 4])
        extent = np.abs(frame.T) @ np.array([reach[0], max(reach[1], depth + 2 * canal_ap), reach[2]])
        box = grid.box(centre - extent, centre + extent)
        if box is None:
            continue
        u, v, w = grid.local(box, centre, frame)
        length = np.abs(u) - half
        section = np.maximum(_ellipse_sdf(v, w, 0.51 * depth, 0.52 * width), -0.44 * depth - 0.004 * w * w - v)
        disc = np.clip(0.5 - np.maximum(section, length) / grid.ramp, 0.0, 1.0)
        if above.label in _SACRAL:
            disc_hu: np.ndarray | float = 0.5 * (model.hu["disc"] + below.trabecular_hu) + 100
        else:
            annulus = np.clip(1.0 + section / 6.0, 0.0, 1.0)  # outer 6 mm of the disc
            disc_hu = model.hu["disc"] + 12.0 * annulus
            if rng is not None and above.disc_state in ("vacuum", "calcified"):
                lumpy = _smooth_field(rng, u.shape, grid.spacing, 3.0)
                nucleus = _ellipse_sdf(v - 0.05 * depth, w, 0.22 * depth, 0.25 * width)
                if above.disc_state == "vacuum":  # a thin, branching gas cleft in the nucleus
                    cleft = (nucleus + 1.5 * lumpy < 0) & (np.abs(u) < 0.12 * half + 0.3 * lumpy) & (lumpy > -0.3)
                    disc_hu = np.where(cleft, -550.0 + 150.0 * lumpy, disc_hu)
                else:
                    spots = (lumpy > 1.4) & (section > -4.0)
                    disc_hu = np.where(spots, 260.0 + 80.0 * lumpy, disc_hu)
        canal = np.clip(0.5 - np.maximum(_ellipse_sdf(v + 0.44 * depth + canal_ap, w, canal_ap, canal_lr), length) / grid.ramp, 0.0, 1.0)
        region = hu[box]
        region += disc * (disc_hu - region)
        region += canal * (model.hu["csf"] - region)


def _trabecular_texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, grain_mm: float) -> np.ndarray:
    """Spongy bone over marrow, zero mean, unit sd: a sheet-and-rod network plus coarser heterogeneity.

    The network is the neighbourhood of the zero level set of a band-limited random field (grain
    ``grain_mm``, stretched along z where most trabeculae run); a sparser, thicker network adds the
    bright principal trabeculae and a smooth field the patchy marrow of elderly bone.
    """
    stretch = np.array([1.0, 1.0, 1.7])

    def field(sigma_mm: float) -> np.ndarray:
        noise = rng.standard_normal(shape).astype(np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma_mm * stretch / spacing, truncate=3.0)
        return smooth / (smooth.std() + 1e-6)

    network = np.exp(-(field(0.55 * grain_mm) / 0.5) ** 2)
    principal = np.exp(-(field(1.1 * grain_mm) / 0.22) ** 2)
    patches = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.2 / spacing, truncate=2.5)
    patches /= patches.std() + 1e-6
    texture = network + 1.3 * principal + 0.45 * patches
    return ((texture - texture.mean()) / (texture.std() + 1e-6)).astype(np.float32)


def _osteophyte_sdf(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray, section: np.ndarray,
                    z_top: np.ndarray, z_bottom: np.ndarray) -> np.ndarray:
    """Signed distance of the beak-shaped spurs along the anterior and lateral rims of both endplates."""
    reach = shape.osteophyte_mm * np.clip((v / (0.5 * shape.depth) - 0.15) / 0.5, 0.0, 1.0)
    reach = reach * (0.7 + 0.3 * np.cos(3.0 * np.arctan2(w, np.abs(v) + 1e-3)) ** 2)
    safe = np.maximum(reach, 0.3)
    out_frac = np.clip(section / safe, 0.0, 1.0)
    curl = 0.6 * safe * out_frac**2  # the spur bends towards the disc
    half = 0.4 + 1.1 * (1.0 - out_frac)
    result = np.full(u.shape, 1e3, dtype=np.float32)
    for t in (u - z_top, z_bottom - u):
        spur = np.maximum(np.abs(t - curl + 0.3) - half, np.maximum(section - safe, -section - 1.0))
        result = np.minimum(result, spur)
    return np.where(reach > 0.3, result, np.float32(1e3))


def _render_vertebrae(grid: _Grid, model: SpineModel, hu: np.ndarray | None, labels: np.ndarray,
                      best: np.ndarray, rng: np.random.Generator | None = None) -> None:
    """Bone of every vertebra: cortical shell, trabecular core, fracture sclerosis; labels by nearest."""
    texture_hu = float(model.traits.get("texture_hu", 50.0))
    grain_mm = float(model.traits.get("texture_mm", 1.2))
    for shape in model.vertebrae:
        low, high = _vertebra_extent(shape)
        box = grid.box(low, high)
        if box is None:
            continue
        box_shape = tuple(s.stop - s.start for s in box)
        whole = np.full(box_shape, 1e3, dtype=np.float32)
        body = np.full(box_shape, 1e3, dtype=np.float32)
        band = None
        spur = shape.osteophyte_mm + 1.0
        body_low = (-0.5 * shape.height - spur, shape.posterior_wall - 1, -0.5 * shape.width - spur)
        body_high = (0.5 * shape.height + spur, 0.5 * shape.depth + spur, 0.5 * shape.width + spur)
        body_box = _local_box(grid, shape, body_low, body_high)
        if body_box is not None and (sub := _relative(body_box, box)) is not None:
            absolute = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(sub, box, strict=True))
            u, v, w = grid.local(absolute, shape.centre, shape.frame)  # type: ignore[arg-type]
            body_sdf, top, z_top, z_bottom = _body_sdf(shape, u, v, w)
            if shape.osteophyte_mm > 0.3:
                section = _body_section(shape, u, v, w)
                body_sdf = np.minimum(body_sdf, _osteophyte_sdf(shape, u, v, w, section, z_top, z_bottom))
            body[sub] = body_sdf
            whole[sub] = body_sdf
            if hu is not None:
                band = np.zeros(box_shape, dtype=np.float32)
                if shape.profile != "normal" and max(shape.top_loss, shape.bottom_loss) > 0.1:
                    band[sub] = 140.0 * np.clip(1.0 - (z_top - u) / 5.0, 0.0, 1.0) * np.clip(top / 0.2, 0.0, 1.0)
                vein = _capsule(u, v, w, (0.0, shape.posterior_wall + 1.0, 0.0), (0.0, shape.posterior_wall + 7.0, 0.0), 1.6)
                band[sub] += np.where(vein < 0, 0.5 * (model.hu["vein"] - shape.trabecular_hu), 0.0)
                to_plate = np.minimum(z_top - u, u - z_bottom)
                if rng is not None:
                    # Subchondral sclerosis of uneven thickness and density under the endplates.
                    uneven = _smooth_field(rng, band[sub].shape, grid.spacing, 5.0)
                    plate_mm = np.float32(1.8) + np.float32(0.7) * uneven
                    plate_hu = np.float32(150.0) + np.float32(50.0) * _smooth_field(rng, band[sub].shape, grid.spacing, 7.0)
                    band[sub] += plate_hu * np.clip(1.0 - to_plate / plate_mm, 0.0, 1.0)
                    band[sub] += texture_hu * _trabecular_texture(rng, band[sub].shape, grid.spacing, grain_mm)
                else:
                    band[sub] += 90.0 * np.clip(1.0 - to_plate / 2.5, 0.0, 1.0)
        for part_low, part_high, function in _vertebra_parts(shape):
            part_box = _local_box(grid, shape, part_low, part_high)
            if part_box is None or (sub := _relative(part_box, box)) is None:
                continue
            absolute = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(sub, box, strict=True))
            u, v, w = grid.local(absolute, shape.centre, shape.frame)  # type: ignore[arg-type]
            np.minimum(whole[sub], function(u, v, w), out=whole[sub])  # type: ignore[operator]
        region_best = best[box]
        inside = (whole < 0) & (whole < region_best)
        labels[box][inside] = shape.label
        region_best[inside] = whole[inside]
        if hu is None:
            continue
        occupancy = np.clip(0.5 - whole / grid.ramp, 0.0, 1.0)
        if rng is not None:  # cortex of uneven thickness and density
            uneven = _smooth_field(rng, box_shape, grid.spacing, 6.0)
            cortex_mm = shape.cortex_mm * (1.0 + 0.3 * np.clip(uneven, -2.0, 2.0))
            cortex_hu = shape.cortex_hu * (1.0 + 0.12 * _smooth_field(rng, box_shape, grid.spacing, 4.0))
        else:
            cortex_mm = np.full(box_shape, shape.cortex_mm, dtype=np.float32)
            cortex_hu = np.full(box_shape, shape.cortex_hu, dtype=np.float32)
        shell = np.clip((whole + np.where(body < 0, 1.0, 1.4) * cortex_mm) / grid.ramp + 0.5, 0.0, 1.0)
        core = np.where(body < 0, shape.trabecular_hu, shape.trabecular_hu + 90.0)  # arches: denser, thick cortex
        if band is not None:
            core += band
        bone = core + (cortex_hu - core) * shell
        region = hu[box]
        region += occupancy * (bone - region)


def render_labels(model: SpineModel, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Vertebra label image (uint8, VerSe labels) of ``model`` on an axis-aligned RAS grid.

    ``affine`` must be diagonal with positive spacing (any origin); used by the tests to measure
    the generated bodies on fine grids.
    """
    affine = np.asarray(affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise VfdetectError("render_labels needs an axis-aligned RAS affine with positive spacing")
    grid = _Grid(affine[:3, 3], np.diag(affine)[:3], tuple(int(n) for n in shape))  # type: ignore[arg-type]
    labels = np.zeros(grid.shape, dtype=np.uint8)
    best = np.full(grid.shape, np.inf, dtype=np.float32)
    _render_vertebrae(grid, model, None, labels, best)
    return labels


def render_vertebra_labels(model: SpineModel, label: int, spacing: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Label image of vertebra ``label`` alone, whole, on a fine RAS grid; returns (labels, affine)."""
    vertebra = model.by_label(label)
    low, high = _vertebra_extent(vertebra)
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = low
    return render_labels(replace(model, vertebrae=(vertebra,)), affine, shape), affine  # type: ignore[arg-type]
