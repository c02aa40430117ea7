"""``vfdetect predict``: probability maps, vertebra and patient scores, reports and overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.keras").is_file()


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: DIR/<case>/ per scan and DIR/summary.csv.",
)
@click.option(
    "--model",
    "model",
    type=click.Path(path_type=Path),
    default=None,
    help="A training run folder (config.json + model.keras) or a .keras file with its .json "
    "(default: the bundled model; see `vfdetect models`).",
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
    help="Vertebra centroids of a single SCAN: VerSe JSON or a vertebra mask NIfTI (default: localise them).",
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
@click.option("--patient-threshold", type=click.FloatRange(0, 1), default=None,
              help="The patient is called 'fracture' when its score (the highest vertebra score) reaches this "
              "[default: the model's own patient_threshold, else 0.5].")
@click.option("--vertebra-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="A vertebra is predicted fractured when its score reaches this.")
@click.option("--probability-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Secondary information only: the report's largest_component_mm3 is the largest connected "
              "component of p(fracture) >= this.")
@click.option("--noise-threshold-mm3", type=float, default=None, hidden=True,
              help="Deprecated and ignored: the patient decision is the patient score against --patient-threshold.")
@click.option("--region", type=click.Choice(["spine", "whole"]), default="spine", show_default=True,
              help="spine: run the network only around the vertebral column (given centroids, else found in "
              "bone and grown wherever the network finds a vertebra at the region's edge; same scores as whole); "
              "whole: over the whole volume.")
@click.option("--cube-edge-mm", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Edge of the cube averaged around each centroid.")
@click.option("--sigma-mm", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Gaussian weighting of the cube by distance to the centroid (0: plain mean).")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Arithmetic of the network (BatchNorm always folded into the convolutions). auto: bfloat16 on "
              "CPUs with native bf16 (AVX512-BF16, AMX), about 1.4x faster with vertebra scores within 0.01 of "
              "float32; else float32.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Tiles per network call.")
@click.option("--memory-gib", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Memory budget that sets the tile size.")
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=2, show_default=True, help="TensorFlow intra-op threads.")
@click.option("--no-overlay", is_flag=True, help="Do not draw overlay.png.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    inputs: tuple[Path, ...],
    out_dir: Path,
    model: Path | None,
    manifest: Path | None,
    data_root: Path | None,
    centroids: Path | None,
    label_scheme: str,
    anchor_level: str | None,
    patient_threshold: float | None,
    vertebra_threshold: float,
    probability_threshold: float,
    noise_threshold_mm3: float | None,
    region: str,
    cube_edge_mm: float,
    sigma_mm: float,
    precision: str,
    batch_size: int,
    memory_gib: float,
    threads: int,
    no_overlay: bool,
    quiet: bool,
) -> None:
    """Predict fractures in each SCAN (NIfTI file or DICOM folder) or each case of --manifest.

    The model is the bundled one unless --model names a run folder or a .keras file. Deprecated:
    a first SCAN that is a run folder (config.json + model.keras) is taken as the model.

    Patient rule: the patient score is the highest vertebra score; the patient is "fracture" when it
    reaches the patient threshold (--patient-threshold, else the model's own, else 0.5). With no
    vertebra given or found the score is empty and the case is reported as "no spine found".

    Writes per case DIR/<case>/probabilities.nii.gz (channel 0 p(fracture), channel 1 p(vertebra),
    on the input's own grid), labels.nii.gz, scores_map.nii.gz (the internal-grid maps the scores
    were computed from), report.json, report.csv and overlay.png, and
    DIR/summary.csv. A case that fails is reported and skipped; the exit status is 1 if any failed,
    and when every case fails no summary is written. Scans are checked before the network runs: a
    blank volume, or intensities that cannot be CT Hounsfield units, fail their case.
    """
    from vfdetect.errors import VfdetectError
    from vfdetect.fileio import write_bytes_atomic
    from vfdetect.predict import (
        CaseFailure,
        ModelLoadError,
        PredictConfig,
        load_predictor_in_background,
        patient_summary,
        predict_case,
        predict_cases,
    )
    from vfdetect.report import write_summary_csv
    from vfdetect.vertebrae import read_manifest, vertebra_label

    if inputs and _is_run_folder(inputs[0]):
        if model is not None:
            raise VfdetectError(f"{inputs[0]} is a run folder and --model is given: give the model once")
        click.echo(f"vfdetect: warning: a run folder as first argument is deprecated; use --model {inputs[0]}",
                   err=True)
        model, inputs = inputs[0], inputs[1:]
    if noise_threshold_mm3 is not None:
        click.echo("vfdetect: warning: --noise-threshold-mm3 is ignored; the patient decision is the patient "
                   "score against --patient-threshold", err=True)
    if not inputs and manifest is None:
        raise VfdetectError("give SCAN files or --manifest")
    if inputs and manifest is not None:
        raise VfdetectError("give SCAN files or --manifest, not both")
    if centroids is not None and len(inputs) != 1:
        raise VfdetectError("--centroids needs exactly one SCAN")
    if anchor_level is not None:
        vertebra_label(anchor_level)  # validates the name early
    config = PredictConfig(
        cube_edge_mm=cube_edge_mm,
        sigma_mm=sigma_mm if sigma_mm > 0 else None,
        vertebra_threshold=vertebra_threshold,
        patient_threshold=patient_threshold,
        probability_threshold=probability_threshold,
        anchor_level=anchor_level,
        region=region,
        batch_size=batch_size,
        memory_budget_bytes=int(memory_gib * 1024**3),
        write_overlay=not no_overlay,
    )
    cases = read_manifest(manifest, data_root=data_root) if manifest is not None else None
    out_existed = out_dir.exists()
    _check_before_work(inputs, cases, manifest, centroids, model, out_dir)
    # A scan that cannot be read or is not a CT in HU is reported and skipped before the network runs.
    failures: list[CaseFailure] = []
    # The first scan stays loaded for its prediction (it is read once).
    if cases is not None:
        cases = [case for index, case in enumerate(cases)
                 if _scan_is_usable(case.image, case.case, failures, keep=index == 0)]
    else:
        inputs = tuple(path for index, path in enumerate(inputs)
                       if _scan_is_usable(path, input_case_name(path), failures, keep=index == 0))
    if failures and not (cases or inputs):
        for failure in failures:
            click.echo(f"vfdetect: error: case {failure.case}: {failure.error}", err=True)
        if not out_existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if len(failures) > 1:
            click.echo(f"vfdetect: every case failed ({len(failures)}); nothing written", err=True)
        click.get_current_context().exit(1)
    # The network loads in the background while the first case is read, resampled and given its region.
    predictor = load_predictor_in_background(model, precision=precision, threads=threads)
    summary = out_dir / "summary.csv"
    previous_summary = summary.read_bytes() if summary.is_file() else None
    try:
        if cases is not None:
            results = predict_cases(predictor, cases, out_dir, config=config, quiet=quiet, failures=failures)
        elif centroids is not None:
            results = [
                predict_case(predictor, inputs[0], centroids, out_dir=out_dir, config=config, quiet=quiet,
                             label_scheme=label_scheme)
            ]
            write_summary_csv(out_dir / "summary.csv", [result.report for result in results])
        else:
            results = predict_cases(predictor, list(inputs), out_dir, config=config, quiet=quiet, failures=failures)
    except ModelLoadError:
        # The first case stops at the model, before writing anything: leave no empty folder behind.
        if not out_existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    for result in results:
        for warning in result.warnings:
            click.echo(f"vfdetect: warning: case {result.case}: {warning}", err=True)
        if not quiet:
            flagged = [v["name"] for v in result.vertebrae if v["predicted"] == "fracture"]
            click.echo(f"{result.case}: {patient_summary(result.report)}, flagged: {', '.join(flagged) or 'none'}")
    for failure in failures:
        click.echo(f"vfdetect: error: case {failure.case}: {failure.error}", err=True)
    if failures and not results:
        # No summary of nothing: put back what was there before this run.
        if previous_summary is None:
            summary.unlink(missing_ok=True)
        else:
            write_bytes_atomic(summary, previous_summary)
        click.echo(f"vfdetect: every case failed ({len(failures)}); no summary written", err=True)
        click.get_current_context().exit(1)
    if failures:
        click.echo(f"vfdetect: {len(failures)} of {len(failures) + len(results)} cases failed", err=True)
        click.get_current_context().exit(1)


def input_case_name(path: Path) -> str:
    """The case name ``vfdetect predict`` gives a SCAN: its file name without ``.nii[.gz]`` and ``_ct``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith("_ct"):
        name = name[: -len("_ct")]
    return name or "case"


def _check_before_work(inputs: tuple[Path, ...], cases: list[Any] | None, manifest: Path | None,
                       centroids: Path | None, model: Path | None, out_dir: Path) -> None:
    """Everything that can be checked before the network runs, so that a bad input writes nothing.

    Case names (safe and distinct), the model's configuration (unknown keys, variant) and the output
    folder (writable, no output on an input).
    """
    from vfdetect.errors import InputError
    from vfdetect.fileio import check_writable_folder, refuse_overwriting_inputs
    from vfdetect.layout import CaseFolder, PredictionFolder, fixed_files
    from vfdetect.manifest import check_case_id
    from vfdetect.predict import resolve_model
    from vfdetect.settings import check_model_config, read_settings_file

    if cases is not None:
        named = [(case.case, case.image) for case in cases]
        sources: list[Path | None] = [manifest, *(c.image for c in cases), *(c.centroids for c in cases),
                                      *(c.body_mask for c in cases)]
    else:
        named = [(check_case_id(input_case_name(path), path), path) for path in inputs]
        sources = [*inputs, centroids]
    seen: dict[str, Path] = {}
    for name, image in named:
        if name in seen:
            raise InputError(image, f"gives the same case name {name!r} as {seen[name]}; rename one of them")
        seen[name] = image
    weights, config_path, _ = resolve_model(model)
    check_model_config(config_path, read_settings_file(config_path, "a model configuration"))
    folder = PredictionFolder(out_dir)
    outputs = [folder.summary_csv, *(path for name in seen for path in fixed_files(CaseFolder(out_dir / name)))]
    refuse_overwriting_inputs(outputs, [*sources, weights, config_path])
    check_writable_folder(out_dir)


def _scan_is_usable(image: Path, case: str, failures: list[Any], keep: bool = False) -> bool:
    """Whether ``image`` loads as a CT in HU; if not, the reason is added to ``failures``. With
    ``keep``, the loaded scan is kept for the next load of that file (:func:`vfdetect.volume.check_ct_scan`)."""
    from vfdetect.errors import VfdetectError
    from vfdetect.predict import CaseFailure
    from vfdetect.volume import check_ct_scan

    try:
        check_ct_scan(image, keep=keep)
    except VfdetectError as error:
        failures.append(CaseFailure(case, str(error)))
        return False
    return True
