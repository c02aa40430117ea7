"""Training cases: the seeded validation split, the hash of the data, loading."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vfdetect.errors import VfdetectError
from vfdetect.layout import LabelFolder
from vfdetect.vertebrae import Case


def has_fracture(case: Case, min_grade: int = 1) -> bool:
    """True when a vertebra of ``case`` has Genant grade >= ``min_grade`` (ungraded ones do not count)."""
    return any(grade is not None and int(grade) >= min_grade for grade in case.grades.values())


def split_cases(
    cases: Sequence[Case], validation_fraction: float, seed: int, min_grade: int = 1
) -> tuple[list[Case], list[Case]]:
    """Seeded split into training and validation cases, stratified by "has a fractured vertebra".

    A case is a fracture case when a vertebra has Genant grade >= ``min_grade`` (:func:`has_fracture`;
    use the ``min_grade`` the label images were made with). ``round(fraction * n)`` cases (at least
    one when the fraction is positive) are held out, shared between cases with and without
    fractures in proportion; the rest train. With a fraction of 0 nothing is held out (validation
    then uses the training cases).
    """
    cases = list(cases)
    if validation_fraction <= 0:
        return cases, []
    if len(cases) < 2:
        raise VfdetectError(
            f"holding out {validation_fraction:.0%} of the cases for validation needs at least 2 cases, got {len(cases)}"
        )
    rng = np.random.default_rng([seed, 0x5EED])
    n_validation = min(len(cases) - 1, max(1, round(validation_fraction * len(cases))))
    fractured = [c for c in cases if has_fracture(c, min_grade)]
    intact = [c for c in cases if not has_fracture(c, min_grade)]
    n_fractured = min(len(fractured), round(n_validation * len(fractured) / len(cases)))
    n_intact = min(len(intact), n_validation - n_fractured)
    n_fractured = n_validation - n_intact
    held_out = {
        c.case
        for group, n in ((fractured, n_fractured), (intact, n_intact))
        for c in (group[int(i)] for i in rng.permutation(len(group))[:n])
    }
    return [c for c in cases if c.case not in held_out], [c for c in cases if c.case in held_out]


def _hash_path(path: Path, digest: Any) -> None:
    """Feed a file's bytes (or every file of a folder, sorted) into ``digest``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)


def data_hash(cases: Sequence[Case], labels_dir: Path) -> str:
    """SHA-256 over the cases' names, grades, scans and label images (contents, not paths)."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case):
        digest.update(f"case {case.case} grades {sorted(case.grades.items())}\n".encode())
        _hash_path(Path(case.image), digest)
        labels = LabelFolder(Path(labels_dir)).image(case.case)
        if labels.is_file():
            _hash_path(labels, digest)
    return digest.hexdigest()


def _load_cases(
    cases: Sequence[Case], labels_dir: Path, spacing: float, quiet: bool, what: str, cache_dir: Path | None = None
) -> list[Any]:
    """The cases in the internal frame (:func:`vfdetect.sampling.load_training_case`); with ``cache_dir``
    read memory-mapped from the preprocessing cache, missing or stale cases being prepared and added."""
    from vfdetect.sampling import load_training_case

    loaded = []
    for case in tqdm(cases, desc=f"loading {what} cases", unit="case", disable=quiet, leave=False):
        loaded.append(load_training_case(case, labels_dir, spacing=spacing, cache_dir=cache_dir))
    return loaded
