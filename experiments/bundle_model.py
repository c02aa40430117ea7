"""Put a trained run into the package as a bundled model, with its model card.

Reads the output folder of ``experiments/real_anatomy.py`` run with a one-recipe configuration
(``experiments/bundled_model.json``), and writes ``vfdetect/models/<name>.keras``,
``<name>.json`` and ``MODEL_CARD.md``::

    python experiments/bundle_model.py work/bundled-model --name vfdetect-3d-realct

The patient threshold is chosen on the run's own validation cases (never on the evaluation
cases): the cut on the patient score with the highest Youden's J, midway between neighbouring
scores; 0.5 when the validation cases are all of one class. Every figure in the card is read from
the saved evaluation, none is typed in.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 5 * 1024 * 1024


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The cut with the highest Youden's J (ties: the higher cut), midway between neighbours."""
    truth = np.asarray(truth, bool)
    scores = np.asarray(scores, float)
    if truth.all() or not truth.any():
        return None
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    best, best_j = 0.5, -np.inf
    for cut in cuts:
        called = scores >= cut
        j = called[truth].mean() - called[~truth].mean()
        if j >= best_j:
            best, best_j = float(cut), j
    return best


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def validation_threshold(run: Path, out: Path) -> dict[str, Any]:
    """Predict the run's validation cases and choose the patient threshold on them."""
    config = json.loads((run / "config.json").read_text())
    names = set(config.get("validation_cases", []))
    manifest = run.parent / "train.csv"
    rows = [row for row in _rows(manifest) if row["case"] in names]
    if not rows:
        return {"threshold": 0.5, "rule": "fixed 0.5 (no validation case)", "cases": 0}
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "centroids"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    predictions = folder / "predictions"
    if not all((predictions / row["case"] / "report.json").is_file() for row in rows):
        # Predictions of another run's validation cases (a stale folder) are replaced.
        shutil.rmtree(predictions, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "vfdetect.cli", "predict", "--model", str(run), "--manifest",
                        str(folder / "manifest.csv"), "--out", str(predictions), "--quiet", "--no-overlay"],
                       check=True)
    grades: dict[str, list[int]] = {}
    for row in _rows(run.parent / "train_grades.csv"):
        grades.setdefault(row["case"], []).append(int(row["grade"]))
    truth, scores = [], []
    for row in rows:
        report = json.loads((predictions / row["case"] / "report.json").read_text())
        score = report.get("patient_score")
        truth.append(any(g >= 1 for g in grades.get(row["case"], [])))
        scores.append(float(score) if score is not None else 0.0)
    threshold = youden_threshold(np.asarray(truth), np.asarray(scores))
    if threshold is None:
        return {"threshold": 0.5, "rule": "fixed 0.5 (validation cases all of one class)", "cases": len(rows)}
    return {
        "threshold": round(threshold, 4),
        "rule": "highest Youden's J of the patient score on the run's validation cases",
        "cases": len(rows),
        "positives": int(np.sum(truth)),
    }


def _progress(report: dict[str, Any], train: dict[str, Any]) -> str:
    """How far the run got and which epoch the shipped weights are."""
    per_epoch = int(train["subepochs"]) * int(train["segments_per_subepoch"])
    done, best = int(report.get("epochs_done", 0)), report.get("best_epoch")
    trained = int(report.get("timings", {}).get("segments_trained", 0))
    if report.get("status") == "finished":
        text = f"The run finished ({trained:,} segments)."
    else:
        text = (f"The run was stopped after epoch {done} of {train['epochs']} ({trained:,} segments; "
                "the full schedule is what `make bundled-model` runs).")
    if best is not None:
        text += f" The weights are those of epoch {best} ({int(best) * per_epoch:,} segments), the checkpoint rule's choice."
    return text


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


def _cell(entry: dict[str, Any]) -> str:
    if entry.get("auc") is None:
        return "n/a"
    low, high = entry["interval_95"]
    return f"{entry['auc']:.3f} (sd {entry['bootstrap_sd']:.3f}; 95 % interval {low:.3f}-{high:.3f})"


def card_text(name: str, run: Path, results: list[dict[str, Any]], experiment: dict[str, Any],
              threshold: dict[str, Any], size: int, machine: str) -> str:
    config = json.loads((run / "config.json").read_text())
    train = config.get("train_config", config)
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
    timings = report.get("timings", {})
    segments = int(train["epochs"]) * int(train["subepochs"]) * int(train["segments_per_subepoch"])
    lines = [
        f"# Model card: {name}",
        "",
        "Research use only. Not a medical device; not validated for clinical decisions.",
        "",
        "## What it is",
        f"- The {train['variant']} variant of the dual-pathway network (Nicolaes et al. 2019), "
        f"{config.get('trainable_parameters', 'about 230K')} trainable parameters, float32 weights, "
        f"{size / 1024:.0f} KiB. Input: any CT the package reads; works on the 1 mm RAS internal grid.",
        f"- Output per voxel: p(background), p(normal vertebra), p(fractured vertebra); per vertebra the "
        f"Gaussian-weighted cube mean of p(fracture); per patient `patient_score` = the highest vertebra "
        f"score (the sacrum, and vertebrae within 10 mm of the scan's edge, count only when no other was "
        f"scored), `patient_fracture` = `patient_score >= {threshold['threshold']}` ({threshold['rule']}, "
        f"{threshold['cases']} cases).",
        "",
        "## Training data and regime",
        f"- {experiment['description']}",
        f"- Phantoms: {experiment['phantoms']['train_cases']} synthetic spine CTs (`vfdetect phantoms`, seed "
        f"{experiment['phantoms']['train_seed']}), bone density independent of fracture status.",
        f"- Real anatomy: fractures simulated (`vfdetect simulate-fractures`, {experiment['simulate']['train_copies']} "
        f"copies per scan, seed {experiment['simulate']['train_seed']}) in the real scans of "
        f"`data_manifests/real_anatomy.csv` except the held-out {', '.join(experiment['held_out'])}; "
        f"sampling share of the real scans {experiment['real_share']}.",
        f"- Schedule {segments:,} training segments ({train['epochs']} epochs x {train['subepochs']} subepochs x "
        f"{train['segments_per_subepoch']}), batch {train['batch_size']}, {train['precision']}, domain "
        f"randomisation on. {_progress(report, train)} Training time "
        f"{timings.get('elapsed_s', float('nan')) / 60:.0f} min ({timings.get('segments_per_s', float('nan')):.1f} "
        f"segments/s) on {machine}.",
        f"- Checkpoint kept: {json.dumps(report.get('checkpoint_selection', {}).get('description', 'see run report'))}.",
        "",
        "## Measured (bootstrap over cases, n=1000)",
        "",
        "| evaluation set | vertebra AUC | patient AUC (patient_score) | vertebrae (fractured) | cases |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for key, label in (("real", f"held-out real anatomy {result['held_out']}: simulated fractures, "
                                    "acquisition varied"), ("phantoms", "held-out phantoms")):
            entry = result[key]
            lines.append(f"| {label} | {_cell(entry['vertebra'])} | {_cell(entry['patient'])} | "
                         f"{entry['vertebra']['n']} ({entry['vertebra']['n_positive']}) | {entry['cases']} |")
    lines += [
        "",
        "Reproduce: `make bundled-model` (runs `experiments/real_anatomy.py --config "
        "experiments/bundled_model.json` and this script).",
        "",
        "## Known limits",
        "- No real fracture was seen in training: fractures are synthetic (phantoms) or simulated by a "
        "smooth collapse of real vertebral bodies. Real fractures with fragments, sclerosis or "
        "retropulsion may look different.",
        "- Only a handful of real anatomies exist in training; the real-anatomy score above comes from "
        "one held-out scan in several acquisitions, so its interval is wide and it does not measure "
        "variation between patients.",
        "- Scores are not calibrated probabilities. The patient threshold was chosen on validation cases "
        "of the training distribution.",
        "- Vertebrae must be found (given centroids, or the built-in localisation); a vertebra missed by "
        "the localisation gets no score. Without centroids the localisation keeps the best head-to-foot "
        "chain of bodies (bone beside the column, such as iliac wings and femoral heads, is dropped), but "
        "it can still keep a fragment of a body at the end of the scan and its names are guesses: give "
        "centroids (a VerSe JSON, or a vertebra mask such as TotalSegmentator's) whenever you can; the "
        "scores above use given centroids.",
        "- A vertebra cut by the edge of the field of view can look collapsed and score high; such "
        "vertebrae were left ungraded in the evaluation above, and the patient score leaves out "
        "vertebrae within 10 mm of the scan's edge.",
        "",
        f"Written {datetime.date.today().isoformat()} from the run `{_shown(run)}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--models-dir", type=Path, default=REPO / "vfdetect" / "models")
    parser.add_argument("--machine", default="a 2-core x86-64 CPU without GPU", help="where the run trained")
    args = parser.parse_args(argv)
    document = json.loads((args.experiment_dir / "real_anatomy.json").read_text())
    experiment, results = document["config"], document["results"]
    runs = {result["run"] for result in results}
    if len(runs) != 1:
        raise SystemExit(f"expected one trained run in {args.experiment_dir}, found {len(runs)}")
    run = Path(runs.pop())
    weights = run / "model.keras"
    size = weights.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{weights}: {size} bytes, over the 5 MB limit for a bundled model")
    threshold = validation_threshold(run, args.experiment_dir / "bundle")
    config = json.loads((run / "config.json").read_text())
    real = [r for r in results if r.get("real", {}).get("vertebra", {}).get("auc") is not None]
    headline = (
        f"3D dual-pathway model, phantoms + simulated fractures in real CT; held-out real anatomy vertebra AUC "
        f"{real[0]['real']['vertebra']['auc']:.2f}" if real else "3D dual-pathway model"
    )
    config.update({"name": args.name, "headline": headline, "patient_threshold": threshold["threshold"],
                   "patient_threshold_rule": threshold["rule"], "card": "MODEL_CARD.md", "default": True})
    args.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, args.models_dir / f"{args.name}.keras")
    (args.models_dir / f"{args.name}.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.models_dir / "MODEL_CARD.md").write_text(card_text(args.name, run, results, experiment, threshold, size, args.machine))
    print(f"bundled {args.name} ({size / 1024:.0f} KiB), patient threshold {threshold['threshold']}")


if __name__ == "__main__":
    main()
