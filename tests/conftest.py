"""Shared test fixtures: the real CT files beside the checkout, and temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vfdetect  # noqa: F401  (before any test module imports TensorFlow: sets its oneDNN default)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("VFDETECT_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (``make test``), each test module runs on one worker.

    The modules build costly module-scoped fixtures (trained runs, phantoms) that a split module would
    build once per worker. A test marked ``xdist_group`` itself keeps its own group: the two tests
    sharing the session fixture :func:`learning_run` run together. Without xdist the marks do nothing.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.module is not None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of real public CT (``../shared/data/real``); tests using it skip when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder not found: {REAL_DATA} (set VFDETECT_REAL_DATA)")
    return REAL_DATA


def assert_png_has_content(path, min_side: int = 200) -> None:
    """The PNG at ``path`` decodes, is at least ``min_side`` pixels each way and is not one flat colour."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side, pixels.shape
    assert float(np.std(pixels[..., :3])) > 0.02, f"{path} is (nearly) one flat colour"


def invoke(*args: object) -> None:
    """Run the command line with ``args`` (converted to str) in-process; it must succeed."""
    from click.testing import CliRunner

    from vfdetect.cli import cli

    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, (args[0], result.output, result.exception)


def bfloat16_error_bound() -> float:
    """Mean |p(bf16) - p(float32)| allowed on an untrained network with random BatchNorm statistics.

    On CPUs with native bf16 (:data:`vfdetect.predictor.BF16_CPU_FLAGS`, where ``auto`` picks bf16)
    such networks stay within 0.01; TensorFlow's emulated bf16 kernels elsewhere were measured at
    0.013-0.015 on an AVX2-only CPU (0.002 with the bundled trained model), hence a looser bound there.
    """
    from vfdetect.predictor import resolve_precision

    return 0.01 if resolve_precision("auto", gpu=False) == "bfloat16" else 0.03


# The 3D variant's architecture (kernels, pathways, residuals) at reduced widths, so that a few
# minutes of CPU training suffice; the full-width model learns the same way, slower.
LEARNING_MODEL = {"widths": [8, 8, 12, 12, 12, 12, 16, 16], "fc_widths": [32, 32]}


@pytest.fixture(scope="session")
def learning_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short training run through the command line, shared by the learning tests.

    16 small phantoms (seed 4; 40 % of vertebrae fractured, grade 2-3 only, so that a short run sees
    enough fractures), labels synthesised, the first 10 phantoms trained on (8 x 4 x 150 = 4,800
    segments, sampling 0.2 / 0.4 / 0.4, :data:`LEARNING_MODEL`, seed 4, no randomisation); the
    other 6 are never seen. Returns the paths: ``data`` (with ``manifest.csv``, ``train.csv`` and
    ``test.csv``), ``labels`` and ``run``. Training once serves both the command-line chain
    (tests/test_end_to_end.py) and the learning figures (tests/test_train.py).
    """
    import csv
    import json

    root = tmp_path_factory.mktemp("learning")
    data, labels, run = root / "data", root / "labels", root / "run"
    phantom_settings = root / "phantoms.json"
    phantom_settings.write_text(json.dumps({"grade_probabilities": [0.0, 0.5, 0.5]}))
    invoke("phantoms", "--out", data, "--cases", 16, "--seed", 4, "--small", "--fracture-prevalence", 0.4,
           "--config", phantom_settings, "--quiet")
    with open(data / "manifest.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    for name, part in (("train.csv", rows[1:11]), ("test.csv", rows[11:])):
        with open(data / name, "w", newline="") as handle:
            csv.writer(handle).writerows([rows[0], *part])
    invoke("synth-labels", data / "manifest.csv", "--out", labels, "--no-preview", "--quiet")
    train_settings = root / "train.json"
    train_settings.write_text(json.dumps({"model_options": LEARNING_MODEL, "sampling": {"class_weights": [0.2, 0.4, 0.4]},
                                          "validation_segments": 500, "balanced_validation_segments": 100}))
    invoke("train", data / "train.csv", "--labels", labels, "--out", run, "--config", train_settings,
           "--epochs", 8, "--subepochs", 4, "--segments-per-subepoch", 150, "--seed", 4,
           "--validation-fraction", 0, "--no-randomise", "--quiet")
    return {"data": data, "labels": labels, "run": run}
