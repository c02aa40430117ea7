"""Vertebrae, their annotations, grade tables and dataset manifests.

Vertebra labels follow the VerSe numbering: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 S1 (VerSe's
"sacrum" label), 27 coccyx, 28 T13 (a transitional thoracic vertebra), plus the extension 29 = S2,
which VerSe does not have and the paper's T1-S2 range needs.

Centroid files use the VerSe JSON format: a list whose entry ``{"direction": ["P", "I", "R"]}``
gives the axis codes of the voxel order, then one ``{"label": L, "X": x, "Y": y, "Z": z}`` per
vertebra in voxel coordinates of the scan (X, Y, Z along array axes 0, 1, 2). Inside the library a
:class:`Vertebra` holds its position in world RAS millimetres, so it is independent of the grid of
the scan it was read with.

Grades are Genant grades 0 (normal), 1 (mild, 20-25 % height loss), 2 (moderate, 25-40 %) and
3 (severe, > 40 %), stored as ``grades.csv`` with the columns ``case,label,grade``.

A manifest (``case,image,centroids``) lists one scan per row with paths relative to a data root;
see :func:`read_manifest` for how paths are resolved.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic, write_text_atomic

# ----------------------------------------------------------------------------------------------
# Names and numbering
# ----------------------------------------------------------------------------------------------

LABEL_NAMES: dict[int, str] = {
    **{label: f"C{label}" for label in range(1, 8)},
    **{label: f"T{label - 7}" for label in range(8, 20)},
    **{label: f"L{label - 19}" for label in range(20, 26)},
    26: "S1",
    27: "Co",
    28: "T13",
    29: "S2",
}
"""VerSe label -> vertebra name (29 = S2 is this package's extension)."""

SPINE_ORDER: tuple[int, ...] = (
    *range(1, 8),
    *range(8, 20),
    28,
    *range(20, 26),
    26,
    29,
    27,
)
"""Every label in cranio-caudal order: C1..C7, T1..T12, T13, L1..L6, S1, S2, coccyx."""

PAPER_LEVELS: tuple[int, ...] = (*range(8, 20), *range(20, 25), 26, 29)
"""The paper's range T1-T12, L1-L5, S1, S2."""

GENANT_GRADES: tuple[int, ...] = (0, 1, 2, 3)

_NAME_ALIASES: dict[str, int] = {
    "SACRUM": 26,
    "COCCYX": 27,
    "COC": 27,
    "CO": 27,
}

TOTALSEGMENTATOR_V2_TO_VERSE: dict[int, int] = {
    26: 26,  # vertebrae_S1 -> S1
    **{
        totalseg: 51 - totalseg for totalseg in range(27, 51)
    },  # L5..L1 (27-31), T12..T1 (32-43), C7..C1 (44-50)
}
"""TotalSegmentator v2 "total" task class -> VerSe label.

TotalSegmentator numbers its vertebra classes caudal to cranial: 26 vertebrae_S1, 27-31 L5..L1,
32-43 T12..T1, 44-50 C7..C1. Its class 25 ("sacrum", the sacrum below S1) has no VerSe
counterpart and is left out; every other class (organs, ribs, ...) is ignored.
"""

LABEL_SCHEMES: dict[str, Mapping[int, int] | None] = {
    "verse": None,
    "totalsegmentator": TOTALSEGMENTATOR_V2_TO_VERSE,
}
"""Label numbering of a vertebra mask: ``verse`` (identity) or ``totalsegmentator`` (v2 classes)."""

_PAIRED_AXIS_CODES = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_AXIS_OF_CODE = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def vertebra_name(label: int) -> str:
    """Name of a VerSe label (``20`` -> ``"L1"``); :class:`VfdetectError` if unknown."""
    try:
        return LABEL_NAMES[int(label)]
    except (KeyError, TypeError, ValueError):
        raise VfdetectError(f"unknown vertebra label {label!r} (known: 1-29, VerSe numbering)") from None


def vertebra_label(name: str) -> int:
    """VerSe label of a vertebra name (``"L1"`` -> ``20``, case-insensitive; ``"sacrum"`` -> 26)."""
    key = str(name).strip().upper()
    for label, label_name in LABEL_NAMES.items():
        if label_name.upper() == key:
            return label
    if key in _NAME_ALIASES:
        return _NAME_ALIASES[key]
    raise VfdetectError(f"unknown vertebra name {name!r}")


def spine_rank(label: int) -> int:
    """Position of ``label`` in :data:`SPINE_ORDER` (0 = C1); use it to sort vertebrae cranio-caudally."""
    try:
        return SPINE_ORDER.index(int(label))
    except ValueError:
        raise VfdetectError(f"unknown vertebra label {label!r}") from None


def _parse_label(value: Any) -> int:
    """Label from an int, an integer-valued float/string or a vertebra name; VfdetectError otherwise."""
    if isinstance(value, bool):
        raise VfdetectError(f"unknown vertebra label {value!r}")
    if isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise VfdetectError(f"unknown vertebra label {value!r}")
        label = int(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return vertebra_label(text)
        if not number.is_integer():
            raise VfdetectError(f"unknown vertebra label {value!r}")
        label = int(number)
    vertebra_name(label)
    return label


def _parse_grade(value: Any) -> int:
    """Genant grade 0..3 from an int or integer-valued string; VfdetectError otherwise."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise VfdetectError(f"grade {value!r} is not a Genant grade 0-3") from None
    if not number.is_integer() or int(number) not in GENANT_GRADES:
        raise VfdetectError(f"grade {value!r} is not a Genant grade 0-3")
    return int(number)


# ----------------------------------------------------------------------------------------------
# Vertebra
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vertebra:
    """One annotated vertebra: VerSe label, centroid in world RAS mm, Genant grade (None = unknown)."""

    label: int
    position_mm: tuple[float, float, float]
    grade: int | None = None

    def __post_init__(self) -> None:
        vertebra_name(self.label)
        position = tuple(float(value) for value in self.position_mm)
        if len(position) != 3 or not all(math.isfinite(value) for value in position):
            raise VfdetectError(
                f"vertebra {self.label}: position must be 3 finite numbers, got {self.position_mm!r}"
            )
        object.__setattr__(self, "label", int(self.label))
        object.__setattr__(self, "position_mm", position)
        if self.grade is not None:
            if (
                isinstance(self.grade, bool)
                or int(self.grade) != self.grade
                or int(self.grade) not in GENANT_GRADES
            ):
                raise VfdetectError(f"vertebra {self.name}: grade {self.grade!r} is not a Genant grade 0-3")
            object.__setattr__(self, "grade", int(self.grade))

    @property
    def name(self) -> str:
        """Vertebra name, e.g. ``"L1"``."""
        return LABEL_NAMES[self.label]

    @property
    def fractured(self) -> bool | None:
        """True for Genant grade >= 1, False for grade 0, None when the grade is unknown."""
        return None if self.grade is None else self.grade >= 1

    def with_grade(self, grade: int | None) -> Vertebra:
        """A copy with another grade."""
        return Vertebra(self.label, self.position_mm, grade)


def sort_vertebrae(vertebrae: Iterable[Vertebra]) -> list[Vertebra]:
    """Vertebrae in cranio-caudal order."""
    return sorted(vertebrae, key=lambda vertebra: spine_rank(vertebra.label))


def attach_grades(vertebrae: Iterable[Vertebra], grades: Mapping[int, int]) -> list[Vertebra]:
    """Vertebrae with the grade of ``grades[label]`` (None where the label is not graded)."""
    return [vertebra.with_grade(grades.get(vertebra.label)) for vertebra in vertebrae]


# ----------------------------------------------------------------------------------------------
# Voxel <-> world
# ----------------------------------------------------------------------------------------------


def _as_affine(affine: np.ndarray) -> np.ndarray:
    matrix = np.asarray(affine, dtype=np.float64)
    if (
        matrix.shape != (4, 4)
        or not np.all(np.isfinite(matrix))
        or abs(np.linalg.det(matrix[:3, :3])) < 1e-12
    ):
        raise VfdetectError(f"not a usable 4x4 voxel-to-world affine: {matrix.tolist()!r}")
    return matrix


def _voxel_to_world(affine: np.ndarray, ijk: np.ndarray | Sequence[float]) -> np.ndarray:
    points = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return points @ affine[:3, :3].T + affine[:3, 3]


def _position(point: np.ndarray) -> tuple[float, float, float]:
    return (float(point[0]), float(point[1]), float(point[2]))


def _world_to_voxel(affine: np.ndarray, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
    points = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
    return (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Orientation codes of the voxel axes (``nibabel.aff2axcodes``), e.g. ``("P", "I", "R")``."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(_as_affine(affine)))  # type: ignore[return-value]


def inside_grid(voxel: np.ndarray, shape: Sequence[int]) -> bool:
    """True when a (continuous) voxel coordinate lies inside the voxels of a grid of ``shape``.

    Voxel ``i`` covers ``[i - 0.5, i + 0.5]``, so the grid spans ``[-0.5, n - 0.5]`` per axis.
    """
    voxel = np.asarray(voxel, dtype=np.float64)
    upper = np.asarray(shape[:3], dtype=np.float64) - 0.5
    return bool(np.all(voxel >= -0.5 - 1e-6) and np.all(voxel <= upper + 1e-6))


# ----------------------------------------------------------------------------------------------
# Centroid JSON
# ----------------------------------------------------------------------------------------------


def _check_direction(path: Path, direction: Any) -> tuple[str, str, str]:
    if not isinstance(direction, (list, tuple)) or len(direction) != 3:
        raise InputError(
            path, f'\'direction\' must list 3 axis codes such as ["P", "I", "R"], got {direction!r}'
        )
    codes = tuple(str(code).strip().upper() for code in direction)
    if any(code not in _AXIS_OF_CODE for code in codes) or len({_AXIS_OF_CODE[code] for code in codes}) != 3:
        raise InputError(
            path,
            f"'direction' {list(direction)!r} is not a valid set of axis codes (one of L/R, A/P, S/I each)",
        )
    return codes  # type: ignore[return-value]


def _reorient_voxel(
    voxel: np.ndarray, from_codes: Sequence[str], to_codes: Sequence[str], to_shape: Sequence[int]
) -> np.ndarray:
    """Voxel coordinate given along axes ``from_codes`` -> the same point along axes ``to_codes``.

    Both grids cover the same voxels (one is a permutation/flip of the other); ``to_shape`` is the
    shape of the target grid, needed for flips (index ``i`` becomes ``n - 1 - i``).
    """
    result = np.empty(3, dtype=np.float64)
    for to_axis, to_code in enumerate(to_codes):
        for from_axis, from_code in enumerate(from_codes):
            if from_code == to_code:
                result[to_axis] = voxel[from_axis]
                break
            if from_code == _PAIRED_AXIS_CODES[to_code]:
                result[to_axis] = to_shape[to_axis] - 1 - voxel[from_axis]
                break
    return result


def read_centroids(
    path: str | Path, affine: np.ndarray, shape: Sequence[int] | None = None
) -> list[Vertebra]:
    """Read a VerSe centroid JSON and return its vertebrae in world RAS mm (grades unknown).

    ``affine`` (voxel -> world) and ``shape`` are those of the scan the file annotates. The voxel
    coordinates are taken along the axes named by the file's ``direction`` entry; when those codes
    differ from the scan's own (``aff2axcodes``), the coordinates are permuted/flipped onto the
    scan's voxel order, which needs ``shape``. With ``shape``, a centroid outside the scan is an
    error. Raises :class:`InputError` for a missing or malformed file, a missing direction, an
    unknown or repeated label, or a centroid outside the image.
    """
    path = Path(path)
    affine = _as_affine(affine)
    if not path.is_file():
        raise InputError(path, "centroid file not found")
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a valid centroid JSON file ({error})") from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise InputError(path, "a VerSe centroid file must be a JSON list of objects")
    directions = [entry for entry in entries if "direction" in entry]
    if not directions:
        raise InputError(path, 'no {"direction": [...]} entry giving the axis codes of the voxel coordinates')
    if len(directions) > 1:
        raise InputError(path, "more than one 'direction' entry")
    file_codes = _check_direction(path, directions[0]["direction"])
    scan_codes = axis_codes(affine)
    if file_codes != scan_codes and shape is None:
        raise InputError(
            path,
            f"direction {list(file_codes)} differs from the scan's {list(scan_codes)}; the scan's shape is needed to convert",
        )
    vertebrae: list[Vertebra] = []
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        if "direction" in entry:
            continue
        missing = [key for key in ("label", "X", "Y", "Z") if key not in entry]
        if missing:
            raise InputError(path, f"entry {index} lacks {', '.join(missing)}")
        try:
            label = _parse_label(entry["label"])
        except VfdetectError:
            raise InputError(
                path,
                f"entry {index}: unknown vertebra label {entry['label']!r} (VerSe numbering 1-28, 29 = S2)",
            ) from None
        if label in seen:
            raise InputError(path, f"label {label} ({vertebra_name(label)}) appears twice")
        seen.add(label)
        try:
            voxel = np.array([float(entry[key]) for key in ("X", "Y", "Z")], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(path, f"entry {index} (label {label}): X, Y, Z must be numbers") from None
        if not np.all(np.isfinite(voxel)):
            raise InputError(path, f"entry {index} (label {label}): X, Y, Z must be finite")
        if file_codes != scan_codes:
            voxel = _reorient_voxel(voxel, file_codes, scan_codes, shape)  # type: ignore[arg-type]
        if shape is not None and not inside_grid(voxel, shape):
            raise InputError(
                path,
                f"centroid of {vertebra_name(label)} (label {label}) at voxel {np.round(voxel, 1).tolist()} "
                f"is outside the image of shape {list(shape[:3])}",
            )
        position = _voxel_to_world(affine, voxel)[0]
        vertebrae.append(Vertebra(label, _position(position)))
    return vertebrae


def write_centroids(
    path: str | Path, vertebrae: Sequence[Vertebra], affine: np.ndarray, decimals: int = 3
) -> None:
    """Write vertebrae as a VerSe centroid JSON in voxel coordinates of the grid ``affine`` (atomic).

    The direction entry holds ``aff2axcodes(affine)``; coordinates are rounded to ``decimals``
    (VerSe itself uses 1; the default 3 keeps a round trip within a thousandth of a voxel).
    """
    affine = _as_affine(affine)
    entries: list[dict[str, Any]] = [{"direction": list(axis_codes(affine))}]
    for vertebra in vertebrae:
        voxel = _world_to_voxel(affine, vertebra.position_mm)[0]
        entries.append(
            {
                "label": vertebra.label,
                **{key: round(float(value), decimals) for key, value in zip("XYZ", voxel, strict=True)},
            }
        )
    write_json_atomic(path, entries)


def centroids_from_mask(
    mask: Any,
    label_map: Mapping[int, int] | None = None,
    source: str | Path | None = None,
    body: np.ndarray | None = None,
) -> list[Vertebra]:
    """Centre of mass (world RAS mm) of every vertebra label of a mask volume.

    ``mask`` is anything with ``.array`` (integer labels) and ``.affine`` (e.g. a
    :class:`vfdetect.volume.Volume`). ``label_map`` translates mask values to VerSe labels (see
    :data:`TOTALSEGMENTATOR_V2_TO_VERSE`); values it does not list are ignored. Without it, every
    non-zero value must be a VerSe label. ``source`` names the file in error messages.

    ``body`` (boolean, same shape) restricts each label to its vertebral-body voxels, which turns
    whole-vertebra centres of mass (10-15 mm posterior, near the spinal canal) into vertebral-body
    centroids; a vertebra without body voxels is then left out.
    """
    from scipy import ndimage

    array = np.asarray(mask.array)
    affine = _as_affine(mask.affine)
    if array.ndim != 3:
        raise InputError(source, f"a vertebra mask must be 3D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(source, "a vertebra mask must hold integer labels")
        array = array.astype(np.int64)
    if body is not None:
        body = np.asarray(body, dtype=bool)
        if body.shape != array.shape:
            raise InputError(
                source, f"body mask shape {body.shape} differs from the vertebra mask's {array.shape}"
            )
        array = np.where(body, array, 0)
    values = [int(value) for value in np.unique(array) if value != 0]
    if label_map is None:
        unknown = [value for value in values if value not in LABEL_NAMES]
        if unknown:
            raise InputError(
                source, f"unknown vertebra label(s) {unknown} in the mask (VerSe numbering 1-28, 29 = S2)"
            )
        mapping = {value: value for value in values}
    else:
        mapping = {value: int(label_map[value]) for value in values if value in label_map}
    if not mapping:
        return []
    mask_values = list(mapping)
    centres = ndimage.center_of_mass(np.ones(array.shape, dtype=np.float32), labels=array, index=mask_values)
    positions = _voxel_to_world(affine, np.asarray(centres, dtype=np.float64))
    vertebrae = [
        Vertebra(mapping[value], _position(position))
        for value, position in zip(mask_values, positions, strict=True)
    ]
    return sort_vertebrae(vertebrae)


@dataclass(frozen=True, eq=False)
class _LabelArray:
    """A label array and its voxel-to-world affine (the part of a Volume a mask needs)."""

    array: np.ndarray
    affine: np.ndarray


def _read_mask_volume(path: Path) -> _LabelArray:
    """Load a label NIfTI as a small object with ``.array`` (int) and ``.affine``."""
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise InputError(
            path, f"cannot read the vertebra mask as NIfTI ({type(error).__name__}: {error})"
        ) from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(path, f"a vertebra mask must be 3D, got shape {array.shape}")
    return _LabelArray(array, np.asarray(image.affine, dtype=np.float64))


def load_centroids(
    path: str | Path,
    affine: np.ndarray,
    shape: Sequence[int] | None = None,
    label_scheme: str = "verse",
    body_mask: str | Path | None = None,
) -> list[Vertebra]:
    """Vertebrae of a scan from a VerSe centroid JSON or from a vertebra mask NIfTI.

    For a mask, the centre of mass of each label is computed on the mask's own grid and converted
    to world mm with the mask's affine, so the mask need not share the scan's grid (only its world
    space). ``label_scheme`` names the mask's numbering (:data:`LABEL_SCHEMES`); JSON files always
    use VerSe numbering. ``body_mask`` (a NIfTI on the vertebra mask's grid whose label 1 marks
    the vertebral bodies, as in TotalSegmentator's ``vertebrae_body`` output; other values are
    ignored) restricts the centre of mass to vertebral-body voxels (see :func:`centroids_from_mask`).
    With ``shape``, each centroid must lie inside the scan.
    """
    path = Path(path)
    if label_scheme not in LABEL_SCHEMES:
        raise VfdetectError(f"unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
    if path.name.lower().endswith(".json"):
        if label_scheme != "verse":
            raise InputError(path, f"centroid JSON files use VerSe numbering, not {label_scheme!r}")
        if body_mask is not None:
            raise InputError(path, "a body mask only applies to centroids computed from a vertebra mask")
        return read_centroids(path, affine, shape)
    if not path.exists():
        raise InputError(path, "centroid file not found")
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(path, "centroids must be a VerSe JSON (.json) or a vertebra mask (.nii/.nii.gz)")
    mask = _read_mask_volume(path)
    body = None
    if body_mask is not None:
        body_volume = _read_mask_volume(Path(body_mask))
        if body_volume.array.shape != mask.array.shape or not np.allclose(
            body_volume.affine, mask.affine, atol=1e-3
        ):
            raise InputError(body_mask, f"body mask is not on the grid of the vertebra mask {path}")
        body = body_volume.array == 1
    vertebrae = centroids_from_mask(mask, LABEL_SCHEMES[label_scheme], source=path, body=body)
    if shape is not None:
        scan_affine = _as_affine(affine)
        for vertebra in vertebrae:
            voxel = _world_to_voxel(scan_affine, vertebra.position_mm)[0]
            if not inside_grid(voxel, shape):
                raise InputError(
                    path,
                    f"centroid of {vertebra.name} at scan voxel {np.round(voxel, 1).tolist()} is outside the image "
                    f"of shape {list(shape[:3])}",
                )
    return vertebrae


# ----------------------------------------------------------------------------------------------
# Grades
# ----------------------------------------------------------------------------------------------


def _read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as (line number, row) with the required columns checked."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read as CSV text ({error})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in required if name not in header]
    if missing:
        raise InputError(
            path, f"missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})"
        )
    rows = []
    for row in reader:
        clean = {(key or "").strip(): (value or "").strip() for key, value in row.items() if key is not None}
        if not any(clean.values()):
            continue
        rows.append((reader.line_num, clean))
    return rows


def read_grades(path: str | Path) -> dict[str, dict[int, int]]:
    """Read ``grades.csv`` (``case,label,grade``) -> ``{case: {label: grade}}``.

    ``label`` may be a VerSe number or a vertebra name (``L1``). Raises :class:`InputError` for a
    grade outside 0-3, an unknown label or a repeated (case, label).
    """
    path = Path(path)
    grades: dict[str, dict[int, int]] = {}
    for line, row in _read_csv_rows(path, ("case", "label", "grade")):
        case = row["case"]
        if not case:
            raise InputError(path, f"line {line}: empty case id")
        try:
            label = _parse_label(row["label"])
        except VfdetectError:
            raise InputError(path, f"line {line}: unknown vertebra label {row['label']!r}") from None
        try:
            grade = _parse_grade(row["grade"])
        except VfdetectError:
            raise InputError(path, f"line {line}: grade {row['grade']!r} is not a Genant grade 0-3") from None
        case_grades = grades.setdefault(case, {})
        if label in case_grades:
            raise InputError(path, f"line {line}: case {case!r} grades {vertebra_name(label)} twice")
        case_grades[label] = grade
    return grades


def write_grades(path: str | Path, grades: Mapping[str, Mapping[int, int]]) -> None:
    """Write ``{case: {label: grade}}`` as ``grades.csv`` (atomic; cases sorted, labels cranio-caudal)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "grade"])
    for case in sorted(grades):
        for label in sorted(grades[case], key=spine_rank):
            grade = grades[case][label]
            if isinstance(grade, bool) or int(grade) != grade or int(grade) not in GENANT_GRADES:
                raise VfdetectError(
                    f"case {case!r}, label {label}: grade {grade!r} is not a Genant grade 0-3"
                )
            writer.writerow([case, int(label), int(grade)])
    write_text_atomic(path, buffer.getvalue())


def read_verse19_vertebra_data(
    path: str | Path, splits: Sequence[str] | None = None
) -> dict[str, dict[int, int]]:
    """Grades of the ``vertebra_data.json`` VerSe 2019 table -> ``{subject: {label: grade}}``.

    The file maps split -> {"<subject>_<label>": grade}; the subject is ``sub-verseNNN`` or
    ``sub-verseNNN_seriesK``. ``splits`` keeps only the named splits (``train``, ``val``, ``test``).
    """
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a valid JSON file ({error})") from None
    if not isinstance(table, dict) or not all(isinstance(part, dict) for part in table.values()):
        raise InputError(path, 'expected {split: {"<subject>_<label>": grade}}')
    grades: dict[str, dict[int, int]] = {}
    for split, entries in table.items():
        if splits is not None and split not in splits:
            continue
        for key, value in entries.items():
            subject, _, label_text = str(key).rpartition("_")
            try:
                label = _parse_label(label_text)
                grade = _parse_grade(value)
            except VfdetectError as error:
                raise InputError(path, f"{split}/{key}: {error}") from None
            if not subject:
                raise InputError(path, f"{split}/{key}: key is not '<subject>_<label>'")
            grades.setdefault(subject, {})[label] = grade
    return grades


def verse19_case_id(patient_id: str, scan_id: str) -> str:
    """VerSe file-name id of a scan: ``sub-verse015`` when the scan number is the subject's
    (``verse15``), else ``sub-verse409_split-verse266`` (the public download's split subjects)."""
    patient_digits = "".join(character for character in patient_id if character.isdigit())
    scan_digits = "".join(character for character in scan_id if character.isdigit())
    if not patient_digits or not scan_digits:
        raise VfdetectError(f"not a VerSe subject/scan pair: {patient_id!r}, {scan_id!r}")
    if int(patient_digits) == int(scan_digits):
        return patient_id
    return f"{patient_id}_split-verse{int(scan_digits):03d}"


def read_verse19_manifest_table(path: str | Path) -> dict[str, dict[int, int]]:
    """Grades of the ``verse19_manifest.csv`` table -> ``{scan: {label: grade}}``.

    Rows name the vertebra (``T12``) and carry ``patient_id`` and ``scan_id``; scans are keyed by
    their VerSe file-name id (:func:`verse19_case_id`): ``sub-verse015`` or, for the split
    (400-series) subjects, ``sub-verse409_split-verse266``.
    """
    path = Path(path)
    grades: dict[str, dict[int, int]] = {}
    for line, row in _read_csv_rows(path, ("patient_id", "scan_id", "vertebra", "genant_grade")):
        try:
            key = verse19_case_id(row["patient_id"], row["scan_id"])
            label = vertebra_label(row["vertebra"])
            grade = _parse_grade(row["genant_grade"])
        except VfdetectError as error:
            raise InputError(path, f"line {line}: {error}") from None
        if label in grades.get(key, {}) and grades[key][label] != grade:
            raise InputError(path, f"line {line}: {key} {row['vertebra']} graded twice with different grades")
        grades.setdefault(key, {})[label] = grade
    return grades


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------

DATA_ROOT_VARIABLE = "VFDETECT_DATA_ROOT"
MANIFEST_COLUMNS: tuple[str, ...] = ("case", "image", "centroids")


@dataclass(frozen=True)
class Case:
    """One scan of a manifest: absolute resolved paths and its Genant grades by VerSe label.

    ``centroids`` is a VerSe JSON or a vertebra mask NIfTI (or None when not annotated);
    ``label_scheme`` is the numbering of such a mask (see :data:`LABEL_SCHEMES`) and ``body_mask``
    an optional vertebral-body mask on its grid (see :func:`load_centroids`). ``source`` names the
    data source the case comes from (empty: unnamed) and ``weight`` is its relative share of
    training draws (positive; see :func:`vfdetect.sampling.draw_subepoch`).
    """

    case: str
    image: Path
    centroids: Path | None = None
    grades: dict[int, int] = field(default_factory=dict)
    label_scheme: str = "verse"
    body_mask: Path | None = None
    source: str = ""
    weight: float = 1.0

    def vertebrae(self, affine: np.ndarray, shape: Sequence[int] | None = None) -> list[Vertebra]:
        """The case's vertebrae (world mm, grades attached) for a scan with ``affine`` and ``shape``."""
        if self.centroids is None:
            return []
        return attach_grades(
            load_centroids(self.centroids, affine, shape, self.label_scheme, self.body_mask), self.grades
        )


class _FileIndex:
    """Lazy name -> paths index of every file and folder under a data root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, name: str) -> list[Path]:
        if self._by_name is None:
            self._by_name = {}
            for folder, directories, files in os.walk(self.root, followlinks=True):
                directories[:] = [name for name in directories if not name.startswith(".")]
                for entry in (*directories, *files):
                    self._by_name.setdefault(entry, []).append(Path(folder) / entry)
        return self._by_name.get(name, [])


def _resolve_entry(
    manifest: Path, line: int, case: str, column: str, value: str, root: Path, index: _FileIndex
) -> Path:
    relative = Path(value)
    if relative.is_absolute():
        candidates = [relative]
    else:
        candidates = [root / relative, manifest.resolve().parent / relative]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    matches = index.find(relative.name) if not relative.is_absolute() else []
    if len(matches) == 1:
        return matches[0].resolve()
    if len(matches) > 1:
        # Prefer the match whose trailing path components agree most with the given path.
        def agreement(match: Path) -> int:
            count = 0
            for given, found in zip(reversed(relative.parts), reversed(match.parts), strict=False):
                if given != found:
                    break
                count += 1
            return count

        best = max(agreement(match) for match in matches)
        best_matches = [match for match in matches if agreement(match) == best]
        if len(best_matches) == 1:
            return best_matches[0].resolve()
        raise InputError(
            manifest,
            f"line {line} (case {case!r}): {column} '{value}' is ambiguous under {root}: "
            f"{', '.join(str(match) for match in best_matches[:3])}",
        )
    raise InputError(
        manifest, f"line {line} (case {case!r}): {column} file '{value}' not found (data root {root})"
    )


def default_grades_path(manifest: str | Path) -> Path | None:
    """The grades file used for a manifest when none is given.

    ``<manifest stem>_grades.csv`` beside the manifest (``verse19.csv`` -> ``verse19_grades.csv``),
    else ``grades.csv`` beside it, else None.
    """
    manifest = Path(manifest)
    for candidate in (manifest.with_name(f"{manifest.stem}_grades.csv"), manifest.with_name("grades.csv")):
        if candidate.is_file():
            return candidate
    return None


def read_manifest(
    path: str | Path, data_root: str | Path | None = None, grades: str | Path | None = None
) -> list[Case]:
    """Read a manifest CSV into cases.

    Columns: ``case``, ``image`` (NIfTI file or DICOM folder), ``centroids`` (VerSe JSON or vertebra
    mask NIfTI; may be empty), and optionally ``label_scheme`` (numbering of a centroid mask, see
    :data:`LABEL_SCHEMES`; default ``verse``), ``body_mask`` (see :func:`load_centroids`), ``source``
    (the data source's name; default the manifest file's stem) and ``weight`` (a positive number,
    the case's relative share of training draws; default 1). A manifest mixing sources can give
    each source a total share: e.g. 30 phantoms of weight 1/30 and 3 real scans of weight 1/3 are
    drawn equally often as groups. Other columns (e.g. ``split``) are ignored.

    Relative paths are resolved against ``data_root``, else ``$VFDETECT_DATA_ROOT``, else the
    manifest's folder (a path missing under a given root is also tried beside the manifest). When a
    relative path still does not exist, the file is looked up by its name anywhere under the root, so the nesting of a public download (``rawdata/sub-verseNNN/``,
    ``derivatives/sub-verseNNN/``) need not match the manifest. An empty ``centroids`` cell means
    none. Grades come from ``grades`` or :func:`default_grades_path`; a case without grades has an
    empty dict. Raises :class:`InputError` for missing columns, empty or duplicate case ids, a row
    whose file is missing, or a bad grades file.
    """
    path = Path(path)
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_VARIABLE) or None
    root = Path(data_root) if data_root is not None else path.resolve().parent
    if not root.is_dir():
        raise InputError(root, "data root folder not found")
    rows = _read_csv_rows(path, ("case", "image"))
    if not rows:
        raise InputError(path, "the manifest lists no cases")
    grades_path = Path(grades) if grades is not None else default_grades_path(path)
    grade_table = read_grades(grades_path) if grades_path is not None else {}
    index = _FileIndex(root)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        case = row["case"]
        if not case:
            raise InputError(path, f"line {line}: empty case id")
        if case in seen:
            raise InputError(path, f"line {line}: duplicate case id {case!r} (first on line {seen[case]})")
        seen[case] = line
        if not row["image"]:
            raise InputError(path, f"line {line} (case {case!r}): empty image path")
        image = _resolve_entry(path, line, case, "image", row["image"], root, index)
        centroids_value = row.get("centroids", "")
        centroids = (
            _resolve_entry(path, line, case, "centroids", centroids_value, root, index)
            if centroids_value
            else None
        )
        scheme = row.get("label_scheme", "") or "verse"
        if scheme not in LABEL_SCHEMES:
            raise InputError(
                path,
                f"line {line} (case {case!r}): unknown label_scheme {scheme!r} (known: {', '.join(LABEL_SCHEMES)})",
            )
        body_value = row.get("body_mask", "")
        body_mask = (
            _resolve_entry(path, line, case, "body_mask", body_value, root, index) if body_value else None
        )
        source = row.get("source", "") or path.stem
        weight_text = row.get("weight", "") or "1"
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise InputError(path, f"line {line} (case {case!r}): weight must be a positive number, got {weight_text!r}")
        cases.append(
            Case(case, image, centroids, dict(grade_table.get(case, {})), scheme, body_mask, source, weight)
        )
    return cases


def _relative_text(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def write_manifest(
    path: str | Path, cases: Sequence[Case], root: str | Path, grades_path: str | Path | None = None
) -> None:
    """Write ``cases`` as a manifest with paths relative to ``root`` (atomic).

    ``label_scheme`` / ``body_mask`` / ``source`` / ``weight`` columns are added only when some case
    needs them (a ``source`` other than empty or the manifest's stem, a ``weight`` other than 1).
    With ``grades_path``, the cases' grades are written there too (:func:`write_grades`).
    """
    root = Path(root)
    names = [case.case for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise VfdetectError(f"duplicate case ids: {', '.join(duplicates)}")
    with_scheme = any(case.label_scheme != "verse" for case in cases)
    with_body = any(case.body_mask is not None for case in cases)
    stem = Path(path).stem
    with_source = any(case.source not in ("", stem) for case in cases)
    with_weight = any(case.weight != 1.0 for case in cases)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            *MANIFEST_COLUMNS,
            *(["label_scheme"] if with_scheme else []),
            *(["body_mask"] if with_body else []),
            *(["source"] if with_source else []),
            *(["weight"] if with_weight else []),
        ]
    )
    for case in cases:
        centroids = "" if case.centroids is None else _relative_text(case.centroids, root)
        body = "" if case.body_mask is None else _relative_text(case.body_mask, root)
        writer.writerow(
            [
                case.case,
                _relative_text(case.image, root),
                centroids,
                *([case.label_scheme] if with_scheme else []),
                *([body] if with_body else []),
                *([case.source or stem] if with_source else []),
                *([repr(float(case.weight))] if with_weight else []),
            ]
        )
    write_text_atomic(path, buffer.getvalue())
    if grades_path is not None:
        write_grades(grades_path, {case.case: case.grades for case in cases if case.grades})
