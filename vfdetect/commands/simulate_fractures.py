"""``vfdetect simulate-fractures``: plant Genant-graded compression fractures into real CT scans."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(help="Plant Genant-graded vertebral compression fractures into real CT scans with vertebra masks.")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (must not exist or be empty).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--copies", type=click.IntRange(min=1), default=1, show_default=True,
              help="Simulated copies of every scan (<case>-sim1, <case>-sim2, ...).")
@click.option("--fracture-prevalence", type=click.FloatRange(0.0, 1.0), default=0.19, show_default=True,
              help="Share of eligible vertebrae fractured.")
@click.option("--negative-fraction", type=click.FloatRange(0.0, 1.0), default=0.12, show_default=True,
              help="Share of scans without any fracture.")
@click.option("--levels", default="T4-L5", show_default=True,
              help="Vertebrae that may fracture: a range such as T4-L5 or a list such as T12,L1.")
@click.option("--label-scheme", type=click.Choice(["verse", "totalsegmentator"]), default=None,
              help="Numbering of every mask (default: the manifest's label_scheme column, else verse).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the manifest's relative paths start from (default: $VFDETECT_DATA_ROOT, else the manifest's folder).")
@click.option("--vary-acquisition", is_flag=True,
              help="Also rotate, crop, add noise, reorient and re-type each copy (for evaluation sets).")
@click.option("--compaction", is_flag=True, help="Add a denser trabecular band (+50..150 HU) at each collapsed endplate.")
@click.option("--preview", is_flag=True, help="Write a before/after PNG per fractured vertebra to OUT/previews.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(manifest: Path, out_dir: Path, seed: int, copies: int, fracture_prevalence: float, negative_fraction: float,
            levels: str, label_scheme: str | None, data_root: Path | None, vary_acquisition: bool, compaction: bool,
            preview: bool, quiet: bool) -> None:
    """Write simulated scans, centroids, masks, manifest.csv, grades.csv and simulation.json to OUT."""
    from vfdetect.errors import VfdetectError
    from vfdetect.simulate import SimulationConfig, parse_levels, simulate_dataset

    try:
        config = SimulationConfig(
            copies=copies,
            fracture_prevalence=fracture_prevalence,
            negative_fraction=negative_fraction,
            levels=parse_levels(levels),
            vary_acquisition=vary_acquisition,
            compaction=compaction,
        )
    except VfdetectError as error:
        raise click.BadParameter(str(error)) from None
    result = simulate_dataset(manifest, out_dir, seed, config, data_root=data_root, preview=preview, quiet=quiet,
                              label_scheme=label_scheme)
    if not quiet:
        click.echo(f"wrote simulated scans; manifest: {result}")
