"""The files of one predicted case: the scores map, probability and label maps on the input grid, overlay, report.csv.

File names come from :class:`vfdetect.layout.CaseFolder`; the report's CSV from :mod:`vfdetect.records`.
``report.json`` is written last by :func:`vfdetect.predict.predict_case`, once its timings are complete.

The scores map (:func:`write_scores_map`, :func:`read_scores_map`) keeps the internal-grid maps the
vertebra scores were computed from, so that they can be re-scored later (centroid noise) on exactly
the values the report saw; ``probabilities.nii.gz`` is the same map resampled onto the input grid and
quantised to 1/255, for viewing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError
from vfdetect.frame import block_affine, nonzero_box
from vfdetect.layout import CaseFolder

SCORES_MAP_FORMAT = "vfdetect scores map 1"
"""The ``format`` of the JSON header extension of a scores map."""
SCORES_MAP_CHANNELS = ("fracture", "normal")
"""The channels of a scores map, in order (probabilities of the classes)."""


def patient_summary(report: Mapping[str, Any]) -> str:
    """One line with the patient verdict, its score against the threshold, and the vertebra count."""
    score = report.get("patient_score")
    threshold = float(report.get("patient_threshold", 0.5))
    count = len(report.get("vertebrae", []))
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return f"no spine found (no patient score); {count} vertebrae"
    verdict = "fracture" if float(score) >= threshold else "no fracture"
    return f"{verdict} (score {float(score):.3f} {'>=' if verdict == 'fracture' else '<'} {threshold:g}); {count} vertebrae"


def _computed_box(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Start and stop (voxels) of the bounding box of the voxels with p(normal) or p(fracture) != 0."""
    return nonzero_box((probabilities[..., 1] != 0) | (probabilities[..., 2] != 0))


def write_scores_map(
    path: Path,
    probabilities: np.ndarray,
    affine: np.ndarray,
    vertebrae: Sequence[Any],
    cube_edge_mm: float,
) -> None:
    """Write the map the vertebra scores were computed from: p(fracture), p(normal) on the internal grid.

    ``probabilities`` is the (X, Y, Z, 3) internal map (background, normal, fracture) on the grid of
    ``affine``; ``vertebrae`` the :class:`vfdetect.vertebrae.Vertebra` scored. The file holds float32
    channels (:data:`SCORES_MAP_CHANNELS`) cropped to the bounding box of the voxels where p(normal)
    or p(fracture) is not 0 (the voxels the network computed), widened by half the scoring cube
    (``cube_edge_mm``) plus two voxels and clipped to the grid; the NIfTI affine is the crop's. Every
    voxel of the grid outside the crop has p(normal) = p(fracture) = 0. A JSON header extension
    (:func:`read_scores_map`) records the full grid (``grid_shape``, ``grid_affine`` at full
    precision), the crop's ``crop_start`` and the exact ``centroids`` scored (report.json rounds them
    to 0.01 mm). The write is atomic.
    """
    import nibabel as nib

    from vfdetect.fileio import atomic_path

    affine = np.asarray(affine, dtype=np.float64)
    shape = np.array(probabilities.shape[:3])
    box = _computed_box(probabilities)
    if box is None:  # nothing computed: one background voxel keeps the file a valid image
        start, stop = np.zeros(3, dtype=int), np.ones(3, dtype=int)
    else:
        voxel_mm = float(np.min(np.linalg.norm(affine[:3, :3], axis=0)))
        margin = int(math.ceil(0.5 * cube_edge_mm / voxel_mm)) + 2
        start = np.maximum(box[0] - margin, 0)
        stop = np.minimum(box[1] + margin, shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    data = np.stack([probabilities[crop][..., 2], probabilities[crop][..., 1]], axis=-1).astype(np.float32)
    crop_affine = block_affine(affine, start)
    image = nib.Nifti1Image(data, crop_affine)
    image.header.set_sform(crop_affine, code=2)
    image.header.set_qform(crop_affine, code=2)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"p(fracture), p(normal): vfdetect scores"
    description = {
        "format": SCORES_MAP_FORMAT,
        "channels": list(SCORES_MAP_CHANNELS),
        "grid_shape": [int(n) for n in shape],
        "grid_affine": affine.tolist(),
        "crop_start": [int(n) for n in start],
        "outside": 0.0,
        "centroids": [{"label": int(v.label), "position_mm": [float(x) for x in v.position_mm]} for v in vertebrae],
    }
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(description).encode()))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


@dataclass(frozen=True, eq=False)
class ScoresMap:
    """A saved scores map (:func:`write_scores_map`): the crop and where it lies in the full internal grid.

    ``data`` is the (x, y, z, 2) crop (channels :data:`SCORES_MAP_CHANNELS`); ``grid_affine`` and
    ``grid_shape`` the full grid the scores were computed on; ``crop_start`` the crop's first voxel in
    it; ``centroids`` (label, world mm) the exact centroids scored, in the report's order.
    """

    data: np.ndarray
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    centroids: tuple[tuple[int, tuple[float, float, float]], ...]

    def channel_index(self, channel: str) -> int:
        return SCORES_MAP_CHANNELS.index(channel)

    def covering(self, points_mm: np.ndarray, channel: str = "fracture", margin: int = 3) -> Any:
        """A :class:`vfdetect.volume.Volume` of one channel that samples like the full internal map at
        ``points_mm`` (N, 3): the crop, widened with the zeros of the full grid to cover the points
        (plus ``margin`` voxels) and clipped to the full grid, so that the points inside and outside
        the grid, and the values read, are those of the map the scores were computed from.
        """
        from vfdetect.volume import Volume

        grid_shape = np.asarray(self.grid_shape)
        crop_start = np.asarray(self.crop_start)
        crop_stop = crop_start + np.asarray(self.data.shape[:3])
        start, stop = crop_start.copy(), crop_stop.copy()
        points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if len(points):
            inverse = np.linalg.inv(self.grid_affine)
            voxels = points @ inverse[:3, :3].T + inverse[:3, 3]
            low = np.floor(voxels.min(axis=0)).astype(int) - margin
            high = np.ceil(voxels.max(axis=0)).astype(int) + margin + 1
            start = np.clip(np.minimum(start, low), 0, grid_shape)
            stop = np.clip(np.maximum(stop, high), 0, grid_shape)
        values = self.data[..., self.channel_index(channel)]
        if np.array_equal(start, crop_start) and np.array_equal(stop, crop_stop):
            array = values
        else:
            array = np.zeros(tuple(int(n) for n in stop - start), dtype=np.float32)
            offset = crop_start - start
            array[offset[0] : offset[0] + values.shape[0], offset[1] : offset[1] + values.shape[1],
                  offset[2] : offset[2] + values.shape[2]] = values
        affine = self.grid_affine if not start.any() else block_affine(self.grid_affine, start)
        return Volume(array, affine)


def read_scores_map(path: Path) -> ScoresMap:
    """Read a scores map written by :func:`write_scores_map`."""
    import nibabel as nib

    if not Path(path).is_file():
        raise InputError(path, "scores map not found")
    try:
        image: Any = nib.load(str(path))
        description = None
        for extension in image.header.extensions:
            if extension.get_code() != 6:
                continue
            content = extension.get_content()
            text = content.decode() if isinstance(content, bytes) else str(content)
            candidate = json.loads(text)
            if isinstance(candidate, dict) and candidate.get("format") == SCORES_MAP_FORMAT:
                description = candidate
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel and json raise many kinds
        raise InputError(path, f"cannot read the scores map ({error})") from None
    if description is None:
        raise InputError(path, f"not a scores map (no '{SCORES_MAP_FORMAT}' header extension)")
    if data.ndim != 4 or data.shape[3] != len(SCORES_MAP_CHANNELS):
        raise InputError(path, f"expected a 4D map with {len(SCORES_MAP_CHANNELS)} channels, got shape {data.shape}")
    try:
        grid_affine = np.asarray(description["grid_affine"], dtype=np.float64).reshape(4, 4)
        grid_shape = tuple(int(n) for n in description["grid_shape"])
        crop_start = tuple(int(n) for n in description["crop_start"])
        centroids = tuple((int(c["label"]), tuple(float(x) for x in c["position_mm"]))
                          for c in description.get("centroids", []))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"malformed scores map header extension ({error})") from None
    if len(grid_shape) != 3 or len(crop_start) != 3:
        raise InputError(path, "malformed scores map header extension (grid_shape, crop_start)")
    return ScoresMap(data, grid_affine, grid_shape, crop_start, centroids)  # type: ignore[arg-type]


_QUANTUM = 1.0 / 255.0
"""The step of ``probabilities.nii.gz`` (uint8 with ``scl_slope`` 1/255)."""


def _output_box(mask: np.ndarray) -> tuple[tuple[slice, slice, slice] | None, np.ndarray]:
    """The bounding box of ``mask`` widened by one voxel (clipped to the grid), and its start.

    Resampling to the input grid reads at most the two neighbours along each axis, so an input
    voxel that reads nothing inside the box reads only voxels below the quantisation step (the
    probability maps: an interpolation of them is below it too and stores 0) or of background (the
    label map, nearest neighbour). None when ``mask`` is empty.
    """
    box = nonzero_box(mask)
    if box is None:
        return None, np.zeros(3, dtype=int)
    start = np.maximum(box[0] - 1, 0)
    stop = np.minimum(box[1] + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True)), start  # type: ignore[return-value]


def write_case_files(
    folder: CaseFolder,
    report: dict[str, Any],
    probabilities: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    grid: Any,
    vertebrae: Sequence[Any],
    overlay_hu: np.ndarray | None,
    cube_edge_mm: float,
) -> dict[str, Path]:
    """The scores map, maps on the input grid, the overlay and report.csv (report.json is written by the caller).

    ``probabilities`` is the internal (X, Y, Z, 3) map on the grid of ``affine`` that the vertebrae
    were scored on, ``cube_edge_mm`` the scoring cube's edge (the scores map's margin).
    """
    from concurrent.futures import ThreadPoolExecutor

    from vfdetect.frame import to_source_in_box
    from vfdetect.records import write_report_csv
    from vfdetect.report import render_overlay
    from vfdetect.volume import save_on_grid, world_to_voxel

    Path(folder.path).mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "scores_map": folder.scores_map, "probabilities": folder.probabilities, "labels": folder.labels,
    }
    # Only the block of the input grid that can see a non-zero output voxel is resampled; the rest
    # of each output is 0 (see _output_box). The scores map, the overlay and the compression of the
    # maps (zlib releases the GIL) run in worker threads beside the resampling.
    vertebra_map = probabilities[..., 1] + probabilities[..., 2]
    with ThreadPoolExecutor(max_workers=2) as writer:
        pending = [writer.submit(write_scores_map, paths["scores_map"], probabilities, affine, vertebrae,
                                 cube_edge_mm)]
        if overlay_hu is not None:
            paths["overlay"] = folder.overlay
            centres = np.array(
                [world_to_voxel(affine, np.asarray(v.position_mm)) for v in vertebrae], dtype=np.float64
            ).reshape(-1, 3)
            pending.append(writer.submit(
                render_overlay, paths["overlay"], overlay_hu, probabilities[..., 2], spacing, report["vertebrae"],
                centres, f"{report['case']}: {patient_summary(report)}", vertebra_probability=vertebra_map,
            ))
        quantised = np.zeros(tuple(grid.shape) + (2,), dtype=np.uint8)
        crop, start = _output_box(vertebra_map >= _QUANTUM / 2)
        if crop is not None:
            stacked = np.stack([probabilities[crop][..., 2], vertebra_map[crop]], axis=-1)
            values, index = to_source_in_box(stacked, affine, grid, start, order=1)
            del stacked
            quantised[index] = np.clip(np.rint(np.clip(values, 0.0, 1.0) / _QUANTUM), 0, 255).astype(np.uint8)
            del values
        pending.append(writer.submit(save_on_grid, quantised, grid, paths["probabilities"], scale=_QUANTUM))
        label_map = np.zeros(tuple(grid.shape), dtype=np.uint8)
        crop, start = _output_box(vertebra_map > probabilities[..., 0])  # wider than argmax != 0
        if crop is not None:
            labels = np.argmax(probabilities[crop], axis=-1).astype(np.uint8)
            values, index = to_source_in_box(labels, affine, grid, start, order=0)
            label_map[index] = values
            del labels, values
        pending.append(writer.submit(save_on_grid, label_map, grid, paths["labels"], dtype=np.uint8))
        for job in pending:
            job.result()
    paths["report_csv"] = folder.report_csv
    write_report_csv(paths["report_csv"], report)
    return paths
