"""Regenerate ``verse19.csv`` and ``verse19_grades.csv`` from the two VerSe 2019 grade tables.

Usage (from the repository root)::

    python data_manifests/make_verse19.py [GRADE_TABLE_FOLDER]

``GRADE_TABLE_FOLDER`` holds ``vertebra_data.json`` and ``verse19_manifest.csv`` (default:
``../shared/data/real/verse19-fracture-grades``). See ``data_manifests/README.md`` for the rules.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from vfdetect.errors import VfdetectError
from vfdetect.fileio import write_text_atomic
from vfdetect.vertebrae import (
    read_verse19_manifest_table,
    read_verse19_vertebra_data,
    verse19_case_id,
    write_grades,
)

HERE = Path(__file__).resolve().parent
DEFAULT_TABLES = HERE.parent.parent / "shared" / "data" / "real" / "verse19-fracture-grades"

# Subjects of the grade tables that the public download cannot serve (verse19_permanent_exclusions.csv):
# no CT on OSF (076, 133) or no mask/centroid annotation (008, 072). sub-verse102 is listed there as
# "recovered_on_retry", so it stays.
EXCLUDED = {
    "sub-verse076": "no CT in the public download",
    "sub-verse133": "no CT in the public download",
    "sub-verse008": "no vertebra mask / centroid file in the public download",
    "sub-verse072": "no vertebra mask / centroid file in the public download",
}
SPLIT_FOLDERS = {"train": "training", "val": "validation", "validation": "validation", "test": "test"}


def _splits_of_vertebra_data(path: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for subject in read_verse19_vertebra_data(path, splits=[split]):
            splits[subject] = SPLIT_FOLDERS[split]
    return splits


def _splits_of_manifest_table(path: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            splits[verse19_case_id(row["patient_id"], row["scan_id"])] = SPLIT_FOLDERS[row["split"]]
    return splits


def _merge(case: str, first: dict[int, int], second: dict[int, int]) -> dict[int, int]:
    merged = dict(first)
    for label, grade in second.items():
        if merged.get(label, grade) != grade:
            raise VfdetectError(
                f"{case}: the two tables disagree on label {label} ({merged[label]} vs {grade})"
            )
        merged[label] = grade
    return merged


def _match_series(scans: dict[str, dict[int, int]], series: dict[str, dict[int, int]]) -> dict[str, str]:
    """Pair split scans (by VerSe scan id) with ``vertebra_data.json`` series of the same subject.

    A series is a candidate for a scan when it grades every vertebra the scan's row grades, with the
    same grades; pairs are fixed by elimination and only kept when unique.
    """
    candidates = {
        scan: {
            name
            for name, graded in series.items()
            if set(grades) <= set(graded) and all(graded[label] == grade for label, grade in grades.items())
        }
        for scan, grades in scans.items()
    }
    matched: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for scan, names in candidates.items():
            if scan in matched:
                continue
            remaining = names - set(matched.values())
            if len(remaining) == 1:
                matched[scan] = remaining.pop()
                changed = True
    return matched


def build(tables: Path) -> tuple[list[tuple[str, str]], dict[str, dict[int, int]], list[str]]:
    """(case, split folder) rows, grades per case, and notes on what was left out."""
    vertebra_data = read_verse19_vertebra_data(tables / "vertebra_data.json")
    manifest_table = read_verse19_manifest_table(tables / "verse19_manifest.csv")
    splits = {**_splits_of_vertebra_data(tables / "vertebra_data.json")}
    for case, split in _splits_of_manifest_table(tables / "verse19_manifest.csv").items():
        if splits.get(case, split) != split:
            raise VfdetectError(f"{case}: the two tables put it in different splits")
        splits.setdefault(case, split)

    grades: dict[str, dict[int, int]] = {}
    notes: list[str] = []
    # Ordinary subjects: one scan each, same id in both tables.
    for case in sorted(set(vertebra_data) | set(manifest_table)):
        if "_series" in case or "_split-" in case:
            continue
        if case in EXCLUDED:
            notes.append(f"{case}: left out ({EXCLUDED[case]})")
            continue
        grades[case] = _merge(case, vertebra_data.get(case, {}), manifest_table.get(case, {}))
    # Split (400-series) subjects: the scan id comes from verse19_manifest.csv; the series of
    # vertebra_data.json that matches it adds the vertebrae that table grades beyond T4-L4.
    split_cases = sorted(case for case in manifest_table if "_split-" in case)
    subjects = sorted({case.split("_split-")[0] for case in split_cases})
    for subject in subjects:
        scans = {case: manifest_table[case] for case in split_cases if case.startswith(subject + "_")}
        series = {name: vertebra_data[name] for name in vertebra_data if name.startswith(subject + "_series")}
        matched = _match_series(scans, series)
        for case, scan_grades in scans.items():
            extra = vertebra_data[matched[case]] if case in matched else {}
            grades[case] = _merge(case, scan_grades, extra)
            splits.setdefault(case, splits.get(matched.get(case, ""), "training"))
        for name in sorted(set(series) - set(matched.values())):
            notes.append(f"{name}: left out (vertebra_data.json series with no known scan file name)")
    rows = [(case, splits[case]) for case in sorted(grades)]
    return rows, grades, notes


def main(argv: list[str]) -> int:
    tables = Path(argv[1]) if len(argv) > 1 else DEFAULT_TABLES
    rows, grades, notes = build(tables)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "image", "centroids", "split"])
    for case, split in rows:
        subject = case.split("_split-")[0]
        folder = f"dataset-verse19{split}"
        writer.writerow(
            [
                case,
                f"{folder}/rawdata/{subject}/{case}_ct.nii.gz",
                f"{folder}/derivatives/{subject}/{case}_seg-subreg_ctd.json",
                split,
            ]
        )
    write_text_atomic(HERE / "verse19.csv", buffer.getvalue())
    write_grades(HERE / "verse19_grades.csv", grades)
    vertebrae = sum(len(graded) for graded in grades.values())
    fractured = sum(1 for graded in grades.values() for grade in graded.values() if grade >= 1)
    print(f"{len(rows)} scans, {vertebrae} graded vertebrae, {fractured} fractured (grade >= 1)")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
