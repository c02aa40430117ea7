"""Cost model: how much network work the spine-region tiling costs, per tile output size.

For the default full-size phantom (``PhantomConfig()``, seed 0, as ``bench_inference.py compare``)
the default spine region is found, the tiles of :func:`vfdetect.tiling.plan_tiles` are planned
for each tile output size, and each tile's work is counted layer by layer at the layer's real
spatial size (valid convolutions shrink from the tile's input to its output; the subsampled
pathway runs on the tile's LR grid; the FC layers on the output). Printed: tiles, the fraction of
voxels computed, and the total work as a fraction of one whole-volume pass at the asymptotic
multiply-adds per voxel (:func:`vfdetect.model.flops_per_output_voxel`). Needs no trained model
and no timing: it shows which tile size wastes least, independently of the machine.

Usage::

    python benchmarks/bench_tiles.py [--sizes 30 42 54 66 78 102] [--out work/benchmarks/tiles.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def tile_work(output: tuple[int, ...], config: object) -> float:
    """Multiply-adds of one tile of output ``output`` (voxels per axis) for a DeepMedic ``config``."""
    out = np.asarray(output, dtype=np.float64)
    shrink = [kernel[0] - 1 for kernel in config.kernels]  # type: ignore[attr-defined]
    total = 0.0
    for grid, widths in ((out, config.widths), (np.ceil(out / np.asarray(config.subsample_factor)), config.subsampled_widths)):  # type: ignore[attr-defined]
        remaining, channels = sum(shrink), 1
        for width, kernel, step in zip(widths, config.kernels, shrink, strict=True):  # type: ignore[attr-defined]
            remaining -= step
            total += float(np.prod(grid + remaining)) * channels * width * math.prod(kernel)
            channels = width
    channels, fc = config.widths[-1] + config.subsampled_widths[-1], 0  # type: ignore[attr-defined]
    for width in (*config.fc_widths, config.num_classes):  # type: ignore[attr-defined]
        fc += channels * width
        channels = width
    return total + float(np.prod(out)) * fc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 36, 42, 48, 54, 60, 66, 78, 90, 102])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from vfdetect.geometry import geometry_for
    from vfdetect.model import DeepMedicConfig
    from vfdetect.phantom import PhantomConfig, generate_phantom
    from vfdetect.predict import PredictConfig, inference_region
    from vfdetect.preprocess import prepare_scan
    from vfdetect.tiling import plan_tiles

    config = DeepMedicConfig.from_dict({"variant": "3d"})
    geometry = geometry_for("3d")
    case = generate_phantom("bench", np.random.default_rng(args.seed), PhantomConfig())
    prepared = prepare_scan(case.image, spacing=1.0)
    settings = PredictConfig()
    region = inference_region(settings.region, prepared.hu, prepared.affine, prepared.body_mask, None,
                              skip_air=settings.skip_air, config=settings.spine_region)
    assert region.mask is not None
    mask = region.mask
    per_voxel = tile_work((1000, 1000, 1000), config) / 1e9  # asymptotic work per output voxel
    rows = []
    print(f"region: {100 * mask.mean():.1f} % of {mask.size / 1e6:.1f}M voxels")
    print("output size | tiles | computed voxels | work (whole-volume passes)")
    for size in args.sizes:
        tiles = plan_tiles(mask.shape, geometry, (size,) * 3, mask)
        computed = sum(int(np.prod(tile.output_shape)) for tile in tiles) / mask.size
        work = sum(tile_work(tile.output_shape, config) for tile in tiles) / per_voxel / mask.size
        rows.append({"output": size, "tiles": len(tiles), "computed_fraction": computed, "work_fraction": work})
        print(f"{size:11d} | {len(tiles):5d} | {100 * computed:14.1f} % | {work:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"region_fraction": float(mask.mean()), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
