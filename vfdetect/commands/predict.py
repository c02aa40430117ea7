"""``vfdetect predict``: probability maps, vertebra and patient scores, reports and overlays."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: DIR/<case>/ per scan and DIR/summary.csv.",
)
@click.option("--manifest", type=click.Path(path_type=Path), default=None, help="Predict every case of a manifest.")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder the manifest's relative paths start from (default: $VFDETECT_DATA_ROOT, else the manifest's folder).",
)
@click.option(
    "--centroids",
    type=click.Path(path_type=Path),
    default=None,
    help="Vertebra centroids of a single INPUT: VerSe JSON or a vertebra mask NIfTI (default: localise them).",
)
@click.option(
    "--label-scheme",
    type=click.Choice(["verse", "totalsegmentator"]),
    default="verse",
    show_default=True,
    help="Label numbering of a --centroids mask.",
)
@click.option(
    "--anchor-level",
    default=None,
    help="Name of the lowest vertebra found when localising (e.g. L5); without it names are guessed.",
)
@click.option("--probability-threshold", type=float, default=0.5, show_default=True,
              help="Patient level: voxels with p(fracture) >= this form fracture components.")
@click.option("--noise-threshold-mm3", type=float, default=500.0, show_default=True,
              help="Patient level: fracture components smaller than this (mm^3) are discarded.")
@click.option("--vertebra-threshold", type=float, default=0.5, show_default=True,
              help="A vertebra is predicted fractured when its score reaches this.")
@click.option("--cube-edge-mm", type=float, default=10.0, show_default=True,
              help="Edge of the cube averaged around each centroid.")
@click.option("--sigma-mm", type=float, default=5.0, show_default=True,
              help="Gaussian weighting of the cube by distance to the centroid (0: plain mean).")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="bfloat16: a copy with BatchNorm folded into the convolutions, about twice as fast.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Tiles per network call.")
@click.option("--memory-gib", type=float, default=4.0, show_default=True,
              help="Memory budget that sets the tile size.")
@click.option("--threads", type=int, default=2, show_default=True, help="TensorFlow intra-op threads.")
@click.option("--no-overlay", is_flag=True, help="Do not draw overlay.png.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    run: Path,
    inputs: tuple[Path, ...],
    out_dir: Path,
    manifest: Path | None,
    data_root: Path | None,
    centroids: Path | None,
    label_scheme: str,
    anchor_level: str | None,
    probability_threshold: float,
    noise_threshold_mm3: float,
    vertebra_threshold: float,
    cube_edge_mm: float,
    sigma_mm: float,
    precision: str,
    batch_size: int,
    memory_gib: float,
    threads: int,
    no_overlay: bool,
    quiet: bool,
) -> None:
    """Predict fractures in each scan INPUT (NIfTI file or DICOM folder) or each case of --manifest with
    the trained model in the run folder RUN.

    Writes per case DIR/<case>/probabilities.nii.gz (channel 0 p(fracture), channel 1 p(vertebra),
    on the input's own grid), labels.nii.gz, report.json, report.csv and overlay.png, and
    DIR/summary.csv. A case that fails is reported and skipped; the exit status is 1 if any failed.
    """
    from vfdetect.errors import VfdetectError
    from vfdetect.predict import CaseFailure, PredictConfig, load_predictor, predict_case, predict_cases
    from vfdetect.report import write_summary_csv
    from vfdetect.vertebrae import read_manifest, vertebra_label

    if not inputs and manifest is None:
        raise VfdetectError("give INPUT scans or --manifest")
    if inputs and manifest is not None:
        raise VfdetectError("give INPUT scans or --manifest, not both")
    if centroids is not None and len(inputs) != 1:
        raise VfdetectError("--centroids needs exactly one INPUT")
    if anchor_level is not None:
        vertebra_label(anchor_level)  # validates the name early
    config = PredictConfig(
        cube_edge_mm=cube_edge_mm,
        sigma_mm=sigma_mm if sigma_mm > 0 else None,
        vertebra_threshold=vertebra_threshold,
        probability_threshold=probability_threshold,
        noise_threshold_mm3=noise_threshold_mm3,
        anchor_level=anchor_level,
        batch_size=batch_size,
        memory_budget_bytes=int(memory_gib * 1024**3),
        write_overlay=not no_overlay,
    )
    predictor = load_predictor(run, precision=precision, threads=threads)
    failures: list[CaseFailure] = []
    if manifest is not None:
        cases = read_manifest(manifest, data_root=data_root)
        results = predict_cases(predictor, cases, out_dir, config=config, quiet=quiet, failures=failures)
    elif centroids is not None:
        results = [
            predict_case(predictor, inputs[0], centroids, out_dir=out_dir, config=config, quiet=quiet,
                         label_scheme=label_scheme)
        ]
        write_summary_csv(out_dir / "summary.csv", [result.report for result in results])
    else:
        results = predict_cases(predictor, list(inputs), out_dir, config=config, quiet=quiet, failures=failures)
    if not quiet:
        for result in results:
            verdict = "fracture" if result.patient_fracture else "no fracture"
            flagged = [v["name"] for v in result.vertebrae if v["predicted"] == "fracture"]
            click.echo(
                f"{result.case}: {verdict} (score {result.patient_fracture_probability:.2f}); "
                f"{len(result.vertebrae)} vertebrae, flagged: {', '.join(flagged) or 'none'}"
            )
    for failure in failures:
        click.echo(f"vfdetect: error: case {failure.case}: {failure.error}", err=True)
    if failures:
        click.echo(f"vfdetect: {len(failures)} of {len(failures) + len(results)} cases failed", err=True)
        click.get_current_context().exit(1)
