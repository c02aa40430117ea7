"""Measure phantoms exactly as measure_real_ct.py measures the real CT, and compare the two.

    .venv/bin/python experiments/calibration/measure_phantoms.py [--cases 12] [--seed 0]

Generates default-size phantoms, measures unfractured T/L bodies (morphometry, HU) and soft tissue with
``vfdetect.phantom.measure_vertebral_bodies`` / ``measure_soft_tissue`` on the scan and mask as written,
and writes ``phantom_measurements.json`` beside this script: min / median / max per quantity next to
the real range from ``real_ct_measurements.json``. Fractured bodies are left out of the morphometry.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from vfdetect.fileio import write_json_atomic
from vfdetect.phantom import PhantomConfig, generate_phantom, measure_soft_tissue, measure_vertebral_bodies

HERE = Path(__file__).resolve().parent
QUANTITIES = (
    "height_posterior_mm", "height_middle_mm", "height_anterior_mm", "depth_mm", "width_mm",
    "disc_height_below_mm", "trabecular_hu", "cortex_hu", "cortex_p90_hu", "disc_hu",
    "trabecular_sd_hu", "trabecular_psd_slope",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "phantom_measurements.json")
    args = parser.parse_args()
    real = json.loads((HERE / "real_ct_measurements.json").read_text())["summary"]
    values: dict[str, dict[str, list[float]]] = {"lumbar": {q: [] for q in QUANTITIES}, "thoracic": {q: [] for q in QUANTITIES}}
    tissue: dict[str, list[float]] = {"muscle_hu": [], "muscle_sd_hu": [], "fat_hu": []}
    for index, sequence in enumerate(np.random.SeedSequence(args.seed).spawn(args.cases)):
        case = generate_phantom(f"phantom{index:03d}", np.random.default_rng(sequence), PhantomConfig())
        hu = np.asarray(case.image.dataobj).astype(np.float32)
        labels = np.asarray(case.mask.dataobj)
        listed = {v.label: v.position_mm for v in case.vertebrae}
        for label, body in measure_vertebral_bodies(labels, case.image.affine, listed, hu=hu).items():
            if case.morphology[label] != "normal" or not 8 <= label <= 24:
                continue
            group = "lumbar" if label >= 20 else "thoracic"
            for quantity in QUANTITIES:
                value = getattr(body, quantity)
                if math.isfinite(value):
                    values[group][quantity].append(float(value))
        for key, value in measure_soft_tissue(hu, labels, case.image.affine, listed).items():
            if math.isfinite(value):
                tissue[key].append(value)

    def stats(numbers: list[float]) -> dict:
        if not numbers:
            return {"n": 0}
        return {"min": round(min(numbers), 2), "median": round(float(np.median(numbers)), 2),
                "max": round(max(numbers), 2), "n": len(numbers)}

    result: dict = {"cases": args.cases, "seed": args.seed, "phantom": {}, "real": {}}
    for group in ("lumbar", "thoracic"):
        result["phantom"][group] = {q: stats(values[group][q]) for q in QUANTITIES}
        result["real"][group] = real.get(group, {})
    result["phantom"]["soft_tissue"] = {k: stats(v) for k, v in tissue.items()}
    result["real"]["soft_tissue"] = real["soft_tissue"]
    write_json_atomic(args.out, result)
    for group in ("lumbar", "thoracic", "soft_tissue"):
        print(f"[{group}] quantity: phantom min / median / max (n)  |  real min / max (n)")
        for quantity, phantom in result["phantom"][group].items():
            truth = result["real"][group].get(quantity, {})
            if phantom.get("n"):
                print(f"  {quantity:22s} {phantom['min']:8.1f} {phantom['median']:8.1f} {phantom['max']:8.1f} ({phantom['n']:3d})"
                      f"  |  {truth.get('min', float('nan')):8.1f} {truth.get('max', float('nan')):8.1f} ({truth.get('n', 0)})")


if __name__ == "__main__":
    main()
