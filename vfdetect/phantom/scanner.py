"""The simulated acquisition: field of view, spacing, sub-slices, blur, noise and stored orientation.

The anatomy is rendered directly onto the acquisition grid (axis-aligned, in-plane spacing
0.6-1 mm, slices 1-3 mm rendered as 1 mm sub-slices and averaged; soft tissue, ribs and pelvis on a
twice coarser grid, upsampled) and then stored in one of several orientation codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect.phantom.anatomy import SpineModel
from vfdetect.phantom.config import PhantomConfig
from vfdetect.phantom.grid import _Grid, _upsample
from vfdetect.phantom.spine import _render_column, _render_vertebrae
from vfdetect.phantom.torso import _render_ribs_and_pelvis, _render_torso


def _acquire(model: SpineModel, listed: Sequence[int], rng: np.random.Generator,
             config: PhantomConfig) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    inplane = float(rng.uniform(*config.inplane_spacing_mm))
    weights = np.asarray(config.slice_spacing_weights, dtype=float)
    slice_spacing = float(config.slice_spacing_choices[int(rng.choice(len(weights), p=weights / weights.sum()))])
    sub = max(1, int(math.ceil(slice_spacing / 1.0 - 1e-6)))
    top_shape, bottom_shape = model.by_label(listed[0]), model.by_label(listed[-1])
    z_top = top_shape.body_centroid[2] + float(rng.uniform(0.15, 0.9)) * top_shape.height
    z_bottom = bottom_shape.body_centroid[2] - float(rng.uniform(0.15, 0.9)) * bottom_shape.height
    if config.max_length_mm is not None and z_top - z_bottom > config.max_length_mm:
        excess = z_top - z_bottom - config.max_length_mm
        z_top -= 0.5 * excess
        z_bottom += 0.5 * excess
    n_slices = max(2, int(round((z_top - z_bottom) / slice_spacing)))
    fov = float(rng.uniform(*config.fov_mm))
    n_inplane = int(round(fov / inplane))
    centres = np.array([model.by_label(label).body_centroid for label in listed])
    centre_x = float(np.mean(centres[:, 0])) + float(rng.normal(0, 0.04 * fov))
    centre_y = float(np.mean(centres[:, 1])) - config.fov_posterior_shift * fov + float(rng.normal(0, 0.03 * fov))
    origin = np.array([centre_x - 0.5 * (n_inplane - 1) * inplane, centre_y - 0.5 * (n_inplane - 1) * inplane,
                       z_bottom - 0.5 * (sub - 1) * slice_spacing / sub])
    render = _Grid(origin, np.array([inplane, inplane, slice_spacing / sub]), (n_inplane, n_inplane, n_slices * sub))
    # Soft tissue, ribs and pelvis are smooth enough for a coarser grid, upsampled afterwards.
    coarse_step = render.spacing * np.array([2.0, 2.0, max(1, round(2.0 / render.spacing[2]))])
    coarse_shape = tuple(int(math.ceil((n - 1) * f / c)) + 2 for n, f, c in zip(render.shape, render.spacing, coarse_step, strict=True))
    coarse = _Grid(render.origin, coarse_step, coarse_shape)  # type: ignore[arg-type]
    texture_rng = np.random.default_rng(model.texture_seed)
    hu_coarse = _render_torso(coarse, model, texture_rng)
    if config.ribs or config.pelvis:
        _render_ribs_and_pelvis(coarse, model, hu_coarse, ribs=config.ribs, pelvis=config.pelvis)
    hu = _upsample(hu_coarse, coarse, render)
    del hu_coarse
    labels_fine = np.zeros(render.shape, dtype=np.uint8)
    best = np.full(render.shape, np.inf, dtype=np.float32)
    _render_column(render, model, hu, texture_rng)
    _render_vertebrae(render, model, hu, labels_fine, best, texture_rng)
    noise_sd = float(rng.uniform(*config.noise_sd_hu))
    blur_mm = float(rng.uniform(*config.blur_sigma_mm))
    sigma = blur_mm / inplane
    # White noise before the blur gives correlated, CT-like grain; sub-slices average into slices.
    gain = 1.0 / (2.0 * math.sqrt(math.pi) * max(sigma, 0.3)) * (1.0 / math.sqrt(sub))
    hu += rng.standard_normal(render.shape, dtype=np.float32) * np.float32(noise_sd / gain)
    ndimage.gaussian_filter1d(hu, sigma, axis=0, output=hu, truncate=3.0)
    ndimage.gaussian_filter1d(hu, sigma, axis=1, output=hu, truncate=3.0)
    if sub > 1:
        hu = hu.reshape(n_inplane, n_inplane, n_slices, sub).mean(axis=3)
        labels = labels_fine[:, :, sub // 2::sub]
    else:
        labels = labels_fine
    slice_origin = origin.copy()
    slice_origin[2] = z_bottom
    ras_affine = np.diag([inplane, inplane, slice_spacing, 1.0])
    ras_affine[:3, 3] = slice_origin
    orientation = config.orientations[int(rng.integers(len(config.orientations)))]
    image_array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    image_array, affine = _reorient(image_array, ras_affine, orientation)
    label_array, _ = _reorient(labels, ras_affine, orientation)
    image = nib.Nifti1Image(image_array, affine)
    mask = nib.Nifti1Image(label_array.astype(np.uint8), affine)
    for img in (image, mask):
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"vfdetect phantom (synthetic CT, HU)"
    return image, mask


def _reorient(array: np.ndarray, ras_affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered array in another axis order; returns the array and its affine."""
    ras = nib.orientations.axcodes2ornt("RAS")
    target = nib.orientations.axcodes2ornt(tuple(code))
    transform = nib.orientations.ornt_transform(ras, target)
    out = nib.orientations.apply_orientation(array, transform)
    affine = ras_affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), affine
