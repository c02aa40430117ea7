"""Rendering of everything around the spine: soft tissue, organs, vessels, gas, lungs, ribs and pelvis."""

from __future__ import annotations

import math

import numpy as np

from vfdetect.phantom.anatomy import SpineModel
from vfdetect.phantom.config import _THORACIC
from vfdetect.phantom.grid import _Grid, _smooth_field


def _spine_path(model: SpineModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body-centre x and y of the spine as increasing-z tables (for torso-level structures)."""
    centres = np.array([shape.body_centroid for shape in model.vertebrae])[::-1]
    return centres[:, 2], centres[:, 0], centres[:, 1]


def _render_torso(grid: _Grid, model: SpineModel, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue, fat, muscles, organs, gas, lungs and air, as HU float32."""
    x, y, z = grid.axes
    zs, xs, ys = _spine_path(model)
    spine_x = np.interp(z, zs, xs)[None, None, :]
    spine_y = np.interp(z, zs, ys)[None, None, :]
    level_z = {shape.label: float(shape.body_centroid[2]) for shape in model.vertebrae}
    widths = np.interp(z, zs, [model.by_label(label).width for label in
                               [s.label for s in model.vertebrae][::-1]])[None, None, :]
    depths = np.interp(z, zs, [s.depth for s in model.vertebrae][::-1])[None, None, :]
    scale = float(np.median(widths)) / 40.0
    # Torso: ellipse whose back lies behind the spinous processes; wider at the pelvis.
    pelvis_widening = np.clip((level_z[22] - z) / 80.0, 0.0, 1.0)[None, None, :] * 20.0 * scale
    half_width = model.torso_half_width + pelvis_widening
    half_depth = model.torso_half_depth
    back = spine_y - model.back_depth - model.fat_mm
    torso_cy = back + half_depth
    dx = x[:, None, None] - spine_x
    dy = y[None, :, None] - torso_cy
    radius = np.sqrt((dx / half_width) ** 2 + (dy / half_depth) ** 2)
    mean_radius = 0.5 * (half_width + half_depth)
    depth_in = (1.0 - radius) * mean_radius  # mm inside the skin (approximate)
    hu = np.full(grid.shape, model.hu["air"], dtype=np.float32)
    body = np.clip(0.5 + depth_in / grid.ramp, 0.0, 1.0)
    texture = _smooth_field(rng, grid.shape, grid.spacing, 18.0)
    fat_fraction = np.clip((texture + 0.1) / 0.25, 0.0, 1.0)
    visceral = model.hu["organ"] + (model.hu["fat"] - model.hu["organ"]) * fat_fraction
    tissue = np.where(depth_in < model.fat_mm, model.hu["fat"],
                      np.where(depth_in < model.fat_mm + 10.0, model.hu["muscle"], visceral)).astype(np.float32)
    dyspine = y[None, :, None] - spine_y
    # Paraspinal muscles behind the spine, psoas beside the lumbar bodies.
    paraspinal = ((dx / (62.0 * scale)) ** 2 + ((dyspine + 0.55 * model.back_depth) / (0.5 * model.back_depth + 8.0)) ** 2) < 1.0
    psoas_radius = np.clip((level_z[19] - z) / (level_z[19] - level_z[24] + 1e-6), 0.0, 1.0)[None, None, :] * 22.0 * scale
    psoas = ((np.abs(dx) - 0.5 * widths - psoas_radius - 4.0) ** 2 + (dyspine - 5.0) ** 2) < psoas_radius**2
    muscle = (paraspinal | psoas) & (depth_in >= model.fat_mm)
    # Muscle with fatty streaks along the fibres (a field stretched cranio-caudally).
    streaks = _smooth_field(rng, grid.shape, grid.spacing * np.array([1.0, 1.0, 0.3]), 5.0)
    marbled = model.hu["muscle"] + 7.0 * streaks + (model.hu["fat"] - model.hu["muscle"]) * 0.6 * np.clip(streaks - 1.5, 0.0, 1.0)
    tissue = np.where(muscle, marbled, tissue)
    # Aorta in front-left of the spine; liver right, kidneys beside the psoas.
    aorta = ((dx + 18.0 * scale) ** 2 + (dyspine - 0.5 * depths - 14.0 * scale) ** 2) < (11.0 * scale) ** 2
    aorta &= (z[None, None, :] > level_z[23])
    kidney_z = np.clip(1.0 - np.abs(z - 0.5 * (level_z[19] + level_z[22])) / (0.6 * abs(level_z[19] - level_z[22]) + 1e-6), 0, 1)
    kidneys = ((np.abs(dx) - 68.0 * scale) / (28.0 * scale)) ** 2 + ((dyspine - 5.0) / (22.0 * scale)) ** 2 < kidney_z[None, None, :]
    liver_z = (z < level_z[15] + 20) & (z > level_z[21])
    liver = (dx > 10.0 * scale) & (dyspine > 0.5 * depths + 5) & (depth_in > model.fat_mm + 12) & liver_z[None, None, :]
    tissue = np.where(liver | kidneys, model.hu["organ"] + 15.0, tissue)
    # Inferior vena cava right-anterior of the spine, flatter than the aorta, up to the confluence at L5.
    ivc = ((dx - 22.0 * scale) / (13.0 * scale)) ** 2 + ((dyspine - 0.5 * depths - 12.0 * scale) / (9.0 * scale)) ** 2 < 1.0
    ivc &= (z[None, None, :] > level_z[24])
    tissue = np.where(ivc, model.hu["ivc"], tissue)
    tissue = np.where(aorta, model.hu["aorta"], tissue)
    # Bowel gas in the anterior abdomen, below the liver and above the pelvic floor.
    gas_z = (z < level_z[21]) & (z > level_z[29] - 30)
    gas = (texture > 1.9) & (dyspine > 0.5 * depths + 35) & (depth_in > model.fat_mm + 15) & gas_z[None, None, :]
    tissue = np.where(gas, model.hu["air"] + 100.0, tissue)
    # Lungs inside the rib cage above a domed diaphragm, around the mediastinum and the spine.
    dome = level_z[17] + 25.0 * scale * np.clip(1.0 - ((np.abs(dx) - 65 * scale) / (70 * scale)) ** 2 - ((dyspine - 40 * scale) / (90 * scale)) ** 2, -1.2, 1.0)
    lungs = (z[None, None, :] > dome) & (depth_in > model.fat_mm + 14.0) & ~paraspinal
    lungs &= ((dx + 12 * scale) / (50.0 * scale)) ** 2 + ((dyspine - 0.5 * depths - 55.0 * scale) / (62.0 * scale)) ** 2 > 1.0
    lungs &= (dx / (0.5 * widths + 14.0)) ** 2 + (dyspine / (0.5 * depths + 16.0)) ** 2 > 1.0
    lungs &= (z[None, None, :] < level_z[8] + 25)
    lung_hu = model.hu["lung"] + 25.0 * texture
    tissue = np.where(lungs, lung_hu, tissue)
    hu += body * (tissue - hu)
    hu += (np.float32(6.0) * texture) * body
    return hu


def _render_ribs_and_pelvis(grid: _Grid, model: SpineModel, hu: np.ndarray, ribs: bool = True, pelvis: bool = True) -> None:
    """Ribs at T1-T12 and iliac wings beside S1-S2 (bone drawn over the soft tissue)."""
    x, y, z = grid.axes
    thoracic = [shape for shape in model.vertebrae if shape.label in _THORACIC]
    bone_hu = float(np.mean([s.trabecular_hu for s in model.vertebrae])) + 60.0
    cortex_hu = model.vertebrae[0].cortex_hu
    if thoracic and ribs:
        heads = np.array([s.body_centroid[2] + 0.25 * s.height for s in thoracic])
        order = np.argsort(heads)
        heads = heads[order]
        xs = np.array([s.body_centroid[0] for s in thoracic])[order]
        ys = np.array([s.body_centroid[1] for s in thoracic])[order]
        drop_max = 45.0 * model.vertebrae[0].height / 16.0
        band = grid.box(np.array([-1e9, -1e9, heads.min() - drop_max - 15]), np.array([1e9, 1e9, heads.max() + 15]))
        if band is not None:
            zb = z[band[2]]
            cx = np.interp(zb, heads, xs)[None, None, :]
            cy = np.interp(zb, heads, ys)[None, None, :] + 35.0
            rx = model.torso_half_width - model.fat_mm - 18.0
            ry = model.torso_half_depth - 0.5 * model.fat_mm - 10.0
            ry = np.minimum(ry, 70.0)
            dx = x[:, None, None] - cx
            dy = y[None, :, None] - cy
            angle = np.arctan2(np.abs(dx) / rx, -dy / ry)  # 0 behind, pi in front
            radial = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * 0.5 * (rx + ry)
            drop = drop_max * (1.0 - np.cos(0.5 * np.clip(angle, 0.0, math.pi)))
            unrolled = zb[None, None, :] + drop
            nearest = np.interp(unrolled, heads, heads)
            index = np.clip(np.searchsorted(heads, unrolled), 1, len(heads) - 1)
            lower, upper = heads[index - 1], heads[index]
            nearest = np.where(np.abs(unrolled - lower) < np.abs(unrolled - upper), lower, upper)
            dz = unrolled - nearest
            inside = ((radial / 3.5) ** 2 + (dz / 6.0) ** 2)
            valid = (angle > 0.22) & (angle < 2.3) & (unrolled < heads.max() + 8) & (unrolled > heads.min() - 8)
            rib = np.clip((1.0 - np.sqrt(inside)) * 3.0 / grid.ramp + 0.5, 0.0, 1.0) * valid
            shell = np.clip((np.sqrt(inside) - 0.6) * 4.0, 0.0, 1.0)
            rib_hu = bone_hu + (0.7 * cortex_hu - bone_hu) * shell
            region = hu[band]
            region += rib * (rib_hu - region)
    labels = {s.label for s in model.vertebrae}
    if 26 in labels and pelvis:
        s1 = model.by_label(26)
        crest = model.by_label(23).body_centroid[2] if 23 in labels else s1.centre[2] + 70
        bottom = s1.centre[2] - 70.0
        band = grid.box(np.array([-1e9, -1e9, bottom]), np.array([1e9, 1e9, crest + 5]))
        if band is not None:
            zb = z[band[2]]
            t = np.clip((zb - bottom) / (crest - bottom), 0.0, 1.0)[None, None, :]
            dx = x[:, None, None] - s1.centre[0]
            dy = y[None, :, None] - (s1.centre[1] - 5.0)
            rx = (55.0 + 55.0 * t) * s1.width / 48.0
            ry = (45.0 + 25.0 * t) * s1.width / 48.0
            radial = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * 0.5 * (rx + ry)
            thickness = 4.0 + 6.0 * (1.0 - t)
            angle = np.arctan2(np.abs(dx) / rx, -dy / ry)
            valid = (angle > 0.5) & (angle < 2.0 - 0.6 * t) & (t < 1.0)
            distance = np.abs(radial) - thickness
            wing = np.clip(0.5 - distance / grid.ramp, 0.0, 1.0) * valid
            shell = np.clip((distance + 1.5) / grid.ramp + 0.5, 0.0, 1.0)
            wing_hu = bone_hu + (0.8 * cortex_hu - bone_hu) * shell
            region = hu[band]
            region += wing * (wing_hu - region)
