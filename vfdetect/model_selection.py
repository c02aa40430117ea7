"""Model selection (paper section 3.2): the three variants trained on one split and compared.

The variants (1slice, 5slices, 3d) are trained on one seeded split (68/22 in the paper, i.e.
about 24 % validation) with the same regime and compared on voxel accuracy and vertebra-level AUC
on the validation cases; one validation case is recorded for the paper's Figure 3. The stages are
those of :mod:`vfdetect.stages`. Output folder: see :class:`vfdetect.layout.ModelSelectionFolder`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic, write_text_atomic
from vfdetect.jsonutil import format_value, json_safe
from vfdetect.layout import LabelFolder, ModelSelectionFolder, PredictionFolder, RunFolder
from vfdetect.stages import (
    Stages,
    default_stages,
    ensure_labels,
    is_positive,
    metrics_summary,
    stratified_holdout,
    train_and_predict,
)

VARIANTS: tuple[str, ...] = ("1slice", "5slices", "3d")
PAPER_MODEL_SELECTION_VALIDATION_FRACTION = 22 / 90
"""The paper's model-selection split: 68 training and 22 validation cases of 90."""


@dataclass(frozen=True)
class ModelSelectionConfig:
    """Settings of the model-selection experiment (paper section 3.2)."""

    variants: tuple[str, ...] = VARIANTS
    validation_fraction: float = PAPER_MODEL_SELECTION_VALIDATION_FRACTION
    seed: int = 0
    min_grade: int = 1
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise VfdetectError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise VfdetectError("the model-selection validation fraction must lie in (0, 1)")


def voxel_agreement(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Voxel accuracy of hard labels 0/1/2: overall, per reference class, and inside the vertebrae.

    ``vertebra_accuracy`` counts only reference voxels labelled 1 or 2 (the overall figure is
    dominated by background); ``mean_class_recall`` averages the three per-class recalls.
    """
    predicted = np.asarray(predicted).reshape(-1)
    reference = np.asarray(reference).reshape(-1)
    if predicted.shape != reference.shape:
        raise VfdetectError(f"label images differ in size: {predicted.size} vs {reference.size} voxels")
    result: dict[str, float] = {"accuracy": float(np.mean(predicted == reference)) if reference.size else math.nan}
    recalls = []
    for value, key in ((0, "background"), (1, "normal"), (2, "fracture")):
        members = reference == value
        recall = float(np.mean(predicted[members] == value)) if members.any() else math.nan
        result[f"{key}_recall"] = recall
        if not math.isnan(recall):
            recalls.append(recall)
    vertebra = reference > 0
    result["vertebra_accuracy"] = float(np.mean(predicted[vertebra] == reference[vertebra])) if vertebra.any() else math.nan
    result["mean_class_recall"] = float(np.mean(recalls)) if recalls else math.nan
    result["voxels"] = float(reference.size)
    return result


def validation_voxel_agreement(cases: Sequence[Any], pred_dir: Path, labels_dir: Path) -> dict[str, float]:
    """:func:`voxel_agreement` over all validation cases together (predicted ``labels.nii.gz`` vs label images).

    Both are on the scan's own grid (prediction and label synthesis save there).
    """
    from vfdetect.volume import load_label_image

    predicted_parts, reference_parts = [], []
    for case in cases:
        predicted_path = PredictionFolder(Path(pred_dir)).case(case.case).labels
        reference_path = LabelFolder(Path(labels_dir)).image(case.case)
        for path in (predicted_path, reference_path):
            if not path.is_file():
                raise InputError(path, "label image not found")
        predicted = load_label_image(predicted_path)[0].array.astype(np.uint8)
        reference = load_label_image(reference_path)[0].array.astype(np.uint8)
        if predicted.shape != reference.shape:
            raise InputError(predicted_path, f"grid {predicted.shape} differs from the label image's {reference.shape}")
        predicted_parts.append(predicted.reshape(-1))
        reference_parts.append(reference.reshape(-1))
    if not predicted_parts:
        raise VfdetectError("no validation case to measure voxel accuracy on")
    return voxel_agreement(np.concatenate(predicted_parts), np.concatenate(reference_parts))


def training_log_summary(run_dir: Path) -> dict[str, Any]:
    """Best validation accuracy and parameter count from a run folder (what exists of them)."""
    summary: dict[str, Any] = {}
    run = RunFolder(Path(run_dir))
    try:
        description = json.loads(run.config.read_text())
        summary["trainable_parameters"] = description.get("trainable_parameters")
    except (OSError, ValueError):
        pass
    log = run.log
    if log.is_file():
        import csv

        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = [c for c in (rows[0].keys() if rows else []) if "val" in c and "acc" in c]
        if columns:
            values = [float(row[columns[0]]) for row in rows if row.get(columns[0]) not in ("", None)]
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                summary["best_validation_segment_accuracy"] = max(finite)
                summary["validation_accuracy_column"] = columns[0]
        summary["epochs_logged"] = len(rows)
    return summary


def figure3_case(cases: Sequence[Any], min_grade: int = 1) -> str:
    """The validation case shown in Figure 3: the one with the most fractured vertebrae (then by name)."""
    if not cases:
        raise VfdetectError("no validation case")
    return sorted(cases, key=lambda c: (-sum(int(g) >= min_grade for g in c.grades.values()), c.case))[0].case


def run_model_selection(
    cases: Sequence[Any],
    out_dir: Path,
    config: ModelSelectionConfig = ModelSelectionConfig(),
    stages_for_variant: Callable[[str], Stages] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train each variant on one seeded split and compare them on the validation cases.

    Writes ``split.json``, ``labels/``, ``<variant>/{run,predictions,evaluation}/``,
    ``<variant>/variant.json`` (finished marker: a finished variant is reused),
    ``model_selection.json`` (comparison and the Figure 3 case) and ``model_selection.md``.
    """
    stages_for_variant = stages_for_variant or (
        lambda variant: default_stages({"variant": variant, "min_grade": config.min_grade})
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = ModelSelectionFolder(out_dir)
    say = progress or (lambda message: None)
    by_name = {case.case: case for case in cases}
    split_path = folder.split
    settings = {"validation_fraction": config.validation_fraction, "seed": config.seed, "min_grade": config.min_grade}
    if split_path.is_file():
        saved = json.loads(split_path.read_text())
        if saved.get("settings") != settings or sorted(saved["train"] + saved["validation"]) != sorted(by_name):
            raise InputError(split_path, "was made for other cases or settings; use another --out folder or delete it")
        train_names, validation_names = saved["train"], saved["validation"]
    else:
        positives = sorted(c.case for c in cases if is_positive(c, config.min_grade))
        negatives = sorted(c.case for c in cases if not is_positive(c, config.min_grade))
        train_names, validation_names = stratified_holdout(positives, negatives, config.validation_fraction,
                                                           np.random.default_rng([config.seed, 0x35]))
        if not validation_names:
            raise VfdetectError("model selection needs at least 2 cases")
        write_json_atomic(split_path, {"settings": settings, "train": sorted(train_names),
                                       "validation": sorted(validation_names)})
    train_cases = [by_name[n] for n in sorted(train_names)]
    validation_cases = [by_name[n] for n in sorted(validation_names)]
    labels_dir = folder.labels.path
    ensure_labels(cases, labels_dir, stages_for_variant(config.variants[0]))
    rows: list[dict[str, Any]] = []
    for variant in config.variants:
        stages = stages_for_variant(variant)
        variant_folder = folder.variant(variant)
        done = variant_folder.done
        if done.is_file():
            say(f"{variant}: finished earlier, reused")
            rows.append(json.loads(done.read_text()))
            continue
        started = time.perf_counter()
        run_dir, pred_dir = variant_folder.run.path, variant_folder.predictions.path
        train_and_predict(stages, train_cases, validation_cases, labels_dir, run_dir, validation_cases, pred_dir,
                          "validation", say)
        metrics = stages.evaluate(validation_cases, [pred_dir], variant_folder.evaluation.path,
                                  min_grade=config.min_grade, n_bootstrap=config.n_bootstrap, seed=config.seed)
        row = {
            "variant": variant,
            "seconds": round(time.perf_counter() - started, 1),
            "voxels": json_safe(validation_voxel_agreement(validation_cases, pred_dir, labels_dir)),
            **training_log_summary(run_dir),
            **metrics_summary(metrics),
        }
        write_json_atomic(done, row)
        rows.append(row)
    document = {
        "experiment": "model_selection",
        "settings": asdict(config),
        "provenance": dict(provenance or {}),
        "train": sorted(train_names),
        "validation": sorted(validation_names),
        "figure3_case": figure3_case(validation_cases, config.min_grade),
        "figure3_image": str(by_name[figure3_case(validation_cases, config.min_grade)].image),
        "variants": rows,
    }
    write_json_atomic(folder.summary, document)
    write_text_atomic(folder.summary_markdown, model_selection_markdown(document))
    return document


def _interval(values: Any) -> str:
    low, high = values if isinstance(values, list | tuple) and len(values) == 2 else (None, None)
    return f"{format_value(low)} - {format_value(high)}"


def model_selection_markdown(document: Mapping[str, Any]) -> str:
    """Readable comparison table of :func:`run_model_selection`."""

    fmt = format_value

    lines = [
        "# Model selection (paper section 3.2, Table 1)",
        "",
        f"Training cases: {len(document['train'])}; validation cases: {len(document['validation'])}. "
        f"Figure 3 case: {document['figure3_case']}.",
        "",
        "| variant | trainable parameters | validation voxel accuracy | accuracy inside vertebrae | "
        "mean class recall | best validation segment accuracy | vertebra AUC (95 % interval) | patient AUC (95 % "
        "interval) | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in document["variants"]:
        voxels = row.get("voxels", {})
        lines.append(
            f"| {row['variant']} | {fmt(row.get('trainable_parameters'))} | {fmt(voxels.get('accuracy'))} | "
            f"{fmt(voxels.get('vertebra_accuracy'))} | {fmt(voxels.get('mean_class_recall'))} | "
            f"{fmt(row.get('best_validation_segment_accuracy'))} | {fmt(row.get('vertebra_auc'))} "
            f"({_interval(row.get('vertebra_auc_interval95'))}) | {fmt(row.get('patient_auc'))} "
            f"({_interval(row.get('patient_auc_interval95'))}) | {fmt(row.get('seconds'))} |"
        )
    return "\n".join(lines) + "\n"
