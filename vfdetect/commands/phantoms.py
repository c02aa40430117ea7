"""``vfdetect phantoms``: write the synthetic spine CT dataset (scans, centroids, masks, grades, manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command(help="Generate synthetic spine CT phantoms with Genant-graded vertebral fractures.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (created if missing).")
@click.option("--cases", type=click.IntRange(min=1), default=20, show_default=True, help="Number of phantom scans.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (same seed, same dataset).")
@click.option("--small", is_flag=True, help="Tiny 1 mm phantoms (about 100x100x140 voxels) for tests and demos.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel processes (the output does not depend on it).")
@click.option("--fracture-prevalence", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of fractured vertebrae (default 0.19, as in the paper's data).")
@click.option("--negative-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="Share of patients without any fracture (default 0.12, as in the paper's data).")
@click.option("--density-fracture-correlation", is_flag=True,
              help="Experiments only: lower bone density and more kyphosis in patients with fractures "
                   "(by default no patient property depends on the fractures).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON object of PhantomConfig settings (e.g. {\"fov_mm\": [160, 200]}), applied over the "
                   "defaults (or over --small); the options above override it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(out_dir: Path, cases: int, seed: int, small: bool, workers: int,
            fracture_prevalence: float | None, negative_fraction: float | None,
            density_fracture_correlation: bool, config_file: Path | None, quiet: bool) -> None:
    """Write <case>_ct.nii.gz, <case>_ctd.json, <case>_msk.nii.gz, manifest.csv and grades.csv to OUT."""
    import dataclasses

    from vfdetect.phantom import PhantomConfig, write_phantom_dataset

    config = PhantomConfig.small() if small else PhantomConfig()
    if config_file is not None:
        config = _with_file_settings(config, config_file)
    if fracture_prevalence is not None:
        config = dataclasses.replace(config, fracture_prevalence=fracture_prevalence)
    if negative_fraction is not None:
        config = dataclasses.replace(config, negative_fraction=negative_fraction)
    if density_fracture_correlation:
        config = dataclasses.replace(config, density_fracture_correlation=True)
    from vfdetect.fileio import check_writable_folder

    check_writable_folder(out_dir)
    manifest = write_phantom_dataset(out_dir, cases, seed, config, quiet=quiet, workers=workers)
    if not quiet:
        click.echo(f"wrote {cases} phantom case(s); manifest: {manifest}")


def _with_file_settings(config: Any, path: Path) -> Any:
    """``config`` with the settings of the JSON file ``path`` (lists become tuples); unknown keys refused."""
    import dataclasses

    from vfdetect.errors import InputError, VfdetectError
    from vfdetect.settings import Layer, dataclass_keys, read_settings_file, resolve_settings

    values = resolve_settings(dataclass_keys(type(config)), [Layer(path, read_settings_file(path, "phantom settings"))],
                              what="phantom setting(s)")
    try:
        return dataclasses.replace(
            config, **{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
        )
    except (VfdetectError, TypeError) as error:
        raise InputError(path, str(error)) from None
