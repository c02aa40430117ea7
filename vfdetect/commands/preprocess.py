"""``vfdetect preprocess MANIFEST --out DIR [--labels LABELS]``: the optional cache of prepared cases."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cache folder (created; up-to-date entries in it are kept).")
@click.option("--labels", "labels_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Label folder training will use (its label_config.json; label images for cases without "
                   "centroids).  [default: labels drawn from the centroids with default settings]")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Root the manifest's paths are relative to (default: $VFDETECT_DATA_ROOT or the manifest's folder).")
@click.option("--grades", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Grades CSV (default: grades.csv beside the manifest).")
@click.option("--spacing", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Isotropic voxel size (mm) of the internal frame; use the training's --spacing.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    manifest: Path,
    out_dir: Path,
    labels_dir: Path | None,
    data_root: Path | None,
    grades: Path | None,
    spacing: float,
    quiet: bool,
) -> None:
    """Prepare every case of MANIFEST once for `vfdetect train --cache DIR`.

    Per case, DIR/<case>/ holds the internal-frame normalised image and the label image as .npy
    (memory-mappable), the voxel indices of each class, and case.json with the inputs and a content
    hash of them: training reads an entry instead of loading and resampling the scan again, and
    prepares an entry again when its inputs have changed.
    """
    from vfdetect.manifest import read_manifest
    from vfdetect.preprocess import preprocess_cases

    cases = read_manifest(manifest, data_root=data_root, grades=grades)
    folders = preprocess_cases(cases, out_dir, labels_dir=labels_dir, spacing=spacing, quiet=quiet)
    if not quiet:
        click.echo(f"{len(folders)} case(s) prepared in {out_dir}")
