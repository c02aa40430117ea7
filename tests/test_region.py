"""Growth of the spine region where the network finds a vertebra at its edge (vfdetect.region.region_growth)."""

from __future__ import annotations

import numpy as np
import pytest

from vfdetect.errors import VfdetectError
from vfdetect.region import SpineRegionConfig, chain_extension, region_growth

SHAPE = (60, 60, 60)


def _ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def _background(found: np.ndarray) -> np.ndarray:
    """p(background): 0.1 where something is found, 1 elsewhere."""
    return np.where(found, 0.1, 1.0).astype(np.float32)


def test_nothing_found_or_found_deep_inside_needs_no_growth() -> None:
    region = np.zeros(SHAPE, dtype=bool)
    region[10:50, 10:50, 10:50] = True
    assert region_growth(region, np.ones(SHAPE, np.float32), 1.0) is None
    assert region_growth(region, _background(_ball((30, 30, 30), 6)), 1.0) is None
    assert region_growth(np.zeros(SHAPE, bool), _background(_ball((30, 30, 30), 6)), 1.0) is None


def test_found_at_the_edge_grows_around_it_within_the_allowed_voxels() -> None:
    region = np.zeros(SHAPE, dtype=bool)
    region[10:50, 10:50, 10:36] = True
    found = _ball((30, 30, 36), 6)  # a body cut in half by the region's top face
    add = region_growth(region, _background(found), 1.0, config=SpineRegionConfig(grow_mm=12.0))
    assert add is not None
    assert not (add & region).any()
    assert add[30, 30, 36:42].all()  # the cut half of the body
    assert not add[30, 30, 56:].any() and not add[30, 30, :36].any()  # within grow_mm (+ a block) of it
    allowed = np.ones(SHAPE, dtype=bool)
    allowed[:, 30:, :] = False
    limited = region_growth(region, _background(found), 1.0, allowed=allowed, config=SpineRegionConfig(grow_mm=12.0))
    assert limited is not None and not limited[:, 30:, :].any() and limited[30, 25, 37]
    assert region_growth(region, _background(found), 1.0, allowed=np.zeros(SHAPE, bool)) is None


def test_the_volume_edge_is_not_a_region_edge() -> None:
    region = np.zeros(SHAPE, dtype=bool)
    region[10:50, 10:50, 30:] = True  # reaches the top of the field of view
    assert region_growth(region, _background(_ball((30, 30, 59), 6)), 1.0) is None


def test_threshold_and_guard() -> None:
    region = np.zeros(SHAPE, dtype=bool)
    region[10:50, 10:50, 10:50] = True
    faint = np.where(_ball((30, 30, 49), 4), 0.8, 1.0).astype(np.float32)  # p(vertebra) 0.2 at the edge
    assert region_growth(region, faint, 1.0, config=SpineRegionConfig(grow_threshold=0.3)) is None
    assert region_growth(region, faint, 1.0, config=SpineRegionConfig(grow_threshold=0.1)) is not None
    near = _background(_ball((30, 30, 38), 2))  # 9-12 mm inside the top face
    assert region_growth(region, near, 1.0, config=SpineRegionConfig(grow_guard_mm=4.0)) is None
    assert region_growth(region, near, 1.0, config=SpineRegionConfig(grow_guard_mm=16.0)) is not None


def test_chain_extension_looks_one_body_beyond_each_end() -> None:
    affine = np.eye(4)  # voxel = mm
    config = SpineRegionConfig(box_across_mm=5.0, box_along_mm=4.0, extend_step_mm=12.0)
    region = np.zeros(SHAPE, dtype=bool)
    add = chain_extension([(30.0, 30.0, 40.0), (30.0, 33.0, 25.0)], region, affine, config=config)
    assert add is not None
    assert add[30, 36, 10] and add[30, 27, 55]  # 15 mm beyond each end, following the chain's tilt
    assert not add[30, 27, 10] and not add[30, 36, 55]
    assert not add[30, 30, 40] and not add[30, 30, 25] and not add[30, 30, 32]
    region |= add
    assert chain_extension([(30.0, 30.0, 40.0), (30.0, 33.0, 25.0)], region, affine, config=config) is None
    lone = chain_extension([(30.0, 30.0, 30.0)], np.zeros(SHAPE, bool), affine, config=config)
    assert lone is not None and lone[30, 30, 42] and lone[30, 30, 18] and not lone[30, 30, 30]
    assert chain_extension([], np.zeros(SHAPE, bool), affine, config=config) is None
    assert chain_extension([(30.0, 30.0, 30.0)], np.zeros(SHAPE, bool), affine, allowed=np.zeros(SHAPE, bool)) is None


@pytest.mark.parametrize("changes", [{"grow_threshold": 1.0}, {"grow_guard_mm": -1.0}, {"grow_mm": 0.0},
                                     {"grow_rounds": -1}, {"extend_step_mm": 0.0}])
def test_bad_growth_settings_are_refused(changes: dict) -> None:
    with pytest.raises(VfdetectError, match="growth"):
        SpineRegionConfig(**changes)
