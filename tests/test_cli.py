"""The command line's start-up: quiet TensorFlow unless --verbose, and the device choice."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vfdetect.cli import runtime_environment
from vfdetect.errors import VfdetectError

CHATTER = ("oneDNN", "cuda", "cuInit", "absl", "I0000", "E0000", "W0000", "rebuild TensorFlow")


def test_importing_vfdetect_turns_onednn_on_unless_the_environment_says_otherwise() -> None:
    script = "import os, vfdetect; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    environment = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}

    def value_after_import(**extra: str) -> str:
        result = subprocess.run([sys.executable, "-c", script], env={**environment, **extra}, capture_output=True,
                                text=True, check=True, timeout=120)
        return result.stdout.strip()

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert value_after_import() == ("1" if x86 else "None")
    assert value_after_import(TF_ENABLE_ONEDNN_OPTS="0") == "0"


def test_quiet_environment_and_device_choice() -> None:
    quiet_cpu = runtime_environment(False, "auto", environ={}, gpu_present=False)
    assert quiet_cpu == {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "CUDA_VISIBLE_DEVICES": ""}
    assert "CUDA_VISIBLE_DEVICES" not in runtime_environment(False, "auto", environ={}, gpu_present=True)
    assert "CUDA_VISIBLE_DEVICES" not in runtime_environment(True, "gpu", environ={}, gpu_present=False)
    assert runtime_environment(True, "cpu", environ={}, gpu_present=True) == {"CUDA_VISIBLE_DEVICES": ""}
    # What the user set is kept.
    assert runtime_environment(False, "cpu", environ={"CUDA_VISIBLE_DEVICES": "1", "TF_CPP_MIN_LOG_LEVEL": "0"},
                               gpu_present=True) == {"GRPC_VERBOSITY": "ERROR"}
    with pytest.raises(VfdetectError, match="unknown device"):
        runtime_environment(False, "tpu", environ={})


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):  # type: ignore[no-untyped-def]
    from vfdetect.model import build_model

    folder = tmp_path_factory.mktemp("cli")
    run = folder / "run"
    run.mkdir()
    build_model("3d", widths=(2,) * 8, fc_widths=(3, 3), seed=11).save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"variant": "3d", "spacing": 2.0, "trainable_parameters": 1}))
    array = np.full((40, 36, 48), -1000, dtype=np.int16)
    array[5:-5, 5:-5, :] = 40
    array[15:25, 12:22, :] = 700
    scan = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([1.2, 1.0, 1.5, 1.0])), scan)
    return run, scan


def _predict(run: Path, scan: Path, out: Path, *global_options: str,
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "GRPC_VERBOSITY")}
    command = [sys.executable, "-m", "vfdetect.cli", *global_options, "predict", str(scan), "--model", str(run),
               "--out", str(out), "--quiet", "--no-overlay", *options]
    return subprocess.run(command, capture_output=True, text=True, env=environment, check=False, timeout=600)


@pytest.mark.slow
def test_predict_prints_no_tensorflow_chatter(tiny_case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run, scan = tiny_case
    result = _predict(run, scan, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    assert (tmp_path / "out" / "scan" / "report.json").is_file()


@pytest.mark.slow
def test_messages_written_while_tensorflow_loads_in_the_background_are_shown(tiny_case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # `predict` imports TensorFlow in a thread while it checks its inputs; its own warnings still show.
    run, scan = tiny_case
    result = _predict(run, scan, tmp_path / "out", options=("--noise-threshold-mm3", "100"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "vfdetect: warning: --noise-threshold-mm3 is ignored; the patient decision is the patient score against "
        "--patient-threshold"]
    missing = _predict(run, tmp_path / "missing.nii.gz", tmp_path / "out2")
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith("missing.nii.gz: file or folder not found"), missing.stderr
    assert not any(word in missing.stderr for word in CHATTER)


@pytest.mark.slow
def test_a_model_that_fails_to_load_in_the_background_stops_the_command(tiny_case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The network loads in a thread while the first scan is read; a broken model file still fails the
    # command (not each case), names the file, and leaves no output folder.
    run, scan = tiny_case
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run / "config.json").read_text())
    (broken / "model.keras").write_bytes(b"not a model")
    result = _predict(broken, scan, tmp_path / "out")
    assert result.returncode == 1
    assert "model.keras: not a valid .keras model file (not a zip archive)" in result.stderr, result.stderr
    assert "case scan" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verbose_lets_tensorflow_speak(tiny_case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run, scan = tiny_case
    result = _predict(run, scan, tmp_path / "out", "--verbose")
    assert result.returncode == 0, result.stderr
    assert any(word in result.stderr for word in CHATTER)


def test_long_tests_are_excluded_by_default_and_slow_ones_are_not(tmp_path: Path) -> None:
    # setup.cfg's addopts deselect `long`; `make test-all` (-m "slow or long or not slow") brings it back.
    repository = Path(__file__).resolve().parents[1]
    (tmp_path / "test_marks.py").write_text(
        "import pytest\n\n@pytest.mark.long\ndef test_long():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    pass\n\ndef test_plain():\n    pass\n"
    )
    base = [sys.executable, "-m", "pytest", "-c", str(repository / "setup.cfg"), "--rootdir", str(tmp_path),
            "-p", "no:cacheprovider", "--collect-only", "-q", str(tmp_path / "test_marks.py")]
    default = subprocess.run(base, capture_output=True, text=True, check=False, timeout=120)
    assert "test_slow" in default.stdout and "test_plain" in default.stdout, default.stdout
    assert "test_long" not in default.stdout and "1 deselected" in default.stdout
    everything = subprocess.run([*base, "-m", "slow or long or not slow"], capture_output=True, text=True,
                                check=False, timeout=120)
    assert "test_long" in everything.stdout, everything.stdout
