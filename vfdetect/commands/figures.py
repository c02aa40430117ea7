"""``vfdetect figures``: the paper's figures from saved outputs (PNG and PDF)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the figures (default: DIRECTORY/figures).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Also draw Figure 1 (fractures per grade along the spine) for this manifest.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Data root of --manifest (default: $VFDETECT_DATA_ROOT, else the manifest's folder).")
@click.option("--grades", type=click.Path(path_type=Path), default=None, help="grades.csv of --manifest.")
@click.option("--cases-per-figure", type=click.IntRange(min=1), default=3, show_default=True,
              help="Cases shown in each of Figures 6 (correct) and 7 (with errors).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def command(directory: Path, out_dir: Path | None, manifest: Path | None, data_root: Path | None,
            grades: Path | None, cases_per_figure: int, quiet: bool) -> None:
    """Draw every figure that DIRECTORY's saved outputs allow.

    DIRECTORY is an evaluation folder (metrics.json: Figures 1, 4, 5, 6, 7), a cross-validation
    folder (cv.json: the same from its pooled evaluation), or a model-selection folder
    (model_selection.json: Figure 3).
    """

    cases = None
    if manifest is not None:
        from vfdetect.vertebrae import read_manifest

        cases = read_manifest(manifest, data_root=data_root, grades=grades)
    written = _draw_all_or_none(directory, out_dir, cases, cases_per_figure)
    if not quiet:
        for path in written:
            click.echo(f"written: {path}")


def _draw_all_or_none(directory: Path, out_dir: Path | None, cases: Any, cases_per_figure: int) -> list[Path]:
    """Draw the figures into a temporary folder beside the output folder and move them into place only
    when every figure was drawn: a failure leaves no figure of this run behind."""
    import os
    import shutil
    import tempfile

    from vfdetect.errors import InputError
    from vfdetect.figures import draw_figures
    from vfdetect.fileio import check_writable_folder
    from vfdetect.layout import figures_dir

    if not Path(directory).is_dir():
        raise InputError(directory, "folder not found")
    final = Path(out_dir) if out_dir is not None else figures_dir(Path(directory))
    check_writable_folder(final)
    staging = Path(tempfile.mkdtemp(prefix=".figures-", dir=final.parent))
    try:
        drawn = draw_figures(directory, staging, manifest_cases=cases, cases_per_figure=cases_per_figure)
        written = []
        for path in drawn:
            target = final / Path(path).relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
