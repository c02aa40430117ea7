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


def with_random_statistics(model, seed: int):  # type: ignore[no-untyped-def]
    """``model`` with non-trivial BatchNorm statistics, PReLU slopes and biases (an untrained model has
    identities there, which would let a wrong BatchNorm folding pass)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape),
                               rng.normal(0, 0.3, shape), rng.uniform(0.5, 2.0, shape)])
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([rng.uniform(0.0, 0.3, layer.alpha.shape)])
        elif layer.name.endswith("input_bias") or layer.name == "class_bias":
            layer.set_weights([rng.normal(0, 0.5, layer.bias.shape)])
    return model
