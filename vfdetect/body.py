"""The patient's body in a CT volume and the intensities the network sees.

:func:`body_mask` finds the body (voxels above -500 HU, the largest component, slice holes filled);
:func:`normalise` clips to :data:`HU_RANGE` and z-scores over the body, as in the paper. Both work on
the internal frame's HU array (:func:`vfdetect.preprocess.prepare_scan`), the same for training and
prediction.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vfdetect.errors import VfdetectError
from vfdetect.frame import nonzero_box

#: HU range that :func:`normalise` clips to before taking statistics: air (and the -2000/-3024 padding
#: some scanners write outside the reconstruction circle) becomes -1024, metal saturates at 3071.
HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)


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
    # int32 labels (half the memory of intp on a 512 x 512 x 600 scan), counted a chunk at a time so
    # that bincount's conversion to intp stays small.
    labels = np.empty(above.shape, dtype=np.int32)
    count = ndimage.label(above, output=labels)
    if count > 1:
        sizes = np.zeros(count + 1, dtype=np.int64)
        flat = labels.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            sizes += np.bincount(flat[start : start + (1 << 24)], minlength=count + 1)
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    else:
        mask = above
    del labels, above
    # Holes only exist within the body's bounding box: work on it. A background voxel on the box's
    # faces touches the background around the box, which reaches every slice's border, so the holes
    # of the cropped slices (not reaching the crop's border) are exactly those of the full slices.
    extent = nonzero_box(mask)
    assert extent is not None  # the mask holds the largest component
    box = tuple(slice(int(low), int(high)) for low, high in zip(*extent, strict=True))
    cropped = mask[box]
    filled = mask.copy()
    for axis in range(mask.ndim):
        filled[box] |= _planar_holes(cropped, axis)
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
