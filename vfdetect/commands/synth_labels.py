"""``vfdetect synth-labels``: label images (ellipsoids) from centroids and Genant grades."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for <case>_labels.nii.gz (and <case>_labels.png with --preview).",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder the manifest's relative paths start from "
    "(default: $VFDETECT_DATA_ROOT, else the manifest's folder).",
)
@click.option(
    "--grades",
    type=click.Path(path_type=Path),
    default=None,
    help="grades.csv (case,label,grade); default: <manifest>_grades.csv or grades.csv beside the manifest.",
)
@click.option(
    "--preview/--no-preview",
    default=True,
    show_default=True,
    help="Also write a mid-sagittal PNG with the label overlay per case.",
)
@click.option(
    "--along-fraction",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Ellipsoid semi-axis along the spine, as a fraction of the level spacing (default 0.4).",
)
@click.option(
    "--left-right-fraction",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Semi-axis left-right, as a fraction of the level spacing (default 0.55).",
)
@click.option(
    "--anterior-posterior-fraction",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Semi-axis antero-posterior, as a fraction of the level spacing (default 0.42).",
)
@click.option(
    "--min-grade",
    type=click.IntRange(1, 3),
    default=None,
    help="Lowest Genant grade labelled fractured (2); grade 0 is labelled normal (1) and grades "
    "between 0 and this one are labelled ignore (255).  [default: 1]",
)
@click.option(
    "--unknown-grade",
    type=click.Choice(["ignore", "normal", "skip"]),
    default=None,
    help="Ungraded vertebrae: label them ignore (255, no loss in training; the default), "
    "normal (1), or leave them background (skip).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    manifest: Path,
    out_dir: Path,
    data_root: Path | None,
    grades: Path | None,
    preview: bool,
    along_fraction: float | None,
    left_right_fraction: float | None,
    anterior_posterior_fraction: float | None,
    unknown_grade: str | None,
    min_grade: int | None,
    quiet: bool,
) -> None:
    """Build a label image (0 background, 1 normal, 2 fracture, 255 ignore) per case of MANIFEST.

    Each annotated vertebra becomes an ellipsoid around its centroid, oriented along the local
    spine direction and sized from the distance to its neighbours; deformed vertebrae (Genant
    grade >= 1) are flattened along the spine. Grade 0 is labelled normal, grade >= --min-grade
    fractured; a vertebra graded between them, or ungraded (see --unknown-grade), is labelled
    ignore (255): training gives it no loss and centres no segment on it. The images are written
    on each scan's own grid; the settings go to label_config.json beside them, where
    `vfdetect train` reads --min-grade back.
    """
    from vfdetect.labels import LabelConfig, synthesize_manifest_labels
    from vfdetect.manifest import read_manifest

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "along_fraction": along_fraction,
            "left_right_fraction": left_right_fraction,
            "anterior_posterior_fraction": anterior_posterior_fraction,
            "unknown_grade": unknown_grade,
            "min_grade": min_grade,
        }.items()
        if value is not None
    }
    config = LabelConfig(**overrides)
    cases = read_manifest(manifest, data_root=data_root, grades=grades)
    _check_before_work(manifest, grades, cases, out_dir)
    written = synthesize_manifest_labels(cases, out_dir, config=config, preview=preview, quiet=quiet)
    if not quiet:
        click.echo(f"wrote {len(written)} label image(s) to {out_dir}")


def _check_before_work(manifest: Path, grades: Path | None, cases: list[Any], out_dir: Path) -> None:
    """Refuse cases without centroids (their label image would be all background), outputs that would
    overwrite an input, and an unwritable output folder, before any label image is written."""
    from vfdetect.errors import InputError
    from vfdetect.fileio import check_writable_folder, refuse_overwriting_inputs
    from vfdetect.layout import LabelFolder

    without = [case.case for case in cases if case.centroids is None]
    if without:
        raise InputError(manifest, f"{len(without)} case(s) without centroids ({', '.join(without[:5])}); "
                                   "label images need a centroids file (VerSe JSON or vertebra mask) per case")
    folder = LabelFolder(out_dir)
    outputs = [folder.config, *(path for case in cases for path in (folder.image(case.case), folder.preview(case.case)))]
    from vfdetect.manifest import default_grades_path

    inputs = [manifest, grades or default_grades_path(manifest), *(case.image for case in cases), *(case.centroids for case in cases),
              *(case.body_mask for case in cases)]
    refuse_overwriting_inputs(outputs, inputs)
    check_writable_folder(out_dir)
