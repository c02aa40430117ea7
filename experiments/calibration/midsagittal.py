"""Mid-sagittal slice of a phantom next to the real sub-verse014 one, as one PNG for eyeballing.

    .venv/bin/python experiments/calibration/midsagittal.py --out /tmp/midsagittal.png [--seed 3] [--small]

Both scans are brought to RAS; the sagittal plane goes through the mean body centroid. Shown at
1 mm (the real scan's slice axis is left-right, so its sagittal plane is native) in a bone window
(-250..1250 HU) and, below, a soft-tissue window (-160..240 HU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from scipy import ndimage

from vfdetect.phantom import PhantomConfig, generate_phantom

HERE = Path(__file__).resolve().parent
DEFAULT_REAL = HERE.parents[1].parent / "shared" / "data" / "real"


def _sagittal(image: nib.Nifti1Image, centre_mm: np.ndarray) -> np.ndarray:
    """The RAS sagittal slice (A horizontal, S up) through ``centre_mm``, resampled to 1 mm."""
    ras = nib.as_closest_canonical(image)
    array = np.asarray(ras.dataobj, dtype=np.float32)
    voxel = np.linalg.inv(ras.affine) @ np.append(centre_mm, 1.0)
    x = int(np.clip(round(voxel[0]), 0, array.shape[0] - 1))
    plane = array[x]  # (A, S)
    zooms = ras.header.get_zooms()[1:3]
    plane = ndimage.zoom(plane, zooms, order=1)
    return plane.T[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL)
    args = parser.parse_args()
    config = PhantomConfig.small() if args.small else PhantomConfig(min_vertebrae=6, max_vertebrae=8, abdominal_fraction=1.0)
    case = generate_phantom("view", np.random.default_rng(args.seed), config)
    phantom_centre = np.mean([v.position_mm for v in case.vertebrae], axis=0)
    folder = args.real_data / "verse19-sub-verse014"
    real = nib.load(folder / "sub-verse014_ct.nii.gz")
    entries = json.loads((folder / "sub-verse014_seg-vb_ctd.json").read_text())
    points = [real.affine[:3, :3] @ [e["X"], e["Y"], e["Z"]] + real.affine[:3, 3] for e in entries if "label" in e]
    panels = [(f"phantom seed {args.seed} (grades {({v.name: v.grade for v in case.vertebrae if v.grade})})",
               _sagittal(case.image, phantom_centre)),
              ("sub-verse014", _sagittal(real, np.mean(points, axis=0)))]
    figure, axes = plt.subplots(2, 2, figsize=(12, 12))
    for column, (title, plane) in enumerate(panels):
        for row, (low, high) in enumerate(((-250, 1250), (-160, 240))):
            axes[row, column].imshow(plane, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            axes[row, column].set_title(f"{title} [{low}, {high}]", fontsize=8)
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
