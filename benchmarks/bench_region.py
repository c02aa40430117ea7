"""The spine region against whole-volume inference: scores, decisions, voxels computed, seconds.

Each scan is predicted by :func:`vfdetect.predict.predict_case` twice with the same model and
precision, ``region="whole"`` (every voxel of the body) and the default ``region="spine"``; without
centroids (vertebrae localised in the map) and, for ``SCAN:CENTROIDS``, with the given centroids
too. The vertebrae of the two runs are paired by position (the nearest within 10 mm: localised
names can shift when one run finds a body more or less), and the table gives per scan and mode
the bodies found by each run, the pairs, the largest change of a paired vertebra's fracture score,
whether the patient decision is the same, the spine region's voxel fractions (region, computed),
its growth rounds, and the inference seconds of both runs.

Usage::

    python benchmarks/bench_region.py --run MODEL [--phantom] [SCAN[:CENTROIDS] ...] [--out results.json]

``--phantom`` adds the default full-size phantom (:func:`vfdetect.phantom.generate_phantom`,
seed 0, as ``bench_inference.py compare``). One process, 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PAIR_MM = 10.0


def paired(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Vertebra entries of two reports paired by centroid (mutually nearest, within :data:`PAIR_MM`)."""
    pairs = []
    for a in first:
        if not second:
            break
        distances = [float(np.linalg.norm(np.subtract(a["centroid_mm"], b["centroid_mm"]))) for b in second]
        b = second[int(np.argmin(distances))]
        back = [float(np.linalg.norm(np.subtract(b["centroid_mm"], c["centroid_mm"]))) for c in first]
        if min(distances) <= PAIR_MM and first[int(np.argmin(back))] is a:
            pairs.append((a, b))
    return pairs


def compare_scan(predictor: Any, scan: str, centroids: str | None) -> dict[str, Any]:
    from vfdetect.predict import PredictConfig, predict_case

    results = {}
    for region in ("whole", "spine"):
        config = PredictConfig(region=region, write_overlay=False)
        with tempfile.TemporaryDirectory(prefix="vfdetect-region-") as out:
            start = time.perf_counter()
            result = predict_case(predictor, scan, centroids, case="scan", out_dir=out, config=config)
            results[region] = (result, time.perf_counter() - start)
    whole, spine = results["whole"][0], results["spine"][0]
    pairs = paired(whole.vertebrae, spine.vertebrae)
    changes = [abs(a["fracture_probability"] - b["fracture_probability"]) for a, b in pairs]
    return {
        "scan": scan,
        "centroids": centroids,
        "whole_vertebrae": len(whole.vertebrae),
        "spine_vertebrae": len(spine.vertebrae),
        "paired": len(pairs),
        "same_names": [v["name"] for v in whole.vertebrae] == [v["name"] for v in spine.vertebrae],
        "max_score_change": max(changes) if changes else None,
        "same_patient_decision": whole.patient_fracture == spine.patient_fracture,
        "patient_fracture": {"whole": whole.patient_fracture, "spine": spine.patient_fracture},
        "region": spine.report["region"],
        "inference_s": {"whole": whole.report["timings"]["inference_s"], "spine": spine.report["timings"]["inference_s"]},
        "total_s": {"whole": results["whole"][1], "spine": results["spine"][1]},
    }


def main() -> None:
    from vfdetect.cli import runtime_environment

    os.environ.update(runtime_environment(verbose=False, device="auto"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scans", nargs="*", help="SCAN or SCAN:CENTROIDS (VerSe JSON or vertebra mask)")
    parser.add_argument("--run", default=None, help="model (run folder or .keras); default: the bundled model")
    parser.add_argument("--phantom", action="store_true", help="add the default full-size phantom (seed 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from vfdetect.predict import load_predictor

    predictor = load_predictor(args.run, threads=args.threads)
    jobs: list[tuple[str, str | None]] = []
    with tempfile.TemporaryDirectory(prefix="vfdetect-region-phantom-") as folder:
        if args.phantom:
            import nibabel as nib

            from vfdetect.phantom import PhantomConfig, generate_phantom

            path = Path(folder) / "phantom_ct.nii.gz"
            nib.save(generate_phantom("bench", np.random.default_rng(0), PhantomConfig()).image, path)
            jobs.append((str(path), None))
        for item in args.scans:
            scan, _, centroids = item.partition(":")
            jobs.append((scan, None))
            if centroids:
                jobs.append((scan, centroids))
        rows = []
        print("scan | centroids | bodies whole / spine (paired) | max score change | same decision | "
              "region % / computed % | rounds | inference s whole / spine")
        for scan, centroids in jobs:
            row = compare_scan(predictor, scan, centroids)
            rows.append(row)
            region = row["region"]
            change = "n/a" if row["max_score_change"] is None else f"{row['max_score_change']:.4f}"
            print(f"{Path(scan).name} | {'given' if centroids else 'localised'} | {row['whole_vertebrae']} / "
                  f"{row['spine_vertebrae']} ({row['paired']}) | {change} | {row['same_patient_decision']} | "
                  f"{100 * region['region_fraction']:.1f} / {100 * region['computed_fraction']:.1f} | "
                  f"{region.get('growth_rounds', 0)} | {row['inference_s']['whole']:.1f} / {row['inference_s']['spine']:.1f}",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": predictor.describe(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
