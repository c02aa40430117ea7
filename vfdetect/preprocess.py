"""Preprocessing: the one way from a scan to the arrays the network sees, and an optional cache.

:func:`prepare_scan` loads a scan (NIfTI, DICOM folder or in-memory image), resamples it onto the
internal frame (canonical RAS, isotropic ``spacing`` mm, trilinear), computes the body mask and
z-scores the intensities over it. Training, validation, prediction and evaluation all call it, so
the network sees identical arrays for a scan whichever stage reads it.

:func:`training_labels` makes a case's 0/1/2/255 label image on the internal grid. A case with
centroids has its ellipsoids drawn directly on the internal grid with the label settings of the
label folder (``label_config.json``), so a flattened fracture keeps its true height on thick-slice
scans instead of being quantised to the slice thickness by resampling a source-grid label image.
Label images from elsewhere (no ``label_config.json``) and cases without centroids are read from
``<case>_labels.nii.gz`` on the scan's grid and resampled nearest-neighbour.

The optional cache (:func:`preprocess_cases`, :func:`cached_case`) holds per case, in
``<cache>/<case>/``: ``image.npy`` (float32, normalised, internal grid), ``labels.npy`` (uint8,
same grid), ``class_<value>.npy`` (flat C-order indices of the voxels of each non-background label
value, for drawing segment centres) and ``case.json`` (inputs, grids, label origin and
``input_hash``, a SHA-256 over the contents of every input and the settings). The ``.npy`` files
can be memory-mapped (``np.load(path, mmap_mode="r")``). An entry whose hash no longer matches its
inputs is stale and is prepared again. ``case.json`` is written last, so an interrupted write
leaves no entry that looks complete.

Arrays are indexed ``[x, y, z]``; affines follow nibabel (voxel index to world RAS mm).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.frame import SourceGrid

if TYPE_CHECKING:  # pragma: no cover - typing only
    import nibabel as nib

    from vfdetect.labels import LabelConfig
    from vfdetect.manifest import Case

__all__ = [
    "PreparedScan",
    "prepare_scan",
    "training_labels",
    "CacheEntry",
    "CachedCase",
    "input_hash",
    "write_cached_case",
    "read_cached_case",
    "cached_case",
    "cache_entry",
    "preprocess_cases",
    "CACHE_FORMAT",
]

CACHE_FORMAT = 1
"""Version of the cache layout and of the preparation; part of every entry's hash."""

_VALID_LABELS = (0, 1, 2, 255)


# --------------------------------------------------------------------------------------------------
# Prepared scans


@dataclass(frozen=True, eq=False)
class PreparedScan:
    """A scan in the internal frame.

    ``hu``: float32 HU, ``[x, y, z]``; ``image``: the network's input (``hu`` clipped to the HU range
    and z-scored over the body); ``body_mask``: bool, same shape; ``affine``: the internal grid's
    affine; ``grid``: the input's own grid (to save results back onto it).
    """

    hu: np.ndarray
    image: np.ndarray
    body_mask: np.ndarray
    affine: np.ndarray
    grid: SourceGrid

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the internal grid."""
        return (int(self.image.shape[0]), int(self.image.shape[1]), int(self.image.shape[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the internal grid along each axis."""
        sizes = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def prepare_scan(image_or_path: str | Path | nib.Nifti1Image, spacing: float = 1.0) -> PreparedScan:
    """Load a scan and bring it into the internal frame: HU, body mask and normalised image.

    ``image_or_path`` is anything :func:`vfdetect.volume.load_scan` reads. The source-grid array is
    released as soon as it is resampled. Raises :class:`InputError` naming the input for unreadable
    or invalid scans.
    """
    from vfdetect.body import body_mask, normalise
    from vfdetect.volume import load_scan, to_internal

    scan, grid = load_scan(image_or_path)
    internal = to_internal(scan, spacing=spacing, order=1)
    del scan
    affine = internal.affine
    hu = np.asarray(internal.array, dtype=np.float32)
    del internal
    mask = body_mask(hu)
    image = normalise(hu, mask)
    return PreparedScan(hu=hu, image=image, body_mask=mask, affine=affine, grid=grid)


# --------------------------------------------------------------------------------------------------
# Training labels


def _label_inputs(case: Case, labels_dir: Path | None) -> tuple[LabelConfig | None, Path | None]:
    """How ``case``'s training labels are made: (settings to draw them with, or the label image to read).

    Drawn from the centroids when the case has them and the label folder records its settings
    (default settings without a label folder); read from the folder's label image otherwise.
    """
    from vfdetect.labels import LabelConfig, label_path, read_label_config

    config = LabelConfig() if labels_dir is None else read_label_config(labels_dir)
    if case.centroids is not None and config is not None:
        return config, None
    if labels_dir is None:
        raise InputError(case.image, f"case {case.case} has no centroids; its label image needs a label folder")
    label_file = label_path(Path(labels_dir), case.case)
    if not label_file.is_file():
        raise InputError(label_file, f"label image of case {case.case} not found (run synth-labels first?)")
    return None, label_file


def training_labels(case: Case, scan: PreparedScan, labels_dir: str | Path | None) -> np.ndarray:
    """uint8 label image of ``case`` on ``scan``'s internal grid (0, 1, 2, or 255 ignored).

    With centroids and a label folder holding ``label_config.json`` (or no label folder: default
    settings), the ellipsoids are drawn directly on the internal grid. Otherwise the folder's
    ``<case>_labels.nii.gz``, which must lie on the scan's grid, is resampled nearest-neighbour.
    Raises :class:`InputError` naming the label file when it is missing, off the scan's grid, or
    holds other values.
    """
    from vfdetect.labels import synthesize_labels

    config, label_file = _label_inputs(case, None if labels_dir is None else Path(labels_dir))
    if config is not None:
        vertebrae = case.vertebrae(scan.grid.affine, scan.grid.shape)
        return synthesize_labels(scan.shape, scan.affine, vertebrae, config)
    assert label_file is not None
    return _read_label_image(label_file, scan)


def _read_label_image(label_file: Path, scan: PreparedScan) -> np.ndarray:
    from vfdetect.volume import load_label_image, to_internal

    labels, _ = load_label_image(label_file)
    grid = scan.grid
    if tuple(labels.shape) != tuple(grid.shape) or not np.allclose(labels.affine, grid.affine, rtol=0, atol=1e-3):
        raise InputError(
            label_file,
            f"label image grid (shape {tuple(labels.shape)}) is not the grid of the scan {grid.source} "
            f"(shape {tuple(grid.shape)}); label images must be written on the scan's grid",
        )
    values = np.unique(np.asarray(labels.array))
    unexpected = [int(v) for v in values if int(v) not in _VALID_LABELS]
    if unexpected:
        raise InputError(label_file, f"label values must be 0, 1, 2 or 255 (ignored), found {unexpected[:5]}")
    internal = to_internal(labels, spacing=scan.spacing[0], order=0)
    if internal.shape != scan.shape:  # pragma: no cover - the internal grid depends on the source grid only
        raise InputError(label_file, "label image and scan map to different internal grids")
    return np.ascontiguousarray(internal.array, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Cache


@dataclass(frozen=True)
class CacheEntry:
    """The files of one case in a cache folder: ``<cache>/<case>/``."""

    folder: Path

    @property
    def image(self) -> Path:
        """Normalised image, float32, internal grid."""
        return self.folder / "image.npy"

    @property
    def labels(self) -> Path:
        """Label image, uint8, internal grid."""
        return self.folder / "labels.npy"

    @property
    def info(self) -> Path:
        """Inputs, grids and ``input_hash`` (written last)."""
        return self.folder / "case.json"

    def class_voxels(self, value: int) -> Path:
        """Flat indices of the voxels holding label ``value``."""
        return self.folder / f"class_{int(value)}.npy"


def cache_entry(cache_dir: str | Path, case: str) -> CacheEntry:
    """Where ``case`` lives in the cache folder ``cache_dir``."""
    return CacheEntry(Path(cache_dir) / case)


@dataclass(frozen=True, eq=False)
class CachedCase:
    """One case as stored in the cache (arrays memory-mapped when read back).

    ``class_voxels[value]``: sorted flat C-order indices into ``labels`` of every voxel with that
    non-background value. ``info``: the contents of ``case.json``.
    """

    case: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    class_voxels: dict[int, np.ndarray]
    info: dict[str, Any]


def _hash_file_or_folder(path: Path, digest: Any) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"file {file.relative_to(path) if path.is_dir() else file.name}\n".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)


def input_hash(case: Case, labels_dir: str | Path | None, spacing: float = 1.0) -> str:
    """SHA-256 over everything an entry is made from: the contents of the scan, centroid, body-mask
    and label files, the grades, the label settings, ``spacing`` and the cache format."""
    from vfdetect import __version__

    if not Path(case.image).exists():
        raise InputError(case.image, "file or folder not found")
    config, label_file = _label_inputs(case, None if labels_dir is None else Path(labels_dir))
    digest = hashlib.sha256()
    digest.update(f"vfdetect {__version__} cache {CACHE_FORMAT} spacing {float(spacing)!r}\n".encode())
    digest.update(f"grades {sorted(case.grades.items())} scheme {case.label_scheme}\n".encode())
    _hash_file_or_folder(Path(case.image), digest)
    if config is not None:
        digest.update(f"labels drawn {json.dumps(config.to_dict(), sort_keys=True)}\n".encode())
        for path in (case.centroids, case.body_mask):
            if path is not None:
                _hash_file_or_folder(Path(path), digest)
    else:
        assert label_file is not None
        digest.update(b"labels read\n")
        _hash_file_or_folder(label_file, digest)
    return digest.hexdigest()


def _class_voxels(labels: np.ndarray) -> dict[int, np.ndarray]:
    flat = labels.ravel()
    present = np.flatnonzero(np.bincount(flat, minlength=256))
    return {int(value): np.flatnonzero(flat == value) for value in present if value != 0}


def _save_npy(path: Path, array: np.ndarray) -> None:
    from vfdetect.fileio import atomic_path

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))


def write_cached_case(
    cache_dir: str | Path,
    case: Case,
    labels_dir: str | Path | None,
    spacing: float = 1.0,
    digest: str | None = None,
) -> CachedCase:
    """Prepare ``case`` (:func:`prepare_scan`, :func:`training_labels`) and write its cache entry.

    An existing entry is replaced; its ``case.json`` is removed first, so that an interrupted write
    leaves no entry that reads as complete. ``digest``: the case's :func:`input_hash` when already
    known. Returns the entry with in-memory arrays.
    """
    from vfdetect import __version__
    from vfdetect.fileio import write_json_atomic

    entry = cache_entry(cache_dir, case.case)
    config, _ = _label_inputs(case, None if labels_dir is None else Path(labels_dir))
    digest = digest or input_hash(case, labels_dir, spacing)
    scan = prepare_scan(case.image, spacing=spacing)
    labels = training_labels(case, scan, labels_dir)
    image, affine, grid = scan.image, scan.affine, scan.grid
    del scan  # HU and body mask are not needed any more
    voxels = _class_voxels(labels)
    entry.folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        entry.info.unlink()
    for stale in entry.folder.glob("class_*.npy"):
        stale.unlink()
    _save_npy(entry.image, image)
    _save_npy(entry.labels, labels)
    for value, indices in voxels.items():
        _save_npy(entry.class_voxels(value), indices)
    info = {
        "case": case.case,
        "source": grid.source,
        "data_source": case.source,
        "spacing": float(spacing),
        "input_hash": digest,
        "cache_format": CACHE_FORMAT,
        "version": __version__,
        "labels": "drawn from centroids" if config is not None else "label image",
        "labels_dir": None if labels_dir is None else str(labels_dir),
        "shape": list(image.shape),
        "affine": np.asarray(affine).tolist(),
        "source_shape": list(grid.shape),
        "source_affine": np.asarray(grid.affine).tolist(),
        "class_counts": {str(value): int(indices.size) for value, indices in voxels.items()},
    }
    write_json_atomic(entry.info, info)
    return CachedCase(case.case, image, labels, np.asarray(affine, dtype=np.float64), voxels, info)


def _open_entry(entry: CacheEntry, case: str, digest: str, mmap: bool) -> CachedCase | None:
    """The entry's arrays when ``case.json`` is complete and records ``digest``; None otherwise."""
    try:
        info = json.loads(entry.info.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("input_hash") != digest:
        return None
    mode: Literal["r"] | None = "r" if mmap else None
    try:
        image = np.load(entry.image, mmap_mode=mode, allow_pickle=False)
        labels = np.load(entry.labels, mmap_mode=mode, allow_pickle=False)
        counts = {int(value): int(n) for value, n in dict(info["class_counts"]).items()}
        voxels = {value: np.load(entry.class_voxels(value), allow_pickle=False) for value in counts}
        shape = tuple(int(n) for n in info["shape"])
        affine = np.asarray(info["affine"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        image.shape != shape
        or labels.shape != shape
        or image.dtype != np.float32
        or labels.dtype != np.uint8
        or affine.shape != (4, 4)
        or any(voxels[value].size != n for value, n in counts.items())
    ):
        return None
    return CachedCase(case, image, labels, affine, voxels, info)


def read_cached_case(
    cache_dir: str | Path, case: Case, labels_dir: str | Path | None, spacing: float = 1.0, mmap: bool = True
) -> CachedCase | None:
    """``case``'s cache entry, or None when it is missing, incomplete or stale (its inputs changed).

    With ``mmap`` the image and labels are memory-mapped read-only rather than read into memory.
    """
    return _open_entry(cache_entry(cache_dir, case.case), case.case, input_hash(case, labels_dir, spacing), mmap)


def cached_case(
    cache_dir: str | Path, case: Case, labels_dir: str | Path | None, spacing: float = 1.0, mmap: bool = True
) -> CachedCase:
    """``case`` from the cache, prepared and added (or replaced) first when missing or stale."""
    entry = cache_entry(cache_dir, case.case)
    digest = input_hash(case, labels_dir, spacing)
    found = _open_entry(entry, case.case, digest, mmap)
    if found is None:
        written = write_cached_case(cache_dir, case, labels_dir, spacing, digest=digest)
        if not mmap:
            return written
        del written  # read back memory-mapped: the prepared arrays need not stay in memory
        found = _open_entry(entry, case.case, digest, mmap)
    if found is None:  # pragma: no cover - only when the entry is changed while being written
        raise VfdetectError(f"case {case.case}: the cache entry in {entry.folder} could not be read back")
    return found


def preprocess_cases(
    cases: Sequence[Case],
    out_dir: str | Path,
    labels_dir: str | Path | None = None,
    spacing: float = 1.0,
    quiet: bool = False,
) -> list[Path]:
    """Write (or refresh) the cache entry of every case in ``out_dir``; up-to-date entries are kept.

    ``labels_dir``: the label folder training will use (its ``label_config.json`` and, for cases
    without centroids, its label images); without it, labels are drawn from the centroids with the
    default :class:`vfdetect.labels.LabelConfig`. Returns the entry folders in the order of ``cases``.
    """
    from tqdm import tqdm

    folders: list[Path] = []
    for case in tqdm(cases, desc="preprocessing", unit="case", disable=quiet):
        entry = cache_entry(out_dir, case.case)
        digest = input_hash(case, labels_dir, spacing)
        if _open_entry(entry, case.case, digest, mmap=True) is None:
            write_cached_case(out_dir, case, labels_dir, spacing, digest=digest)
        folders.append(cache_entry(out_dir, case.case).folder)
    return folders
