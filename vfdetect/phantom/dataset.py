"""Phantom cases and datasets: :func:`generate_phantom` (one case in memory) and
:func:`write_phantom_dataset` (scans, masks, centroids, manifest.csv and grades.csv on disk).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from vfdetect.errors import VfdetectError
from vfdetect.fileio import atomic_path, write_text_atomic
from vfdetect.phantom.anatomy import SpineModel, _build_model, _choose_levels, _draw_fractures
from vfdetect.phantom.config import PhantomConfig
from vfdetect.phantom.scanner import _acquire
from vfdetect.vertebrae import Vertebra, write_centroids


@dataclass
class PhantomCase:
    """A generated case: image and mask on the same grid, annotated vertebrae and ground truth.

    ``vertebrae`` lists the vertebrae whose body centroid lies in the field of view, with grades;
    ``morphology`` (wedge/biconcave/crush/normal) and ``height_loss`` (fraction) are per label;
    ``reference_height_mm`` is each body's unfractured height. ``model`` re-renders the anatomy on
    any grid (:func:`render_labels`). The mask also labels neighbours that the field of view shows
    only in part (their body centroid lies outside it), as VerSe masks do; they are not listed.
    """

    case: str
    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    vertebrae: list[Vertebra]
    morphology: dict[int, str]
    height_loss: dict[int, float]
    reference_height_mm: dict[int, float] = field(default_factory=dict)
    model: SpineModel | None = None

    @property
    def grades(self) -> dict[int, int]:
        return {vertebra.label: int(vertebra.grade or 0) for vertebra in self.vertebrae}


def generate_phantom(case: str, rng: np.random.Generator, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Draw and render one synthetic patient (deterministic for the generator's state)."""
    listed = _choose_levels(rng, config)
    grades = _draw_fractures(rng, listed, config)
    model, morphology = _build_model(rng, listed, grades, config)
    image, mask = _acquire(model, listed, rng, config)
    shape = image.shape
    inverse = np.linalg.inv(image.affine)
    vertebrae = []
    for label in listed:
        position = model.by_label(label).body_centroid
        voxel = inverse[:3, :3] @ position + inverse[:3, 3]
        if np.all(voxel >= -0.5) and np.all(voxel <= np.asarray(shape) - 0.5):
            vertebrae.append(Vertebra(label, (float(position[0]), float(position[1]), float(position[2])), grades[label]))
    listed_labels = [v.label for v in vertebrae]
    return PhantomCase(
        case=case,
        image=image,
        mask=mask,
        vertebrae=vertebrae,
        morphology={label: morphology[label] for label in listed_labels},
        height_loss={label: model.by_label(label).height_loss for label in listed_labels},
        reference_height_mm={label: model.by_label(label).height for label in listed_labels},
        model=model,
    )


def case_seeds(seed: int, n_cases: int) -> list[np.random.SeedSequence]:
    """Independent seed sequences per case (case i depends only on ``seed`` and ``i``)."""
    return np.random.SeedSequence(seed).spawn(n_cases)


def _case_name(index: int) -> str:
    return f"phantom{index:03d}"


def _generate_and_write(args: tuple[Path, int, np.random.SeedSequence, PhantomConfig]) -> tuple[str, dict[int, int], str, str]:
    out_dir, index, seed_sequence, config = args
    case = _case_name(index)
    phantom = generate_phantom(case, np.random.default_rng(seed_sequence), config)
    image_name, centroid_name, mask_name = f"{case}_ct.nii.gz", f"{case}_ctd.json", f"{case}_msk.nii.gz"
    with atomic_path(out_dir / image_name) as tmp:
        nib.save(phantom.image, tmp)
    with atomic_path(out_dir / mask_name) as tmp:
        nib.save(phantom.mask, tmp)
    write_centroids(out_dir / centroid_name, phantom.vertebrae, phantom.image.affine)
    return case, phantom.grades, image_name, centroid_name


def write_phantom_dataset(out_dir: Path, n_cases: int, seed: int, config: PhantomConfig = PhantomConfig(),
                          quiet: bool = False, workers: int = 1) -> Path:
    """Write ``n_cases`` phantoms (CT, centroid JSON, mask) plus manifest.csv and grades.csv.

    Deterministic for ``seed`` whatever ``workers`` is (each case has its own seed sequence).
    Returns the manifest path.
    """
    if n_cases < 1:
        raise VfdetectError(f"number of phantom cases must be at least 1, got {n_cases}")
    if workers < 1:
        raise VfdetectError(f"number of workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, index, sequence, config) for index, sequence in enumerate(case_seeds(seed, n_cases))]
    progress = tqdm(total=n_cases, desc="phantoms", unit="case", disable=quiet)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_generate_and_write(job))
            progress.update()
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, n_cases)) as pool:
            for result in pool.imap(_generate_and_write, jobs):
                results.append(result)
                progress.update()
    progress.close()
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["case", "image", "centroids"])
    grades_text = io.StringIO()
    grade_writer = csv.writer(grades_text, lineterminator="\n")
    grade_writer.writerow(["case", "label", "grade"])
    for case, grades, image_name, centroid_name in results:
        writer.writerow([case, image_name, centroid_name])
        for label, grade in grades.items():
            grade_writer.writerow([case, label, grade])
    write_text_atomic(out_dir / "grades.csv", grades_text.getvalue())
    manifest_path = out_dir / "manifest.csv"
    write_text_atomic(manifest_path, manifest.getvalue())
    return manifest_path
