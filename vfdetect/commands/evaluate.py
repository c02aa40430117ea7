"""``vfdetect evaluate``: ROC, convex-hull and bootstrapped AUC from saved predictions."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json, metrics.md, roc.npz and the CSV tables.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Folder the manifest's relative paths start from (default: $VFDETECT_DATA_ROOT, else the "
                   "manifest's folder).")
@click.option("--grades", type=click.Path(path_type=Path), default=None,
              help="grades.csv (case,label,grade); default: <manifest>_grades.csv or grades.csv beside the manifest.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the cases (0: none).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the bootstrap and the centroid noise.")
@click.option("--centroid-noise-mm", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Gaussian noise (sd per axis, mm) added to the centroids before re-scoring the vertebrae "
                   "from the saved probability maps (the paper used 3); the noisy ROC becomes the main "
                   "vertebra-level result, the noise-free one from the same maps secondary.")
@click.option("--noise-draws", type=click.IntRange(min=1), default=10, show_default=True,
              help="Draws of centroid noise pooled into the vertebra-level ROC.")
@click.option("--min-grade", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Genant grade from which a vertebra counts as fractured (2: mild fractures count as normal).")
@click.option("--vertebra-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Vertebra score from which a vertebra is called fractured (per-grade and per-level tables).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def command(manifest: Path, pred_dir: Path, out_dir: Path, data_root: Path | None, grades: Path | None,
            n_bootstrap: int, seed: int, centroid_noise_mm: float, noise_draws: int, min_grade: int,
            vertebra_threshold: float, quiet: bool) -> None:
    """Evaluate the predictions in PRED_DIR (PRED_DIR/<case>/report.json) against MANIFEST's grades.

    Vertebra level: ROC of the vertebra scores. Patient level: the convex hull of all (probability
    threshold, noise threshold) classifiers, as in the paper, and the decision rule stored in the
    reports. AUCs on all cases with a 95 % percentile bootstrap interval.
    """
    from vfdetect.errors import InputError
    from vfdetect.evaluate import evaluate_predictions
    from vfdetect.layout import EvaluationFolder
    from vfdetect.vertebrae import read_manifest

    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found")
    cases = read_manifest(manifest, data_root=data_root, grades=grades)
    from vfdetect.fileio import check_writable_folder, refuse_overwriting_inputs
    from vfdetect.layout import fixed_files
    from vfdetect.manifest import default_grades_path

    refuse_overwriting_inputs(fixed_files(EvaluationFolder(out_dir)),
                              [manifest, grades or default_grades_path(manifest), pred_dir])
    check_writable_folder(out_dir)
    metrics = evaluate_predictions(
        cases, pred_dir, out_dir, min_grade=min_grade, n_bootstrap=n_bootstrap, seed=seed,
        centroid_noise_mm=centroid_noise_mm, noise_draws=noise_draws, vertebra_threshold=vertebra_threshold,
        provenance={"manifest": str(Path(manifest).resolve()), "grades": str(grades) if grades else None},
    )
    if quiet:
        return
    for key, values in metrics["excluded"].items():
        if values:
            click.echo(f"note: {len(values)} {key.replace('_', ' ')} (listed in metrics.md)", err=True)

    from vfdetect.jsonutil import format_value as fmt

    def auc(level: str) -> str:
        low, high = metrics.get(f"{level}_auc_interval95") or (None, None)
        return f"AUC {fmt(metrics.get(f'{level}_auc'))} (95 % interval {fmt(low)}-{fmt(high)})"

    noise = f", centroid noise {centroid_noise_mm:g} mm" if centroid_noise_mm > 0 else ""
    click.echo(f"patient level: {auc('patient')}, {metrics['patient_counts']['patients']} patients")
    rule = metrics.get("patient_fixed_rule")
    if rule:
        click.echo(f"patient level, rule fixed before seeing these cases: recall {fmt(rule['recall'])}, "
                   f"specificity {fmt(rule['specificity'])}")
    click.echo(f"vertebra level: {auc('vertebra')}, {metrics['vertebra_counts']['vertebrae']} vertebrae{noise}")
    click.echo(f"written: {EvaluationFolder(out_dir).metrics_markdown}")
