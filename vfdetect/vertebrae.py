"""Vertebrae: VerSe numbering and names, the :class:`Vertebra` record, centroid files and masks.

Vertebra labels follow the VerSe numbering: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 S1 (VerSe's
"sacrum" label), 27 coccyx, 28 T13 (a transitional thoracic vertebra), plus the extension 29 = S2,
which VerSe does not have and the paper's T1-S2 range needs.

Centroid files use the VerSe JSON format: a list whose entry ``{"direction": ["P", "I", "R"]}``
gives the axis codes of the voxel order, then one ``{"label": L, "X": x, "Y": y, "Z": z}`` per
vertebra in voxel coordinates of the scan (X, Y, Z along array axes 0, 1, 2). Inside the library a
:class:`Vertebra` holds its position in world RAS millimetres, so it is independent of the grid of
the scan it was read with.

Grades are Genant grades 0 (normal), 1 (mild, 20-25 % height loss), 2 (moderate, 25-40 %) and
3 (severe, > 40 %). Grade tables and dataset manifests are read and written by
:mod:`vfdetect.manifest`; its names are importable from here as well.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic
from vfdetect.frame import voxel_to_world, world_to_voxel
from vfdetect.volume import load_label_image

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


def parse_label(value: Any) -> int:
    """VerSe label from an int, an integer-valued float/string or a vertebra name (``"L1"``).

    Raises :class:`VfdetectError` for anything else or a label outside the VerSe numbering.
    """
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


def parse_grade(value: Any) -> int:
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


def _position(point: np.ndarray) -> tuple[float, float, float]:
    return (float(point[0]), float(point[1]), float(point[2]))


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Orientation codes of the voxel axes (``nibabel.aff2axcodes``), e.g. ``("P", "I", "R")``."""
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
    to_from = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(tuple(to_codes)), nib.orientations.axcodes2ornt(tuple(from_codes))
    )
    return voxel_to_world(nib.orientations.inv_ornt_aff(to_from, tuple(to_shape[:3])), voxel)


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
            label = parse_label(entry["label"])
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
        position = voxel_to_world(affine, voxel)
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
        voxel = world_to_voxel(affine, np.asarray(vertebra.position_mm))
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
    positions = voxel_to_world(affine, np.asarray(centres, dtype=np.float64))
    vertebrae = [
        Vertebra(mapping[value], _position(position))
        for value, position in zip(mask_values, positions, strict=True)
    ]
    return sort_vertebrae(vertebrae)


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
    mask, _ = load_label_image(path)
    body = None
    if body_mask is not None:
        body_volume, _ = load_label_image(Path(body_mask))
        if body_volume.array.shape != mask.array.shape or not np.allclose(
            body_volume.affine, mask.affine, atol=1e-3
        ):
            raise InputError(body_mask, f"body mask is not on the grid of the vertebra mask {path}")
        body = body_volume.array == 1
    vertebrae = centroids_from_mask(mask, LABEL_SCHEMES[label_scheme], source=path, body=body)
    if shape is not None:
        scan_affine = _as_affine(affine)
        for vertebra in vertebrae:
            voxel = world_to_voxel(scan_affine, np.asarray(vertebra.position_mm))
            if not inside_grid(voxel, shape):
                raise InputError(
                    path,
                    f"centroid of {vertebra.name} at scan voxel {np.round(voxel, 1).tolist()} is outside the image "
                    f"of shape {list(shape[:3])}",
                )
    return vertebrae


# ----------------------------------------------------------------------------------------------
# Names of vfdetect.manifest, importable from here
# ----------------------------------------------------------------------------------------------

# Private names under which manifest helpers are also importable from here.
_MANIFEST_ALIASES = {"_FileIndex": "FileIndex", "_read_csv_rows": "read_csv_rows", "_resolve_entry": "resolve_entry"}

if TYPE_CHECKING:
    from vfdetect.manifest import DATA_ROOT_VARIABLE as DATA_ROOT_VARIABLE
    from vfdetect.manifest import MANIFEST_COLUMNS as MANIFEST_COLUMNS
    from vfdetect.manifest import Case as Case
    from vfdetect.manifest import FileIndex as _FileIndex  # noqa: F401
    from vfdetect.manifest import default_grades_path as default_grades_path
    from vfdetect.manifest import read_csv_rows as _read_csv_rows  # noqa: F401
    from vfdetect.manifest import read_grades as read_grades
    from vfdetect.manifest import read_manifest as read_manifest
    from vfdetect.manifest import read_verse19_manifest_table as read_verse19_manifest_table
    from vfdetect.manifest import read_verse19_vertebra_data as read_verse19_vertebra_data
    from vfdetect.manifest import resolve_entry as _resolve_entry  # noqa: F401
    from vfdetect.manifest import verse19_case_id as verse19_case_id
    from vfdetect.manifest import write_grades as write_grades
    from vfdetect.manifest import write_manifest as write_manifest


def __getattr__(name: str) -> Any:
    """Names of :mod:`vfdetect.manifest` (which builds on this module), imported on first use."""
    from vfdetect import manifest

    public = _MANIFEST_ALIASES.get(name, name)
    if public in manifest.__all__:
        return getattr(manifest, public)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
