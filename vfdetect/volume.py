"""Scans in any geometry: loading, the internal frame, resampling, saving back, normalisation.

Every scan enters through :func:`load_scan` (a NIfTI file, a folder holding one DICOM CT series, or an
in-memory ``nibabel`` image) and comes out as a :class:`Volume` in HU on its *native* grid plus a
:class:`SourceGrid` that remembers that grid. :func:`to_internal` resamples a volume onto the internal
frame: canonical RAS voxel order (axis 0 left->right, axis 1 posterior->anterior, axis 2
inferior->superior), axis-aligned, isotropic spacing (1 mm by default). :func:`to_source` and
:func:`save_on_grid` carry a result computed in the internal frame back onto the input's own grid,
affine and header, so that it overlays the input in nibabel, ITK-SNAP and 3D Slicer.

Affines follow nibabel: a 4x4 matrix mapping voxel indices ``(i, j, k, 1)`` to world RAS millimetres.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect.errors import InputError, MissingDependencyError, VfdetectError
from vfdetect.fileio import atomic_path

__all__ = [
    "Volume",
    "SourceGrid",
    "load_scan",
    "load_label_image",
    "internal_grid",
    "to_internal",
    "to_source",
    "save_on_grid",
    "body_mask",
    "normalise",
    "voxel_to_world",
    "world_to_voxel",
    "HU_RANGE",
]

#: HU range that :func:`normalise` clips to before taking statistics: air (and the -2000/-3024 padding
#: some scanners write outside the reconstruction circle) becomes -1024, metal saturates at 3071.
HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)

# A matrix entry counts as zero when it moves a coordinate by less than this many voxels across the
# whole volume; below it a grid is treated as axis-aligned and resampled with the fast separable path.
_AXIS_ALIGNED_TOLERANCE_VOXELS = 1e-3
# Internal grid origins are rounded to this many decimals of a millimetre, so that a scan and its mask
# whose affines differ only by float32 storage noise get identical internal grids.
_ORIGIN_DECIMALS = 4
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True, eq=False)
class Volume:
    """An image array with the affine that places it in the world.

    ``array`` is 3D, or 4D with a trailing channel axis, indexed ``[i, j, k(, c)]`` of ``affine``;
    ``affine`` is a 4x4 float64 matrix from voxel index to world RAS millimetres (nibabel convention).
    """

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VfdetectError(f"a Volume affine must be 4x4, got shape {affine.shape}")
        if self.array.ndim not in (3, 4):
            raise VfdetectError(f"a Volume array must be 3D or 4D (channels last), got shape {self.array.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The three spatial dimensions."""
        return (int(self.array.shape[0]), int(self.array.shape[1]), int(self.array.shape[2]))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel spacing in mm along the array's three axes (lengths of the affine's columns)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(frozen=True, eq=False)
class SourceGrid:
    """Everything needed to write a result back onto an input's own grid.

    ``header`` is a NIfTI-1 header (the input's own for NIfTI input, a fresh one for DICOM) whose
    sform/qform already hold ``affine``; ``source`` names the input (a path or a description).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    source: str


# --------------------------------------------------------------------------------------------------
# Coordinates


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World RAS mm of voxel indices ``ijk`` (shape (N, 3) or (3,)); returns the same shape."""
    points = np.asarray(ijk, dtype=np.float64)
    flat = np.atleast_2d(points)
    world = flat @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    return world.reshape(points.shape)


def world_to_voxel(affine: np.ndarray, xyz_mm: np.ndarray) -> np.ndarray:
    """Fractional voxel indices of world RAS mm points ``xyz_mm`` (shape (N, 3) or (3,))."""
    return voxel_to_world(np.linalg.inv(np.asarray(affine, dtype=np.float64)), xyz_mm)


# --------------------------------------------------------------------------------------------------
# Loading


def load_scan(path: str | Path | nib.Nifti1Image) -> tuple[Volume, SourceGrid]:
    """Load a CT scan as float32 HU on its native grid.

    ``path`` is a NIfTI file (``.nii``/``.nii.gz``, any orientation, oblique affines, any stored dtype;
    ``scl_slope``/``scl_inter`` applied), a folder holding one DICOM CT series (see
    :func:`_load_dicom_series`), or an in-memory ``nibabel`` image. The affine is the one nibabel
    reports (sform when its code is set, else qform). A trailing singleton 4th dimension is dropped.

    Raises :class:`InputError` naming the input for a missing or unreadable file, a truncated file,
    an image that is not 3D, a zero-size dimension or non-finite voxels.
    """
    if isinstance(path, nib.spatialimages.SpatialImage):
        image, source = _in_memory_image(path)
        array = _read_array(image, source, dtype=np.float32)
        return _finish_scan(array, image, source)
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(path, "file or folder not found")
    if path.is_dir():
        return _load_dicom_series(path)
    image = _open_nifti(path)
    array = _read_array(image, str(path), dtype=np.float32)
    return _finish_scan(array, image, str(path))


def load_label_image(path: str | Path | nib.Nifti1Image) -> tuple[Volume, SourceGrid]:
    """Load an integer label image (vertebra mask, synthesized labels) on its native grid.

    Float-stored masks (VerSe ships some as float64) are cast to integers after checking that every
    voxel is a whole number; the result uses the smallest of uint8/int16/int32 that holds the labels
    (an integer-stored image keeps its dtype unless it is 64-bit).
    """
    if isinstance(path, nib.spatialimages.SpatialImage):
        image, source = _in_memory_image(path)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise InputError(path, "file not found")
        if path.is_dir():
            raise InputError(path, "is a folder; a label image must be a NIfTI file (.nii or .nii.gz)")
        image = _open_nifti(path)
        source = str(path)
    array = _read_array(image, source, dtype=None)
    array = _as_3d(array, source)
    _check_finite(array, source)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            bad = int(np.count_nonzero(rounded != array))
            raise InputError(source, f"label image holds {bad} non-integer voxels; labels must be whole numbers")
        array = _smallest_integer_array(rounded)
    elif array.dtype.itemsize == 8:
        array = _smallest_integer_array(array)
    header = _header_for(image)
    volume = Volume(np.ascontiguousarray(array), _image_affine(image))
    _check_affine(volume.affine, source)
    return volume, SourceGrid(volume.shape, volume.affine.copy(), header, source)


def _smallest_integer_array(array: np.ndarray) -> np.ndarray:
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype)
    raise InputError(None, f"label values {low:g}..{high:g} do not fit in int32")


def _in_memory_image(image: nib.spatialimages.SpatialImage) -> tuple[nib.spatialimages.SpatialImage, str]:
    filename = image.get_filename()
    source = filename if filename else "<in-memory image>"
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        try:
            image = nib.Nifti1Image.from_image(image)
        except Exception as error:  # nibabel raises several types here
            raise InputError(source, f"cannot be converted to NIfTI ({error})") from error
    return image, source


def _open_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    name = path.name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        if _looks_like_dicom(path):
            raise InputError(path, "is a single DICOM file; pass the folder that holds the whole series")
        raise InputError(path, "not a NIfTI file (.nii or .nii.gz) or a folder holding a DICOM series")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        image = nib.load(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(path, f"file is truncated or corrupt ({_describe(error)})") from error
    except Exception as error:  # nibabel's ImageFileError, HeaderDataError, struct/OSError...
        if _is_truncated(path):
            raise InputError(path, "file is truncated (shorter than a NIfTI header or cut mid-stream)") from error
        raise InputError(path, f"cannot be read as NIfTI ({_describe(error)})") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def _is_truncated(path: Path) -> bool:
    """True when the (possibly gzipped) file ends before a full NIfTI header or mid-stream."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                head = handle.read(540)
                while handle.read(1 << 20):
                    pass
        else:
            with open(path, "rb") as handle:
                head = handle.read(540)
    except (EOFError, zlib.error):
        return True
    except (OSError, gzip.BadGzipFile):
        return False
    return len(head) < 348


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read_array(image: nib.spatialimages.SpatialImage, source: str, dtype: type | None) -> np.ndarray:
    """Voxel data with the NIfTI scaling applied; errors while decompressing become InputError."""
    shape = tuple(int(n) for n in image.shape)
    if any(n == 0 for n in shape):
        raise InputError(source, f"image has a zero-size dimension (shape {shape})")
    try:
        if dtype is None:
            array = np.asanyarray(image.dataobj)
        else:
            array = np.asarray(image.dataobj, dtype=dtype) if _is_unscaled(image) else image.get_fdata(dtype=dtype)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(source, f"file is truncated or corrupt ({_describe(error)})") from error
    except (OSError, ValueError) as error:
        raise InputError(source, f"voxel data cannot be read; file truncated or corrupt? ({_describe(error)})") from error
    return np.asarray(array)


def _is_unscaled(image: nib.spatialimages.SpatialImage) -> bool:
    slope = getattr(image.dataobj, "slope", 1.0)
    inter = getattr(image.dataobj, "inter", 0.0)
    return slope == 1.0 and inter == 0.0


def _as_3d(array: np.ndarray, source: str) -> np.ndarray:
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3:
        raise InputError(source, f"{array.ndim}D image (shape {shape}); a 3D scan is needed")
    if array.ndim > 3:
        raise InputError(source, f"{array.ndim}D image (shape {shape}); a 3D scan is needed, not a series of volumes")
    if any(n == 0 for n in array.shape):
        raise InputError(source, f"image has a zero-size dimension (shape {shape})")
    if min(array.shape) < 2:
        raise InputError(source, f"image is a single slice (shape {shape}); a 3D scan is needed")
    return array


def _check_finite(array: np.ndarray, source: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputError(source, f"{bad} voxel(s) are not finite (NaN or infinity)")


def _check_affine(affine: np.ndarray, source: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError(source, "affine holds non-finite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(source, "affine is singular (a zero voxel spacing or collinear axes)")


def _header_for(image: nib.spatialimages.SpatialImage) -> nib.Nifti1Header:
    """A NIfTI-1 header copy whose sform/qform hold ``image.affine`` (with the image's own codes)."""
    header = image.header
    if not isinstance(header, nib.Nifti1Header) or isinstance(header, nib.Nifti2Header):
        header = nib.Nifti1Header.from_header(header, check=False)
        header["sizeof_hdr"] = 348
        header["magic"] = b"n+1"
    else:
        header = header.copy()
    affine = _image_affine(image)
    if not np.allclose(header.get_best_affine(), affine, atol=1e-6):
        sform_code = int(header["sform_code"]) or 2
        qform_code = int(header["qform_code"])
        header.set_sform(affine, code=sform_code)
        header.set_qform(affine, code=qform_code)
    return header


def _image_affine(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The image's affine; an in-memory image made without one gets its header's best affine."""
    if image.affine is None:
        return np.array(image.header.get_best_affine(), dtype=np.float64)
    return np.array(image.affine, dtype=np.float64)


def _finish_scan(array: np.ndarray, image: nib.spatialimages.SpatialImage, source: str) -> tuple[Volume, SourceGrid]:
    array = _as_3d(array, source)
    _check_finite(array, source)
    affine = _image_affine(image)
    _check_affine(affine, source)
    volume = Volume(np.ascontiguousarray(array, dtype=np.float32), affine)
    return volume, SourceGrid(volume.shape, affine.copy(), _header_for(image), source)


# --------------------------------------------------------------------------------------------------
# DICOM


def _load_dicom_series(folder: Path) -> tuple[Volume, SourceGrid]:
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

    array = np.empty((columns, rows, len(headers)), dtype=np.float32)
    for index, (entry, _) in enumerate(headers):
        full = None
        try:
            full = pydicom.dcmread(entry)
            pixels = full.pixel_array
        except Exception as error:  # decoder plugins raise many types
            syntax = getattr(getattr(full, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise InputError(
                entry,
                f"DICOM pixel data cannot be decoded (transfer syntax {syntax}; compressed data may need"
                f" `pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg`): {_describe(error)}",
            ) from error
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
    array = _as_3d(array, source)
    _check_finite(array, source)
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


# --------------------------------------------------------------------------------------------------
# Internal frame and resampling


def internal_grid(shape: Sequence[int], affine: np.ndarray, spacing: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the internal grid for an input grid ``(shape, affine)``.

    The grid is RAS, axis-aligned, isotropic ``spacing`` mm, and spans the world bounding box of the
    input's voxel centres (its origin is the box's minimum corner, rounded to 1e-4 mm; it extends up
    to one voxel past the maximum). It depends on nothing else, so images on one grid share it.
    """
    if spacing <= 0:
        raise VfdetectError(f"internal spacing must be positive, got {spacing}")
    affine = np.asarray(affine, dtype=np.float64)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = voxel_to_world(affine, corners)
    low, high = world.min(axis=0), world.max(axis=0)
    extent = (high - low) / spacing
    out_shape = tuple(int(np.ceil(e - 1e-3)) + 1 for e in extent)
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = np.round(low, _ORIGIN_DECIMALS)
    return (out_shape[0], out_shape[1], out_shape[2]), out_affine


def _orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel ornt array: for each array axis, the nearest world axis and its sign."""
    return nib.orientations.io_orientation(affine)


def _to_ras_view(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip/transpose ``array`` (a view, no copy) so its axes run closest to R, A, S.

    Returns the view, its affine and the ornt array that produced it.
    """
    ornt = _orientation(affine)
    shape = array.shape[:3]
    view = nib.orientations.apply_orientation(array, ornt)
    view_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return view, view_affine, ornt


def _from_ras_view(view: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_ras_view`: array axis ``i`` is view axis ``ornt[i, 0]``, flipped if negative."""
    axes = [int(ornt[i, 0]) for i in range(3)] + list(range(3, view.ndim))
    array = np.transpose(view, axes)
    for axis in range(3):
        if ornt[axis, 1] < 0:
            array = np.flip(array, axis)
    return array


def _resample(
    source: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    output_shape: tuple[int, int, int],
    order: int,
    fill_value: float | None,
    margin_voxels: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """``out[o] = source[matrix @ o + offset]`` with clamped edges.

    Output voxels farther than half a voxel plus ``margin_voxels`` (per source axis) outside the
    source get ``fill_value`` (unless it is None).

    A (near-)diagonal ``matrix`` (axis-aligned grids, after flipping/permuting to RAS order) takes the
    separable path of :func:`_separable_resample`, several times faster than scipy's general 3D one.
    """
    extent = np.asarray(output_shape, dtype=np.float64)
    off_diagonal = np.abs(matrix - np.diag(np.diag(matrix))) * extent[None, :]
    diagonal = bool(np.all(off_diagonal < _AXIS_ALIGNED_TOLERANCE_VOXELS))
    transform = np.diag(matrix).copy() if diagonal else matrix
    output_dtype = source.dtype if source.dtype == np.float64 or order == 0 else np.dtype(np.float32)
    if source.dtype == bool:
        as_bytes = _resample(source.astype(np.uint8), matrix, offset, output_shape, order, fill_value, margin_voxels)
        return as_bytes > (0 if order == 0 else 0.5)
    work = source if source.dtype != np.float16 else source.astype(np.float32)
    if diagonal and order in (0, 1):
        out = _separable_resample(work, np.diag(matrix), offset, output_shape, order, output_dtype)
    else:
        out = ndimage.affine_transform(
            work, transform, offset=offset, output_shape=output_shape, output=output_dtype, order=order,
            mode="nearest", prefilter=order > 1,
        )
    if fill_value is None:
        return out
    # Voxels within `margin` input voxels beyond the input's edge keep the clamped edge value, so that
    # resampling back (to_source) never mixes the fill value into the input's edge voxels.
    margin = margin_voxels
    limits = np.asarray(source.shape[:3], dtype=np.float64)
    if diagonal:
        for axis in range(3):
            coordinate = np.diag(matrix)[axis] * np.arange(output_shape[axis]) + offset[axis]
            outside = (coordinate < -0.5 - margin[axis]) | (coordinate > limits[axis] - 0.5 + margin[axis])
            if outside.any():
                index = [slice(None)] * 3
                index[axis] = outside
                out[tuple(index)] = fill_value
    else:
        pad = np.asarray(margin, dtype=int)
        inside = ndimage.affine_transform(
            np.ones(tuple(int(n) for n in limits + 2 * pad), dtype=np.uint8), matrix, offset=offset + pad,
            output_shape=output_shape, output=np.uint8, order=0, mode="grid-constant", cval=0,
        )
        out[inside == 0] = fill_value
    return out


def _separable_resample(
    source: np.ndarray,
    scales: np.ndarray,
    offset: np.ndarray,
    output_shape: tuple[int, int, int],
    order: int,
    output_dtype: np.dtype,
) -> np.ndarray:
    """Axis-by-axis nearest/linear resampling for a diagonal mapping (edges clamped).

    Trilinear interpolation is separable, so three 1D passes give the same result as scipy's 3D
    interpolation at a fraction of the cost; the axis that shrinks the data most goes first.
    """
    growth = np.asarray(output_shape, dtype=np.float64) / np.asarray(source.shape[:3], dtype=np.float64)
    array = source
    for axis in np.argsort(growth, kind="stable"):
        axis = int(axis)
        size = array.shape[axis]
        coordinate = np.clip(scales[axis] * np.arange(output_shape[axis]) + offset[axis], 0.0, size - 1.0)
        if order == 0:
            array = np.take(array, np.floor(coordinate + 0.5).astype(np.intp), axis=axis)
            continue
        if array.dtype != output_dtype:
            array = array.astype(output_dtype)
        lower = np.minimum(np.floor(coordinate).astype(np.intp), max(size - 2, 0))
        weight = (coordinate - lower).astype(output_dtype)
        if size == 1 or not np.any(weight):
            array = np.take(array, lower, axis=axis)
            continue
        shape = [1] * array.ndim
        shape[axis] = -1
        weight = weight.reshape(shape)
        array = _interpolate_axis(array, axis, lower, weight)
    return np.ascontiguousarray(array, dtype=output_dtype)


def _interpolate_axis(array: np.ndarray, axis: int, lower: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Linear interpolation along ``axis`` between ``lower`` and ``lower + 1``, slab by slab.

    Working in slabs along another axis keeps the temporaries small on large scans.
    """
    out_shape = list(array.shape)
    out_shape[axis] = lower.size
    result = np.empty(out_shape, dtype=array.dtype)
    other = max((a for a in range(3) if a != axis), key=lambda a: array.shape[a])
    per_slice = int(np.prod(out_shape)) // out_shape[other]
    step = max(1, (1 << 22) // max(per_slice, 1))
    for start in range(0, out_shape[other], step):
        index: list = [slice(None)] * array.ndim
        index[other] = slice(start, start + step)
        slab = array[tuple(index)]
        part = np.take(slab, lower, axis=axis)
        part *= 1 - weight
        upper = np.take(slab, lower + 1, axis=axis)
        upper *= weight
        part += upper
        result[tuple(index)] = part
    return result


def to_internal(volume: Volume, spacing: float = 1.0, order: int = 1, fill_value: float | None = None) -> Volume:
    """Resample ``volume`` onto the internal frame (see :func:`internal_grid`).

    ``order`` 1 (trilinear) for images, 0 (nearest neighbour, dtype kept) for labels. Internal voxels
    farther than half an input voxel outside the input get ``fill_value``: by default 0 for integer
    images resampled with order 0 (labels) and the volume's minimum (air) otherwise. Just outside the
    input (up to ``ceil(sqrt(3) * spacing / input spacing)`` input voxels) the edge values are
    extended instead, so that :func:`to_source` reproduces the input's edge voxels. 4D volumes are
    resampled per channel.
    """
    if order not in (0, 1, 2, 3):
        raise VfdetectError(f"interpolation order must be 0..3, got {order}")
    out_shape, out_affine = internal_grid(volume.shape, volume.affine, spacing)
    view, view_affine, _ = _to_ras_view(volume.array, volume.affine)
    mapping = np.linalg.inv(view_affine) @ out_affine
    if fill_value is None:
        integer = np.issubdtype(volume.array.dtype, np.integer) or volume.array.dtype == bool
        fill_value = 0 if (order == 0 and integer) else float(np.min(volume.array))
    channels = [view] if view.ndim == 3 else [view[..., c] for c in range(view.shape[3])]
    # Clamp-extend the input far enough that every internal voxel used when interpolating back onto
    # an input voxel centre (at most sqrt(3) internal spacings away) holds a real value, not the fill.
    view_spacing = np.linalg.norm(view_affine[:3, :3], axis=0)
    margin = [int(np.ceil(np.sqrt(3.0) * spacing / s - 1e-6)) for s in view_spacing]
    results = [
        _resample(channel, mapping[:3, :3], mapping[:3, 3], out_shape, order, fill_value, margin) for channel in channels
    ]
    array = results[0] if view.ndim == 3 else np.stack(results, axis=-1)
    return Volume(array, out_affine)


def to_source(array: np.ndarray, internal_affine: np.ndarray, grid: SourceGrid, order: int = 1) -> np.ndarray:
    """Resample an internal-frame ``array`` (3D, or 4D channels last) back onto ``grid``.

    The internal grid of :func:`to_internal` covers every voxel centre of the source grid, so no fill
    value is needed (coordinates at the very edge are clamped). Returns an array of shape
    ``grid.shape`` (plus the channel axis): float32 for order >= 1, the input dtype for order 0.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise VfdetectError(f"to_source needs a 3D or 4D (channels last) array, got shape {array.shape}")
    # Work in the source grid's RAS view so that an axis-aligned grid gives a diagonal mapping.
    grid_affine = np.asarray(grid.affine, dtype=np.float64)
    ornt = _orientation(grid_affine)
    view_affine = grid_affine @ nib.orientations.inv_ornt_aff(ornt, tuple(grid.shape))
    permuted = np.asarray(grid.shape)[np.argsort(ornt[:, 0])]
    view_shape = (int(permuted[0]), int(permuted[1]), int(permuted[2]))
    mapping = np.linalg.inv(np.asarray(internal_affine, dtype=np.float64)) @ view_affine
    channels = [array] if array.ndim == 3 else [array[..., c] for c in range(array.shape[3])]
    results = []
    for channel in channels:
        view = _resample(channel, mapping[:3, :3], mapping[:3, 3], view_shape, order, None)
        results.append(np.ascontiguousarray(_from_ras_view(view, ornt)))
    return results[0] if array.ndim == 3 else np.stack(results, axis=-1)


# --------------------------------------------------------------------------------------------------
# Saving


def save_on_grid(
    array: np.ndarray,
    grid: SourceGrid,
    path: str | Path,
    dtype: np.dtype | type | str | None = None,
    scale: float | None = None,
) -> None:
    """Write ``array`` (on ``grid``: shape ``grid.shape`` or ``grid.shape + (channels,)``) as NIfTI.

    The input's header is copied (extensions and display window dropped) and its sform/qform keep the
    grid's affine and the input's codes, so the file overlays the input in any viewer. ``dtype``
    defaults to the array's (bool -> uint8, float64 -> float32, 64-bit integers -> int32). With
    ``scale`` the values are stored as uint8 ``round(value / scale)`` with ``scl_slope = scale`` (e.g.
    ``scale=1/255`` for probabilities). The write is atomic.
    """
    path = Path(path)
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise InputError(path, "output file name must end with .nii or .nii.gz")
    array = np.asarray(array)
    if array.shape[:3] != tuple(grid.shape) or array.ndim not in (3, 4):
        raise VfdetectError(f"array of shape {array.shape} does not match the grid {tuple(grid.shape)} of {grid.source}")
    header = grid.header.copy()
    grid_affine = np.asarray(grid.affine, dtype=np.float64)
    if not np.allclose(header.get_best_affine(), grid_affine, atol=1e-5):
        # A grid built by hand with a bare header: store its affine (sform 'aligned' unless coded).
        header.set_sform(grid_affine, code=int(header["sform_code"]) or 2)
        header.set_qform(grid_affine, code=int(header["qform_code"]))
    header.extensions.clear()
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    header["vox_offset"] = 0
    if scale is not None:
        if scale <= 0:
            raise VfdetectError(f"scale must be positive, got {scale}")
        if dtype is not None and np.dtype(dtype) != np.uint8:
            raise VfdetectError("scaled storage is uint8 only")
        if np.issubdtype(array.dtype, np.integer):
            stored = np.clip(array, 0, 255).astype(np.uint8)
        else:
            stored = np.clip(np.rint(array / scale), 0, 255).astype(np.uint8)
        header.set_data_dtype(np.uint8)
        header.set_data_shape(stored.shape)
        _set_units_for_channels(header, stored.ndim)
        header.set_slope_inter(float(scale), 0.0)
        with atomic_path(path) as tmp:
            _write_raw_nifti(tmp, header, stored)
        return
    out_dtype = _default_output_dtype(array.dtype) if dtype is None else np.dtype(dtype)
    if np.issubdtype(out_dtype, np.integer) and array.size:
        info = np.iinfo(out_dtype)  # type: ignore[type-var]
        low, high = float(array.min()), float(array.max())
        if low < info.min or high > info.max:
            raise VfdetectError(f"values {low:g}..{high:g} do not fit in {out_dtype.name} for {path}")
        if not np.issubdtype(array.dtype, np.integer):
            array = np.rint(array)
    stored = array.astype(out_dtype, copy=False)
    header.set_data_dtype(out_dtype)
    header.set_data_shape(stored.shape)
    _set_units_for_channels(header, stored.ndim)
    header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        _write_raw_nifti(tmp, header, stored)


def _default_output_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype == np.float64:
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer) and dtype.itemsize == 8:
        return np.dtype(np.int32)
    return np.dtype(dtype)


def _set_units_for_channels(header: nib.Nifti1Header, ndim: int) -> None:
    zooms = list(header.get_zooms()[:3])
    if ndim == 4:
        zooms.append(1.0)
    header.set_zooms(zooms)


def _write_raw_nifti(path: Path, header: nib.Nifti1Header, data: np.ndarray) -> None:
    """Write header + data exactly as given (nibabel's image writer would re-derive the scaling)."""
    header = header.copy()
    if header["magic"] != b"n+1":
        header["magic"] = b"n+1"
    header["vox_offset"] = 0
    handle_context: IO[bytes]
    if path.name.lower().endswith(".gz"):
        handle_context = gzip.open(path, "wb", compresslevel=1)  # type: ignore[assignment]
    else:
        handle_context = open(path, "wb")
    with handle_context as handle:
        header.write_to(handle)
        offset = int(header["vox_offset"])
        written = header.single_vox_offset + header.extensions.get_sizeondisk()
        if offset > written:
            handle.write(b"\x00" * (offset - written))
        handle.write(np.asarray(data, dtype=header.get_data_dtype()).tobytes(order="F"))
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------------------------------
# Intensities


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Boolean mask of the patient's body in a CT volume.

    Voxels above ``threshold_hu``, restricted to the largest 6-connected component (drops the table,
    clothing, noise specks), with holes filled slice by slice along each of the three axes, so that
    air inside the body (lungs, bowel gas, trachea) counts as body even where the field of view cuts
    it open at the top or bottom (a cavity enclosed in 3D is enclosed in every slice too). An empty
    mask is returned when no voxel exceeds the threshold.
    """
    above = np.asarray(hu) > threshold_hu
    if not above.any():
        return np.zeros(above.shape, dtype=bool)
    # Labels as intp: bincount and fancy indexing would otherwise copy them to intp first.
    labels = np.empty(above.shape, dtype=np.intp)
    count = ndimage.label(above, output=labels)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    else:
        mask = above
    del labels, above
    filled = mask.copy()
    for axis in range(mask.ndim):
        filled |= _planar_holes(mask, axis)
    return filled


def _planar_holes(mask: np.ndarray, axis: int) -> np.ndarray:
    """Background regions of each slice (normal to ``axis``) that do not reach the slice's border."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    index: list = [slice(None)] * 3
    index[axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    labels = np.empty(mask.shape, dtype=np.intp)
    count = ndimage.label(~mask, structure=structure, output=labels)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    touches_border = np.zeros(count + 1, dtype=bool)
    for other in range(3):
        if other == axis:
            continue
        for end in (0, -1):
            face: list = [slice(None)] * 3
            face[other] = end
            touches_border[labels[tuple(face)]] = True
    touches_border[0] = True
    return ~touches_border[labels]


def normalise(hu: np.ndarray, mask: np.ndarray | None = None, hu_range: tuple[float, float] = HU_RANGE) -> np.ndarray:
    """Zero mean, unit standard deviation intensities (float32), as in the paper.

    The volume is first clipped to ``hu_range`` (scanner padding of -2000/-3024 HU becomes air). The
    mean and standard deviation are taken over the **body** only (``mask``, by default
    :func:`body_mask` of ``hu``): the air around the patient fills a large and varying share of every
    field of view and would otherwise dominate the statistics, making them depend on the field of
    view rather than on the patient's tissue. Without any body voxel the whole volume is used.
    """
    clipped = np.clip(np.asarray(hu, dtype=np.float32), hu_range[0], hu_range[1])
    if mask is None:
        mask = body_mask(clipped)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != clipped.shape:
        raise VfdetectError(f"mask shape {mask.shape} differs from image shape {clipped.shape}")
    values = clipped[mask] if mask.any() else clipped.ravel()
    mean, sd = _mean_and_sd(values)
    if not np.isfinite(sd) or sd < 1e-6:
        sd = 1.0
    clipped -= np.float32(mean)
    clipped /= np.float32(sd)
    return clipped


def _mean_and_sd(values: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float]:
    """Mean and standard deviation accumulated in float64, chunk by chunk (no full float64 copy)."""
    count = values.size
    total = sum(float(np.sum(values[start : start + chunk], dtype=np.float64)) for start in range(0, count, chunk))
    mean = total / count
    squares = 0.0
    for start in range(0, count, chunk):
        centred = values[start : start + chunk].astype(np.float64) - mean
        squares += float(np.dot(centred, centred))
    return mean, float(np.sqrt(squares / count))
