"""The overlay PNG of a case: curved sagittal and coronal views with p(fracture) over the CT.

No TensorFlow here. The case report itself (report.json, report.csv, summary.csv) is read and
written by :mod:`vfdetect.records`; the writers are importable from here as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.fileio import atomic_path
from vfdetect.records import write_case_report as write_report_json
from vfdetect.records import write_report_csv, write_summary_csv

__all__ = ["render_overlay", "write_report_json", "write_report_csv", "write_summary_csv"]

FRACTURE_DISPLAY_MIN = 0.05
"""Fracture probabilities below this are not drawn on the overlay (as in the paper's Fig. 6)."""

BONE_WINDOW_HU = (-400.0, 1100.0)


# ----------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------


def _spine_path(
    centres_voxel: np.ndarray, vertebra_probability: np.ndarray | None, shape: Sequence[int], axis: int
) -> np.ndarray:
    """Per axial slice z, the coordinate along ``axis`` (0: x, 1: y) of the spine, smoothly interpolated.

    From the vertebra centroids when there are any (held constant beyond the first and last), else
    from the centre of mass of p(vertebra) per slice, else the middle of the volume.
    """
    depth = int(shape[2])
    middle = (shape[axis] - 1) / 2.0
    if len(centres_voxel) >= 1:
        order = np.argsort(centres_voxel[:, 2])
        z = centres_voxel[order, 2]
        values = centres_voxel[order, axis]
        return np.interp(np.arange(depth), z, values)
    if vertebra_probability is not None and float(vertebra_probability.max()) > 0.5:
        from scipy import ndimage

        # Summed a few slices at a time: a full-size float copy of a large map is not needed.
        profile = np.zeros((int(shape[axis]), depth), dtype=np.float64)  # (shape[axis], z)
        for first in range(0, depth, 16):
            block = np.asarray(vertebra_probability[:, :, first : first + 16], dtype=np.float32)
            profile[:, first : first + block.shape[2]] = np.where(block > 0.5, block, 0.0).sum(axis=1 - axis)
        totals = profile.sum(axis=0)
        coordinates = np.arange(shape[axis])[:, None]
        path = np.where(totals > 0, (profile * coordinates).sum(axis=0) / np.maximum(totals, 1e-9), np.nan)
        known = np.isfinite(path)
        if known.any():
            path = np.interp(np.arange(depth), np.nonzero(known)[0], path[known])
            return ndimage.gaussian_filter1d(path, 5.0)
    return np.full(depth, middle)


def _curved_slice(volume: np.ndarray, path: np.ndarray, axis: int) -> np.ndarray:
    """Slice through ``volume`` [x, y, z] that follows ``path`` (coordinate along ``axis`` per z).

    Returns a float32 2D array indexed [other axis, z]: per z, the linear interpolation between the
    two planes along ``axis`` around the path (clipped to the volume). Only those planes are read.
    """
    size, depth = volume.shape[axis], volume.shape[2]
    position = np.clip(np.asarray(path, dtype=np.float64), 0, size - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, size - 1)
    weight = (position - below).astype(np.float32)[None, :]
    z = np.arange(depth)
    if axis == 0:  # [z, y] from the separated advanced indices, then [y, z]
        low, high = volume[below, :, z].T, volume[above, :, z].T
    else:
        low, high = volume[:, below, z], volume[:, above, z]
    return low.astype(np.float32) * (1.0 - weight) + high.astype(np.float32) * weight


def render_overlay(
    path: str | Path,
    hu: np.ndarray,
    fracture_probability: np.ndarray,
    spacing: Sequence[float],
    vertebrae: Sequence[dict[str, Any]],
    centres_voxel: np.ndarray,
    title: str,
    vertebra_probability: np.ndarray | None = None,
    window_hu: tuple[float, float] = BONE_WINDOW_HU,
) -> None:
    """Write a PNG with a curved sagittal and a curved coronal view, p(fracture) overlaid.

    Arrays are in the internal frame [x, y, z] (canonical RAS, ``spacing`` mm per axis). The sagittal view follows the spine's left-right course, the
    coronal view its front-back course, both through the vertebra centroids (or the vertebra
    probability when there are none). Probabilities < 0.05 are hidden; each vertebra is labelled
    with its name and score, fractures in red. The write is atomic.
    """
    # The object API (no pyplot): no global state, so the overlay can be drawn in a worker thread.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    hu = np.asarray(hu)  # only the curved slices are converted to float32
    fracture_probability = np.asarray(fracture_probability)
    centres_voxel = np.asarray(centres_voxel, dtype=np.float64).reshape(-1, 3)
    spacing = [float(s) for s in spacing]
    shape = hu.shape

    x_path = _spine_path(centres_voxel, vertebra_probability, shape, axis=0)
    y_path = _spine_path(centres_voxel, vertebra_probability, shape, axis=1)
    sagittal_ct = _curved_slice(hu, x_path, axis=0)  # [y, z]
    sagittal_p = _curved_slice(fracture_probability, x_path, axis=0)
    coronal_ct = _curved_slice(hu, y_path, axis=1)  # [x, z]
    coronal_p = _curved_slice(fracture_probability, y_path, axis=1)

    height_mm = shape[2] * spacing[2]
    widths_mm = [shape[1] * spacing[1], shape[0] * spacing[0]]
    # Size the figure to the data: images at most 14 x 9 inches, at least 3.5 inches tall.
    image_width = min(14.0, 9.0 * sum(widths_mm) / max(height_mm, 1.0))
    image_height = max(3.5, image_width * height_mm / max(sum(widths_mm), 1.0))
    figure = Figure(figsize=(image_width + 2.5, image_height + 1.3), facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": widths_mm})
    colour_map = colormaps["autumn_r"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    norm = Normalize(0.0, 1.0)
    panels = [
        (axes[0], sagittal_ct, sagittal_p, 1, "sagittal, curved along the spine", ("A", "P")),
        (axes[1], coronal_ct, coronal_p, 0, "coronal, curved along the spine", ("R", "L")),
    ]
    image = None
    for axis, ct, probability, horizontal, name, (screen_left, screen_right) in panels:
        extent_h = shape[horizontal] * spacing[horizontal]
        extent = (0.0, extent_h, 0.0, height_mm)
        # Radiological display: anterior on the left of the sagittal view, patient's right on the left
        # of the coronal view; the horizontal index axis is flipped for both.
        axis.imshow(ct.T[:, ::-1], cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower",
                    extent=extent, interpolation="bilinear", aspect="equal")
        masked = np.ma.masked_less(probability.T[:, ::-1], FRACTURE_DISPLAY_MIN)
        image = axis.imshow(masked, cmap=colour_map, norm=norm, alpha=0.55, origin="lower", extent=extent,
                            interpolation="nearest", aspect="equal")
        axis.set_title(f"{name}: {screen_left} left, {screen_right} right", color="white", fontsize=11)
        axis.set_xticks([])
        axis.set_yticks([])
        for vertebra, centre in zip(vertebrae, centres_voxel, strict=False):
            score = vertebra.get("fracture_probability")
            fractured = vertebra.get("predicted") == "fracture"
            score_text = "n/a" if score is None or not math.isfinite(float(score)) else f"{float(score):.2f}"
            text = f"{vertebra['name']} {score_text}" + ("  FRACTURE" if fractured else "")
            h_mm = extent_h - (centre[horizontal] + 0.5) * spacing[horizontal]
            z_mm = (centre[2] + 0.5) * spacing[2]
            axis.plot([h_mm], [z_mm], marker="+", color="red" if fractured else "cyan", markersize=9, mew=2)
            # Labels sit on the right side of each panel (posterior on the sagittal, patient's left on the coronal).
            axis.annotate(
                text,
                xy=(h_mm, z_mm),
                xytext=(extent_h * 0.98, z_mm),
                ha="right",
                va="center",
                fontsize=9,
                fontweight="bold" if fractured else "normal",
                color="white",
                bbox={"boxstyle": "round,pad=0.2", "fc": "#c00000" if fractured else "#004060", "ec": "none",
                      "alpha": 0.85},
                arrowprops={"arrowstyle": "-", "color": "red" if fractured else "cyan", "lw": 0.8, "alpha": 0.7},
            )
    figure.suptitle(title, color="white", fontsize=13)
    if image is not None:
        bar = figure.colorbar(image, ax=list(axes), fraction=0.025, pad=0.01)
        bar.set_label("p(fracture) (hidden below 0.05)", color="white")
        bar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, facecolor="black")
