"""Dataset manifests, grade tables and the resolution of their paths under a data root.

A manifest (``case,image,centroids``, optionally ``label_scheme``, ``body_mask``, ``source``,
``weight``) lists one scan per row with paths relative to a data root; :func:`read_manifest` turns
it into :class:`Case` records with absolute paths and Genant grades. Grades are stored as
``grades.csv`` with the columns ``case,label,grade``; the VerSe 2019 grade tables
(``vertebra_data.json``, ``verse19_manifest.csv``) are read into the same ``{case: {label: grade}}``
form. Vertebra names, labels and centroids are in :mod:`vfdetect.vertebrae`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_text_atomic
from vfdetect.vertebrae import (
    GENANT_GRADES,
    LABEL_SCHEMES,
    Vertebra,
    attach_grades,
    load_centroids,
    parse_grade,
    parse_label,
    spine_rank,
    vertebra_label,
    vertebra_name,
)

__all__ = [
    "DATA_ROOT_VARIABLE",
    "MANIFEST_COLUMNS",
    "Case",
    "FileIndex",
    "resolve_entry",
    "default_grades_path",
    "resolve_data_root",
    "read_manifest_rows",
    "case_id_problem",
    "check_case_id",
    "row_label_scheme",
    "read_manifest",
    "write_manifest",
    "read_csv_rows",
    "read_grades",
    "write_grades",
    "read_verse19_vertebra_data",
    "verse19_case_id",
    "read_verse19_manifest_table",
]


# ----------------------------------------------------------------------------------------------
# Grades
# ----------------------------------------------------------------------------------------------


def read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as (line number, row) with the required columns checked.

    Names and values are stripped of surrounding spaces, blank rows are skipped, and a UTF-8 byte
    order mark is ignored; :class:`InputError` for a missing or unreadable file or missing columns.
    """
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
    for line, row in read_csv_rows(path, ("case", "label", "grade")):
        case = row["case"]
        if not case:
            raise InputError(path, f"line {line}: empty case id")
        try:
            label = parse_label(row["label"])
        except VfdetectError:
            raise InputError(path, f"line {line}: unknown vertebra label {row['label']!r}") from None
        try:
            grade = parse_grade(row["grade"])
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
                label = parse_label(label_text)
                grade = parse_grade(value)
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
    for line, row in read_csv_rows(path, ("patient_id", "scan_id", "vertebra", "genant_grade")):
        try:
            key = verse19_case_id(row["patient_id"], row["scan_id"])
            label = vertebra_label(row["vertebra"])
            grade = parse_grade(row["genant_grade"])
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


class FileIndex:
    """Lazy name -> paths index of every file and folder under a data root (hidden folders skipped)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, name: str) -> list[Path]:
        """Every file or folder called ``name`` under the root (the tree is walked on the first call)."""
        if self._by_name is None:
            self._by_name = {}
            visited: set[tuple[int, int]] = set()
            for folder, directories, files in os.walk(self.root, followlinks=True):
                try:
                    status = os.stat(folder)
                except OSError:
                    directories[:] = []
                    continue
                if (status.st_dev, status.st_ino) in visited:  # a symbolic-link loop: walk each folder once
                    directories[:] = []
                    continue
                visited.add((status.st_dev, status.st_ino))
                directories[:] = [name for name in directories if not name.startswith(".")]
                for entry in (*directories, *files):
                    self._by_name.setdefault(entry, []).append(Path(folder) / entry)
        return self._by_name.get(name, [])


def resolve_entry(
    manifest: Path, line: int, case: str, column: str, value: str, root: Path, index: FileIndex
) -> Path:
    """Absolute path of the ``column`` cell ``value`` on ``line`` of ``manifest`` (case ``case``).

    A relative path is tried under ``root``, then beside the manifest; failing both, the file is
    looked up by its name anywhere under ``root`` (``index``), preferring the match whose trailing
    path components agree most with ``value``. Raises :class:`InputError` when the file is not
    found or several matches agree equally well.
    """
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


def resolve_data_root(manifest: str | Path, data_root: str | Path | None = None) -> Path:
    """The folder a manifest's relative paths start from.

    ``data_root`` when given, else ``$VFDETECT_DATA_ROOT`` when set, else the manifest's folder;
    :class:`InputError` when that folder does not exist.
    """
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_VARIABLE) or None
    root = Path(data_root) if data_root is not None else Path(manifest).resolve().parent
    if not root.is_dir():
        raise InputError(root, "data root folder not found")
    return root


def read_manifest_rows(path: str | Path) -> Iterator[tuple[int, str, dict[str, str]]]:
    """``(line, case id, row)`` of every row of a manifest CSV, in file order.

    The file is read at once: :class:`InputError` for missing ``case`` or ``image`` columns or a
    manifest without rows. Case ids are checked as the rows are iterated: :class:`InputError` for
    an empty case id or a case id repeated.
    """
    path = Path(path)
    rows = read_csv_rows(path, ("case", "image"))
    if not rows:
        raise InputError(path, "the manifest lists no cases")
    return _with_case_ids(path, rows)


def _with_case_ids(
    path: Path, rows: Sequence[tuple[int, dict[str, str]]]
) -> Iterator[tuple[int, str, dict[str, str]]]:
    seen: dict[str, int] = {}
    for line, row in rows:
        case = row["case"]
        if not case:
            raise InputError(path, f"line {line}: empty case id")
        if case in seen:
            raise InputError(path, f"line {line}: duplicate case id {case!r} (first on line {seen[case]})")
        problem = case_id_problem(case)
        if problem:
            raise InputError(path, f"line {line}: case id {case!r} {problem}")
        seen[case] = line
        yield line, case, row


CASE_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+")
"""Characters a case id may hold: it names files and folders (``<case>_labels.nii.gz``, ``<out>/<case>/``)."""


def case_id_problem(case: str) -> str | None:
    """Why ``case`` cannot be a case id (None when it can).

    A case id names output files and folders, so it must stay inside the output folder: letters,
    digits, ``.``, ``_``, ``-`` and ``+`` only (no path separator, no space), not starting with a dot
    (no ``..``, no hidden file), at most 200 characters.
    """
    if not case:
        return "is empty"
    if len(case) > 200:
        return "is longer than 200 characters"
    if case.startswith("."):
        return "starts with a dot; case ids name output files and folders"
    bad = sorted(set(case) - CASE_ID_CHARACTERS)
    if bad:
        return (f"holds {', '.join(repr(c) for c in bad)}; case ids name output files and folders and may "
                "hold only letters, digits, '.', '_', '-' and '+'")
    return None


def check_case_id(case: str, source: str | Path | None = None) -> str:
    """``case`` when it is a valid case id (:func:`case_id_problem`); else :class:`InputError` naming ``source``."""
    problem = case_id_problem(case)
    if problem:
        raise InputError(source, f"case id {case!r} {problem}")
    return case


def row_label_scheme(manifest: str | Path, line: int, case: str, row: Mapping[str, str]) -> str:
    """The ``label_scheme`` cell of a manifest row (default ``verse``), checked against :data:`LABEL_SCHEMES`."""
    scheme = row.get("label_scheme", "") or "verse"
    if scheme not in LABEL_SCHEMES:
        raise InputError(
            manifest,
            f"line {line} (case {case!r}): unknown label_scheme {scheme!r} (known: {', '.join(LABEL_SCHEMES)})",
        )
    return scheme


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
    root = resolve_data_root(path, data_root)
    rows = read_manifest_rows(path)
    grades_path = Path(grades) if grades is not None else default_grades_path(path)
    grade_table = read_grades(grades_path) if grades_path is not None else {}
    index = FileIndex(root)
    cases: list[Case] = []
    for line, case, row in rows:
        if not row["image"]:
            raise InputError(path, f"line {line} (case {case!r}): empty image path")
        image = resolve_entry(path, line, case, "image", row["image"], root, index)
        centroids_value = row.get("centroids", "")
        centroids = (
            resolve_entry(path, line, case, "centroids", centroids_value, root, index)
            if centroids_value
            else None
        )
        scheme = row_label_scheme(path, line, case, row)
        body_value = row.get("body_mask", "")
        body_mask = (
            resolve_entry(path, line, case, "body_mask", body_value, root, index) if body_value else None
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
