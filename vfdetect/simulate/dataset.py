"""A simulated dataset on disk: :func:`simulate_dataset`, reproducible NIfTI writing, preview PNGs.

Every copy draws from its own generator seeded by (seed, case, copy), and the files are written
byte for byte reproducibly (gzip without time stamp), into a folder renamed onto the output at
the end.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from vfdetect import __version__
from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import atomic_path, write_json_atomic, write_text_atomic
from vfdetect.simulate.config import SimulationConfig
from vfdetect.simulate.inputs import read_simulation_manifest
from vfdetect.simulate.scan import VertebraOutcome, simulate_scan
from vfdetect.vertebrae import LABEL_SCHEMES, vertebra_name, write_centroids

_PREVIEW_WINDOW_HU = (-400.0, 1100.0)


def _write_nifti(path: Path, image: nib.Nifti1Image) -> None:
    """Write ``image`` byte-for-byte reproducibly (gzip without time stamp or name), atomically."""
    header = image.header.copy()
    header["magic"] = b"n+1"
    header["vox_offset"] = 352
    buffer = io.BytesIO()
    header.write_to(buffer)
    buffer.write(b"\x00" * (352 - buffer.tell()))
    data = np.asanyarray(image.dataobj)
    buffer.write(np.asarray(data, dtype=header.get_data_dtype()).tobytes(order="F"))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=6) as stream:
            stream.write(buffer.getvalue())


def write_preview_png(path: str | Path, before: np.ndarray, after: np.ndarray, title: str) -> None:
    """Before/after mid-sagittal slices side by side (anterior left, superior up, 0.5 mm pixels) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), dpi=100)
    for index, (image, name) in enumerate(((before, "before"), (after, "after"))):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.imshow(image, cmap="gray", vmin=_PREVIEW_WINDOW_HU[0], vmax=_PREVIEW_WINDOW_HU[1], extent=(45, -45, -50, 50))
        axes.set_title(name)
        axes.set_xlabel("anterior coordinate (mm)")
        axes.set_ylabel("superior axis (mm)")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _case_rng(seed: int, case: str, copy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(case.encode()), copy]))


def _outcome_record(outcome: VertebraOutcome) -> dict[str, Any]:
    record = asdict(outcome)
    record["name"] = outcome.name
    record["heights_before"] = [round(value, 3) for value in outcome.heights_before.as_tuple()]
    record["heights_after"] = [round(value, 3) for value in outcome.heights_after.as_tuple()]
    for key in ("height_loss", "min_jacobian", "amplitude_mm"):
        record[key] = round(float(record[key]), 4)
    return record


def simulate_dataset(
    manifest: str | Path,
    out_dir: str | Path,
    seed: int,
    config: SimulationConfig = SimulationConfig(),
    data_root: str | Path | None = None,
    preview: bool = False,
    quiet: bool = False,
    label_scheme: str | None = None,
) -> Path:
    """Simulate ``config.copies`` fractured copies of every scan of ``manifest``; returns the output manifest.

    Writes ``<case>-sim<k>_ct.nii.gz``, ``_ctd.json`` (VerSe body centroids), ``_msk.nii.gz`` (warped
    vertebra mask, VerSe numbering), ``manifest.csv`` (``case,image,centroids,mask,source``, readable
    by :func:`vfdetect.manifest.read_manifest`), ``grades.csv`` (``case,label,grade,morphology,height_loss``),
    ``simulation.json`` (seed, settings, measured heights, Jacobian minima, timings) and with
    ``preview`` ``previews/<case>_<vertebra>.png``. ``label_scheme`` overrides the manifest's
    ``label_scheme`` column for every row. Everything is written into a temporary folder that
    is renamed onto ``out_dir`` at the end, so a failed run leaves nothing; ``out_dir`` must not
    exist or be empty. Each copy draws from its own generator seeded by (seed, case, copy).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "output folder exists and is not empty")
    scans = read_simulation_manifest(manifest, data_root)
    if label_scheme is not None:
        if label_scheme not in LABEL_SCHEMES:
            raise VfdetectError(f"unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
        scans = [replace(scan, label_scheme=label_scheme) for scan in scans]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        manifest_rows: list[list[str]] = []
        grade_rows: list[list[Any]] = []
        records: list[dict[str, Any]] = []
        jobs = [(scan, copy) for scan in scans for copy in range(1, config.copies + 1)]
        for scan, copy in tqdm(jobs, desc="simulate-fractures", unit="scan", disable=quiet):
            name = f"{scan.case}-sim{copy}"
            result = simulate_scan(
                scan.image, scan.mask, _case_rng(seed, scan.case, copy), config, scan.body_mask, scan.label_scheme,
                case=name, source=scan.case, previews=preview,
            )
            image, centroids, mask = f"{name}_ct.nii.gz", f"{name}_ctd.json", f"{name}_msk.nii.gz"
            _write_nifti(work / image, result.ct)
            _write_nifti(work / mask, result.mask)
            write_centroids(work / centroids, result.vertebrae, result.ct.affine)
            manifest_rows.append([name, image, centroids, mask, scan.case])
            for outcome in result.outcomes:
                grade_rows.append([name, outcome.label, outcome.grade, outcome.morphology, f"{outcome.height_loss:.4f}"])
            for label, (before, after) in result.previews.items():
                title = f"{name} {vertebra_name(label)}"
                for graded in (o for o in result.outcomes if o.label == label):
                    title += f": grade {graded.grade} {graded.morphology}, height loss {graded.height_loss:.1%}"
                write_preview_png(work / "previews" / f"{name}_{vertebra_name(label)}.png", before, after, title)
            records.append(
                {
                    "case": name,
                    "source": scan.case,
                    "copy": copy,
                    "seconds": round(result.seconds, 2),
                    "acquisition": result.acquisition,
                    "vertebrae": [_outcome_record(outcome) for outcome in result.outcomes],
                }
            )
        write_text_atomic(work / "manifest.csv", _csv_text(("case", "image", "centroids", "mask", "source"), manifest_rows))
        write_text_atomic(work / "grades.csv", _csv_text(("case", "label", "grade", "morphology", "height_loss"), grade_rows))
        settings = asdict(config)
        write_json_atomic(
            work / "simulation.json",
            {"version": __version__, "seed": seed, "manifest": str(Path(manifest).resolve()), "config": settings, "cases": records},
        )
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"
