"""Scans in any geometry: loading, and saving back onto the input's grid.

Every scan enters through :func:`load_scan` (a NIfTI file, a folder holding one DICOM CT series, or an
in-memory ``nibabel`` image) and comes out as a :class:`Volume` in HU on its *native* grid plus a
:class:`SourceGrid` that remembers that grid; label images enter through :func:`load_label_image`.
DICOM series are read by :mod:`vfdetect.dicom`. The internal frame (canonical RAS, isotropic 1 mm) and
the resampling into it and back (:func:`to_internal`, :func:`to_source`, :func:`internal_grid`) live in
:mod:`vfdetect.frame`, the body mask and the normalisation (:func:`body_mask`, :func:`normalise`) in
:mod:`vfdetect.body`; both are importable from here too. :func:`save_on_grid` writes a result that is
on the input's own grid with the input's affine and header, so that it overlays the input in nibabel,
ITK-SNAP and 3D Slicer.

Affines follow nibabel: a 4x4 matrix mapping voxel indices ``(i, j, k, 1)`` to world RAS millimetres.
"""

from __future__ import annotations

import errno
import gzip
import os
import zlib
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

from vfdetect.body import HU_RANGE, body_mask, normalise
from vfdetect.dicom import load_dicom_series
from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import atomic_path
from vfdetect.frame import (
    SourceGrid,
    Volume,
    as_3d,
    check_affine,
    check_finite,
    describe_error,
    internal_grid,
    to_internal,
    to_source,
    voxel_to_world,
    world_to_voxel,
)

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
    "MAX_VOXELS",
    "check_ct_intensities",
    "check_ct_scan",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Largest scan accepted, in voxels (2**31: 8 GiB as float32, four times a 512 x 512 x 2048 whole-body
#: CT). A header claiming more is refused before any voxel memory is allocated.
MAX_VOXELS: int = 2**31

#: HU plausibility (:func:`check_ct_intensities`): a CT in Hounsfield units holds air or fat (at or
#: below ``CT_LOW_HU``) and bone (at or above ``CT_BONE_HU``) somewhere.
CT_LOW_HU: float = -50.0
CT_BONE_HU: float = 150.0


# --------------------------------------------------------------------------------------------------
# Loading


def load_scan(path: str | Path | nib.Nifti1Image) -> tuple[Volume, SourceGrid]:
    """Load a CT scan as float32 HU on its native grid.

    ``path`` is a NIfTI file (``.nii``/``.nii.gz``, any orientation, oblique affines, any stored dtype;
    ``scl_slope``/``scl_inter`` applied), a folder holding one DICOM CT series (see
    :func:`load_dicom_series`), or an in-memory ``nibabel`` image. The affine is the one nibabel
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
        raise InputError(path, _missing_problem(path, "file or folder not found"))
    if path.is_dir():
        return load_dicom_series(path)
    kept = _KEPT_SCAN.pop(_file_key(path), None) if _KEPT_SCAN else None
    if kept is not None:
        return kept
    image = _open_nifti(path)
    array = _read_array(image, str(path), dtype=np.float32)
    return _finish_scan(array, image, str(path))


_KEPT_SCAN: dict[tuple[str, int, int], tuple[Volume, SourceGrid]] = {}
"""At most one scan loaded by :func:`check_ct_scan` with ``keep``, handed to the next :func:`load_scan`
of the same unchanged file (and then forgotten), so that a checked scan is not read twice."""


def _file_key(path: Path) -> tuple[str, int, int]:
    status = path.stat()
    return str(path.resolve()), status.st_mtime_ns, status.st_size


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
            raise InputError(path, _missing_problem(path, "file not found"))
        if path.is_dir():
            raise InputError(path, "is a folder; a label image must be a NIfTI file (.nii or .nii.gz)")
        image = _open_nifti(path)
        source = str(path)
    array = _read_array(image, source, dtype=None)
    array = as_3d(array, source)
    check_finite(array, source)
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
    check_affine(volume.affine, source)
    return volume, SourceGrid(volume.shape, volume.affine.copy(), header, source)


def _missing_problem(path: Path, default: str) -> str:
    """Why ``path`` cannot be opened although it was named: a symbolic-link loop, a dangling link, or missing."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "symbolic link loop"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "symbolic link loop"
            return "symbolic link to a missing file"
        return "symbolic link cannot be followed"
    return default


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
        raise InputError(path, f"file is truncated or corrupt ({describe_error(error)})") from error
    except Exception as error:  # nibabel's ImageFileError, HeaderDataError, struct/OSError...
        if _is_truncated(path):
            raise InputError(path, "file is truncated (shorter than a NIfTI header or cut mid-stream)") from error
        raise InputError(path, f"cannot be read as NIfTI ({describe_error(error)})") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    check_header(image, str(path), _raw_header(path, image))
    if name.endswith(".gz"):
        image = _decompressed(path, image)
    return image


def _decompressed(path: Path, image: nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    """A gzipped NIfTI whose header passed :func:`check_header`, decompressed in one call.

    Nibabel reads a ``.nii.gz`` in thousands of small chunks, each taking Python's lock again; with a
    thread importing TensorFlow beside it (``vfdetect predict``) that made reading a 39 MB scan take
    3.5 s instead of 0.45 s in one call (which leaves the lock free while it decompresses).
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(path, f"file is truncated or corrupt ({describe_error(error)})") from error
    try:
        return type(image).from_bytes(raw)  # type: ignore[attr-defined]
    except Exception as error:  # nibabel's ImageFileError, HeaderDataError, struct/OSError...
        raise InputError(path, f"cannot be read as NIfTI ({describe_error(error)})") from error


def _raw_header(path: Path, image: nib.spatialimages.SpatialImage) -> Any:
    """The header as stored in the file, before nibabel's silent repairs (e.g. negative pixdim -> abs)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header_class: Any = type(image.header)
            return header_class.from_fileobj(handle, check=False)
    except Exception:  # nibabel read it once already; fall back to its (repaired) header
        return image.header


def check_header(image: nib.spatialimages.SpatialImage, source: str, header: Any = None) -> None:
    """Refuse, from the header alone, a scan too large to load or with a zero or negative voxel size.

    Raises :class:`InputError` when the header claims more than :data:`MAX_VOXELS` voxels (before any
    memory is allocated) or when a spatial ``pixdim`` is zero, negative or not finite (nibabel would
    otherwise repair it silently, and the scan's size in mm would be a guess). ``header`` is the
    header as stored in the file (default: ``image.header``).
    """
    shape = tuple(int(n) for n in image.shape)
    voxels = 1
    for n in shape:
        voxels *= max(n, 0)
    if voxels > MAX_VOXELS:
        raise InputError(
            source, f"header claims {' x '.join(str(n) for n in shape)} = {voxels:,} voxels, more than the "
            f"{MAX_VOXELS:,} vfdetect loads; a corrupt header or not a single CT scan?"
        )
    header = image.header if header is None else header
    if isinstance(header, nib.Nifti1Header):
        spatial = min(3, len(shape))
        pixdim = np.asarray(header["pixdim"][1 : 1 + spatial], dtype=np.float64)
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
            raise InputError(
                source, f"header voxel size (pixdim) {', '.join(f'{v:g}' for v in pixdim)} is not positive; "
                "fix the header (the voxel size in mm) before using the scan"
            )


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


def _read_array(image: nib.spatialimages.SpatialImage, source: str, dtype: type | None) -> np.ndarray:
    """Voxel data with the NIfTI scaling applied; errors while decompressing become InputError."""
    shape = tuple(int(n) for n in image.shape)
    if any(n == 0 for n in shape):
        raise InputError(source, f"image has a zero-size dimension (shape {shape})")
    try:
        if dtype is None:
            array = np.asanyarray(image.dataobj)
        elif _is_unscaled(image):
            array = row_major(np.asanyarray(image.dataobj), dtype)
        else:
            array = image.get_fdata(dtype=dtype)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(source, f"file is truncated or corrupt ({describe_error(error)})") from error
    except (OSError, ValueError) as error:
        raise InputError(source, f"voxel data cannot be read; file truncated or corrupt? ({describe_error(error)})") from error
    return np.asarray(array)


def row_major(array: np.ndarray, dtype: Any, block: int = 64) -> np.ndarray:
    """``array`` as a C-ordered (row-major) array of ``dtype``.

    NIfTI stores voxels column-major, so nibabel's arrays are Fortran-ordered. numpy reorders a
    whole 3D volume element by element across memory (3.3 s for a 512 x 512 x 600 float32 scan, on
    top of 0.8 s to convert it); copied in blocks of ``block`` voxels along the first and last axes,
    which stay in cache, reordering and converting together take about 1.1 s. Values are those of
    ``np.ascontiguousarray(array, dtype=dtype)``.
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.flags.c_contiguous or not array.flags.f_contiguous:
        return np.ascontiguousarray(array, dtype=dtype)
    out = np.empty(array.shape, dtype=dtype)
    for first in range(0, array.shape[0], block):
        for last in range(0, array.shape[2], block):
            out[first : first + block, :, last : last + block] = array[first : first + block, :, last : last + block]
    return out


def _is_unscaled(image: nib.spatialimages.SpatialImage) -> bool:
    slope = getattr(image.dataobj, "slope", 1.0)
    inter = getattr(image.dataobj, "inter", 0.0)
    return slope == 1.0 and inter == 0.0


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
    array = as_3d(array, source)
    check_finite(array, source)
    affine = _image_affine(image)
    check_affine(affine, source)
    volume = Volume(np.ascontiguousarray(array, dtype=np.float32), affine)
    return volume, SourceGrid(volume.shape, affine.copy(), _header_for(image), source)
def check_ct_intensities(array: np.ndarray, source: str) -> None:
    """Refuse a volume whose intensities cannot be a CT scan in Hounsfield units.

    A CT of a body in HU holds air or fat (a value at or below :data:`CT_LOW_HU`, -50 HU) and bone
    (a value at or above :data:`CT_BONE_HU`, 150 HU). Refused with :class:`InputError`: a constant
    (blank) volume, a volume without any value that low (e.g. unsigned stored values whose rescale
    intercept was lost, 0..4095), and one without any value that high (e.g. intensities normalised
    to 0..1, or an MR scan). Such scans are refused rather than warned about: the network would
    otherwise find vertebrae in a blank volume and score normalised intensities as fractures.
    """
    finite = np.asarray(array)
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        raise InputError(source, f"the scan is blank: every voxel is {low:g}")
    if high < CT_BONE_HU or low > CT_LOW_HU:
        raise InputError(
            source, f"intensities {low:g}..{high:g} are not CT Hounsfield units: a CT holds air or fat "
            f"(<= {CT_LOW_HU:g} HU) and bone (>= {CT_BONE_HU:g} HU); was the scan normalised or its "
            "rescale slope/intercept lost?"
        )


def check_ct_scan(path: str | Path, keep: bool = False) -> tuple[int, int, int]:
    """Load the scan at ``path`` (see :func:`load_scan`) and check that it is a CT in HU; its shape.

    Used by the command line before any work starts, so that a bad scan stops the run before
    anything is written (:func:`check_ct_intensities`). With ``keep`` (a NIfTI file), the loaded scan
    replaces any kept before and the next :func:`load_scan` of the unchanged file returns it
    instead of reading the file again.
    """
    volume, grid = load_scan(path)
    check_ct_intensities(volume.array, grid.source)
    path = Path(path).expanduser()
    if keep and path.is_file():
        _KEPT_SCAN.clear()
        _KEPT_SCAN[_file_key(path)] = (volume, grid)
    return volume.shape


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
        if array.dtype == np.uint8:
            stored = array  # already stored values: no copy of a large map
        elif np.issubdtype(array.dtype, np.integer):
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


_WRITE_CHUNK_BYTES = 32 * 2**20
"""Bytes converted to the file's column-major order at a time by :func:`_write_raw_nifti`."""


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
        data = np.asarray(data, dtype=header.get_data_dtype())
        # Column-major bytes, one slab of the slowest axes at a time: a full-size copy of a large
        # map in Fortran order would double its memory.
        flat = data if data.ndim == 4 else data[..., np.newaxis]  # (x, y, z, channels)
        slab = max(1, _WRITE_CHUNK_BYTES // max(1, flat[:, :, :1, :1].nbytes))
        for channel in range(flat.shape[3]):
            for first in range(0, flat.shape[2], slab):
                handle.write(flat[:, :, first : first + slab, channel].tobytes(order="F"))
    os.chmod(path, 0o644)
