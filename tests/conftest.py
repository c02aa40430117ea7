"""Shared test fixtures: the real CT files beside the checkout, and temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("VFDETECT_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


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


