"""Bad input on the command line: one line ``vfdetect: error: <file>: <problem>``, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result

from vfdetect.cli import cli
from vfdetect.errors import InputError
from vfdetect.manifest import case_id_problem
from vfdetect.volume import check_ct_intensities, load_scan


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_refused(result: Result, *fragments: str, code: int = 1) -> None:
    """Exit ``code``, no traceback, and stderr's last line in the house style holding every fragment."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("vfdetect: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def ct_array(shape: tuple[int, int, int] = (30, 30, 40)) -> np.ndarray:
    """A small CT in HU: air, a soft-tissue body and a bony column."""
    array = np.full(shape, -1000, dtype=np.int16)
    array[4:-4, 4:-4, :] = 40
    array[12:18, 12:18, :] = 600
    return array


def write_scan(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine), path)
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Two small phantoms with their manifest, centroids and grades."""
    out = tmp_path / "data"
    result = run("phantoms", "--out", out, "--cases", "2", "--small", "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def stand_in_run(tmp_path: Path) -> Path:
    """A run folder that resolves as a model (config.json + model.keras); its weights are never loaded here."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"variant": "3d", "spacing": 2.0, "trainable_parameters": 1}))
    (run_dir / "model.keras").write_bytes(b"not loaded")
    return run_dir


# ------------------------------------------------------------------------------------------------
# Manifests


def test_manifest_without_centroids_is_refused_by_synth_labels_and_train(dataset: Path, tmp_path: Path) -> None:
    no_column = tmp_path / "no_column.csv"
    no_column.write_text("case,image\nphantom000,phantom000_ct.nii.gz\n")
    empty_cell = tmp_path / "empty_cell.csv"
    empty_cell.write_text("case,image,centroids\nphantom000,phantom000_ct.nii.gz,phantom000_ctd.json\n"
                          "phantom001,phantom001_ct.nii.gz,\n")
    for manifest, missing in ((no_column, "phantom000"), (empty_cell, "phantom001")):
        out = tmp_path / f"labels_{manifest.stem}"
        result = run("synth-labels", manifest, "--data-root", dataset, "--out", out, "--quiet")
        assert_refused(result, str(manifest), "without centroids", missing)
        assert files_under(out) == []
    labels = tmp_path / "labels"
    labels.mkdir()
    result = run("train", no_column, "--data-root", dataset, "--labels", labels, "--out", tmp_path / "r", "--quiet")
    assert_refused(result, str(no_column), "without centroids")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["../../x", "a/b", ".hidden", "two words", ""])
def test_unsafe_case_ids_are_refused(case: str) -> None:
    assert case_id_problem(case)


def test_case_id_escaping_the_output_folder_is_refused(dataset: Path, tmp_path: Path, stand_in_run: Path) -> None:
    manifest = tmp_path / "escape.csv"
    manifest.write_text("case,image,centroids\n../../x,phantom000_ct.nii.gz,phantom000_ctd.json\n")
    out = tmp_path / "deep" / "er" / "labels"
    result = run("synth-labels", manifest, "--data-root", dataset, "--out", out, "--quiet")
    assert_refused(result, str(manifest), "line 2", "'../../x'")
    result = run("predict", "--manifest", manifest, "--data-root", dataset, "--model", stand_in_run, "--out", out)
    assert_refused(result, str(manifest), "'../../x'")
    assert files_under(tmp_path / "deep") == [] and not (tmp_path / "x").exists()
    hidden = write_scan(tmp_path / ".hidden.nii.gz", ct_array())
    result = run("predict", hidden, "--model", stand_in_run, "--out", out)
    assert_refused(result, str(hidden), "starts with a dot")


def test_no_output_overwrites_an_input(dataset: Path, tmp_path: Path, stand_in_run: Path) -> None:
    # An input scan named like the label image synth-labels would write into the same folder.
    scan = dataset / "phantom000_labels.nii.gz"
    (dataset / "phantom000_ct.nii.gz").rename(scan)
    manifest = tmp_path / "clash.csv"
    manifest.write_text("case,image,centroids\nphantom000,phantom000_labels.nii.gz,phantom000_ctd.json\n")
    before = scan.read_bytes()
    result = run("synth-labels", manifest, "--data-root", dataset, "--out", dataset, "--quiet")
    assert_refused(result, "phantom000_labels.nii.gz", "would overwrite an input")
    assert scan.read_bytes() == before and not (dataset / "label_config.json").exists()
    # predict: a centroids file where the case's report would go.
    out = tmp_path / "pred"
    (out / "phantom001").mkdir(parents=True)
    report = out / "phantom001" / "report.json"
    report.write_text((dataset / "phantom001_ctd.json").read_text())
    result = run("predict", dataset / "phantom001_ct.nii.gz", "--centroids", report, "--model", stand_in_run,
                 "--out", out)
    assert_refused(result, "report.json", "would overwrite an input")
    # evaluate: the manifest named like its metrics table.
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    shadow = evaluation / "vertebrae.csv"
    shadow.write_text("case,image,centroids\nphantom001,phantom001_ct.nii.gz,phantom001_ctd.json\n")
    (tmp_path / "preds").mkdir()
    result = run("evaluate", shadow, tmp_path / "preds", "--data-root", dataset, "--out", evaluation, "--quiet")
    assert_refused(result, "vertebrae.csv", "would overwrite an input")


# ------------------------------------------------------------------------------------------------
# Options and settings


@pytest.mark.parametrize("args", [
    ("predict", "scan.nii.gz", "--out", "o", "--threads", "-1"),
    ("predict", "scan.nii.gz", "--out", "o", "--batch-size", "0"),
    ("predict", "scan.nii.gz", "--out", "o", "--memory-gib", "0"),
    ("predict", "scan.nii.gz", "--out", "o", "--vertebra-threshold", "1.5"),
    ("predict", "scan.nii.gz", "--out", "o", "--patient-threshold", "-0.1"),
    ("predict", "scan.nii.gz", "--out", "o", "--cube-edge-mm", "0"),
    ("predict", "scan.nii.gz", "--out", "o", "--sigma-mm", "-1"),
    ("synth-labels", "m.csv", "--out", "o", "--along-fraction", "0"),
    ("phantoms", "--out", "o", "--seed", "-1"),
    ("evaluate", "m.csv", "p", "--out", "o", "--seed", "-3"),
    ("cv", "m.csv", "--out", "o", "--seed", "-3"),
    ("simulate-fractures", "m.csv", "--out", "o", "--seed", "-3"),
    ("bogus-command",),
])
def test_usage_errors_are_one_line_with_exit_status_2(args: tuple[str, ...], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert_refused(result, code=2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_resume_without_a_run_is_refused(dataset: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    result = run("train", dataset / "manifest.csv", "--labels", labels, "--out", empty, "--resume", "--quiet")
    assert_refused(result, str(empty), "no training run to resume")
    assert files_under(empty) == []


def test_unknown_training_setting_names_the_file(dataset: Path, tmp_path: Path) -> None:
    settings = tmp_path / "train.json"
    settings.write_text(json.dumps({"epochs": 1, "segmnets_per_subepoch": 10}))
    labels = tmp_path / "labels"
    labels.mkdir()
    result = run("train", dataset / "manifest.csv", "--labels", labels, "--out", tmp_path / "r", "--config", settings)
    assert_refused(result, str(settings), "segmnets_per_subepoch")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("document, fragment", [
    ({"experiment": "cv", "trian": {"epochs": 1}}, "trian"),
    ({"experiment": "cv", "folds": 3}, "folds"),
    ({"experiment": "cv", "train": {"epocs": 1}}, "epocs"),
    ({"experiment": "cv", "predict": {"cube_edge": 10}}, "cube_edge"),
    ({"experiment": "cv", "cv": {"n_fold": 3}}, "n_fold"),
])
def test_experiment_file_with_unknown_sections_or_keys_is_refused(
    document: dict[str, Any], fragment: str, dataset: Path, tmp_path: Path
) -> None:
    experiment = tmp_path / "experiment.json"
    experiment.write_text(json.dumps(document))
    out = tmp_path / "cv"
    result = run("cv", dataset / "manifest.csv", "--out", out, "--config", experiment, "--quiet")
    assert_refused(result, str(experiment), fragment)
    assert files_under(out) == []


@pytest.mark.parametrize("change, fragment", [({"varient": "3d"}, "varient"), ({"variant": "4d"}, "'4d'"),
                                              ({"spacing": 0}, "spacing")])
def test_model_configuration_with_unknown_keys_or_variant_is_refused(
    change: dict[str, Any], fragment: str, stand_in_run: Path, tmp_path: Path
) -> None:
    config = stand_in_run / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    scan = write_scan(tmp_path / "scan.nii.gz", ct_array())
    out = tmp_path / "pred"
    result = run("predict", scan, "--model", stand_in_run, "--out", out)
    assert_refused(result, str(config), fragment)
    assert files_under(out) == []


def test_phantom_settings_file_with_unknown_key_is_refused(tmp_path: Path) -> None:
    settings = tmp_path / "phantoms.json"
    settings.write_text(json.dumps({"fov_mmm": [100, 100]}))
    result = run("phantoms", "--out", tmp_path / "p", "--config", settings, "--small")
    assert_refused(result, str(settings), "fov_mmm")


# ------------------------------------------------------------------------------------------------
# Scans


def test_blank_and_non_hu_volumes_are_refused(tmp_path: Path, stand_in_run: Path) -> None:
    with pytest.raises(InputError, match="blank"):
        check_ct_intensities(np.full((8, 8, 8), 40.0), "blank")
    with pytest.raises(InputError, match="not CT Hounsfield units"):
        check_ct_intensities(np.linspace(0.0, 1.0, 512).reshape(8, 8, 8), "unit")
    with pytest.raises(InputError, match="not CT Hounsfield units"):
        check_ct_intensities(ct_array().astype(np.float32) + 1024.0, "raw")  # rescale intercept lost
    check_ct_intensities(ct_array(), "ct")
    for name, array in (("blank", np.full((30, 30, 40), -1000, np.int16)),
                        ("unit", ((ct_array() + 1000) / 1600.0).astype(np.float32))):
        scan = write_scan(tmp_path / f"{name}.nii.gz", array)
        out = tmp_path / f"pred_{name}"
        result = run("predict", scan, "--model", stand_in_run, "--out", out)
        assert_refused(result, str(scan), "blank" if name == "blank" else "not CT Hounsfield units")
        assert files_under(out) == []


def test_header_claiming_a_huge_volume_is_refused_before_allocating(tmp_path: Path) -> None:
    path = write_scan(tmp_path / "huge.nii", ct_array((4, 4, 4)))
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    header.set_data_shape((30000, 30000, 30000))
    with open(path, "r+b") as handle:
        handle.write(header.binaryblock)
    with pytest.raises(InputError, match="voxels"):
        load_scan(path)


@pytest.mark.parametrize("pixdim", [0.0, -1.0])
def test_zero_or_negative_pixdim_is_refused(pixdim: float, tmp_path: Path) -> None:
    path = write_scan(tmp_path / "pixdim.nii", ct_array())
    raw = bytearray(path.read_bytes())
    pixdim_offset = 76 + 4 * 2  # pixdim[2] of the NIfTI-1 header
    raw[pixdim_offset: pixdim_offset + 4] = np.float32(pixdim).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="pixdim"):
        load_scan(path)


def test_symlink_loop_is_named(tmp_path: Path) -> None:
    loop = tmp_path / "loop.nii.gz"
    os.symlink(loop, loop)
    with pytest.raises(InputError, match="symbolic link loop"):
        load_scan(loop)
    result = run("predict", loop, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_before_any_work(tmp_path: Path, dataset: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run("synth-labels", dataset / "manifest.csv", "--out", locked, "--quiet")
        assert_refused(result, str(locked), "cannot write")
    finally:
        locked.chmod(0o700)


def test_output_folder_that_is_a_file_is_refused(tmp_path: Path, dataset: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    result = run("synth-labels", dataset / "manifest.csv", "--out", blocker, "--quiet")
    assert_refused(result, str(blocker), code=2)  # click's own check of --out


def test_os_errors_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path) -> None:
    import errno

    import vfdetect.labels

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "labels" / "x.nii.gz"))

    monkeypatch.setattr(vfdetect.labels, "synthesize_manifest_labels", disk_full)
    result = run("synth-labels", dataset / "manifest.csv", "--out", tmp_path / "labels", "--quiet")
    assert_refused(result, "x.nii.gz", "No space left on device")


def test_figures_are_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vfdetect.figures

    source = tmp_path / "evaluation"
    source.mkdir()

    def half_then_fail(directory: Path, out_dir: Path, **kwargs: Any) -> list[Path]:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "figure4.png").write_bytes(b"png")
        raise InputError(directory, "figure 5 cannot be drawn")

    monkeypatch.setattr(vfdetect.figures, "draw_figures", half_then_fail)
    result = run("figures", source, "--quiet")
    assert_refused(result, "figure 5 cannot be drawn")
    assert files_under(source) in ([], ["figures"])


def test_every_case_failing_writes_no_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              stand_in_run: Path) -> None:
    import vfdetect.predict

    def stand_in_predictor(*args: Any, **kwargs: Any) -> Any:
        return vfdetect.predict.Predictor(model=None, config={"variant": "3d"}, fn=lambda hr, lr: hr)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise InputError("somewhere", "cannot be scored")

    monkeypatch.setattr(vfdetect.predict, "load_predictor", stand_in_predictor)
    monkeypatch.setattr(vfdetect.predict, "predict_case", fail)
    scans = [write_scan(tmp_path / f"case{index}.nii.gz", ct_array()) for index in range(2)]
    out = tmp_path / "pred"
    result = run("predict", *scans, "--model", stand_in_run, "--out", out, "--quiet")
    assert result.exit_code == 1
    assert "every case failed (2)" in result.stderr
    assert result.stderr.count("case case0") == 1 and result.stderr.count("case case1") == 1
    assert not (out / "summary.csv").exists()


# ------------------------------------------------------------------------------------------------
# Start-up


def test_light_modules_and_help_never_import_tensorflow() -> None:
    probe = (
        "import sys, runpy\n"
        "import vfdetect.geometry, vfdetect.aggregate, vfdetect.evaluate, vfdetect.metrics\n"
        "sys.argv = ['vfdetect', '--help']\n"
        "try:\n"
        "    runpy.run_module('vfdetect.cli', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print('HEAVY', heavy[:5], file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: vfdetect" in done.stdout
