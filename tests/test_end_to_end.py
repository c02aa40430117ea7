"""The product chain end to end, and where predictions land on the source grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import invoke

from vfdetect.geometry import geometry_for
from vfdetect.predict import PredictConfig, Predictor, predict_case
from vfdetect.vertebrae import Vertebra

GEOMETRY = geometry_for("3d")
MARGIN = GEOMETRY.margin()[0][0]
RF = GEOMETRY.receptive_field[0]


def rotation(axis: list[float], degrees: float) -> np.ndarray:
    axis_array = np.asarray(axis, dtype=np.float64)
    x, y, z = axis_array / np.linalg.norm(axis_array)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def ball_detector(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """A stand-in network: p(fracture) = 1 where the output voxel's own (normalised) intensity is high
    (the bright ball), else background."""
    out = [n - RF + 1 for n in hr.shape[1:4]]
    centre = hr[:, MARGIN : MARGIN + out[0], MARGIN : MARGIN + out[1], MARGIN : MARGIN + out[2], 0]
    fracture = (centre > 1.5).astype(np.float32)
    return np.stack([1.0 - fracture, np.zeros_like(fracture), fracture], axis=-1)


def test_prediction_lands_on_the_right_source_voxels_of_an_oblique_anisotropic_scan(tmp_path: Path) -> None:
    # An oblique grid of 0.8 x 1.1 x 2.5 mm voxels; a body of 40 HU with a 1500 HU ball of radius 8 mm
    # at a known world position. The stand-in calls the ball "fracture"; the saved map must put it at
    # the source voxels whose world centres lie in the ball.
    shape = (56, 44, 26)
    linear = rotation([1.0, 2.0, 0.5], 25) @ np.diag([0.8, 1.1, 2.5])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-12.0, 30.0, -70.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ linear.T + affine[:3, 3]
    ball_centre = affine[:3, :3] @ np.array([30.0, 20.0, 12.0]) + affine[:3, 3]
    radius = 8.0
    distance = np.linalg.norm(world - ball_centre, axis=1).reshape(shape)
    array = np.full(shape, -1000, dtype=np.int16)
    array[3:-3, 3:-3, 2:-2] = 40
    array[distance <= radius] = 1500
    image = nib.Nifti1Image(array, affine)

    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=ball_detector)
    inside = Vertebra(20, tuple(ball_centre))
    outside = Vertebra(21, tuple(ball_centre + linear @ np.array([0.0, 0.0, -7.0])))  # 17.5 mm away
    result = predict_case(predictor, image, [inside, outside], case="oblique", out_dir=tmp_path,
                          config=PredictConfig(region="whole", write_overlay=False), quiet=True)

    saved = nib.load(tmp_path / "oblique" / "probabilities.nii.gz")
    np.testing.assert_allclose(saved.affine, affine, atol=1e-4)
    fracture = np.asarray(saved.dataobj[..., 0], dtype=np.float64)
    assert fracture.shape == shape
    margin = 1.5 * 2.5  # interpolation across the coarsest source spacing
    assert fracture[distance <= radius - margin].min() > 0.5
    assert fracture[distance >= radius + margin].max() < 0.5
    weights = fracture.reshape(-1)
    centre_of_mass = (world * weights[:, None]).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(centre_of_mass, ball_centre, atol=1.0)
    scores = {v["name"]: v["fracture_probability"] for v in result.vertebrae}
    assert scores["L1"] > 0.9 and scores["L2"] < 0.1


# ------------------------------------------------------------------------------------------------
# The chain: phantoms -> synth-labels -> train -> predict -> evaluate

# The run of conftest.learning_run, whose fracture-versus-normal separation on unseen phantoms
# tests/test_train.py checks. At this size (4,800 segments) the network has learnt where the vertebrae are,
# not yet reliably which are fractured, so the chain's floor is on the vertebra map, p(normal) +
# p(fracture): an untrained network gives about 2/3 everywhere; this chain measured 0.55-0.78 inside
# the labelled vertebrae and 0.01-0.04 in the body away from them (seed 4).
INSIDE_MIN = 0.45
OUTSIDE_MAX = 0.2


@pytest.mark.slow
@pytest.mark.xdist_group("learning")  # shares conftest.learning_run
def test_the_product_chain_learns_and_scores_unseen_phantoms(tmp_path: Path, learning_run: dict[str, Path]) -> None:
    # phantoms -> synth-labels -> train: the shared command-line run (conftest.learning_run)
    data, labels = learning_run["data"], learning_run["labels"]
    with open(data / "manifest.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    # The last epoch's weights, as tests/test_train.py's learning test scores them (model.keras is the
    # epoch chosen on validation segments, here drawn from the training cases).
    invoke("predict", "--manifest", data / "test.csv", "--model", learning_run["run"] / "model_last.keras",
           "--out", tmp_path / "pred", "--no-overlay", "--quiet")
    invoke("evaluate", data / "test.csv", tmp_path / "pred", "--out", tmp_path / "evaluation", "--bootstrap", 0,
           "--quiet")

    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["vertebra_counts"]["vertebrae"] >= 20 and np.isfinite(metrics["vertebra_auc"])
    reports = [json.loads(path.read_text()) for path in sorted((tmp_path / "pred").glob("*/report.json"))]
    assert len(reports) == 6 and all(len(r["vertebrae"]) >= 3 for r in reports)

    # The vertebra map, read back from the saved source-grid files, against the label images.
    from scipy import ndimage

    inside, outside = [], []
    for row in rows[11:]:
        case = row[0]
        vertebra = np.asarray(nib.load(tmp_path / "pred" / case / "probabilities.nii.gz").dataobj[..., 1], float)
        label_image = np.asarray(nib.load(labels / f"{case}_labels.nii.gz").dataobj)
        hu = np.asarray(nib.load(data / f"{case}_ct.nii.gz").dataobj)
        annotated = (label_image == 1) | (label_image == 2)
        far = ~ndimage.binary_dilation(annotated | (label_image == 255), iterations=10) & (hu > -500)
        inside.append(vertebra[annotated].mean())
        outside.append(vertebra[far].mean())
    print("end-to-end p(vertebra) inside / away from the vertebrae:", np.round(inside, 3), np.round(outside, 3))
    assert min(inside) > INSIDE_MIN and max(outside) < OUTSIDE_MAX


@pytest.mark.slow
def test_train_command_randomises_new_runs_by_default(tmp_path: Path) -> None:
    invoke("phantoms", "--out", tmp_path / "data", "--cases", 2, "--seed", 1, "--small", "--quiet")
    invoke("synth-labels", tmp_path / "data" / "manifest.csv", "--out", tmp_path / "labels", "--no-preview", "--quiet")
    tiny = ["--epochs", 1, "--subepochs", 1, "--segments-per-subepoch", 10, "--validation-segments", 10,
            "--balanced-validation-segments", 10, "--validation-fraction", 0, "--quiet"]
    for flag, expected in (([], True), (["--no-randomise"], False)):
        run = tmp_path / f"run{expected}"
        invoke("train", tmp_path / "data" / "manifest.csv", "--labels", tmp_path / "labels", "--out", run, *tiny, *flag)
        sampling = json.loads((run / "config.json").read_text())["train_config"]["sampling"]
        assert sampling["randomise"] is expected
