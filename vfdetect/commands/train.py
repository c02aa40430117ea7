"""``vfdetect train MANIFEST --labels DIR --out RUN``: train the dual-pathway network.

Options left out take :class:`vfdetect.train.TrainConfig`'s defaults (the paper's regime: 35 epochs
x 20 subepochs x 1000 segments, batch 10), or with ``--resume`` the settings of the run being
resumed. ``--min-grade`` left out takes the ``min_grade`` the label images were made with (their
``label_config.json``), else 1. TensorFlow is imported only when the command runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

# option name -> TrainConfig field
_CONFIG_OPTIONS: dict[str, str] = {
    "variant": "variant",
    "epochs": "epochs",
    "subepochs": "subepochs",
    "segments_per_subepoch": "segments_per_subepoch",
    "batch_size": "batch_size",
    "seed": "seed",
    "learning_rate": "learning_rate",
    "lr_patience": "lr_patience",
    "validation_fraction": "validation_fraction",
    "validation_segments": "validation_segments",
    "balanced_validation_segments": "balanced_validation_segments",
    "min_grade": "min_grade",
    "precision": "precision",
    "strategy": "strategy",
    "spacing": "spacing",
}


@click.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--labels", "labels_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of label images <case>_labels.nii.gz (from `vfdetect synth-labels`).")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder to create (or to continue with --resume).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Root the manifest's paths are relative to (default: $VFDETECT_DATA_ROOT or the manifest's folder).")
@click.option("--grades", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Grades CSV (default: grades.csv beside the manifest).")
@click.option("--variant", type=click.Choice(["3d", "5slices", "1slice"]), default=None,
              help="Network variant of the paper's Table 1.  [default: 3d]")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs.  [default: 35]")
@click.option("--subepochs", type=click.IntRange(min=1), default=None, help="Subepochs per epoch.  [default: 20]")
@click.option("--segments-per-subepoch", type=click.IntRange(min=1), default=None,
              help="Training segments drawn per subepoch.  [default: 1000]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global training batch (split between replicas).  [default: 10]")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Base seed of every random draw.  [default: 0]")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Initial RMSProp learning rate.  [default: 0.001]")
@click.option("--lr-patience", type=click.IntRange(min=1), default=None,
              help="Epochs without a gain of the checkpoint selection measure (fracture-vs-normal voxel AUC) "
                   "before the learning rate is halved.  [default: 10]")
@click.option("--validation-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help="Share of the cases held out for validation (0: validate on the training cases).  [default: 0.15]")
@click.option("--validation-segments", type=click.IntRange(min=1), default=None,
              help="Uniformly placed validation segments per epoch (overall and per-class accuracy).  [default: 3000]")
@click.option("--balanced-validation-segments", type=click.IntRange(min=1), default=None,
              help="Class-balanced validation segments (training size and class weights, no augmentation) for "
                   "the vertebra recalls and the fracture-vs-normal AUC that choose model.keras.  [default: 500]")
@click.option("--min-grade", type=click.IntRange(1, 3), default=None,
              help="Lowest Genant grade counted as a fracture, for the stratified validation split; must match "
                   "the label images.  [default: the labels' label_config.json, else 1]")
@click.option("--randomise/--no-randomise", default=None,
              help="Domain randomisation of the training segments on or off (SamplingConfig.randomised(); other "
                   "sampling settings of --config are kept).  [default: on for a new run, unless --config sets "
                   "sampling.randomise; a resumed run keeps its own]")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16"]), default=None,
              help="Training precision (saved models are float32).  [default: float32]")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multiworker"]), default=None,
              help="tf.distribute strategy; auto: multi-worker with TF_CONFIG, mirrored on several GPUs.  [default: auto]")
@click.option("--spacing", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Isotropic voxel size (mm) of the internal frame.  [default: 1.0]")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON file of TrainConfig settings; options given here override it. With --resume the "
                   "run's own settings are used instead.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Preprocessing cache (`vfdetect preprocess`); missing or stale cases are prepared and added.")
@click.option("--keep-epoch-models", is_flag=True,
              help="Also keep the weights after every epoch (model_epoch<NNN>.keras in --out).")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
def command(
    manifest: Path,
    labels_dir: Path,
    run_dir: Path,
    data_root: Path | None,
    grades: Path | None,
    config_file: Path | None,
    resume: bool,
    cache_dir: Path | None,
    keep_epoch_models: bool,
    quiet: bool,
    randomise: bool | None,
    **options: Any,
) -> None:
    """Train the dual-pathway network on MANIFEST's cases and their label images.

    model.keras is the epoch with the highest fracture-vs-normal voxel AUC on class-balanced
    validation segments (ties: mean recall of the normal and fracture classes); see report.json's
    checkpoint_selection. Label voxels 255 (vertebrae of unknown class) add no loss.
    """
    from vfdetect.errors import InputError, VfdetectError
    from vfdetect.labels import read_label_min_grade
    from vfdetect.settings import Layer, dataclass_keys, read_settings_file, resolve_settings
    from vfdetect.train import TrainConfig, run_training
    from vfdetect.vertebrae import read_manifest

    saved_config = run_dir / "config.json"
    if resume and not saved_config.is_file():
        raise InputError(run_dir, "holds no training run to resume (no config.json); leave out --resume to start one")
    layers = [Layer("defaults", {})]
    if resume:
        saved = read_settings_file(saved_config, "a run configuration")
        if not isinstance(saved.get("train_config"), dict):
            raise InputError(saved_config, "unreadable run configuration: no 'train_config' object")
        layers.append(Layer(saved_config, saved["train_config"]))
    elif config_file is not None:
        layers.append(Layer(config_file, read_settings_file(config_file, "training settings")))
    layers.append(Layer("command line", {_CONFIG_OPTIONS[name]: value for name, value in options.items()}))
    settings = resolve_settings(dataclass_keys(TrainConfig), layers, what="training setting(s)")
    if "min_grade" not in settings:
        label_min_grade = read_label_min_grade(labels_dir)
        if label_min_grade is not None:
            settings["min_grade"] = label_min_grade
    if randomise is None and not resume and "randomise" not in (settings.get("sampling") or {}):
        # On by default for new runs: it lifted the real-anatomy score (README, "Real anatomy").
        randomise = True
    if randomise is not None:
        settings["sampling"] = _sampling_with_randomise(settings.get("sampling") or {}, randomise).to_dict()
    try:
        config = TrainConfig.from_dict(settings)  # a bad setting raises TrainConfigError naming it
    except (VfdetectError, TypeError) as error:
        source = layers[1].source if len(layers) > 2 else "command line"
        raise InputError(source if isinstance(source, Path) else None, str(error)) from None

    cases = read_manifest(manifest, data_root=data_root, grades=grades)
    _check_before_work(manifest, grades, cases, labels_dir, run_dir)
    run_training(cases, labels_dir, run_dir, config, resume=resume, quiet=quiet, cache_dir=cache_dir,
                 keep_epoch_models=keep_epoch_models)
    if not quiet:
        click.echo(_summary(run_dir))


def _check_before_work(manifest: Path, grades: Path | None, cases: list[Any], labels_dir: Path, run_dir: Path) -> None:
    """Refuse, before training starts: cases with neither centroids nor a label image (they would hold
    no vertebra), scans that are not CT in HU, an unwritable run folder and run files that are inputs."""
    from vfdetect.errors import InputError
    from vfdetect.fileio import check_writable_folder, refuse_overwriting_inputs
    from vfdetect.layout import LabelFolder, RunFolder, fixed_files
    from vfdetect.volume import check_ct_scan

    labels = LabelFolder(labels_dir)
    # A case without centroids trains on a label image made elsewhere; with neither, it has no labels.
    without = [case.case for case in cases if case.centroids is None and not labels.image(case.case).is_file()]
    if without:
        raise InputError(manifest, f"{len(without)} case(s) without centroids and without a label image in "
                                   f"{labels_dir} ({', '.join(without[:5])}); training needs every vertebra "
                                   "annotated (a centroids column with a file per case, or hand-made label images)")
    from vfdetect.manifest import default_grades_path

    inputs = [manifest, grades or default_grades_path(manifest), *(case.image for case in cases), *(case.centroids for case in cases),
              *(labels.image(case.case) for case in cases)]
    refuse_overwriting_inputs(fixed_files(RunFolder(run_dir)), inputs)
    check_writable_folder(run_dir)
    for case in cases:
        check_ct_scan(case.image)


def _sampling_with_randomise(values: Any, randomise: bool) -> Any:
    """The sampling settings ``values`` (a dict or a SamplingConfig) with domain randomisation on or off.

    On: :meth:`SamplingConfig.randomised` with the settings given in ``values`` kept; off: the same
    settings with ``randomise`` false.
    """
    import dataclasses

    from vfdetect.sampling import SamplingConfig

    given = values.to_dict() if isinstance(values, SamplingConfig) else dict(values)
    base = SamplingConfig.from_dict(given)
    if not randomise:
        return dataclasses.replace(base, randomise=False)
    kept = {name: getattr(base, name) for name in given if name != "randomise"}
    return SamplingConfig.randomised(**kept)


def _summary(run_dir: Path) -> str:
    """One line on the finished epochs and the checkpoint kept as model.keras."""
    from vfdetect.train import read_log

    rows = read_log(run_dir / "log.csv") if (run_dir / "log.csv").is_file() else []
    if not rows:
        return f"run folder {run_dir}: no epoch finished"
    try:
        selection = json.loads((run_dir / "report.json").read_text())["checkpoint_selection"]
    except (OSError, ValueError, KeyError):
        return f"trained {len(rows)} epoch(s) into {run_dir}"

    def number(value: Any) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"

    return (
        f"trained {len(rows)} epoch(s) into {run_dir}: model.keras is epoch {selection['best_epoch']} "
        f"({selection['measure']} {number(selection['measure_value'])}, {selection['tie_break']} "
        f"{number(selection['tie_break_value'])}); last epoch {selection['measure']} "
        f"{number(rows[-1].get(selection['measure']))}"
    )
