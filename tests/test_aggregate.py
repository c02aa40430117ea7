"""Vertebra and patient scores (vfdetect.aggregate) and vertebra localisation (vfdetect.localise); numpy only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vfdetect.aggregate import (
    COMPONENT_THRESHOLDS,
    cube_offsets,
    largest_at,
    largest_components,
    patient_decision,
    patient_positive,
    patient_rule,
    patient_score,
    vertebra_scores,
)
from vfdetect.errors import VfdetectError
from vfdetect.localise import (
    LocalisationConfig,
    drop_fragments,
    identification,
    localise_vertebrae,
    name_by_spacing,
    name_from_anchor,
    spine_chain,
)
from vfdetect.vertebrae import Vertebra, vertebra_label
from vfdetect.volume import Volume


def _grid_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _world_map(shape, affine, function) -> Volume:  # type: ignore[no-untyped-def]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return Volume(function(world).reshape(shape).astype(np.float32), affine)


def test_cube_has_ten_samples_per_axis_centred() -> None:
    offsets = cube_offsets(10.0, 1.0)
    assert offsets.shape == (1000, 3)
    np.testing.assert_allclose(offsets.mean(axis=0), 0.0, atol=1e-12)
    assert offsets.max() == pytest.approx(4.5)


def test_vertebra_score_is_a_gaussian_weighted_cube_mean() -> None:
    affine = _grid_affine((1, 1, 1), (0, 0, 0))
    constant = Volume(np.full((30, 30, 30), 0.3, np.float32), affine)
    vertebra = Vertebra(20, (15.0, 15.0, 15.0))
    (result,) = vertebra_scores(constant, [vertebra], normal_probability=constant)
    assert result["fracture_probability"] == pytest.approx(0.3)
    assert result["normal_probability"] == pytest.approx(0.3)
    assert result["predicted"] == "normal" and result["name"] == "L1"
    # A map that is 1 on one half-space x >= 15: the plain mean is 1/2; the Gaussian weights keep it 1/2
    # by symmetry; shifting the cube moves it toward 1 more steeply with a narrow Gaussian.
    half = _world_map((30, 30, 30), affine, lambda w: (w[:, 0] >= 15.0).astype(float))
    plain = vertebra_scores(half, [Vertebra(20, (15.0, 15, 15))], sigma_mm=None)[0]["fracture_probability"]
    assert plain == pytest.approx(0.5, abs=0.06)
    shifted = Vertebra(20, (16.5, 15.0, 15.0))
    wide = vertebra_scores(half, [shifted], sigma_mm=None)[0]["fracture_probability"]
    narrow = vertebra_scores(half, [shifted], sigma_mm=2.0)[0]["fracture_probability"]
    assert 0.6 < wide < narrow < 1.0
    assert vertebra_scores(half, [Vertebra(20, (25.0, 15, 15))])[0]["predicted"] == "fracture"


def test_vertebra_score_does_not_depend_on_the_grid() -> None:
    def smooth(world: np.ndarray) -> np.ndarray:
        return 0.5 + 0.4 * np.sin(world[:, 0] / 7.0) * np.cos(world[:, 2] / 9.0)

    fine = _world_map((40, 40, 40), _grid_affine((1, 1, 1), (-20, -20, -20)), smooth)
    coarse_affine = np.array([[0, 0, -2.0, 22.0], [0, 1.5, 0, -21.0], [1.0, 0, 0, -20.0], [0, 0, 0, 1]])
    coarse = _world_map((42, 30, 24), coarse_affine, smooth)
    vertebrae = [Vertebra(20, (3.0, -2.0, 4.0)), Vertebra(21, (-6.0, 5.0, -8.0))]
    a = [r["fracture_probability"] for r in vertebra_scores(fine, vertebrae)]
    b = [r["fracture_probability"] for r in vertebra_scores(coarse, vertebrae)]
    np.testing.assert_allclose(a, b, atol=0.01)


def test_vertebra_outside_the_map_gets_nan() -> None:
    volume = Volume(np.ones((10, 10, 10), np.float32), np.eye(4))
    (result,) = vertebra_scores(volume, [Vertebra(20, (100.0, 0, 0))])
    assert math.isnan(result["fracture_probability"]) and result["predicted"] == "normal"


def test_largest_components_per_threshold_in_mm3() -> None:
    array = np.zeros((30, 30, 30), np.float32)
    array[2:6, 2:6, 2:6] = 0.9  # 64 voxels
    array[10:20, 10:15, 10:12] = 0.6  # 100 voxels
    array[25, 25, 25] = 0.95
    volume = Volume(array, np.diag([2.0, 1.0, 1.0, 1.0]))  # 2 mm^3 voxels
    sizes = largest_components(volume, [0.5, 0.7, 0.92, 0.99])
    assert sizes == [200.0, 128.0, 2.0, 0.0]
    assert patient_positive(sizes[0], 150.0) and not patient_positive(sizes[1], 150.0)
    assert not patient_positive(0.0, 0.0)
    all_sizes = largest_components(volume)
    assert len(all_sizes) == len(COMPONENT_THRESHOLDS)
    assert largest_at(COMPONENT_THRESHOLDS, all_sizes, 0.5) == 200.0
    with pytest.raises(VfdetectError):
        largest_at(COMPONENT_THRESHOLDS, all_sizes, 0.52)


def test_patient_score_and_decision_follow_one_rule() -> None:
    results = [{"fracture_probability": 0.2}, {"fracture_probability": float("nan")}, {"fracture_probability": 0.7}]
    assert patient_score(results) == 0.7
    assert math.isnan(patient_score([])) and math.isnan(patient_score([{"fracture_probability": float("nan")}]))
    assert patient_decision(0.7, 0.7) is True and patient_decision(0.69, 0.7) is False
    assert patient_decision(float("nan"), 0.5) is None
    assert patient_decision(patient_score(results)) is True  # default threshold 0.5
    assert "0.35" in patient_rule(0.35) and "patient_score" in patient_rule(0.35)
    with pytest.raises(VfdetectError):
        patient_decision(0.4, 0.0)


def test_vertebrae_at_the_edge_of_the_view_count_only_when_nothing_else_was_scored() -> None:
    from types import SimpleNamespace

    from vfdetect.aggregate import edge_distance_mm

    grid = SimpleNamespace(shape=(100, 80, 60), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    assert edge_distance_mm(grid, (50.0, 40.0, 60.0)) == pytest.approx(39.5)  # y: 80 - 0.5 - 40
    assert edge_distance_mm(grid, (50.0, 40.0, 116.0)) == pytest.approx(3.0)  # z: (59.5 - 58) * 2 mm
    assert edge_distance_mm(grid, (-3.0, 40.0, 60.0)) == pytest.approx(-2.5)
    cut, inside = {"fracture_probability": 0.9, "edge_distance_mm": 3.0}, {"fracture_probability": 0.2, "edge_distance_mm": 40.0}
    assert patient_score([cut, inside]) == 0.2
    assert patient_score([cut]) == 0.9
    assert patient_score([cut, inside], edge_margin_mm=0.0) == 0.9
    assert patient_score([cut, {"fracture_probability": 0.3}]) == 0.3  # no distance: counted
    # The sacrum is reported but counts only when nothing else is left.
    sacrum = {"label": 26, "fracture_probability": 0.95, "edge_distance_mm": 50.0}
    assert patient_score([sacrum, inside]) == 0.2
    assert patient_score([sacrum, cut]) == 0.95
    assert patient_score([{**sacrum, "label": 24}, inside]) == 0.95  # L5 counts


def _spine_map(levels: list[int], rng: np.random.Generator, merge: tuple[int, int] | None = None):  # type: ignore[no-untyped-def]
    """p(vertebra)-like map: ellipsoidal bodies along a curved spine (lowest = last level), 1 mm grid."""
    gaps = {8: 20, 9: 20, 10: 21, 11: 21, 12: 22, 13: 23, 14: 24, 15: 25, 16: 26, 17: 27, 18: 28, 19: 31,
            20: 34, 21: 36, 22: 37, 23: 37, 24: 35}
    z = 15.0
    centres = []
    for label in reversed(levels):
        centres.append((label, z))
        z += gaps.get(label - 1, 30) if label > 8 else 20
    shape = (60, 70, int(z) + 10)
    array = np.zeros(shape, np.float32)
    x, y, zz = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    truth = []
    for label, cz in centres:
        cx, cy = 30 + 4 * math.sin(cz / 60.0), 35 + 6 * math.cos(cz / 50.0)
        height = 0.32 * gaps.get(label, 30)
        body = ((x - cx) / 14) ** 2 + ((y - cy) / 11) ** 2 + ((zz - cz) / height) ** 2 <= 1.0
        array[body] = rng.uniform(0.7, 1.0)
        truth.append(Vertebra(label, (cx, cy, cz)))
    if merge is not None:
        lower = [c for c in truth if c.label == merge[1]][0]
        upper = [c for c in truth if c.label == merge[0]][0]
        bridge = (np.abs(x - lower.position_mm[0]) < 5) & (np.abs(y - lower.position_mm[1]) < 5)
        bridge &= (zz > lower.position_mm[2]) & (zz < upper.position_mm[2])
        array[bridge] = 0.9
    array += rng.normal(0, 0.05, shape).astype(np.float32)
    return Volume(np.clip(array, 0, 1), np.eye(4)), truth


def test_localisation_finds_orders_and_names_bodies() -> None:
    rng = np.random.default_rng(0)
    levels = [vertebra_label(n) for n in ("T11", "T12", "L1", "L2", "L3", "L4", "L5")]
    volume, truth = _spine_map(levels, rng, merge=(vertebra_label("L2"), vertebra_label("L3")))
    found = localise_vertebrae(volume, anchor_level="L5")
    assert [v.name for v in found] == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    scores = identification(found, truth)
    assert scores["identification_rate"] == 1.0
    assert scores["mean_error_mm"] < 3.0
    shifted = localise_vertebrae(volume, anchor_level="L4")
    assert identification(shifted, truth)["identification_rate"] == 0.0
    assert identification(shifted, truth)["detection_rate"] == 1.0


def test_localisation_keeps_the_column_and_drops_bone_beside_it() -> None:
    """Iliac-wing- and femoral-head-like blobs beside the lowest bodies are not vertebrae."""
    rng = np.random.default_rng(1)
    levels = [vertebra_label(n) for n in ("T12", "L1", "L2", "L3", "L4", "L5")]
    volume, truth = _spine_map(levels, rng)
    shape = volume.array.shape
    wide = np.zeros((shape[0] + 160, shape[1], shape[2]), np.float32)
    wide[80 : 80 + shape[0]] = volume.array
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in wide.shape], indexing="ij")
    for cx, cz in ((30.0, 20.0), (30.0, 45.0), (190.0, 30.0), (185.0, 60.0)):  # beside L5 and L4
        wide[((x - cx) / 18) ** 2 + ((y - 35) / 14) ** 2 + ((z - cz) / 14) ** 2 <= 1.0] = 0.9
    moved = [Vertebra(v.label, (v.position_mm[0] + 80, *v.position_mm[1:])) for v in truth]
    found = localise_vertebrae(Volume(wide, np.eye(4)), anchor_level="L5")
    assert [v.name for v in found] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert identification(found, moved)["identification_rate"] == 1.0
    # Without the chain every blob would have been a body.
    from vfdetect.localise import LocalisationConfig as Config

    loose = Config(chain_lateral_mm=500.0, chain_ap_mm=500.0, chain_min_step_mm=0.0, fragment_gap_fraction=0.0)
    assert len(localise_vertebrae(Volume(wide, np.eye(4)), config=loose)) > len(levels)


def test_chain_and_fragments_on_positions() -> None:
    column = [np.array([0.0, 0.0, z]) for z in (200.0, 170.0, 140.0, 110.0, 80.0)]
    decoy = np.array([60.0, 0.0, 95.0])
    centres = np.array([*column, decoy])
    assert spine_chain(centres, np.ones(6)) == [0, 1, 2, 3, 4]
    # A fragment 10 mm below the third body, between bodies 30 mm apart, is dropped (the lighter one).
    with_fragment = np.array([*column[:3], np.array([2.0, 5.0, 130.0]), *column[3:]])
    masses = np.array([1.0, 1.0, 1.0, 0.3, 1.0, 1.0])
    assert drop_fragments(with_fragment, masses) == [0, 1, 2, 4, 5]
    # The sacrum curves backwards: S1 and S2 are closer along z than lumbar bodies but not fragments.
    lumbar = [np.array([0.0, 40.0, z]) for z in (150.0, 113.0, 76.0, 39.0)]
    sacrum = [np.array([0.0, 20.0, 12.0]), np.array([0.0, 3.0, -8.0])]
    assert drop_fragments(np.array([*lumbar, *sacrum]), np.ones(6)) == [0, 1, 2, 3, 4, 5]
    # Regular bodies are all kept, and short chains are left alone.
    assert drop_fragments(np.array(column), np.ones(5)) == [0, 1, 2, 3, 4]
    assert drop_fragments(np.array(column[:3]), np.ones(3)) == [0, 1, 2]


def test_names_from_spacing_and_anchor() -> None:
    assert [vertebra_label(n) for n in ("L3", "L4", "L5")] == name_from_anchor(3, "L5")
    with pytest.raises(VfdetectError):
        name_from_anchor(25, "L5")
    lumbar = [np.array([0.0, 0.0, -z]) for z in np.cumsum([0, 34, 36, 37, 37])]
    assert name_by_spacing(lumbar)[-1] in (vertebra_label("L5"), vertebra_label("S1"))
    thoracic = [np.array([0.0, 0.0, -z]) for z in np.cumsum([0, 20, 20, 21, 21, 22])]
    assert name_by_spacing(thoracic)[0] <= vertebra_label("T4")


def test_localisation_config_is_validated() -> None:
    with pytest.raises(VfdetectError):
        LocalisationConfig(threshold=1.5)
    assert localise_vertebrae(Volume(np.zeros((10, 10, 10), np.float32), np.eye(4))) == []
