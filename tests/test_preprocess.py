"""Tests of vfdetect.preprocess: one preparation for training and prediction, labels, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from vfdetect.errors import InputError
from vfdetect.labels import LabelConfig
from vfdetect.manifest import Case
from vfdetect.preprocess import (
    PreparedScan,
    cache_entry,
    cached_case,
    input_hash,
    prepare_scan,
    preprocess_cases,
    read_cached_case,
    training_labels,
)
from vfdetect.sampling import load_training_case
from vfdetect.volume import body_mask, internal_grid, load_scan, normalise, to_internal


def _write_label_folder(folder: Path, config: LabelConfig = LabelConfig()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label_config.json").write_text(json.dumps(config.to_dict()))
    return folder


def _small_case(tmp_path: Path, name: str = "s1", grade: int = 3) -> Case:
    """A 1 x 1 x 2 mm scan (LPS-stored) with three lumbar centroids, the middle one graded ``grade``."""
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = (30.0, 30.0, -40.0)
    hu = np.full((40, 40, 60), -1000, dtype=np.int16)
    hu[5:35, 5:35, :] = 40
    hu[15:25, 15:25, :] = 300
    scan = tmp_path / f"{name}_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), scan)
    centroids = [{"direction": ["L", "P", "S"]}] + [
        {"label": label, "X": 20.0, "Y": 20.0, "Z": z} for label, z in ((20, 12.0), (21, 28.0), (22, 44.0))
    ]
    centroid_file = tmp_path / f"{name}_ctd.json"
    centroid_file.write_text(json.dumps(centroids))
    return Case(name, scan, centroid_file, grades={20: 0, 21: grade, 22: 0})


def test_prepare_scan_is_the_load_resample_mask_normalise_chain(tmp_path) -> None:
    case = _small_case(tmp_path)
    prepared = prepare_scan(case.image)
    assert isinstance(prepared, PreparedScan)
    scan, grid = load_scan(case.image)
    internal = to_internal(scan, order=1)
    hu = np.asarray(internal.array, dtype=np.float32)
    assert np.array_equal(prepared.hu, hu) and prepared.hu.dtype == np.float32
    assert np.array_equal(prepared.body_mask, body_mask(hu))
    assert np.array_equal(prepared.image, normalise(hu, body_mask(hu))) and prepared.image.dtype == np.float32
    assert np.allclose(prepared.affine, internal.affine) and prepared.spacing == (1.0, 1.0, 1.0)
    assert prepared.grid.shape == grid.shape and np.allclose(prepared.grid.affine, grid.affine)
    assert prepared.shape == internal_grid(grid.shape, grid.affine)[0]
    in_memory = prepare_scan(nib.load(case.image), spacing=2.0)
    assert in_memory.spacing == (2.0, 2.0, 2.0)


def test_training_and_prediction_feed_the_network_identical_arrays(real_data, tmp_path, monkeypatch) -> None:
    """sub-verse014: 1 x 1 x 2 mm, oblique, PIR."""
    from vfdetect import predict

    folder = real_data / "verse19-sub-verse014"
    case = Case("sub-verse014", folder / "sub-verse014_ct.nii.gz", folder / "sub-verse014_seg-vb_ctd.json",
                grades={20: 0, 21: 0, 22: 0, 23: 0, 24: 0})
    labels_dir = _write_label_folder(tmp_path / "labels")
    trained_on = load_training_case(case, labels_dir)

    seen: list[np.ndarray] = []

    def recording_inference(volume, fn, geometry, **options):  # type: ignore[no-untyped-def]
        seen.append(np.array(volume))
        options["stats"].update(computed_voxels=0, tiles=0)
        probabilities = np.zeros((*volume.shape, 3), dtype=np.float32)
        probabilities[..., 0] = 1.0
        return probabilities

    monkeypatch.setattr(predict, "predict_volume", recording_inference)
    predictor = predict.Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=lambda hr, lr: hr)
    predict.predict_case(predictor, case.image, case.centroids, config=predict.PredictConfig(write_overlay=False))
    assert len(seen) == 1
    assert seen[0].dtype == trained_on.image.dtype == np.float32
    assert seen[0].shape == trained_on.image.shape
    assert np.array_equal(seen[0], trained_on.image)
    assert set(np.unique(trained_on.labels).tolist()) == {0, 1}


def test_labels_are_drawn_on_the_internal_grid_when_the_case_has_centroids(tmp_path) -> None:
    case = _small_case(tmp_path)
    labels_dir = _write_label_folder(tmp_path / "labels", LabelConfig(min_grade=2))
    scan = prepare_scan(case.image)
    labels = training_labels(case, scan, labels_dir)
    assert labels.shape == scan.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    # Without label_config.json the folder's label image is read instead (label images made elsewhere).
    (labels_dir / "label_config.json").unlink()
    with pytest.raises(InputError, match="s1_labels.nii.gz"):
        training_labels(case, scan, labels_dir)
    source = np.zeros(scan.grid.shape, dtype=np.uint8)
    source[10:20, 10:20, 10:20] = 1
    nib.save(nib.Nifti1Image(source, scan.grid.affine), labels_dir / "s1_labels.nii.gz")
    read = training_labels(case, scan, labels_dir)
    assert read.shape == scan.shape and set(np.unique(read).tolist()) == {0, 1}
    # A case without centroids needs a label folder.
    with pytest.raises(InputError, match="no centroids"):
        training_labels(Case("s1", case.image), scan, None)


def test_cache_round_trip_gives_identical_arrays(tmp_path) -> None:
    case = _small_case(tmp_path)
    labels_dir = _write_label_folder(tmp_path / "labels")
    cache = tmp_path / "cache"
    direct = load_training_case(case, labels_dir)
    assert read_cached_case(cache, case, labels_dir) is None
    preprocess_cases([case], cache, labels_dir, quiet=True)
    entry = cache_entry(cache, "s1")
    info = json.loads(entry.info.read_text())
    assert info["input_hash"] == input_hash(case, labels_dir) and info["labels"] == "drawn from centroids"
    assert info["source"] == str(case.image) and info["spacing"] == 1.0
    assert isinstance(np.load(entry.image, mmap_mode="r"), np.memmap)

    cached = load_training_case(case, labels_dir, cache_dir=cache)
    assert isinstance(cached.image, np.memmap) and isinstance(cached.labels, np.memmap)
    assert cached.image.dtype == direct.image.dtype and np.array_equal(cached.image, direct.image)
    assert cached.labels.dtype == direct.labels.dtype and np.array_equal(cached.labels, direct.labels)
    assert cached.class_voxels is not None and set(cached.class_voxels) == {1, 2}
    for value, voxels in cached.class_voxels.items():
        assert np.array_equal(voxels, np.flatnonzero(direct.labels.ravel() == value))


def test_a_stale_or_missing_cache_entry_is_prepared_again(tmp_path) -> None:
    case = _small_case(tmp_path)
    labels_dir = _write_label_folder(tmp_path / "labels")
    cache = tmp_path / "cache"
    first = cached_case(cache, case, labels_dir)  # missing: prepared and added
    entry = cache_entry(cache, "s1")
    assert entry.info.is_file() and read_cached_case(cache, case, labels_dir) is not None
    # The scan changes: the entry is stale.
    image = nib.load(case.image)
    changed = np.asarray(image.dataobj).copy()
    changed[15:25, 15:25, 30:] = 900
    nib.save(nib.Nifti1Image(changed, image.affine), case.image)
    assert read_cached_case(cache, case, labels_dir) is None
    refreshed = cached_case(cache, case, labels_dir)
    assert not np.array_equal(refreshed.image, first.image)
    assert np.array_equal(refreshed.image, prepare_scan(case.image).image)
    # Other grades, label settings or spacing: stale too.
    assert read_cached_case(cache, Case("s1", case.image, case.centroids, {20: 0, 21: 0, 22: 0}), labels_dir) is None
    _write_label_folder(labels_dir, LabelConfig(min_grade=2))
    assert read_cached_case(cache, case, labels_dir) is None
    _write_label_folder(labels_dir)
    assert read_cached_case(cache, case, labels_dir) is not None
    assert read_cached_case(cache, case, labels_dir, spacing=2.0) is None
    # An entry without its case.json (an interrupted write) counts as missing.
    entry.info.unlink()
    assert read_cached_case(cache, case, labels_dir) is None


def test_preprocess_command_writes_the_cache(tmp_path) -> None:
    from vfdetect.cli import cli

    case = _small_case(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case,image,centroids\ns1,{case.image.name},{case.centroids.name}\n")
    (tmp_path / "grades.csv").write_text("case,label,grade\ns1,20,0\ns1,21,3\ns1,22,0\n")
    labels_dir = _write_label_folder(tmp_path / "labels")
    result = CliRunner().invoke(cli, ["preprocess", str(manifest), "--out", str(tmp_path / "cache"),
                                      "--labels", str(labels_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    entry = cache_entry(tmp_path / "cache", "s1")
    labels = np.load(entry.labels)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    assert np.array_equal(np.load(entry.image), prepare_scan(case.image).image)
