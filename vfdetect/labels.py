"""Label images from sparse vertebra annotations (a centroid and a Genant grade per vertebra).

Following section 3.1 of the paper (an extension of Glocker et al.'s dense labels from sparse
annotations), every annotated vertebra becomes an ellipsoid around its centroid carrying its
class: 0 background, 1 normal vertebra (Genant grade 0), 2 fractured vertebra (Genant grade >=
``LabelConfig.min_grade``, 1 by default). The label image is deliberately not a segmentation:
voxels near the vertebra's border stay background.

A fourth value, :data:`IGNORE` (255), marks vertebrae whose class is not known for the chosen
reference: graded ``0 < grade < min_grade`` (e.g. a mild grade-1 deformity when only grades 2-3
count as fractures: neither a clean normal nor a counted fracture) and, by default
(``unknown_grade="ignore"``), ungraded vertebrae. Such a vertebra still occupies its ellipsoid (so
its neighbours do not grow into it), but training gives its voxels no loss and never centres a
segment on them (:func:`vfdetect.train.voxel_cross_entropy` masks every value >= 3).

Geometry of one ellipsoid (all in world millimetres, so anisotropic and oblique grids are handled):

* **Axis along the spine**: the local spine direction, the normalised vector from the cranial to
  the caudal neighbouring centroid (one-sided at the ends of the annotated run). A lone vertebra
  uses the world superior-inferior axis.
* **Size**: the *level spacing* ``d`` of a vertebra is the mean distance to its annotated
  neighbours divided by the number of vertebral levels between them (so a missing vertebra in
  between does not inflate it). A vertebra without annotated neighbours takes the median spacing
  of the case's other vertebrae, or, when it is alone, a typical spacing for its level
  (:data:`TYPICAL_LEVEL_SPACING_MM`). The semi-axis along the spine is
  ``along_fraction * d``; across the spine the ellipsoid is wider left-right
  (``left_right_fraction * d``) than antero-posterior (``anterior_posterior_fraction * d``),
  with the left-right axis taken as the world left-right direction made perpendicular to the spine.
* **Fractures** are flattened along the spine: the along-spine semi-axis is multiplied by
  ``fracture_height_scale[grade - 1]`` (by default about one minus the height loss of the grade).
* **Overlaps** go to the nearest centroid (Euclidean distance in mm).

The centroids are expected to be vertebral-*body* centroids (as in VerSe's centroid files and the
paper); an ellipsoid around the centre of mass of a whole-vertebra mask would sit about 10-15 mm
too far posterior.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError, refuse_unknown_fields
from vfdetect.manifest import Case
from vfdetect.vertebrae import SPINE_ORDER, Vertebra, sort_vertebrae, spine_rank

BACKGROUND, NORMAL, FRACTURE = 0, 1, 2
"""Class values of a label image."""

IGNORE = 255
"""Label value of a vertebra of unknown class (ungraded, or ``0 < grade < min_grade``): no loss, no
segment centre. Any value >= 3 is treated alike by training; 255 is the one written."""

GENANT_GRADES_COUNTED = (1, 2, 3)
"""Allowed ``min_grade`` values: the lowest Genant grade labelled as a fracture."""

TYPICAL_LEVEL_SPACING_MM: dict[str, float] = {"C": 17.0, "T": 24.0, "L": 33.0, "S": 32.0, "Co": 20.0}
"""Typical adult centroid-to-centroid distance per spine region (used only for a lone vertebra)."""

LABEL_CONFIG_FILE = "label_config.json"
"""Name of the settings file written beside the label images."""

_OPTIONAL_LABELS = frozenset({25, 28})  # L6 and T13: only counted as a level when annotated
_UNKNOWN_GRADE_POLICIES = ("ignore", "normal", "skip")


@dataclass(frozen=True)
class LabelConfig:
    """How ellipsoids are sized and labelled; fractions are relative to the level spacing ``d``.

    ``along_fraction``: semi-axis along the spine (0.4 x 33 mm ~ 13 mm in the lumbar spine, inside
    a ~26-28 mm high body). ``left_right_fraction`` / ``anterior_posterior_fraction``: semi-axes across
    the spine. ``fracture_height_scale``: factor on the along-spine semi-axis for Genant grades
    1, 2, 3 (applied by grade, whatever label value the vertebra gets). ``min_spacing_mm`` /
    ``max_spacing_mm`` clamp the level spacing against annotation errors.

    ``min_grade``: the lowest Genant grade labelled fractured (:data:`FRACTURE`); grade 0 is
    labelled normal and ``0 < grade < min_grade`` is labelled :data:`IGNORE` (it is neither). Use the
    same value for training (``TrainConfig.min_grade``, which also stratifies the validation split)
    and for evaluation. ``unknown_grade``: an ungraded vertebra is labelled :data:`IGNORE` with
    ``"ignore"`` (the default: it is not known to be normal), :data:`NORMAL` with ``"normal"``, or
    left background with ``"skip"``.
    """

    along_fraction: float = 0.4
    left_right_fraction: float = 0.55
    anterior_posterior_fraction: float = 0.42
    fracture_height_scale: tuple[float, float, float] = (0.75, 0.65, 0.5)
    unknown_grade: str = "ignore"
    min_spacing_mm: float = 8.0
    max_spacing_mm: float = 60.0
    min_grade: int = 1

    def __post_init__(self) -> None:
        for name in ("along_fraction", "left_right_fraction", "anterior_posterior_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise VfdetectError(f"LabelConfig.{name} must be in (0, 1], got {value!r}")
        scales = tuple(float(value) for value in self.fracture_height_scale)
        if len(scales) != 3 or not all(0.0 < value <= 1.0 for value in scales):
            raise VfdetectError(
                f"LabelConfig.fracture_height_scale must be 3 factors in (0, 1] for grades 1-3, got {scales!r}"
            )
        object.__setattr__(self, "fracture_height_scale", scales)
        if self.unknown_grade not in _UNKNOWN_GRADE_POLICIES:
            raise VfdetectError(
                f"LabelConfig.unknown_grade must be one of {', '.join(_UNKNOWN_GRADE_POLICIES)}, "
                f"got {self.unknown_grade!r}"
            )
        if not (0.0 < self.min_spacing_mm < self.max_spacing_mm and math.isfinite(self.max_spacing_mm)):
            raise VfdetectError(
                "LabelConfig needs 0 < min_spacing_mm < max_spacing_mm, "
                f"got {self.min_spacing_mm!r}, {self.max_spacing_mm!r}"
            )
        if isinstance(self.min_grade, bool) or self.min_grade not in GENANT_GRADES_COUNTED:
            raise VfdetectError(f"LabelConfig.min_grade must be 1, 2 or 3, got {self.min_grade!r}")
        object.__setattr__(self, "min_grade", int(self.min_grade))

    def label_value(self, grade: int | None) -> int | None:
        """The label value of a vertebra of Genant grade ``grade`` (None: ungraded); None: not drawn."""
        if grade is None:
            return {"ignore": IGNORE, "normal": NORMAL, "skip": None}[self.unknown_grade]
        if grade >= self.min_grade:
            return FRACTURE
        return NORMAL if grade == 0 else IGNORE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the settings."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        refuse_unknown_fields(cls, values, "LabelConfig setting(s)")
        values = dict(values)
        if "fracture_height_scale" in values:
            values["fracture_height_scale"] = tuple(values["fracture_height_scale"])
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    """One labelled ellipsoid in world mm: centre, orthonormal axes (rows) and their semi-axes."""

    label: int
    value: int  # NORMAL, FRACTURE or IGNORE
    centre_mm: np.ndarray  # (3,)
    axes: np.ndarray  # (3, 3): rows = along-spine, left-right, anterior-posterior unit vectors
    semi_axes_mm: np.ndarray  # (3,)


def _level_steps(upper: int, lower: int, present: set[int]) -> int:
    """Number of vertebral levels from ``upper`` to ``lower`` (ranks in SPINE_ORDER), skipping
    the optional T13 / L6 unless the case annotates them."""
    first, last = sorted((spine_rank(upper), spine_rank(lower)))
    between = [
        label for label in SPINE_ORDER[first + 1 : last] if label not in _OPTIONAL_LABELS or label in present
    ]
    return len(between) + 1


def _typical_spacing(label: int) -> float:
    name = Vertebra(label, (0.0, 0.0, 0.0)).name
    region = "Co" if name == "Co" else name[0]
    return TYPICAL_LEVEL_SPACING_MM[region]


def ellipsoids(vertebrae: Sequence[Vertebra], config: LabelConfig = LabelConfig()) -> list[Ellipsoid]:
    """The labelled ellipsoid of every vertebra (see the module docstring for the geometry)."""
    ordered = sort_vertebrae(vertebrae)
    labels = [vertebra.label for vertebra in ordered]
    if len(set(labels)) != len(labels):
        raise VfdetectError(f"a vertebra label appears more than once: {labels}")
    present = set(labels)
    positions = np.array([vertebra.position_mm for vertebra in ordered], dtype=np.float64).reshape(-1, 3)
    count = len(ordered)

    spacings: list[float | None] = []
    directions: list[np.ndarray | None] = []
    for index in range(count):
        per_level: list[float] = []
        for neighbour in (index - 1, index + 1):
            if 0 <= neighbour < count:
                distance = float(np.linalg.norm(positions[neighbour] - positions[index]))
                per_level.append(distance / _level_steps(labels[index], labels[neighbour], present))
        spacings.append(float(np.mean(per_level)) if per_level else None)
        upper, lower = max(index - 1, 0), min(index + 1, count - 1)
        vector = positions[lower] - positions[upper]
        norm = float(np.linalg.norm(vector))
        directions.append(vector / norm if upper != lower and norm > 1e-6 else None)

    known_spacings = [value for value in spacings if value is not None]
    case_spacing = float(np.median(known_spacings)) if known_spacings else None
    world_left_right = np.array([1.0, 0.0, 0.0])
    world_superior = np.array([0.0, 0.0, 1.0])

    result: list[Ellipsoid] = []
    for index, vertebra in enumerate(ordered):
        value = config.label_value(vertebra.grade)
        if value is None:
            continue
        spacing = spacings[index]
        if spacing is None:
            spacing = case_spacing if case_spacing is not None else _typical_spacing(vertebra.label)
        spacing = float(np.clip(spacing, config.min_spacing_mm, config.max_spacing_mm))
        direction = directions[index]
        along = direction if direction is not None else world_superior
        left_right = world_left_right - np.dot(world_left_right, along) * along
        if np.linalg.norm(left_right) < 1e-3:  # spine along the world left-right axis: pick any normal
            left_right = world_superior - np.dot(world_superior, along) * along
        left_right = left_right / np.linalg.norm(left_right)
        anterior_posterior = np.cross(along, left_right)
        semi_along = config.along_fraction * spacing
        if vertebra.grade is not None and vertebra.grade >= 1:  # the shape follows the grade itself
            semi_along *= config.fracture_height_scale[int(vertebra.grade) - 1]
        result.append(
            Ellipsoid(
                label=vertebra.label,
                value=value,
                centre_mm=positions[index].copy(),
                axes=np.stack([along, left_right, anterior_posterior]),
                semi_axes_mm=np.array(
                    [
                        semi_along,
                        config.left_right_fraction * spacing,
                        config.anterior_posterior_fraction * spacing,
                    ]
                ),
            )
        )
    return result


def _voxel_box(
    ellipsoid: Ellipsoid, inverse_affine: np.ndarray, shape: Sequence[int]
) -> tuple[slice, ...] | None:
    """Voxel index box (clipped to the grid) holding the ellipsoid, or None when it misses the grid."""
    corners = (
        np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        * ellipsoid.semi_axes_mm
    )
    world = ellipsoid.centre_mm + corners @ ellipsoid.axes
    voxels = world @ inverse_affine[:3, :3].T + inverse_affine[:3, 3]
    low = np.floor(voxels.min(axis=0)).astype(int)
    high = np.ceil(voxels.max(axis=0)).astype(int) + 1
    low = np.maximum(low, 0)
    high = np.minimum(high, np.asarray(shape[:3]))
    if np.any(high <= low):
        return None
    return tuple(slice(int(start), int(stop)) for start, stop in zip(low, high, strict=True))


def synthesize_labels(
    shape: Sequence[int],
    affine: np.ndarray,
    vertebrae: Sequence[Vertebra],
    config: LabelConfig = LabelConfig(),
) -> np.ndarray:
    """uint8 label image (0 background, 1 normal, 2 fracture, 255 ignore) on the grid ``shape`` / ``affine``.

    Which vertebra gets which value is set by ``config.min_grade`` and ``config.unknown_grade``
    (see :class:`LabelConfig`).

    The grid is the scan's own (any orientation, spacing or obliquity); geometry is evaluated in
    world mm at each voxel centre.
    """
    shape = tuple(int(size) for size in shape[:3])
    affine = np.asarray(affine, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.uint8)
    shapes = ellipsoids(vertebrae, config)
    if not shapes:
        return labels
    inverse = np.linalg.inv(affine)
    boxes = [_voxel_box(ellipsoid, inverse, shape) for ellipsoid in shapes]
    used = [box for box in boxes if box is not None]
    if not used:
        return labels
    # Nearest-centroid bookkeeping only over the union of the boxes (the spine), not the whole scan.
    origin = np.array([min(box[axis].start for box in used) for axis in range(3)])
    extent = np.array([max(box[axis].stop for box in used) for axis in range(3)]) - origin
    best_distance = np.full(tuple(extent), np.inf, dtype=np.float32)
    region = labels[tuple(slice(int(o), int(o + e)) for o, e in zip(origin, extent, strict=True))]
    for ellipsoid, box in zip(shapes, boxes, strict=True):
        if box is None:
            continue
        indices = [np.arange(box[axis].start, box[axis].stop, dtype=np.float64) for axis in range(3)]
        # offset from the centre along world axes, as a sum of per-axis terms (broadcast, no meshgrid)
        base = affine[:3, 3] - ellipsoid.centre_mm
        offset_terms = [indices[axis][:, None] * affine[:3, axis][None, :] for axis in range(3)]
        quadratic = np.zeros(tuple(len(index) for index in indices), dtype=np.float64)
        distance_squared = np.zeros_like(quadratic)
        for axis_vector, semi_axis in zip(ellipsoid.axes, ellipsoid.semi_axes_mm, strict=True):
            projection = (
                (offset_terms[0] @ axis_vector)[:, None, None]
                + (offset_terms[1] @ axis_vector)[None, :, None]
                + (offset_terms[2] @ axis_vector)[None, None, :]
                + float(base @ axis_vector)
            )
            quadratic += (projection / semi_axis) ** 2
            distance_squared += projection**2
        inside = quadratic <= 1.0
        local = tuple(
            slice(box[axis].start - int(origin[axis]), box[axis].stop - int(origin[axis]))
            for axis in range(3)
        )
        distance = np.sqrt(distance_squared).astype(np.float32)
        closer = inside & (distance < best_distance[local])
        best_distance[local][closer] = distance[closer]
        region[local][closer] = ellipsoid.value
    return labels


def label_path(labels_dir: str | Path, case: str) -> Path:
    """Where the label image of ``case`` lives: ``labels_dir / f"{case}_labels.nii.gz"``."""
    return Path(labels_dir) / f"{case}_labels.nii.gz"


def preview_path(labels_dir: str | Path, case: str) -> Path:
    """Where the PNG preview of ``case`` lives: ``labels_dir / f"{case}_labels.png"``."""
    return Path(labels_dir) / f"{case}_labels.png"


def _sagittal_plane(
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    vertebrae: Sequence[Vertebra],
    pixel_mm: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Resample a world sagittal plane (constant x = the spine's median x) of the scan and labels.

    Returns the image and label planes indexed [z, y] (rows superior at top after origin='lower')
    and the plane's (y_min, y_max, z_min, z_max) in mm.
    """
    from scipy import ndimage

    shape = np.asarray(hu.shape[:3])
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    if vertebrae:
        x_mm = float(np.median([vertebra.position_mm[0] for vertebra in vertebrae]))
    else:
        x_mm = float(world[:, 0].mean())
    y_min, y_max = float(world[:, 1].min()), float(world[:, 1].max())
    z_min, z_max = float(world[:, 2].min()), float(world[:, 2].max())
    # keep the picture small for big scans
    pixel_mm = max(pixel_mm, (y_max - y_min) / 600.0, (z_max - z_min) / 600.0)
    y_values = np.arange(y_min, y_max + 1e-6, pixel_mm)
    z_values = np.arange(z_min, z_max + 1e-6, pixel_mm)
    grid_z, grid_y = np.meshgrid(z_values, y_values, indexing="ij")
    points = np.stack([np.full(grid_y.shape, x_mm), grid_y, grid_z], axis=-1).reshape(-1, 3)
    inverse = np.linalg.inv(affine)
    voxels = (points @ inverse[:3, :3].T + inverse[:3, 3]).T
    image = ndimage.map_coordinates(hu, voxels, order=1, cval=-1024.0, mode="constant").reshape(grid_y.shape)
    label_plane = ndimage.map_coordinates(labels, voxels, order=0, cval=0, mode="constant").reshape(
        grid_y.shape
    )
    return image, label_plane, (y_min, y_max, z_min, z_max)


def write_preview(
    path: str | Path,
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    vertebrae: Sequence[Vertebra],
    title: str = "",
    min_grade: int = 1,
) -> None:
    """PNG of a mid-sagittal slice through the spine with the label overlay (atomic write).

    Anterior is to the left, superior at the top; green = normal, red = fractured (grade >=
    ``min_grade``), yellow = ignored (:data:`IGNORE`); each annotated vertebra's name and grade are
    written beside its centroid.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    from vfdetect.fileio import atomic_path

    affine = np.asarray(affine, dtype=np.float64)
    image, label_plane, (y_min, y_max, z_min, z_max) = _sagittal_plane(hu, labels, affine, vertebrae)
    height_in = 6.0
    width_in = max(2.5, min(12.0, height_in * (y_max - y_min) / max(z_max - z_min, 1e-6)))
    figure, axis = plt.subplots(figsize=(width_in + 0.5, height_in + 0.4), dpi=100)
    extent = (y_min, y_max, z_min, z_max)
    axis.imshow(
        image, cmap="gray", vmin=-250, vmax=1250, origin="lower", extent=extent, interpolation="nearest"
    )
    shown = np.where(label_plane == IGNORE, 3, np.minimum(label_plane, 3))  # colour index 3: ignored
    overlay = np.ma.masked_equal(shown, BACKGROUND)
    colours = ListedColormap(["#00000000", "#2ca02c", "#d62728", "#e6c619"])
    axis.imshow(
        overlay,
        cmap=colours,
        vmin=0,
        vmax=3,
        alpha=0.45,
        origin="lower",
        extent=extent,
        interpolation="nearest",
    )
    for vertebra in vertebrae:
        _, y_mm, z_mm = vertebra.position_mm
        if vertebra.grade is None or 0 < vertebra.grade < min_grade:
            colour = "#e6c619"
        else:
            colour = "#d62728" if vertebra.grade >= min_grade else "#2ca02c"
        grade = "?" if vertebra.grade is None else str(vertebra.grade)
        axis.plot([y_mm], [z_mm], marker="+", color=colour, markersize=8)
        # names on the anterior side of the body (large y is on the left of the inverted axis)
        axis.text(
            y_mm + 22.0, z_mm, f"{vertebra.name} g{grade}", color=colour, fontsize=7, va="center", ha="right"
        )
    axis.invert_xaxis()  # anterior (large y) on the left, as sagittal images are read
    axis.set_xlabel("y (mm), anterior on the left")
    axis.set_ylabel("z (mm), superior up")
    axis.set_title(title or "labels", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def synthesize_manifest_labels(
    cases: Sequence[Case],
    out_dir: str | Path,
    config: LabelConfig = LabelConfig(),
    preview: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """Write ``out_dir/<case>_labels.nii.gz`` (uint8, on the scan's own grid and header) per case.

    With ``preview``, also ``out_dir/<case>_labels.png``. The settings (``min_grade`` among them)
    are saved as ``out_dir/label_config.json``; training reads ``min_grade`` back from it. Returns
    the label image paths in the order of ``cases``.
    """
    from tqdm import tqdm

    from vfdetect.fileio import write_json_atomic
    from vfdetect.volume import load_scan, save_on_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / LABEL_CONFIG_FILE, config.to_dict())
    written: list[Path] = []
    for case in tqdm(cases, desc="label images", unit="case", disable=quiet):
        volume, grid = load_scan(case.image)
        vertebrae = case.vertebrae(grid.affine, grid.shape)
        labels = synthesize_labels(grid.shape, grid.affine, vertebrae, config)
        path = label_path(out_dir, case.case)
        save_on_grid(labels, grid, path, dtype=np.uint8)
        if preview:
            write_preview(
                preview_path(out_dir, case.case),
                np.asarray(volume.array),
                labels,
                grid.affine,
                vertebrae,
                title=f"{case.case}: {len(vertebrae)} vertebrae, "
                f"{sum(1 for v in vertebrae if v.grade is not None and v.grade >= config.min_grade)} fractured "
                f"(grade >= {config.min_grade})",
                min_grade=config.min_grade,
            )
        written.append(path)
    return written


def read_label_config(labels_dir: str | Path) -> LabelConfig | None:
    """The :class:`LabelConfig` the label images in ``labels_dir`` were made with (``label_config.json``).

    None when the folder has no such file (label images made elsewhere). Settings missing from the
    file take their defaults (``min_grade`` 1 for files that predate it).
    """
    import json

    path = Path(labels_dir) / LABEL_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable label settings: {error}") from None
    if not isinstance(values, dict):
        raise InputError(path, "label settings must be a JSON object")
    try:
        return LabelConfig.from_dict(values)
    except (VfdetectError, TypeError, ValueError) as error:
        raise InputError(path, f"invalid label settings: {error}") from None


def read_label_min_grade(labels_dir: str | Path) -> int | None:
    """``min_grade`` of the label images in ``labels_dir`` from its ``label_config.json``.

    None when the folder has no such file (label images made elsewhere); 1 when the file predates
    the setting (fractures were then always grade >= 1).
    """
    config = read_label_config(labels_dir)
    return None if config is None else config.min_grade
