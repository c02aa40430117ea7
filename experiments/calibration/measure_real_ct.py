"""Measure tissue HU and vertebral-body morphometry on the real CT in ../shared/data/real.

Run from the repository root:

    .venv/bin/python experiments/calibration/measure_real_ct.py [--real-data DIR] [--out FILE]

It measures, with the same code that measures the phantoms (``vfdetect.phantom``), per vertebra:
body heights (posterior / middle / anterior), depth, width, disc height below, trabecular HU
(body interior >= 3 mm from its surface), cortex HU (rim voxels: mean and 90th percentile) and disc
HU; per scan: paraspinal muscle HU, its spread, and body fat HU. The scans and their masks:

- VerSe 2019 sub-verse014: CT + expert vertebra mask (L1-L5), body centroids from the VerSe JSON;
- TPTBox sample: CT crop + vertebra mask (L2-L4), body centroids from the sub-region mask (49+50);
- TotalSegmentator example_ct (3 mm): CT + predicted vertebra mask, body centroids from the
  predicted vertebral-body mask (its label 1).

Vertebrae cut by the scan's edge give NaN for what cannot be measured and are left out of the ranges.
Writes ``real_ct_measurements.json`` beside this script (per scan, per level, and summary ranges).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from vfdetect.fileio import write_json_atomic
from vfdetect.phantom import BodyMeasurement, measure_soft_tissue, measure_vertebral_bodies
from vfdetect.vertebrae import vertebra_name

HERE = Path(__file__).resolve().parent
DEFAULT_REAL = HERE.parents[1].parent / "shared" / "data" / "real"
# TotalSegmentator v2 vertebra classes 26..33 = S1, L5, L4, L3, L2, L1, T12, T11 -> VerSe labels.
TOTALSEG_TO_VERSE = {26: 26, 27: 24, 28: 23, 29: 22, 30: 21, 31: 20, 32: 19, 33: 18}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def _centres(mask: np.ndarray, affine: np.ndarray, labels: list[int]) -> dict[int, np.ndarray]:
    out = {}
    for label in labels:
        voxels = np.argwhere(mask == label)
        if len(voxels) > 50:
            out[label] = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
    return out


def measure_verse014(real: Path) -> dict:
    folder = real / "verse19-sub-verse014"
    ct, affine = _load(folder / "sub-verse014_ct.nii.gz")
    labels, _ = _load(folder / "sub-verse014_seg-vert_msk.nii.gz")
    entries = json.loads((folder / "sub-verse014_seg-vb_ctd.json").read_text())
    centroids = {int(e["label"]): affine[:3, :3] @ np.array([e["X"], e["Y"], e["Z"]]) + affine[:3, 3]
                 for e in entries if "label" in e}
    return _measure("sub-verse014", ct.astype(np.float32), labels.astype(np.int32), affine, centroids)


def measure_tptbox(real: Path) -> dict:
    folder = real / "tptbox-sample-ct"
    ct, affine = _load(folder / "sub-ct_label-22_ct.nii.gz")
    labels, _ = _load(folder / "sub-ct_seg-vert_label-22_msk.nii.gz")
    subregions, _ = _load(folder / "sub-ct_seg-subreg_label-22_msk.nii.gz")
    body = np.isin(subregions, (49, 50))
    centroids = _centres(np.where(body, labels, 0), affine, [21, 22, 23])
    result = _measure("tptbox-L3", ct.astype(np.float32), labels.astype(np.int32), affine, centroids)
    # The sub-region mask separates the body's border (49) from its interior (50): a cross-check.
    interior = subregions == 50
    from scipy import ndimage

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    deep = ndimage.distance_transform_edt(interior, sampling=spacing) >= 3.0
    result["subregion_check"] = {
        "trabecular_hu_subregion50_eroded3mm": float(np.median(ct[deep & (labels == 22)])),
        "cortex_hu_subregion49_mean": float(np.mean(ct[(subregions == 49) & (labels == 22)])),
        "cortex_hu_subregion49_p90": float(np.percentile(ct[(subregions == 49) & (labels == 22)], 90)),
    }
    return result


def measure_totalsegmentator(real: Path) -> dict:
    folder = real / "totalsegmentator-example"
    ct, affine = _load(folder / "example_ct.nii.gz")
    predicted, _ = _load(folder / "spine_report" / "example_ct_report" / "totalseg.nii.gz")
    bodies, _ = _load(folder / "spine_report" / "example_ct_report" / "totalseg_vertebrae_body.nii.gz")
    labels = np.zeros(predicted.shape, dtype=np.int32)
    for source, target in TOTALSEG_TO_VERSE.items():
        labels[predicted == source] = target
    centroids = _centres(np.where(bodies == 1, labels, 0), affine, sorted(set(TOTALSEG_TO_VERSE.values())))
    result = _measure("totalsegmentator-example", ct.astype(np.float32), labels, affine, centroids)
    disc = bodies == 2
    result["disc_mask_hu_median"] = float(np.median(ct[disc])) if disc.any() else math.nan
    return result


def _measure(name: str, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, centroids: dict) -> dict:
    bodies = measure_vertebral_bodies(labels, affine, centroids, hu=ct)
    tissue = measure_soft_tissue(ct, labels, affine, centroids)
    spacing = [round(float(s), 3) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    return {
        "scan": name,
        "spacing_mm": spacing,
        "orientation": "".join(nib.aff2axcodes(affine)),
        "soft_tissue": tissue,
        "vertebrae": {vertebra_name(label): _as_dict(m) for label, m in bodies.items()},
    }


def _as_dict(measurement: BodyMeasurement) -> dict:
    out = {}
    for key, value in measurement.__dict__.items():
        if key == "label":
            continue
        out[key] = None if not math.isfinite(value) else round(float(value), 2)
    return out


QUANTITIES = (
    "height_posterior_mm", "height_middle_mm", "height_anterior_mm", "depth_mm", "width_mm",
    "disc_height_below_mm", "trabecular_hu", "cortex_hu", "cortex_p90_hu", "disc_hu",
    "trabecular_sd_hu", "trabecular_psd_slope",
)


def summarise(scans: list[dict]) -> dict:
    """Min/max per quantity over every measured vertebra (and per level group), plus soft tissue."""
    summary: dict = {"all_levels": {}, "lumbar": {}, "thoracic": {}, "soft_tissue": {}}
    for quantity in QUANTITIES:
        for group, prefix in (("all_levels", ""), ("lumbar", "L"), ("thoracic", "T")):
            values = [v[quantity] for scan in scans for name, v in scan["vertebrae"].items()
                      if v[quantity] is not None and name.startswith(prefix)]
            if values:
                summary[group][quantity] = {"min": min(values), "max": max(values), "n": len(values)}
    for quantity in ("muscle_hu", "muscle_sd_hu", "fat_hu"):
        values = [scan["soft_tissue"][quantity] for scan in scans if math.isfinite(scan["soft_tissue"][quantity])]
        summary["soft_tissue"][quantity] = {"min": round(min(values), 2), "max": round(max(values), 2), "n": len(values)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--out", type=Path, default=HERE / "real_ct_measurements.json")
    args = parser.parse_args()
    scans = [measure_verse014(args.real_data), measure_tptbox(args.real_data), measure_totalsegmentator(args.real_data)]
    result = {
        "description": "Real-CT calibration targets for vfdetect phantoms; see measure_real_ct.py and README.md.",
        "scans": scans,
        "summary": summarise(scans),
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
