"""Inputs of the simulation: manifest rows (:class:`SourceScan`) and a scan with its masks, checked.

A vertebra mask is renumbered to VerSe labels; a body mask (binary, TPTBox sub-regions or
TotalSegmentator ``vertebrae_body``) becomes the VerSe label of each body voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.manifest import (
    FileIndex,
    read_manifest_rows,
    resolve_data_root,
    resolve_entry,
    row_label_scheme,
)
from vfdetect.vertebrae import LABEL_NAMES, LABEL_SCHEMES
from vfdetect.volume import SourceGrid, load_label_image, load_scan


@dataclass(frozen=True)
class SourceScan:
    """One row of a simulation manifest: resolved paths of the CT, its vertebra mask and body mask."""

    case: str
    image: Path
    mask: Path
    label_scheme: str = "verse"
    body_mask: Path | None = None


def read_simulation_manifest(path: str | Path, data_root: str | Path | None = None) -> list[SourceScan]:
    """Read a manifest with the columns ``case,image,mask`` (+ optional ``label_scheme``, ``body_mask``).

    ``mask`` is a vertebra instance mask NIfTI (a manifest without it may give the mask in
    ``centroids``); ``label_scheme`` its numbering (:data:`vfdetect.vertebrae.LABEL_SCHEMES`);
    ``body_mask`` a vertebral-body mask on its grid (binary, TPTBox sub-regions with 49/50 = body,
    or TotalSegmentator ``vertebrae_body`` with 1 = bodies). Relative paths are resolved as
    :func:`vfdetect.manifest.read_manifest` does: against ``data_root``, else
    ``$VFDETECT_DATA_ROOT``, else the manifest's folder, else by file name under the root.
    """
    path = Path(path)
    root = resolve_data_root(path, data_root)
    index = FileIndex(root)
    scans: list[SourceScan] = []
    for line, case, row in read_manifest_rows(path):
        mask_value = row.get("mask", "") or (
            row.get("centroids", "") if row.get("centroids", "").lower().endswith((".nii", ".nii.gz")) else ""
        )
        if not row["image"] or not mask_value:
            raise InputError(path, f"line {line} (case {case!r}): needs an image and a vertebra mask (column 'mask')")
        scheme = row_label_scheme(path, line, case, row)
        body_value = row.get("body_mask", "")
        scans.append(
            SourceScan(
                case,
                resolve_entry(path, line, case, "image", row["image"], root, index),
                resolve_entry(path, line, case, "mask", mask_value, root, index),
                scheme,
                resolve_entry(path, line, case, "body_mask", body_value, root, index) if body_value else None,
            )
        )
    return scans


def _same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> bool:
    return tuple(shape_a) == tuple(shape_b) and bool(np.allclose(affine_a, affine_b, atol=1e-3))


def _verse_labels(array: np.ndarray, label_scheme: str, source: str) -> np.ndarray:
    """Mask values -> VerSe labels (uint8, 0 elsewhere); unknown VerSe values are an error."""
    values = [int(value) for value in np.unique(array) if value != 0]
    mapping = LABEL_SCHEMES[label_scheme]
    if mapping is None:
        unknown = [value for value in values if value not in LABEL_NAMES]
        if unknown:
            raise InputError(source, f"unknown vertebra label(s) {unknown} in the mask (VerSe numbering 1-28, 29 = S2)")
        table = {value: value for value in values}
    else:
        table = {value: int(mapping[value]) for value in values if value in mapping}
    if not table:
        raise InputError(source, f"no vertebra in the mask ({label_scheme} numbering)")
    lookup = np.zeros(max(values) + 1, dtype=np.uint8)
    for value, label in table.items():
        lookup[value] = label
    clipped = np.clip(array, 0, max(values)).astype(np.int64)
    return lookup[clipped]


def _body_indicator(array: np.ndarray, source: str) -> np.ndarray:
    """Vertebral-body voxels of a body mask: 49/50 (TPTBox), else 1 (binary, TotalSegmentator), else its one value."""
    values = {int(value) for value in np.unique(array) if value != 0}
    if values & {49, 50}:
        return np.isin(array, (49, 50))
    if 1 in values:
        return np.asarray(array == 1)
    if len(values) == 1:
        return np.asarray(array != 0)
    raise InputError(source, f"cannot tell the vertebral bodies in the body mask (values {sorted(values)})")


@dataclass(frozen=True, eq=False)
class _Inputs:
    hu: np.ndarray
    labels: np.ndarray
    bodies: np.ndarray  # VerSe label where vertebral body, 0 elsewhere
    affine: np.ndarray
    ct_grid: SourceGrid
    mask_grid: SourceGrid
    ct_dtype: np.dtype
    ct_scaling: tuple[float, float]
    body_given: bool


def _load_inputs(
    ct: str | Path | nib.Nifti1Image,
    mask: str | Path | nib.Nifti1Image,
    body: str | Path | nib.Nifti1Image | None,
    label_scheme: str,
) -> _Inputs:
    if label_scheme not in LABEL_SCHEMES:
        raise VfdetectError(f"unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
    volume, ct_grid = load_scan(ct)
    mask_volume, mask_grid = load_label_image(mask)
    if not _same_grid(volume.shape, volume.affine, mask_volume.shape, mask_volume.affine):
        raise InputError(
            mask_grid.source,
            f"vertebra mask (shape {list(mask_volume.shape)}) is not on the grid of the CT {ct_grid.source} "
            f"(shape {list(volume.shape)})",
        )
    labels = _verse_labels(mask_volume.array, label_scheme, mask_grid.source)
    if body is not None:
        body_volume, body_grid = load_label_image(body)
        if not _same_grid(body_volume.shape, body_volume.affine, mask_volume.shape, mask_volume.affine):
            raise InputError(body_grid.source, f"body mask is not on the grid of the vertebra mask {mask_grid.source}")
        bodies = np.where(_body_indicator(body_volume.array, body_grid.source), labels, 0).astype(np.uint8)
        if not bodies.any():
            raise InputError(body_grid.source, "the body mask has no voxel inside any vertebra of the mask")
    else:
        bodies = np.zeros_like(labels)
    header = ct_grid.header
    slope, inter = header.get_slope_inter()
    scaling = (1.0 if slope is None else float(slope), 0.0 if inter is None else float(inter))
    return _Inputs(
        volume.array, labels, bodies, volume.affine, ct_grid, mask_grid, header.get_data_dtype(), scaling, body is not None
    )
