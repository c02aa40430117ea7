"""The experiment scripts' own logic (no training): a shorter run taken from a longer one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vfdetect.train.checkpoints import write_log

REPO = Path(__file__).resolve().parents[1]


def _real_anatomy_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("real_anatomy_script", REPO / "experiments" / "real_anatomy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _longer_run(folder: Path, aucs: list[float]) -> Path:
    run = folder / "runs" / "d-without-scan1" / "run"
    run.mkdir(parents=True)
    rows = [{"epoch": i + 1, "val_fracture_auc": auc, "selection_measure": auc, "val_mean_recall": 0.5}
            for i, auc in enumerate(aucs)]
    write_log(run / "log.csv", rows)
    for epoch in range(1, len(aucs) + 1):
        (run / f"model_epoch{epoch:03d}.keras").write_text(f"weights of epoch {epoch}")
    train_config = {"epochs": 30, "subepochs": 5, "segments_per_subepoch": 1000, "batch_size": 10}
    (run / "config.json").write_text(json.dumps({"train_config": train_config}))
    (run / "report.json").write_text(json.dumps({"checkpoint_selection": {"rule": "fracture_auc"},
                                                 "timings": {"segments_trained": 5000 * len(aucs)}}))
    return run


def test_the_first_epochs_of_a_longer_run_keep_the_epoch_the_rule_chooses_among_them(tmp_path: Path) -> None:
    module = _real_anatomy_module()
    _longer_run(tmp_path, [0.80, 0.91, 0.88, 0.95])
    config = {"anatomies": "data_manifests/real_anatomy.csv",
              "recipes": {"3d": {"first_epochs_of": {"recipe": "d", "epochs": 3}}}}
    experiment = module.Experiment(config, tmp_path, tmp_path)
    run = experiment.train("3d", "scan1")
    # Epoch 4 (0.95) is beyond the first three: the rule picks epoch 2 (0.91) among 1-3.
    assert (run / "model.keras").read_text() == "weights of epoch 2"
    report = json.loads((run / "report.json").read_text())
    assert report["selected_epoch"] == 2 and report["timings"]["segments_trained"] == 15000
    assert json.loads((run / "config.json").read_text())["train_config"]["subepochs"] == 5


def test_the_first_epochs_need_the_longer_run_to_have_kept_them(tmp_path: Path) -> None:
    module = _real_anatomy_module()
    _longer_run(tmp_path, [0.80, 0.91])
    config = {"anatomies": "data_manifests/real_anatomy.csv",
              "recipes": {"3d": {"first_epochs_of": {"recipe": "d", "epochs": 3}}}}
    with pytest.raises(SystemExit, match="has not kept 3 epoch models"):
        module.Experiment(config, tmp_path, tmp_path).train("3d", "scan1")
