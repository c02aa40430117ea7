"""``vfdetect cv``: stratified k-fold cross-validation end to end (or the model-selection experiment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Experiment folder (splits.json, labels/, fold<k>/, evaluation/, cv.json); rerunning with "
                   "the same folder resumes: finished folds are not redone.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Experiment JSON (experiments/*.json); options given here override it.")
@click.option("--model-selection", is_flag=True, default=False,
              help="Run the model-selection experiment (paper 3.2: 1slice, 5slices and 3d on one split) "
                   "instead of cross-validation.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Folder the manifest's relative paths start from.")
@click.option("--grades", type=click.Path(path_type=Path), default=None, help="grades.csv of the manifest.")
@click.option("--folds", "n_folds", type=click.IntRange(min=2), default=None, help="Number of folds [5].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the split, the training and the bootstrap [0].")
@click.option("--min-grade", type=click.IntRange(1, 3), default=None,
              help="Genant grade from which a vertebra counts as fractured [1].")
@click.option("--min-negatives-per-fold", type=click.IntRange(min=0), default=None,
              help="Negative patients each fold must hold [2, the paper's rule].")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of each training fold held out for validation [0.15]; with --model-selection the "
                   "share of all cases [22/90].")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=None, help="Bootstrap resamples [1000].")
@click.option("--centroid-noise-mm", type=click.FloatRange(min=0), default=None,
              help="Also evaluate with Gaussian centroid noise of this sd per axis (paper: 3) [0: no].")
@click.option("--noise-draws", type=click.IntRange(min=1), default=None,
              help="Draws of centroid noise pooled into the vertebra-level ROC [10].")
@click.option("--patient-threshold-from", type=click.Choice(["validation", "training", "model"]), default=None,
              help="Where each fold's patient-score threshold is chosen: its validation cases, its training and "
                   "validation cases (both predicted for it), or the model's stored threshold [validation].")
@click.option("--variant", type=click.Choice(["3d", "5slices", "1slice"]), default=None,
              help="Network variant of the cross-validation [3d].")
@click.option("--variants", default=None, help="Comma-separated variants of --model-selection [1slice,5slices,3d].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs [35].")
@click.option("--subepochs", type=click.IntRange(min=1), default=None, help="Subepochs per epoch [20].")
@click.option("--segments-per-subepoch", type=click.IntRange(min=1), default=None,
              help="Training segments per subepoch [1000].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Training batch size [10].")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Initial learning rate [0.001].")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16"]), default=None,
              help="Training precision [float32].")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def command(manifest: Path, out_dir: Path, config_path: Path | None, model_selection: bool,
            data_root: Path | None, grades: Path | None, n_folds: int | None, seed: int | None,
            min_grade: int | None, min_negatives_per_fold: int | None, validation_fraction: float | None,
            n_bootstrap: int | None, centroid_noise_mm: float | None, noise_draws: int | None,
            patient_threshold_from: str | None, variant: str | None, variants: str | None,
            epochs: int | None, subepochs: int | None, segments_per_subepoch: int | None,
            batch_size: int | None, learning_rate: float | None, precision: str | None, quiet: bool) -> None:
    """Cross-validate on MANIFEST: splits, label images, train / predict / evaluate per fold, pooled evaluation."""
    from vfdetect import cv
    from vfdetect import model_selection as selection_experiment
    from vfdetect.layout import CvFolder
    from vfdetect.stages import Stages, default_stages
    from vfdetect.vertebrae import read_manifest

    document: dict[str, Any] = cv.read_experiment(config_path) if config_path else {"experiment": "cv"}
    if config_path is not None:
        _check_experiment(config_path, document)
    from vfdetect.fileio import check_writable_folder

    check_writable_folder(out_dir)
    if model_selection:
        document["experiment"] = "model_selection"
    train_options: dict[str, Any] = dict(document.get("train", {}))
    overrides = {"variant": variant, "epochs": epochs, "subepochs": subepochs,
                 "segments_per_subepoch": segments_per_subepoch, "batch_size": batch_size,
                 "learning_rate": learning_rate, "precision": precision, "seed": seed}
    train_options.update({key: value for key, value in overrides.items() if value is not None})
    predict_options: dict[str, Any] = dict(document.get("predict", {}))
    cases = read_manifest(manifest, data_root=data_root, grades=grades)
    provenance = {"manifest": str(Path(manifest).resolve()), "config": str(config_path) if config_path else None,
                  "train": train_options, "predict": predict_options}

    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    if document["experiment"] == "model_selection":
        settings: dict[str, Any] = dict(document.get("model_selection", {}))
        given: dict[str, Any] = {"seed": seed, "min_grade": min_grade, "validation_fraction": validation_fraction,
                 "n_bootstrap": n_bootstrap}
        settings.update({key: value for key, value in given.items() if value is not None})
        if variants is not None:
            settings["variants"] = [v.strip() for v in variants.split(",") if v.strip()]
        selection_config = selection_experiment.ModelSelectionConfig(**settings)
        if "seed" not in train_options:
            train_options["seed"] = selection_config.seed
        train_options.setdefault("min_grade", selection_config.min_grade)

        def stages_for(variant_name: str) -> Stages:
            return default_stages({**train_options, "variant": variant_name}, predict_options, quiet)

        selection = selection_experiment.run_model_selection(cases, out_dir, selection_config, stages_for,
                                                             provenance=provenance, progress=say)
        if not quiet:
            click.echo(selection_experiment.model_selection_markdown(selection))
        return

    settings = dict(document.get("cv", {}))
    given = {"n_folds": n_folds, "seed": seed, "min_grade": min_grade,
             "min_negatives_per_fold": min_negatives_per_fold, "validation_fraction": validation_fraction,
             "n_bootstrap": n_bootstrap, "centroid_noise_mm": centroid_noise_mm, "noise_draws": noise_draws,
             "patient_threshold_from": patient_threshold_from}
    settings.update({key: value for key, value in given.items() if value is not None})
    cv_config = cv.CvConfig(**settings)
    if "seed" not in train_options:
        train_options["seed"] = cv_config.seed
    train_options.setdefault("min_grade", cv_config.min_grade)
    stages = default_stages(train_options, predict_options, quiet)
    result = cv.run_cross_validation(cases, out_dir, cv_config, stages, provenance=provenance, progress=say)
    if quiet:
        return

    from vfdetect.jsonutil import format_value as fmt

    def auc(metrics: Any, level: str) -> str:
        low, high = metrics.get(f"{level}_auc_interval95") or (None, None)
        return f"{level} AUC {fmt(metrics.get(f'{level}_auc'))} ({fmt(low)}-{fmt(high)})"

    for name, metrics in (("pooled", result.pooled_metrics), ("centroid noise", result.noisy_metrics)):
        if metrics:
            click.echo(f"{name}: {auc(metrics, 'patient')}, {auc(metrics, 'vertebra')}")
    chosen = result.pooled_metrics.get("patient_training_threshold")
    if chosen:
        click.echo(f"patient threshold chosen on the training side of each fold: recall {fmt(chosen['recall'])}, "
                   f"specificity {fmt(chosen['specificity'])} on the test folds")
    experiment = CvFolder(Path(out_dir))
    click.echo(f"written: {experiment.summary}, {experiment.evaluation.metrics_markdown}")


def _check_experiment(path: Path, document: dict[str, Any]) -> None:
    """Refuse unknown sections of an experiment file and unknown keys in each, before any work starts."""
    from vfdetect.cv import CvConfig
    from vfdetect.model_selection import ModelSelectionConfig
    from vfdetect.predict import PredictConfig
    from vfdetect.settings import check_sections, dataclass_keys
    from vfdetect.train import TrainConfig

    check_sections(path, document, {
        "experiment": None, "description": None, "reproduces": None,
        "cv": dataclass_keys(CvConfig), "model_selection": dataclass_keys(ModelSelectionConfig),
        "train": dataclass_keys(TrainConfig), "predict": dataclass_keys(PredictConfig),
    })
