"""Tiled inference, the folded model, predict_case and the ``predict`` command."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_png_has_content, bfloat16_error_bound

from vfdetect.errors import VfdetectError
from vfdetect.geometry import geometry_for
from vfdetect.model import with_random_statistics
from vfdetect.predict import PredictConfig, predict_case, predict_volume
from vfdetect.predictor import Predictor
from vfdetect.tiling import GIB, choose_tile_shape, tile_output_shape
from vfdetect.vertebrae import Vertebra

GEOMETRY = geometry_for("3d")
MARGIN = GEOMETRY.margin()[0][0]
RF = GEOMETRY.receptive_field[0]


def stand_in(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """Network-shaped stand-in: channel 0 = the HR voxel at the output's centre; channel 1 = the LR
    voxel its LR pathway would centre on (upsampled by repetition, cropped from the start); 2 = 0."""
    out = [n - RF + 1 for n in hr.shape[1:4]]
    centre = hr[:, MARGIN : MARGIN + out[0], MARGIN : MARGIN + out[1], MARGIN : MARGIN + out[2], :]
    context = lr[:, MARGIN:, MARGIN:, MARGIN:, :]
    for axis in (1, 2, 3):
        context = np.repeat(context, 3, axis=axis)
    context = context[:, : out[0], : out[1], : out[2]]
    return np.concatenate([centre, context, np.zeros_like(centre)], axis=-1)


@pytest.mark.parametrize("shape", [(31, 20, 47), (5, 4, 2), (1, 1, 1), (50, 3, 19)])
def test_stitching_reproduces_the_volume_for_any_tiling(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(size=shape).astype(np.float32)
    reference = predict_volume(image, stand_in, GEOMETRY, tile_shape=(200, 200, 200))
    assert reference.shape == (*shape, 3)
    np.testing.assert_array_equal(reference[..., 0], image)
    for tile, batch in [((25, 25, 25), 1), ((26, 31, 20), 3), ((40, 22, 29), 2)]:
        tiled = predict_volume(image, stand_in, GEOMETRY, tile_shape=tile, batch_size=batch)
        # HR channel: no seams; LR channel: the LR phase follows tile starts on multiples of 3.
        np.testing.assert_array_equal(tiled, reference)


def test_lr_context_uses_the_corner_mean_outside_the_volume() -> None:
    image = np.full((6, 6, 6), 2.0, dtype=np.float32)
    image[0, 0, 0] = 10.0  # corner mean = (10 + 7 * 2) / 8 = 3
    seen = []

    def record(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        seen.append(lr.copy())
        return stand_in(hr, lr)

    predict_volume(image, record, GEOMETRY, tile_shape=(40, 40, 40))
    assert seen[0][0, 0, 0, 0, 0] == pytest.approx(3.0)  # the LR window starts 16 voxels before the volume
    predict_volume(image, record, GEOMETRY, tile_shape=(40, 40, 40), fill_value=-7.0)
    assert seen[-1][0, 0, 0, 0, 0] == pytest.approx(-7.0)


def test_body_mask_skips_air_tiles() -> None:
    image = np.zeros((60, 30, 30), dtype=np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[2:10, 5:8, 5:8] = True
    calls = []

    def counting(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        calls.append(len(hr))
        result = stand_in(hr, lr)
        result[..., 2] = 0.5
        return result

    out = predict_volume(image, counting, GEOMETRY, tile_shape=(32, 32, 32), mask=mask)
    assert sum(calls) < 12  # 4 x 2 x 2 tiles without the mask
    assert np.all(out[40:, ..., 0] == 1.0) and np.all(out[40:, ..., 2] == 0.0)
    assert np.all(out[2:10, 5:8, 5:8, 2] == 0.5)


def test_tile_sizes_are_balanced_and_fit_the_budget() -> None:
    assert tile_output_shape((300, 300, 400), GEOMETRY, (66, 66, 66)) == (60, 60, 60)
    assert tile_output_shape((10, 4, 1), GEOMETRY, (66, 66, 66)) == (12, 6, 3)
    big = choose_tile_shape((512, 512, 600), GEOMETRY, batch_size=1, memory_budget_bytes=4 * GIB)
    small = choose_tile_shape((512, 512, 600), GEOMETRY, batch_size=4, memory_budget_bytes=4 * GIB)
    assert np.prod(small) < np.prod(big)
    with pytest.raises(VfdetectError):
        choose_tile_shape((512, 512, 600), GEOMETRY, memory_budget_bytes=3 * GIB)


def test_predictor_with_a_wrong_output_shape_is_refused() -> None:
    with pytest.raises(VfdetectError, match="predictor returned"):
        predict_volume(np.zeros((5, 5, 5), np.float32), lambda hr, lr: hr, GEOMETRY)


# ----------------------------------------------------------------------------------------------
# The real network (untrained: shapes and equalities only)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]

    from vfdetect.model import build_model

    network = build_model("3d", seed=4)
    return with_random_statistics(network, 0)  # non-trivial BN statistics: folding really tested


def test_model_single_tile_equals_small_tiles(model) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import keras_predictor

    image = np.random.default_rng(1).normal(size=(23, 19, 28)).astype(np.float32)
    predictor = keras_predictor(model)
    whole = predict_volume(image, predictor, model.geometry, tile_shape=(60, 60, 60))
    tiled = predict_volume(image, predictor, model.geometry, tile_shape=(26, 29, 25), batch_size=2)
    assert whole.shape == (23, 19, 28, 3)
    np.testing.assert_allclose(whole.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_predictor_precisions_match_the_keras_model(model) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import keras_predictor

    rng = np.random.default_rng(2)
    hr = rng.normal(size=(2, 29, 29, 29, 1)).astype(np.float32)
    lr = rng.normal(size=(2, *model.geometry.lr_shape_for((29, 29, 29)), 1)).astype(np.float32)
    reference = np.asarray(model([hr, lr], training=False))
    np.testing.assert_allclose(keras_predictor(model, "float32", fold=False)(hr, lr), reference, atol=1e-6)
    np.testing.assert_allclose(keras_predictor(model, "float32")(hr, lr), reference, atol=1e-4)
    assert np.abs(keras_predictor(model, "bfloat16")(hr, lr) - reference).mean() < bfloat16_error_bound()
    with pytest.raises(VfdetectError, match="float32 only"):
        keras_predictor(model, "bfloat16", fold=False)


# ----------------------------------------------------------------------------------------------
# predict_case and the command


def _scan(shape: tuple[int, int, int] = (40, 36, 48)) -> nib.Nifti1Image:
    """A small CT-like scan (LPS-ish voxel order to test the grid round trip): a body with a bright column."""
    array = np.full(shape, -1000, dtype=np.int16)
    array[5:-5, 5:-5, :] = 40
    array[15:25, 12:22, :] = 700
    affine = np.array([[-1.2, 0, 0, 30.0], [0, -1.0, 0, 20.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])
    return nib.Nifti1Image(array, affine)


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("run")
    model.save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({"variant": "3d", "spacing": 2.0, "trainable_parameters": 1}))
    return folder


def test_predict_case_writes_outputs_on_the_input_grid(run_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import load_predictor

    predictor = load_predictor(run_dir)
    assert isinstance(predictor, Predictor) and predictor.spacing == 2.0
    image = _scan()
    centre = image.affine @ np.array([20, 17, 24, 1.0])
    vertebrae = [Vertebra(20, tuple(centre[:3]), grade=2), Vertebra(21, tuple(centre[:3] - [0, 0, 30]))]
    result = predict_case(predictor, image, vertebrae, case="tiny", out_dir=tmp_path,
                          config=PredictConfig(tile_shape=(29, 29, 29)))
    folder = tmp_path / "tiny"
    report = json.loads((folder / "report.json").read_text())
    assert set(report) >= {"case", "patient_score", "patient_fracture", "patient_threshold", "patient_rule",
                           "thresholds", "vertebrae", "model", "timings", "component_sizes", "largest_component_mm3",
                           "region", "warnings"}
    assert [v["name"] for v in report["vertebrae"]] == ["L1", "L2"]
    first = report["vertebrae"][0]
    np.testing.assert_allclose(first["centroid_voxel"], [20, 17, 24], atol=0.01)
    assert first["source"] == "given" and first["grade"] == 2
    for vertebra in report["vertebrae"]:  # the call follows the vertebra threshold (0.5)
        assert vertebra["predicted"] == ("fracture" if vertebra["fracture_probability"] >= 0.5 else "normal")
    assert 0.0 <= first["fracture_probability"] <= 1.0
    sizes = report["component_sizes"]
    assert len(sizes["probability_thresholds"]) == len(sizes["largest_component_mm3"]) == 19
    # The patient score leaves out vertebrae within 10 mm of the scan's edge unless nothing else was scored.
    assert all(isinstance(v["edge_distance_mm"], float) for v in report["vertebrae"])
    inside = [v for v in report["vertebrae"] if v["edge_distance_mm"] >= 10.0] or report["vertebrae"]
    assert report["patient_score"] == pytest.approx(max(v["fracture_probability"] for v in inside))
    assert report["patient_threshold"] == 0.5 and report["warnings"] == []
    assert report["patient_fracture"] == (report["patient_score"] >= 0.5) == result.patient_fracture
    assert report["region"]["mode"] == "spine" and report["region"]["source"] == "centroids"
    assert 0.0 < report["region"]["region_fraction"] <= report["region"]["computed_fraction"] <= 1.0

    probabilities = nib.load(folder / "probabilities.nii.gz")
    assert probabilities.shape == (*image.shape, 2)
    np.testing.assert_allclose(probabilities.affine, image.affine)
    assert probabilities.get_data_dtype() == np.uint8
    assert probabilities.dataobj.slope == pytest.approx(1 / 255)
    data = probabilities.get_fdata()
    assert data.min() >= 0 and data.max() <= 1.0 + 1e-6 and np.all(data[..., 1] >= data[..., 0] - 1 / 255)
    labels = nib.load(folder / "labels.nii.gz")
    assert labels.shape == image.shape and labels.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}
    assert_png_has_content(folder / "overlay.png")
    assert (folder / "report.csv").read_text().count("\n") == 3


def test_predict_command_skips_a_bad_case_and_fails(run_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from vfdetect.cli import cli

    good = tmp_path / "good_ct.nii.gz"
    nib.save(_scan((30, 30, 36)), good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(run_dir), str(bad), str(good), "--out", str(out),
                                      "--anchor-level", "L5", "--no-overlay", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "bad" in result.output
    assert (out / "good" / "report.json").is_file() and not (out / "bad").exists()
    assert (out / "summary.csv").read_text().startswith("case,label,name")
    report = json.loads((out / "good" / "report.json").read_text())
    assert all(v["source"] == "localised" for v in report["vertebrae"])

    assert "deprecated" in result.output

    result = CliRunner().invoke(cli, ["predict", str(run_dir), "--out", str(out)])
    assert result.exit_code == 1 and "SCAN" in result.output


# ----------------------------------------------------------------------------------------------
# Bundled models and model resolution


@pytest.fixture(scope="module")
def tiny_model():  # type: ignore[no-untyped-def]
    from vfdetect.model import build_model

    return build_model("3d", widths=(2,) * 8, fc_widths=(3, 3), seed=11)


TINY_CONFIG = {"variant": "3d", "spacing": 2.0, "trainable_parameters": 1}


@pytest.fixture()
def bundled(tiny_model, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import vfdetect.models

    folder = tmp_path / "bundle"
    folder.mkdir()
    tiny_model.save(folder / "tiny.keras")
    document = {**TINY_CONFIG, "name": "tiny", "headline": "A tiny untrained test network.",
                "patient_threshold": 0.25, "card": "MODEL_CARD.md"}
    (folder / "tiny.json").write_text(json.dumps(document))
    (folder / "MODEL_CARD.md").write_text("# tiny\n")
    (folder / "orphan.json").write_text("{}")  # no weights beside it: not a model
    monkeypatch.setattr(vfdetect.models, "MODELS_DIR", folder)
    return folder


def test_bundled_registry_lists_and_loads_the_default(bundled) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.models import bundled_models, default_model_path
    from vfdetect.predictor import load_predictor

    (model,) = bundled_models()
    assert model.name == "tiny" and model.headline.startswith("A tiny") and model.patient_threshold == 0.25
    assert model.card == bundled / "MODEL_CARD.md" and default_model_path() == bundled / "tiny.keras"
    predictor = load_predictor()
    assert predictor.name == "tiny" and predictor.spacing == 2.0 and predictor.patient_threshold == 0.25
    assert predictor.model_path == bundled / "tiny.keras" and predictor.describe()["name"] == "tiny"


def test_no_bundled_model_is_a_clear_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import vfdetect.models
    from vfdetect.errors import InputError
    from vfdetect.predictor import load_predictor

    monkeypatch.setattr(vfdetect.models, "MODELS_DIR", tmp_path / "empty")
    assert vfdetect.models.bundled_models() == []
    with pytest.raises(InputError, match="no bundled model in this installation; pass --model RUN_OR_FILE"):
        load_predictor()


def test_a_keras_file_finds_its_configuration(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.errors import InputError
    from vfdetect.predictor import load_predictor, resolve_model

    tiny_model.save(tmp_path / "net.keras")
    with pytest.raises(InputError, match="no configuration"):
        resolve_model(tmp_path / "net.keras")
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert resolve_model(tmp_path / "net.keras")[1] == tmp_path / "config.json"
    (tmp_path / "net.json").write_text(json.dumps({**TINY_CONFIG, "spacing": 3.0}))
    assert load_predictor(tmp_path / "net.keras").spacing == 3.0  # the sibling JSON wins
    with pytest.raises(InputError, match="not a model"):
        resolve_model(tmp_path / "net.json")
    with pytest.raises(InputError, match="not found"):
        resolve_model(tmp_path / "missing.keras")


def test_models_command_and_predict_with_the_bundled_model(bundled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from vfdetect.cli import cli

    listing = CliRunner().invoke(cli, ["models"])
    assert listing.exit_code == 0, listing.output
    assert "tiny (default): A tiny untrained test network." in listing.output and "MODEL_CARD.md" in listing.output
    scan = tmp_path / "one_ct.nii.gz"
    nib.save(_scan((30, 30, 36)), scan)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(scan), "--out", str(out), "--no-overlay", "--region", "whole",
                                      "--anchor-level", "L5"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "one" / "report.json").read_text())
    assert report["model"]["name"] == "tiny" and report["patient_threshold"] == 0.25  # the model's own threshold
    assert report["region"]["mode"] == "whole"
    line = [row[row.index("one: ") :] for row in result.output.splitlines() if "one: " in row][0]
    if report["patient_score"] is None:
        assert "no spine found" in line and report["patient_fracture"] is None
    else:
        verdict = "no fracture" if report["patient_score"] < 0.25 else "fracture"
        assert line.startswith(f"one: {verdict} (score {report['patient_score']:.3f}")
        assert report["patient_fracture"] == (verdict == "fracture")
    result = CliRunner().invoke(cli, ["predict", str(scan), "--out", str(out), "--no-overlay", "--quiet",
                                      "--patient-threshold", "0.9", "--model", str(bundled / "tiny.keras")])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "one" / "report.json").read_text())["patient_threshold"] == 0.9


# ----------------------------------------------------------------------------------------------
# The inference region


def bone_stand_in(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """A 'vertebra detector' stand-in: p(vertebra) rises with the intensity at the output voxel (bone),
    split 0.7 / 0.3 into normal / fracture."""
    out = [n - RF + 1 for n in hr.shape[1:4]]
    centre = hr[:, MARGIN : MARGIN + out[0], MARGIN : MARGIN + out[1], MARGIN : MARGIN + out[2], 0]
    vertebra = 1.0 / (1.0 + np.exp(-4.0 * (centre - 1.5)))
    return np.stack([1.0 - vertebra, 0.7 * vertebra, 0.3 * vertebra], axis=-1)


def _phantom(seed: int, **changes):  # type: ignore[no-untyped-def]
    import dataclasses

    from vfdetect.phantom import PhantomConfig, generate_phantom

    config = dataclasses.replace(PhantomConfig.small(), **changes)
    return generate_phantom(f"p{seed}", np.random.default_rng(seed), config)


def _scores(result) -> list[float]:  # type: ignore[no-untyped-def]
    return [v["fracture_probability"] for v in result.vertebrae]


def test_centroid_boxes_cover_every_centroid_even_off_the_spine() -> None:
    from vfdetect.region import centroid_region

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-40.0, -40.0, -40.0)
    region = centroid_region((40, 40, 40), affine, [(0.0, 0.0, 0.0), (36.0, -40.0, 0.0), (500.0, 0.0, 0.0)],
                             across_mm=10.0, along_mm=6.0)
    assert region[20, 20, 20] and region[38, 0, 20]  # the second centre sits at the volume's edge
    assert region[15:26, 15:26, 17:24].all() and not region[20, 20, 25] and not region[20, 27, 20]
    assert region.sum() == 11 * 11 * 7 + 7 * 6 * 7  # clipped at the edge; the third lies outside: nothing


def test_spine_region_contains_the_phantom_column_and_not_a_blank_volume() -> None:
    from scipy import ndimage

    from vfdetect.region import spine_region
    from vfdetect.volume import body_mask, load_scan, to_internal, world_to_voxel

    for seed in (1, 2):
        case = _phantom(seed)
        internal = to_internal(load_scan(case.image)[0], spacing=1.0)
        hu = np.asarray(internal.array, dtype=np.float32)
        region = spine_region(hu, 1.0, body_mask(hu))
        depth = ndimage.distance_transform_edt(np.pad(region, 1, constant_values=False))[1:-1, 1:-1, 1:-1]
        for vertebra in case.vertebrae:
            voxel = np.clip(np.round(world_to_voxel(internal.affine, np.asarray(vertebra.position_mm))).astype(int),
                            0, np.asarray(hu.shape) - 1)
            # The centroid lies deep inside (or the region reaches the edge of the field of view there).
            assert region[tuple(voxel)]
            edge = min(min(voxel), min(np.asarray(hu.shape) - 1 - voxel))
            assert depth[tuple(voxel)] >= min(20.0, edge + 1), (seed, vertebra.name)
    blank = np.full((60, 60, 60), 40.0, dtype=np.float32)
    assert not spine_region(blank, 1.0, np.ones(blank.shape, bool)).any()


def test_region_inference_equals_whole_volume_inference(tiny_model) -> None:  # type: ignore[no-untyped-def]
    case = _phantom(3, ribs=False, pelvis=False)
    network = Predictor(model=tiny_model, config={"variant": "3d", "spacing": 1.0})
    stand_in_predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=bone_stand_in)
    for predictor, centroids in [(network, case.vertebrae), (stand_in_predictor, case.vertebrae),
                                 (stand_in_predictor, None)]:
        results = {
            region: predict_case(predictor, case.image, centroids, config=PredictConfig(region=region, write_overlay=False,
                                                                                        map_dtype="float32"))
            for region in ("whole", "spine")
        }
        whole, spine = results["whole"], results["spine"]
        assert [v["name"] for v in spine.vertebrae] == [v["name"] for v in whole.vertebrae]
        assert len(spine.vertebrae) >= (len(case.vertebrae) if centroids else 1)
        np.testing.assert_allclose(_scores(spine), _scores(whole), atol=1e-6)
        assert spine.patient_fracture == whole.patient_fracture and spine.warnings == []
        assert spine.report["region"]["source"] == ("centroids" if centroids else "bone")


def test_region_grows_until_the_vertebrae_it_finds_are_enclosed() -> None:
    """A seed region far too tight for the vertebral bodies (bone within 10 mm of the column's track,
    no margin) grows where the map shows a vertebra at its edge, until scores and decisions equal
    whole-volume inference; without growth they do not."""
    from vfdetect.region import SpineRegionConfig

    case = _phantom(5, ribs=False, pelvis=False)
    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=bone_stand_in)
    whole = predict_case(predictor, case.image, None, config=PredictConfig(region="whole", write_overlay=False,
                                                                           map_dtype="float32"))
    results = {}
    for rounds in (0, 4):
        tight = SpineRegionConfig(reach_mm=10.0, margin_mm=0.0, grow_rounds=rounds)
        results[rounds] = predict_case(predictor, case.image, None, config=PredictConfig(
            write_overlay=False, map_dtype="float32", spine_region=tight))
    grown, seed_only = results[4], results[0]
    assert grown.report["region"]["growth_rounds"] >= 1
    assert grown.report["region"]["region_fraction"] > seed_only.report["region"]["region_fraction"]
    assert [v["name"] for v in grown.vertebrae] == [v["name"] for v in whole.vertebrae]
    np.testing.assert_allclose(_scores(grown), _scores(whole), atol=1e-6)
    assert grown.patient_fracture == whole.patient_fracture
    assert seed_only.report["region"]["growth_rounds"] == 0
    differs = [v["name"] for v in seed_only.vertebrae] != [v["name"] for v in whole.vertebrae] or not np.allclose(
        _scores(seed_only), _scores(whole), atol=1e-3)
    assert differs  # the tight seed alone loses part of the bodies


def test_a_model_loading_in_the_background_predicts_the_same(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import PendingPredictor, load_predictor, load_predictor_in_background

    run = tmp_path / "run"
    run.mkdir()
    tiny_model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"variant": "3d", "spacing": 1.5}))
    case = _phantom(6, ribs=False, pelvis=False)
    config = PredictConfig(write_overlay=False, map_dtype="float32")
    pending = load_predictor_in_background(run, precision="float32")
    assert isinstance(pending, PendingPredictor) and pending.spacing == 1.5  # known before the network loads
    in_background = predict_case(pending, case.image, case.vertebrae, config=config)
    loaded = predict_case(load_predictor(run, precision="float32"), case.image, case.vertebrae, config=config)
    np.testing.assert_array_equal(_scores(in_background), _scores(loaded))
    assert in_background.report["model"] == loaded.report["model"]
    with pytest.raises(VfdetectError, match="model file not found"):
        load_predictor_in_background(tmp_path / "missing.keras")


def test_vertebra_at_the_edge_of_the_field_of_view_is_scored() -> None:
    from vfdetect.volume import world_to_voxel

    case = _phantom(4, ribs=False, pelvis=False)
    top = max(case.vertebrae, key=lambda v: v.position_mm[2])
    array = np.asarray(case.image.dataobj)
    voxel = world_to_voxel(case.image.affine, np.asarray(top.position_mm))
    # Cut the scan 4 voxels beyond the top vertebra's centroid along the axis closest to superior.
    axis = int(np.argmax(np.abs(case.image.affine[2, :3])))
    upward = case.image.affine[2, axis] > 0
    keep = [slice(None)] * 3
    keep[axis] = slice(0, int(voxel[axis]) + 5) if upward else slice(int(voxel[axis]) - 4, None)
    affine = case.image.affine.copy()
    if not upward:
        affine[:3, 3] += affine[:3, axis] * (int(voxel[axis]) - 4)
    cut = nib.Nifti1Image(array[tuple(keep)], affine)
    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=bone_stand_in)
    config = PredictConfig(write_overlay=False, map_dtype="float32")
    spine = predict_case(predictor, cut, None, config=config)
    whole = predict_case(predictor, cut, None, config=PredictConfig(region="whole", write_overlay=False,
                                                                    map_dtype="float32"))
    np.testing.assert_allclose(_scores(spine), _scores(whole), atol=1e-6)
    highest = max(whole.vertebrae, key=lambda v: v["centroid_mm"][2])
    assert highest["centroid_mm"][2] > top.position_mm[2] - 25.0  # the cut vertebra is among those scored
    given = predict_case(predictor, cut, [top], config=config)
    assert given.vertebrae[0]["fracture_probability"] > 0.0  # inside the computed region


def test_blank_volume_says_no_spine_found(tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls = []

    def counting(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        calls.append(1)
        return bone_stand_in(hr, lr)

    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=counting)
    blank = nib.Nifti1Image(np.full((50, 50, 60), 30, dtype=np.int16), np.eye(4))
    result = predict_case(predictor, blank, None, case="blank", out_dir=tmp_path, config=PredictConfig())
    assert not calls and result.vertebrae == [] and math.isnan(result.patient_score)
    assert result.patient_fracture is None and "no spine found" in result.warnings[0]
    report = json.loads((tmp_path / "blank" / "report.json").read_text())
    assert report["patient_score"] is None and report["patient_fracture"] is None
    assert report["region"]["computed_fraction"] == 0.0 and "no spine found" in report["warnings"][0]


def test_input_grid_maps_equal_the_resampled_internal_map(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """probabilities.nii.gz and labels.nii.gz are resampled only where the map is not background;
    they equal the whole internal map resampled onto the input grid (and quantised)."""
    from vfdetect.volume import load_scan, to_source

    case = _phantom(7, ribs=False, pelvis=False)
    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=bone_stand_in)
    result = predict_case(predictor, case.image, None, case="p7", out_dir=tmp_path,
                          config=PredictConfig(write_overlay=False, keep_maps=True))
    internal = np.asarray(result.probabilities.array)  # the map's own dtype, as written
    internal_affine = np.asarray(result.probabilities.affine)
    _, grid = load_scan(case.image)
    stacked = np.stack([internal[..., 2], internal[..., 1] + internal[..., 2]], axis=-1)
    expected = np.clip(np.rint(np.clip(to_source(stacked, internal_affine, grid), 0, 1) / (1 / 255)), 0, 255)
    saved = nib.load(tmp_path / "p7" / "probabilities.nii.gz")
    stored = np.asarray(saved.dataobj.get_unscaled(), dtype=np.int16)
    assert saved.dataobj.slope == pytest.approx(1 / 255)
    difference = np.abs(stored - expected)
    assert stored.max() > 200 and difference.max() <= 1 and np.mean(difference > 0) < 1e-4  # float rounding only
    labels = np.asarray(nib.load(tmp_path / "p7" / "labels.nii.gz").dataobj)
    expected_labels = to_source(np.argmax(internal, axis=-1).astype(np.uint8), internal_affine, grid, order=0)
    assert set(np.unique(labels)) >= {0, 1}
    np.testing.assert_array_equal(labels, expected_labels)


def test_scores_map_is_the_scored_internal_map_cropped_with_its_affine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.case_outputs import read_scores_map
    from vfdetect.volume import Volume

    case = _phantom(6, ribs=False, pelvis=False)
    predictor = Predictor(model=None, config={"variant": "3d", "spacing": 1.0}, fn=bone_stand_in)
    given = case.vertebrae[1:3]
    result = predict_case(predictor, case.image, given, case="p6", out_dir=tmp_path,
                          config=PredictConfig(write_overlay=False, keep_maps=True))
    internal = np.asarray(result.probabilities.array)
    internal_affine = np.asarray(result.probabilities.affine)
    path = tmp_path / "p6" / "scores_map.nii.gz"
    assert result.paths["scores_map"] == path
    image = nib.load(path)
    assert image.get_data_dtype() == np.float32 and image.ndim == 4 and image.shape[3] == 2
    assert np.prod(image.shape[:3]) < 0.8 * np.prod(internal.shape[:3])  # cropped to the computed voxels
    data = np.asarray(image.dataobj)
    saved = read_scores_map(path)
    assert saved.grid_shape == internal.shape[:3]
    np.testing.assert_array_equal(saved.grid_affine, internal_affine)
    # A known world point: the internal voxel of highest p(fracture) and a centroid land on the same values.
    peak = np.array(np.unravel_index(np.argmax(internal[..., 2]), internal.shape[:3]))
    centroid_voxel = np.rint(np.linalg.inv(internal_affine) @ np.array([*given[0].position_mm, 1.0]))[:3].astype(int)
    for voxel in (peak, centroid_voxel):
        world = internal_affine @ np.array([*voxel, 1.0])
        in_crop = np.linalg.inv(image.affine) @ world
        np.testing.assert_allclose(in_crop[:3], np.rint(in_crop[:3]), atol=1e-3)
        index = tuple(np.rint(in_crop[:3]).astype(int))
        assert data[index][0] == np.float32(internal[(*voxel, 2)]) > 0
        assert data[index][1] == np.float32(internal[(*voxel, 1)]) > 0
        np.testing.assert_array_equal(np.asarray(saved.crop_start) + index, voxel)
    # Outside the crop the internal map is background; the exact centroids are recorded.
    outside = np.ones(internal.shape[:3], dtype=bool)
    outside[tuple(slice(a, a + n) for a, n in zip(saved.crop_start, image.shape[:3], strict=True))] = False
    assert not internal[outside][:, 1:].any()
    assert saved.centroids == tuple((v.label, tuple(v.position_mm)) for v in given)
    # The saved crop, widened with zeros, scores the vertebrae exactly as the report did.
    centres = np.array([v.position_mm for v in given])
    volume = saved.covering(np.concatenate([centres - 10, centres + 10]))
    rescored = [s["fracture_probability"] for s in vertebra_scores(volume, given)]
    np.testing.assert_allclose(rescored, _scores(result), rtol=0, atol=1e-6)
    fracture = Volume(internal[..., 2], internal_affine)
    np.testing.assert_allclose(rescored, [s["fracture_probability"] for s in vertebra_scores(fracture, given)],
                               rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Tiles fitted to the region, precision choice


def _two_blob_mask(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    mask = np.linalg.norm(grid - np.array([9, 11, 10]), axis=-1) < 6
    mask |= np.linalg.norm(grid - np.array([40, 30, 52]), axis=-1) < 8
    mask[20:23, 5:7, 30:31] = True
    return mask


@pytest.mark.parametrize("limit", [9, 12, 30])
def test_tile_plan_covers_the_region_exactly_once(limit: int) -> None:
    from vfdetect.tiling import plan_tiles

    shape = (53, 41, 64)
    mask = _two_blob_mask(shape)
    tiles = plan_tiles(shape, GEOMETRY, (limit,) * 3, mask)
    cover = np.zeros(shape, dtype=np.int32)
    for tile in tiles:
        assert all(s % 3 == 0 for s in tile.start) and all(0 < o <= limit for o in tile.output_shape)
        cover[tuple(slice(s, s + o) for s, o in zip(tile.start, tile.output_shape, strict=True))] += 1
    assert cover.max() == 1 and np.all(cover[mask] == 1)
    whole_plan = plan_tiles(shape, GEOMETRY, (limit,) * 3)
    assert sum(t.voxels_inside(shape) for t in whole_plan) == mask.size
    assert sum(t.voxels_inside(shape) for t in tiles) < 0.6 * mask.size  # the clipped tiles fit the blobs
    assert plan_tiles(shape, GEOMETRY, (limit,) * 3, np.zeros(shape, bool)) == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_region_tiles_give_the_whole_volume_values(batch_size: int) -> None:
    shape = (53, 41, 64)
    image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    mask = _two_blob_mask(shape)
    whole = predict_volume(image, stand_in, GEOMETRY, tile_shape=(40, 40, 40))
    stats: dict = {}
    region = predict_volume(image, stand_in, GEOMETRY, tile_shape=(29, 32, 35), batch_size=batch_size, mask=mask,
                            stats=stats)
    np.testing.assert_array_equal(region[mask], whole[mask])
    assert np.all(region[~mask][:, 0][region[~mask][:, 0] != whole[~mask][:, 0]] == 1.0)
    assert stats["computed_voxels"] < 0.6 * mask.size and stats["tiles"] >= 2


def test_region_tiles_with_the_network(model) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import keras_predictor

    shape = (53, 41, 64)
    image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    mask = _two_blob_mask(shape)
    predictor = keras_predictor(model, "float32")
    whole = predict_volume(image, predictor, model.geometry, tile_shape=(46, 46, 46))
    region = predict_volume(image, predictor, model.geometry, tile_shape=(40, 40, 40), mask=mask)
    np.testing.assert_allclose(region[mask], whole[mask], atol=1e-5)


def test_auto_precision_is_bfloat16_only_with_native_bf16(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vfdetect.predictor import cpu_flags, resolve_precision

    assert resolve_precision("auto", frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert resolve_precision("auto", frozenset({"amx_tile", "amx_bf16"})) == "bfloat16"
    assert resolve_precision("auto", frozenset({"avx2", "avx512f", "avx512_vnni"})) == "float32"
    assert resolve_precision("auto", frozenset()) == "float32"
    assert resolve_precision("auto", frozenset({"avx512_bf16"}), gpu=True) == "float32"
    assert resolve_precision("float32", frozenset({"avx512_bf16"})) == "float32"
    assert resolve_precision("bfloat16", frozenset()) == "bfloat16"
    with pytest.raises(VfdetectError, match="unknown precision"):
        resolve_precision("float16")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.slow
def test_bfloat16_vertebra_scores_of_the_bundled_model_stay_within_0_01_of_float32() -> None:
    """The condition for bfloat16 by default, checked with the model that runs by default."""
    from vfdetect.predictor import load_predictor

    shipped = load_predictor(None)
    case = _phantom(8)
    config = PredictConfig(write_overlay=False, map_dtype="float32")
    scores = {}
    for precision in ("float32", "bfloat16"):
        predictor = Predictor(model=shipped.model, config=shipped.config, precision=precision)
        result = predict_case(predictor, case.image, case.vertebrae, config=config)
        assert result.report["model"]["precision"] == precision
        scores[precision] = np.array(_scores(result))
    assert len(scores["float32"]) == len(case.vertebrae) > 0
    assert np.abs(scores["bfloat16"] - scores["float32"]).max() <= 0.01


def test_the_shipped_model_is_bundled_valid_and_small() -> None:
    """The package ships its default model: listed, under 5 MB, a configuration predict accepts."""
    from vfdetect.models import bundled_models, default_model
    from vfdetect.settings import check_model_config

    models = bundled_models()
    assert models, "vfdetect/models/ holds no bundled model"
    model = default_model()
    assert model.weights.stat().st_size <= 5 * 1024 * 1024
    check_model_config(model.config_path, model.config)
    assert model.config["variant"] == "3d" and 0.0 < model.patient_threshold < 1.0
    assert model.card is not None and model.card.is_file() and model.headline
