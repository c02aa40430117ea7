"""The real-anatomy score: leave one anatomy out, recipes (a)-(d), one table.

For every real scan with a vertebra mask (``data_manifests/real_anatomy.csv``) the models are
trained without any version of it and scored on simulated-fracture versions of it whose
acquisition was varied (rotation, crop, noise, storage orientation and dtype), next to the same
model's score on held-out phantoms. Recipes (``experiments/real_anatomy.json``):

- (a) phantoms in which the fractured patients have the lower bone density (the old shortcut);
- (b) de-confounded phantoms;
- (c) (b) + domain randomisation of the training segments;
- (d) (c) + simulated fractures planted in the *other* real anatomies, with a fixed sampling share.

(a)-(c) see no real anatomy, so one model each serves every held-out anatomy; (d) is trained once
per held-out anatomy. Every stage is skipped when its output exists, and training resumes, so the
same command continues an interrupted run::

    python experiments/real_anatomy.py --out work/real-anatomy [--recipes a,b,c,d] [--held-out sub-verse014]

Writes ``real_anatomy.json`` and ``real_anatomy.md`` (the table) into ``--out`` (another name with
the configuration's ``"results_name"``).

A recipe may override the training ``"variant"`` and ``"epochs"`` (model selection on the real-anatomy
data: ``experiments/model_selection_real.json``), and may be the first epochs of another recipe's
run (``"first_epochs_of": {"recipe": "d", "epochs": 10}``): with the same seed, data and plateau
schedule the first N epochs of a longer run are exactly a run of N epochs, so its ``model.keras``
is the kept epoch model (``"keep_epoch_models": true`` in the configuration) that the checkpoint
rule would have chosen among epochs 1..N.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "real"


def _vfdetect(*args: str) -> None:
    command = [sys.executable, "-m", "vfdetect.cli", *args]
    print("+ vfdetect " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def _absolute(rows: list[dict[str, str]], folder: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows with their file columns made absolute (manifests of several folders are merged)."""
    out = []
    for row in rows:
        row = dict(row)
        for column in columns:
            if row.get(column):
                row[column] = str((folder / row[column]).resolve())
        out.append(row)
    return out


def _anatomy_of(case: str, anatomies: list[str]) -> str:
    matches = [name for name in anatomies if case == name or case.startswith(name + "-")]
    if not matches:
        raise SystemExit(f"simulated case {case!r} matches no anatomy of the anatomies manifest")
    return max(matches, key=len)


class Experiment:
    def __init__(self, config: dict[str, Any], out: Path, data_root: Path, score_only: bool = False) -> None:
        self.config = config
        self.score_only = score_only
        self.out = out
        self.data_root = data_root
        self.labels = out / "labels"
        anatomies_manifest = REPO / config["anatomies"]
        self.anatomies = [row["case"] for row in _read_rows(anatomies_manifest)]
        self.anatomies_manifest = anatomies_manifest

    # -- data ------------------------------------------------------------------------------
    def phantoms(self, kind: str, split: str) -> Path:
        settings = self.config["phantoms"]
        folder = self.out / "phantoms" / kind / split
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            args = ["phantoms", "--out", str(folder), "--cases", str(settings[f"{split}_cases"]),
                    "--seed", str(settings[f"{split}_seed"]), "--workers", "2", "--quiet"]
            if settings.get("config"):
                args += ["--config", str(REPO / settings["config"])]
            if split == "test":
                args += ["--negative-fraction", str(settings["test_negative_fraction"])]
            if kind == "correlated":
                args += ["--density-fracture-correlation"]
            _vfdetect(*args)
        self.synth_labels(manifest)
        return manifest

    def simulated(self, split: str) -> Path:
        settings = self.config["simulate"]
        folder = self.out / "real" / split
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            args = ["simulate-fractures", str(self.anatomies_manifest), "--data-root", str(self.data_root),
                    "--out", str(folder), "--seed", str(settings[f"{split}_seed"]),
                    "--copies", str(settings[f"{split}_copies"]), "--quiet"]
            args += ["--fracture-prevalence", str(settings[f"{split}_fracture_prevalence"]),
                     "--negative-fraction", str(settings[f"{split}_negative_fraction"]), "--vary-acquisition"]
            _vfdetect(*args)
        if split == "train":
            self.synth_labels(manifest)
        return manifest

    def labels_of(self, manifest: Path) -> Path:
        """The label folder of one data set (case ids repeat between phantom sets, so one folder each)."""
        return self.labels / "-".join(manifest.parent.relative_to(self.out).parts)

    def synth_labels(self, manifest: Path) -> None:
        labels = self.labels_of(manifest)
        missing = [row["case"] for row in _read_rows(manifest)
                   if not (labels / f"{row['case']}_labels.nii.gz").is_file()]
        if missing:
            _vfdetect("synth-labels", str(manifest), "--out", str(labels), "--no-preview", "--quiet")

    def link_labels(self, source: Path, cases: list[tuple[str, str]], target: Path) -> None:
        """Give a run's label folder the label images of ``cases`` ((id in source, id in the run))."""
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "label_config.json", target / "label_config.json")
        for old, new in cases:
            link = target / f"{new}_labels.nii.gz"
            if not link.exists():
                link.symlink_to(source / f"{old}_labels.nii.gz")

    def training_manifest(self, recipe: str, held_out: str | None) -> Path:
        spec = self.config["recipes"][recipe]
        phantom_manifest = self.phantoms(spec["phantoms"], "train")
        name = recipe if held_out is None else f"{recipe}-without-{held_out}"
        folder = self.out / "runs" / name
        manifest = folder / "train.csv"
        labels = folder / "labels"
        # Case ids get their data set as a prefix: phantom sets reuse the same ids.
        prefix = f"{spec['phantoms']}-"
        phantom_rows = _absolute(_read_rows(phantom_manifest), phantom_manifest.parent, ("image", "centroids"))
        self.link_labels(self.labels_of(phantom_manifest), [(r["case"], prefix + r["case"]) for r in phantom_rows],
                         labels)
        rows = [dict(row, case=prefix + row["case"], source="phantoms") for row in phantom_rows]
        grade_rows = [dict(row, case=prefix + row["case"]) for row in _read_rows(phantom_manifest.parent / "grades.csv")]
        if spec["real"]:
            real_manifest = self.simulated("train")
            real_rows = [
                dict(row, source="real")
                for row in _absolute(_read_rows(real_manifest), real_manifest.parent, ("image", "centroids", "mask"))
                if _anatomy_of(row["case"], self.anatomies) != held_out
            ]
            self.link_labels(self.labels_of(real_manifest), [(r["case"], r["case"]) for r in real_rows], labels)
            if not real_rows:
                raise SystemExit(f"recipe {recipe}: no simulated real scan left without {held_out}")
            share = float(self.config["real_share"])
            for row in rows:
                row["weight"] = f"{(1.0 - share) / len(rows):.6g}"
            for row in real_rows:
                row["weight"] = f"{share / len(real_rows):.6g}"
            rows += real_rows
            kept = {row["case"] for row in real_rows}
            grade_rows += [row for row in _read_rows(real_manifest.parent / "grades.csv") if row["case"] in kept]
        _write_rows(manifest, rows, ["case", "image", "centroids", "source", "weight"])
        _write_rows(folder / "train_grades.csv", grade_rows, ["case", "label", "grade"])
        return manifest

    # -- training and scoring ----------------------------------------------------------------
    def train(self, recipe: str, held_out: str | None) -> Path:
        spec = self.config["recipes"][recipe]
        if "first_epochs_of" in spec:
            return self.first_epochs(recipe, held_out)
        if self.score_only:
            name = recipe if held_out is None else f"{recipe}-without-{held_out}"
            run = self.out / "runs" / name / "run"
            if not (run / "model.keras").is_file():
                raise SystemExit(f"--score-only: {run} holds no model.keras yet")
            return run
        manifest = self.training_manifest(recipe, held_out)
        run = manifest.parent / "run"
        settings = dict(self.config["train"])
        settings.update({key: spec[key] for key in ("variant", "epochs") if key in spec})
        config_file = manifest.parent / "train_config.json"
        config_file.write_text(json.dumps(settings, indent=2) + "\n")
        report = run / "report.json"
        finished = report.is_file() and json.loads(report.read_text()).get("status") == "finished"
        if not finished:
            args = ["train", str(manifest), "--labels", str(manifest.parent / "labels"), "--out", str(run),
                    "--grades", str(manifest.parent / "train_grades.csv"), "--quiet"]
            args += ["--resume"] if (run / "config.json").is_file() else ["--config", str(config_file)]
            args += ["--randomise"] if spec["randomise"] else ["--no-randomise"]
            if self.config.get("keep_epoch_models"):
                args += ["--keep-epoch-models"]
            _vfdetect(*args)
        return run

    def first_epochs(self, recipe: str, held_out: str | None) -> Path:
        """A run folder holding the first ``epochs`` epochs of another recipe's (longer) run."""
        from vfdetect.layout import RunFolder
        from vfdetect.train import TrainConfig
        from vfdetect.train.checkpoints import read_log
        from vfdetect.train.selection import best_epoch_index

        source = self.config["recipes"][recipe]["first_epochs_of"]
        epochs = int(source["epochs"])
        suffix = "" if held_out is None else f"-without-{held_out}"
        longer = RunFolder(self.out / "runs" / f"{source['recipe']}{suffix}" / "run")
        log = read_log(longer.log) if longer.log.is_file() else []
        if len(log) < epochs or not longer.epoch_model(epochs).is_file():
            raise SystemExit(f"recipe {recipe}: {longer.path} has not kept {epochs} epoch models yet "
                             "(train it first, with keep_epoch_models)")
        rule = json.loads(longer.report.read_text())["checkpoint_selection"]["rule"]
        best = best_epoch_index(log[:epochs], rule)  # the training loop's own rule, among epochs 1..N
        assert best is not None
        train = TrainConfig.from_dict(json.loads(longer.config.read_text())["train_config"])
        run = RunFolder(self.out / "runs" / f"{recipe}{suffix}" / "run")
        Path(run.path).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(longer.epoch_model(best + 1), run.model)
        shutil.copyfile(longer.config, run.config)
        segments = epochs * train.subepochs * train.batches_per_subepoch * train.batch_size
        derived = {"status": "finished", "derived_from": str(longer.path), "epochs": epochs,
                   "selected_epoch": best + 1, "timings": {"segments_trained": segments}}
        run.report.write_text(json.dumps(derived, indent=2) + "\n")
        return Path(run.path)

    def predict(self, run: Path, manifest: Path, out: Path) -> Path:
        if not (out / "summary.csv").is_file():
            _vfdetect("predict", "--model", str(run), "--manifest", str(manifest), "--out", str(out), "--quiet",
                      "--no-overlay")
        return out

    def held_out_manifest(self, anatomy: str) -> Path:
        manifest = self.simulated("eval")
        rows = [row for row in _absolute(_read_rows(manifest), manifest.parent, ("image", "centroids", "mask"))
                if _anatomy_of(row["case"], self.anatomies) == anatomy]
        if len(rows) < 1:
            raise SystemExit(f"no evaluation copy of {anatomy}")
        folder = self.out / "eval" / anatomy
        _write_rows(folder / "manifest.csv", rows, ["case", "image", "centroids"])
        kept = {row["case"] for row in rows}
        grades = [row for row in _read_rows(manifest.parent / "grades.csv") if row["case"] in kept]
        _write_rows(folder / "grades.csv", grades, ["case", "label", "grade"])
        return folder / "manifest.csv"


def score(pred_dir: Path, manifest: Path, n_bootstrap: int, seed: int = 0) -> dict[str, Any]:
    """Vertebra AUC (graded vertebrae) and patient AUC (patient score) with bootstrap over cases."""
    from vfdetect.metrics import bootstrap_case_indices, roc_auc
    from vfdetect.vertebrae import read_grades

    grades = read_grades(manifest.with_name("grades.csv"))
    truth_v, score_v, case_v, truth_p, score_p = [], [], [], [], []
    cases = [row["case"] for row in _read_rows(manifest)]
    for index, case in enumerate(cases):
        report = json.loads((pred_dir / case / "report.json").read_text())
        graded = grades.get(case, {})
        for vertebra in report["vertebrae"]:
            grade = graded.get(int(vertebra["label"]))
            probability = vertebra.get("fracture_probability")
            if grade is None or probability is None or not np.isfinite(probability):
                continue
            truth_v.append(grade >= 1)
            score_v.append(float(probability))
            case_v.append(index)
        truth_p.append(any(g >= 1 for g in graded.values()))
        patient = report.get("patient_score", report.get("patient_fracture_probability"))
        score_p.append(float(patient) if patient is not None else 0.0)
    truth_v_a, score_v_a, case_v_a = np.asarray(truth_v), np.asarray(score_v), np.asarray(case_v)
    truth_p_a, score_p_a = np.asarray(truth_p), np.asarray(score_p)
    rng = np.random.default_rng(seed)
    resamples = bootstrap_case_indices(len(cases), n_bootstrap, rng)
    v_boot, p_boot = [], []
    for indices in resamples:
        rows = np.concatenate([np.flatnonzero(case_v_a == i) for i in indices])
        if truth_v_a[rows].any() and not truth_v_a[rows].all():
            v_boot.append(roc_auc(truth_v_a[rows], score_v_a[rows]))
        if truth_p_a[indices].any() and not truth_p_a[indices].all():
            p_boot.append(roc_auc(truth_p_a[indices], score_p_a[indices]))

    def summary(truth: np.ndarray, scores: np.ndarray, boot: list[float]) -> dict[str, Any]:
        both = truth.any() and not truth.all()
        return {
            "auc": roc_auc(truth, scores) if both else None,
            "bootstrap_sd": float(np.std(boot, ddof=1)) if len(boot) > 1 else None,
            "interval_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None,
            "n": int(truth.size),
            "n_positive": int(truth.sum()),
        }

    return {
        "cases": len(cases),
        "vertebra": summary(truth_v_a, score_v_a, v_boot),
        "patient": summary(truth_p_a, score_p_a, p_boot),
    }


def _cell(entry: dict[str, Any]) -> str:
    if entry["auc"] is None:
        return "n/a"
    sd = entry["bootstrap_sd"]
    return f"{entry['auc']:.3f} ± {sd:.3f}" if sd is not None else f"{entry['auc']:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| held-out anatomy | recipe | real: vertebra AUC | real: patient AUC | phantoms: vertebra AUC | phantoms: patient AUC | real vertebrae (fractured) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        real, phantom = row["real"], row["phantoms"]
        lines.append(
            f"| {row['held_out']} | ({row['recipe']}) {row['description']} | {_cell(real['vertebra'])} | "
            f"{_cell(real['patient'])} | {_cell(phantom['vertebra'])} | {_cell(phantom['patient'])} | "
            f"{real['vertebra']['n']} ({real['vertebra']['n_positive']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "experiments" / "real_anatomy.json")
    parser.add_argument("--out", type=Path, default=REPO / "work" / "real-anatomy")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("VFDETECT_REAL_DATA", DEFAULT_DATA_ROOT)))
    parser.add_argument("--recipes", default=None, help="comma-separated subset of the config's recipes")
    parser.add_argument("--held-out", action="append", default=None, help="held-out anatomy (repeatable)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the runs' current model.keras without (re)starting training (a run stopped early)")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    if config.get("experiment") != "real_anatomy":
        raise SystemExit(f"{args.config}: not a real_anatomy experiment file")
    recipes = args.recipes.split(",") if args.recipes else list(config["recipes"])
    held_out = args.held_out or list(config["held_out"])
    unknown = [r for r in recipes if r not in config["recipes"]]
    if unknown:
        raise SystemExit(f"{args.config}: unknown recipe(s) {unknown}")
    experiment = Experiment(config, args.out, args.data_root, args.score_only)
    n_bootstrap = int(config.get("n_bootstrap", 1000))
    phantom_test = experiment.phantoms("default", "test")
    results_name = config.get("results_name", "real_anatomy")
    results_path = args.out / f"{results_name}.json"
    results: list[dict[str, Any]] = []
    for recipe in recipes:
        spec = config["recipes"][recipe]
        shared_run = None if spec["real"] else experiment.train(recipe, None)
        for anatomy in held_out:
            run = shared_run if shared_run is not None else experiment.train(recipe, anatomy)
            eval_manifest = experiment.held_out_manifest(anatomy)
            real_pred = experiment.predict(run, eval_manifest, run.parent / "predictions" / anatomy)
            phantom_pred = experiment.predict(run, phantom_test, run.parent / "predictions" / "phantoms")
            progress = json.loads((run / "report.json").read_text())
            results.append({
                "held_out": anatomy,
                "recipe": recipe,
                "description": spec["description"],
                "run": str(run),
                "training_status": progress.get("status"),
                "segments_trained": progress.get("timings", {}).get("segments_trained"),
                "real": score(real_pred, eval_manifest, n_bootstrap),
                "phantoms": score(phantom_pred, phantom_test, n_bootstrap),
            })
            results_path.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
            (args.out / f"{results_name}.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
