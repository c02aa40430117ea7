"""DICOM CT series: one folder holding one series becomes a :class:`~vfdetect.frame.Volume` in HU.

:func:`load_dicom_series` finds the series' slices, sorts them along the slice normal, applies the
rescale slope and intercept, turns LPS patient coordinates into a RAS affine, resamples uneven slice
spacing onto an even grid, represents gantry tilt with a sheared affine, and refuses what it cannot
place in space (several series, mixed orientations or sizes, duplicate positions, irregular tilt).
:func:`vfdetect.volume.load_scan` calls it for a folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from vfdetect.errors import InputError, MissingDependencyError
from vfdetect.frame import SourceGrid, Volume, as_3d, check_finite, describe_error

__all__ = ["load_dicom_series"]


def load_dicom_series(folder: Path) -> tuple[Volume, SourceGrid]:
    """Load the one CT series in ``folder`` as float32 HU with a RAS affine.

    * Files are the folder's direct entries that pydicom can read (other files are ignored). Several
      ``SeriesInstanceUID`` values: refused, listing them.
    * Slices are sorted by ``ImagePositionPatient`` projected on the slice normal (the cross product of
      the two ``ImageOrientationPatient`` cosines); ``RescaleSlope``/``RescaleIntercept`` are applied
      per slice; LPS patient coordinates become RAS.
    * The voxel order matches dcm2niix: axis 0 along the image rows' direction cosine, axis 1 against
      the columns' (image rows stored bottom-up), axis 2 along the normal. So a NIfTI converted from
      the same series with dcm2niix lies on the same grid (same shape and affine).
    * Uneven slice spacing (a missing slice, mixed reconstruction increments) is **resampled** by linear
      interpolation along the normal onto an even grid at the median spacing; a warning says so.
    * Gantry tilt (slice origins drifting in-plane, linearly with the position along the normal) is
      **handled** exactly with a sheared affine: the third column is the true step between slice
      origins. Such a grid cannot be stored in a qform, so its qform code is 0 and the sform carries
      it (nibabel and 3D Slicer honour it). Tilt combined with uneven spacing, or slice origins that
      are not on one line, is refused.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as error:
        raise MissingDependencyError("pydicom", "Reading DICOM series") from error

    headers = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        try:
            dataset = pydicom.dcmread(entry, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if "Rows" not in dataset:  # not an image (DICOMDIR, structured report, ...)
            continue
        headers.append((entry, dataset))
    if not headers:
        subfolders = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        hint = ""
        if subfolders:
            shown = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
            hint = f"; it has subfolders ({shown}): pass the one holding the series"
        raise InputError(folder, f"no DICOM image files found (a folder must hold one DICOM CT series){hint}")

    series: dict[str, list] = {}
    for entry, dataset in headers:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "") or ""), []).append((entry, dataset))
    if len(series) > 1:
        listing = "; ".join(
            f"{uid or '<no SeriesInstanceUID>'} ({str(items[0][1].get('SeriesDescription', '') or '').strip() or 'no description'},"
            f" {len(items)} files)"
            for uid, items in sorted(series.items())
        )
        raise InputError(folder, f"holds {len(series)} DICOM series; put one series per folder: {listing}")

    first = headers[0][1]
    modality = str(first.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        raise InputError(folder, f"DICOM series has modality {modality}; a CT series is needed")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(
            folder, "multi-frame (enhanced) DICOM is not supported; convert it to NIfTI (e.g. with dcm2niix) first"
        )
    for entry, dataset in headers:
        missing = [key for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if key not in dataset]
        if missing:
            raise InputError(entry, f"DICOM slice lacks {', '.join(missing)}; cannot place it in space")

    orientation = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    rows, columns = int(first.Rows), int(first.Columns)
    pixel_spacing = np.array([float(v) for v in first.PixelSpacing], dtype=np.float64)
    for entry, dataset in headers:
        other = np.array([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, orientation, atol=1e-4):
            raise InputError(entry, "slices of the series have different ImageOrientationPatient (a localizer mixed in?)")
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise InputError(entry, f"slice size {dataset.Rows}x{dataset.Columns} differs from {rows}x{columns}")
        if not np.allclose([float(v) for v in dataset.PixelSpacing], pixel_spacing, atol=1e-4):
            raise InputError(entry, "slices of the series have different PixelSpacing")
    if len(headers) < 2:
        raise InputError(folder, "DICOM series has a single slice; a 3D scan is needed")

    row_cosine = row_cosine / np.linalg.norm(row_cosine)
    column_cosine = column_cosine / np.linalg.norm(column_cosine)
    normal = np.cross(row_cosine, column_cosine)
    normal /= np.linalg.norm(normal)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers], dtype=np.float64)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    headers = [headers[i] for i in order]
    positions, distances = positions[order], distances[order]
    steps = np.diff(distances)
    if np.any(steps < 1e-3):
        duplicate = headers[int(np.argmin(steps)) + 1][0]
        raise InputError(folder, f"two slices at the same position ({duplicate.name} and another); more than one acquisition in the folder?")
    spacing = float(np.median(steps))
    uneven = bool(np.max(np.abs(steps - spacing)) > 1e-3 + 0.01 * spacing)

    # Gantry tilt: the in-plane part of each slice origin's offset grows linearly with the distance.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    relative = distances - distances[0]
    tilted = bool(np.max(np.linalg.norm(in_plane, axis=1)) > 1e-2)
    shear = np.zeros(3)
    if tilted:
        shear = (relative @ in_plane) / float(relative @ relative)
        residual = in_plane - np.outer(relative, shear)
        if np.max(np.linalg.norm(residual, axis=1)) > 1e-2 + 0.01 * float(np.min(pixel_spacing)):
            raise InputError(folder, "slice origins are not on one line (irregular gantry tilt or mixed acquisitions)")
        if uneven:
            raise InputError(folder, "series has both gantry tilt and uneven slice spacing; resample it to an even, untilted grid first")

    from vfdetect.volume import MAX_VOXELS

    if rows * columns * len(headers) > MAX_VOXELS:
        raise InputError(folder, f"DICOM series of {len(headers)} slices of {rows}x{columns} pixels is larger than the "
                                 f"{MAX_VOXELS:,} voxels vfdetect loads")
    array = np.empty((columns, rows, len(headers)), dtype=np.float32)
    for index, (entry, _) in enumerate(headers):
        full = None
        try:
            full = pydicom.dcmread(entry)
            pixels = full.pixel_array
        except Exception as error:  # decoder plugins raise many types
            raise InputError(entry, _decode_problem(full, error)) from error
        if pixels.shape != (rows, columns):
            raise InputError(entry, f"pixel array has shape {pixels.shape}, expected {rows}x{columns}")
        slope = float(full.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(full.get("RescaleIntercept", 0.0) or 0.0)
        # pixel_array is [row, column]; transposed to [column, row] so axis 0 follows the row cosine.
        array[..., index] = pixels.T
        array[..., index] *= np.float32(slope)
        array[..., index] += np.float32(intercept)

    if uneven:
        array, count = _resample_slices(array, relative, spacing)
        warnings.warn(
            f"{folder}: uneven slice spacing ({steps.min():.3g}..{steps.max():.3g} mm); resampled onto an even"
            f" {spacing:.3g} mm grid of {count} slices",
            stacklevel=3,
        )
        step_vector = spacing * normal
    elif tilted:
        step_vector = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step_vector = spacing * normal

    # Voxel -> LPS: origin + i * column_spacing * row_cosine + j * row_spacing * column_cosine + k * step.
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * pixel_spacing[1]
    lps[:3, 1] = column_cosine * pixel_spacing[0]
    lps[:3, 2] = step_vector
    lps[:3, 3] = positions[0]
    # Store image rows bottom-up (as dcm2niix does): flip axis 1.
    flip = np.eye(4)
    flip[1, 1] = -1.0
    flip[1, 3] = rows - 1
    lps = lps @ flip
    array = array[:, ::-1, :]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    affine[np.abs(affine) < 1e-12] = 0.0
    # Round to what a NIfTI sform stores (float32), so results saved on this grid and loaded again
    # (label images, probability maps) have exactly this affine.
    affine = affine.astype(np.float32).astype(np.float64)

    source = str(folder)
    array = as_3d(array, source)
    check_finite(array, source)
    volume = Volume(np.ascontiguousarray(array, dtype=np.float32), affine)
    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(np.int16)
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code="scanner")
    header.set_qform(affine, code="unknown" if tilted else "scanner")
    description = str(first.get("SeriesDescription", "") or "").strip()
    header["descrip"] = f"DICOM {description}"[:79].encode("ascii", "replace")
    return volume, SourceGrid(volume.shape, affine, header, source)


def _decode_problem(dataset: object, error: BaseException) -> str:
    """Why a slice's pixel data could not be read: truncated or corrupt, or compressed without a decoder."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if dataset is None or syntax is None:
        return f"DICOM slice cannot be read; file truncated or corrupt? ({describe_error(error)})"
    if not getattr(syntax, "is_compressed", True):
        return (f"DICOM pixel data is truncated or corrupt (uncompressed transfer syntax {syntax}): "
                f"{describe_error(error)}")
    return (f"DICOM pixel data cannot be decoded (compressed transfer syntax {syntax}; it may need"
            f" `pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg`, or the file is truncated):"
            f" {describe_error(error)}")


def _resample_slices(array: np.ndarray, relative: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """Linearly interpolate slices at ``relative`` mm onto an even grid of ``spacing`` mm."""
    count = int(np.floor(relative[-1] / spacing + 1e-3)) + 1
    targets = np.arange(count) * spacing
    upper = np.clip(np.searchsorted(relative, targets, side="right"), 1, len(relative) - 1)
    lower = upper - 1
    weight = np.clip((targets - relative[lower]) / (relative[upper] - relative[lower]), 0.0, 1.0).astype(np.float32)
    out = np.empty(array.shape[:2] + (count,), dtype=np.float32)
    for index in range(count):
        out[..., index] = array[..., lower[index]] * (1 - weight[index]) + array[..., upper[index]] * weight[index]
    return out, count

