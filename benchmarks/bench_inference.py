"""Whole-scan inference speed and memory, and vertebra localisation accuracy on phantoms.

Speed (``speed``): predicts a 300 x 300 x 400 scan at 1 mm^3 (a smooth synthetic volume by default,
or ``--scan`` resampled and cropped/padded to that shape) with the 3D network, in float32 (the
Keras model) and in bfloat16 with BatchNorm folded into the convolutions, for a few tile and batch
sizes. Each configuration runs in its own process (2 intra-op threads, no XLA) so that its peak
RSS is its own. Reports seconds, output voxels per second, peak RSS, the useful GFLOP/s
(2 x multiply-adds per output voxel x voxels / s), the GFLOP/s actually executed (tiles include
their receptive-field margins), the float32 and bf16 matmul rates measured in the same run, and the
largest difference of vertebra scores (12 pseudo-centroids along the volume's centre line, cube
10 mm, sigma 5 mm) against the float32 reference. ``--run RUN`` uses a trained model; without it
an untrained network with randomised BatchNorm statistics stands in (speed does not depend on the
weights).

Memory (``memory``): peak RSS of predicting a 512 x 512 x 600 volume with the default memory budget
(4 GiB), stopping after ``--max-batches`` batches: the input and the full output are allocated
and written before the first tile, so the peak is reached within the first batches. Then (unless
``--skip-end-to-end``) the peak RSS of one ``vfdetect predict`` with default settings, start to
finish (loading, body mask, spine region, inference, aggregation, every output written), on a
512 x 512 x 600 scan at 1 mm: the default phantom on the 1 mm internal frame, centred in air.

Localisation (``localisation``): vertebrae found in p(vertebra) maps of phantoms by
:func:`vfdetect.aggregate.localise_vertebrae`, scored with the VerSe rule (identified = predicted
label within 20 mm of the true centroid of that label, and that centroid is the nearest true one),
with the anchor level given (the true name of the lowest body found, as a reader would give it)
and without (names guessed from spacing).
Without ``--run`` the map is simulated from the phantom's truth: label ellipsoids built from the
true centroids (:func:`vfdetect.labels.synthesize_labels`), each vertebra shifted by N(0, 2 mm) per
axis, blurred (sigma 1.5 mm), scaled by U(0.6, 1.0) and with smooth noise (sd 0.1) added.

Compare (``compare``): a full-size phantom (:func:`vfdetect.phantom.generate_phantom`, default
``PhantomConfig``) predicted by :func:`vfdetect.predict.predict_case` in three configurations, each
in its own process: whole volume in float32 (every voxel computed, the reference), whole volume with
the best settings (``auto`` precision, 118^3 tiles), and the default spine region. Per configuration:
seconds per stage (report.json ``timings``), voxels computed, useful GFLOP/s and its fraction of the
float32 matmul rate measured in the same run, peak RSS, and the largest change of the fracture scores
at the phantom's true centroids against the first configuration. Then the wall time of one
``vfdetect predict SCAN --model RUN`` with default settings in a fresh process (start-up included).

Usage::

    python benchmarks/bench_inference.py compare [--run RUN] [--out results.json]
    python benchmarks/bench_inference.py speed [--run RUN] [--out results.json]
    python benchmarks/bench_inference.py memory
    python benchmarks/bench_inference.py localisation --cases 10 [--run RUN] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPEED_SHAPE = (300, 300, 400)
MEMORY_SHAPE = (512, 512, 600)


def peak_rss_gib() -> float:
    """Peak resident set size of this process (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth random normalised volume (texture at a few mm), float32."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=tuple(max(2, n // 4) for n in shape)).astype(np.float32)
    volume = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape, strict=True)], order=1)
    volume = volume[: shape[0], : shape[1], : shape[2]]
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    volume -= volume.mean()
    volume /= volume.std() + 1e-6
    return volume


def scan_volume(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A real scan in the internal frame (1 mm), normalised, centre-cropped/padded to ``shape``."""
    from vfdetect.volume import load_scan, normalise, to_internal

    scan, _ = load_scan(path)
    image = normalise(to_internal(scan, 1.0).array)
    out = np.full(shape, float(image.min()), dtype=np.float32)
    src, dst = [], []
    for n, m in zip(image.shape, shape, strict=True):
        if n >= m:
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = image[tuple(src)]
    return out


def stand_in_model(seed: int = 0) -> Any:
    """Untrained 3D network with non-trivial BatchNorm statistics, PReLU slopes and biases."""
    from vfdetect.model import build_model, with_random_statistics

    return with_random_statistics(build_model("3d", seed=seed), seed)


def matmul_gflops(dtype: str, size: int = 2048, repeats: int = 8) -> float:
    """Best-of-3 matmul rate (GFLOP/s) at the current thread settings.

    The products run eagerly, one op each: inside a ``tf.function`` identical ``matmul(x, y)``
    calls are merged by the graph optimiser and the rate would be overstated ``repeats`` times.
    """
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size), dtype=tf.float32), dtype)
    b = tf.cast(tf.random.normal((size, size), dtype=tf.float32), dtype)
    tf.matmul(a, b).numpy()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        sums = [tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)) for _ in range(repeats)]
        float(tf.add_n(sums).numpy())
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * size**3 * repeats / elapsed / 1e9)
    return best


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this process."""
    from vfdetect.predict import configure_threads

    configure_threads(args.threads)
    from vfdetect.aggregate import vertebra_scores
    from vfdetect.model import flops_per_output_voxel, load_model, multiply_adds_per_segment
    from vfdetect.predict import keras_predictor, predict_volume, tile_output_shape
    from vfdetect.vertebrae import Vertebra
    from vfdetect.volume import Volume

    shape = tuple(args.shape)
    image = scan_volume(args.scan, shape) if args.scan else synthetic_volume(shape)
    weights = None if not args.run else Path(args.run) if args.run.endswith(".keras") else Path(args.run) / "model.keras"
    model = load_model(weights) if weights else stand_in_model()
    geometry = model.geometry
    if args.precision == "float32-unfolded":
        predictor = keras_predictor(model, "float32", fold=False)
    else:
        predictor = keras_predictor(model, args.precision)
    tile = tuple([args.tile] * 3) if args.tile else None
    limit: dict[str, int] = {"batches": 0}

    def limited(hr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        limit["batches"] += 1
        if args.max_batches and limit["batches"] > args.max_batches:
            raise StopIteration
        return predictor(hr, lr)

    # Warm up (trace) on one batch of the same shape so that the timing is steady-state inference.
    from vfdetect.predict import choose_tile_shape

    hr_shape = tile or choose_tile_shape(shape, geometry, args.batch_size,
                                         output_itemsize=np.dtype(args.dtype).itemsize)
    out_shape = tile_output_shape(shape, geometry, geometry.output_shape(hr_shape))
    hr_shape = geometry.input_shape(out_shape)
    lr_shape = geometry.lr_shape_for(hr_shape)
    predictor(np.zeros((args.batch_size, *hr_shape, 1), np.float32), np.zeros((args.batch_size, *lr_shape, 1), np.float32))
    start = time.perf_counter()
    try:
        probabilities = predict_volume(image, limited, geometry, tile_shape=hr_shape, batch_size=args.batch_size,
                                       dtype=args.dtype)
        completed = True
    except StopIteration:
        probabilities = None
        completed = False
    elapsed = time.perf_counter() - start
    voxels = int(np.prod(shape))
    n_tiles = int(np.prod([int(np.ceil(n / o)) for n, o in zip(shape, out_shape, strict=True)]))
    macs_per_voxel = flops_per_output_voxel("3d")
    executed_macs = multiply_adds_per_segment("3d", hr_shape) * n_tiles
    result: dict[str, Any] = {
        "precision": args.precision,
        "map_dtype": args.dtype,
        "tile_hr": list(hr_shape),
        "tile_out": list(out_shape),
        "batch_size": args.batch_size,
        "tiles": n_tiles,
        "shape": list(shape),
        "seconds": elapsed,
        "completed": completed,
        "peak_rss_gib": peak_rss_gib(),
        "threads": args.threads,
    }
    if completed and probabilities is not None:
        result["voxels_per_s"] = voxels / elapsed
        result["useful_gflops"] = 2 * macs_per_voxel * voxels / elapsed / 1e9
        result["executed_gflops"] = 2 * executed_macs / elapsed / 1e9
        result["macs_per_output_voxel"] = macs_per_voxel
        centre = np.array(shape) / 2.0
        points = [Vertebra(20, (float(centre[0]), float(centre[1]), float(z))) for z in np.linspace(30, shape[2] - 30, 12)]
        affine = np.eye(4)
        scores = vertebra_scores(Volume(probabilities[..., 2], affine), points,
                                 normal_probability=Volume(probabilities[..., 1], affine))
        result["vertebra_scores"] = [s["fracture_probability"] for s in scores]
        result["normal_scores"] = [s["normal_probability"] for s in scores]
        if args.save_probabilities:
            np.save(args.save_probabilities, probabilities[::4, ::4, ::4])
    return result


def child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "one", *extra, "--threads", str(args.threads)]
    if args.run:
        command += ["--run", args.run]
    if args.scan:
        command += ["--scan", args.scan]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if output.returncode != 0:
        return {"error": output.stderr[-2000:], "command": command}
    return json.loads(output.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace) -> None:
    from vfdetect.predict import configure_threads

    configure_threads(args.threads)
    results: dict[str, Any] = {"shape": list(SPEED_SHAPE), "threads": args.threads, "configs": []}
    results["matmul_gflops_float32"] = matmul_gflops("float32")
    results["matmul_gflops_bfloat16"] = matmul_gflops("bfloat16")
    print(f"matmul: float32 {results['matmul_gflops_float32']:.0f} GFLOP/s, "
          f"bfloat16 {results['matmul_gflops_bfloat16']:.0f} GFLOP/s", flush=True)
    configs = [(p, int(t), int(b)) for p, t, b in (c.split(":") for c in args.configs)]
    reference = None
    for precision, tile, batch in configs:
        extra = ["--precision", precision, "--tile", str(tile), "--batch-size", str(batch),
                 "--shape", *map(str, SPEED_SHAPE)]
        result = child(args, extra)
        if "error" in result:
            print(f"{precision} tile {tile} batch {batch}: FAILED\n{result['error']}", flush=True)
            results["configs"].append(result)
            continue
        if reference is None and precision.startswith("float32"):
            reference = result
        if reference is not None and reference is not result:
            result["max_score_difference_vs_float32"] = float(np.max(np.abs(
                np.array(result["vertebra_scores"]) - np.array(reference["vertebra_scores"]))))
        results["configs"].append(result)
        peak = results["matmul_gflops_bfloat16" if precision == "bfloat16" else "matmul_gflops_float32"]
        result["fraction_of_matmul_peak"] = result["useful_gflops"] / peak
        print(f"{precision:15s} tile {result['tile_hr']} -> {result['tile_out']} batch {batch}: "
              f"{result['seconds']:.1f} s, {result['voxels_per_s'] / 1e3:.0f}K voxels/s, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB, useful {result['useful_gflops']:.0f} GFLOP/s "
              f"({100 * result['useful_gflops'] / peak:.0f}% of matmul), executed {result['executed_gflops']:.0f}"
              + (f", max score diff {result['max_score_difference_vs_float32']:.4f}"
                 if "max_score_difference_vs_float32" in result else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def write_padded_phantom(path: Path, shape: tuple[int, int, int] = MEMORY_SHAPE, seed: int = 0) -> None:
    """The default phantom on the 1 mm internal frame (:func:`vfdetect.volume.to_internal`), centred
    in ``shape`` voxels of air (-1000 HU)."""
    import nibabel as nib

    from vfdetect.phantom import PhantomConfig, generate_phantom
    from vfdetect.volume import load_scan, to_internal

    case = generate_phantom("memory", np.random.default_rng(seed), PhantomConfig())
    body = to_internal(load_scan(case.image)[0], 1.0)
    volume = np.full(shape, -1000, dtype=np.int16)
    offset = np.array([(n - m) // 2 for n, m in zip(shape, body.shape, strict=True)])
    volume[tuple(slice(o, o + m) for o, m in zip(offset, body.shape, strict=True))] = np.rint(body.array)
    affine = body.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ offset
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)


def end_to_end_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of ``vfdetect predict`` (default settings, all outputs written) on a 512 x 512 x 600 scan."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        scan = Path(folder) / "memory_ct.nii.gz"
        write_padded_phantom(scan)
        command = [str(Path(sys.executable).with_name("vfdetect")), "predict", str(scan), "--out", str(Path(folder) / "out")]
        if args.run:
            command += ["--model", args.run]
        # A wrapper process reports the peak of its only child.
        wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
        start = time.perf_counter()
        output = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        lines = output.stdout.strip().splitlines()
        peak_kib, code = (int(n) for n in lines[-1].split()) if lines else (0, -1)
        if code != 0:
            return {"error": output.stderr[-2000:], "command": command}
        report = json.loads(next((Path(folder) / "out").glob("*/report.json")).read_text())
    return {"shape": list(MEMORY_SHAPE), "command": "vfdetect predict SCAN --out OUT" + (" --model RUN" if args.run else ""),
            "peak_rss_gib": peak_kib / 1024**2, "seconds": seconds, "timings": report["timings"],
            "region": report["region"], "precision": report["model"].get("precision")}


def memory(args: argparse.Namespace) -> None:
    extra = ["--precision", args.precision, "--batch-size", str(args.batch_size), "--shape", *map(str, MEMORY_SHAPE),
             "--max-batches", str(args.max_batches), "--dtype", args.dtype]
    result = child(args, extra)
    if not args.skip_end_to_end:
        result["end_to_end"] = end_to_end_memory(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Side by side on a full-size phantom: whole volume vs spine region
# ----------------------------------------------------------------------------------------------

COMPARE_CONFIGS = ("whole-float32:whole:float32:0", "whole-best:whole:auto:118", "spine-default:spine:auto:0")
"""name:region:precision:tile (tile 0: the default chosen from the memory budget)."""


def write_phantom_case(folder: Path, seed: int, small: bool) -> tuple[Path, list[dict[str, Any]]]:
    """A phantom scan (NIfTI) and its true vertebra centroids (label, world mm)."""
    import nibabel as nib

    from vfdetect.phantom import PhantomConfig, generate_phantom

    case = generate_phantom("bench", np.random.default_rng(seed), PhantomConfig.small() if small else PhantomConfig())
    path = folder / "bench_ct.nii.gz"
    nib.save(case.image, path)
    return path, [{"label": v.label, "position_mm": list(v.position_mm)} for v in case.vertebrae]


def write_model_run(folder: Path, run: str | None) -> Path:
    """The run folder to predict with: ``run`` itself, or the stand-in network saved with a config."""
    if run:
        return Path(run)
    folder.mkdir(parents=True, exist_ok=True)
    stand_in_model().save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({"variant": "3d", "spacing": 1.0}))
    return folder


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One predict_case configuration on the phantom, in this process (default settings otherwise)."""
    import tempfile

    from vfdetect.aggregate import vertebra_scores
    from vfdetect.model import flops_per_output_voxel
    from vfdetect.predict import PredictConfig, load_predictor, predict_case
    from vfdetect.vertebrae import Vertebra
    from vfdetect.volume import Volume

    started = time.perf_counter()
    predictor = load_predictor(args.run, precision=args.precision, threads=args.threads)
    load_seconds = time.perf_counter() - started
    tile = (args.tile,) * 3 if args.tile else None
    config = PredictConfig(region=args.region, skip_air=args.region != "whole", tile_shape=tile, keep_maps=True)
    with tempfile.TemporaryDirectory(prefix="vfdetect-bench-") as out:
        result = predict_case(predictor, args.scan, None, case="bench", out_dir=out, config=config)
    truth = [Vertebra(int(v["label"]), tuple(v["position_mm"])) for v in json.loads(Path(args.truth).read_text())]
    maps = result.probabilities
    scores = vertebra_scores(Volume(maps.array[..., 2].astype(np.float32), maps.affine), truth,
                             normal_probability=Volume(maps.array[..., 1].astype(np.float32), maps.affine))
    region = result.report["region"]
    timings = result.report["timings"]
    voxels = int(np.prod(maps.array.shape[:3]))
    computed = int(round(region["computed_fraction"] * voxels))
    return {
        "region": region,
        "timings": timings,
        "model_load_s": load_seconds,
        "precision": predictor.precision,
        "tile": list(tile) if tile else None,
        "shape": list(maps.array.shape[:3]),
        "voxels": voxels,
        "computed_voxels": computed,
        "useful_gflops": 2 * flops_per_output_voxel("3d") * computed / timings["inference_s"] / 1e9,
        "fracture_scores": {str(s["label"]): s["fracture_probability"] for s in scores},
        "peak_rss_gib": peak_rss_gib(),
    }


def end_to_end_seconds(run: Path, scan: Path, threads: int) -> dict[str, Any]:
    """Wall time of ``vfdetect predict SCAN --model RUN`` with default settings (a fresh process)."""
    import tempfile

    command = [str(Path(sys.executable).parent / "vfdetect"), "predict", str(scan), "--model", str(run),
               "--threads", str(threads), "--quiet", "--out"]
    with tempfile.TemporaryDirectory(prefix="vfdetect-bench-") as out:
        start = time.perf_counter()
        output = subprocess.run([*command, out], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        report = json.loads((Path(out) / "bench" / "report.json").read_text()) if output.returncode == 0 else {}
    return {"seconds": seconds, "returncode": output.returncode, "stderr": output.stderr[-2000:],
            "timings": report.get("timings"), "region": report.get("region"), "command": " ".join(command) + " OUT"}


def compare(args: argparse.Namespace) -> None:
    """Whole-volume float32, whole-volume best and the default spine region, side by side."""
    import platform
    import tempfile

    from vfdetect.predict import configure_threads

    configure_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"threads": args.threads, "configs": {}, "load_average_at_start": list(os.getloadavg())}
    results["matmul_gflops_float32"] = matmul_gflops("float32")
    results["matmul_gflops_bfloat16"] = matmul_gflops("bfloat16")
    print(f"matmul: float32 {results['matmul_gflops_float32']:.0f} GFLOP/s, "
          f"bfloat16 {results['matmul_gflops_bfloat16']:.0f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="vfdetect-bench-") as tmp:
        folder = Path(tmp)
        scan = Path(args.scan) if args.scan else None
        truth_path = folder / "truth.json"
        if scan is None:
            scan, truth = write_phantom_case(folder, args.seed, args.small)
            truth_path.write_text(json.dumps(truth))
        else:
            truth_path.write_text(json.dumps([]))
        run = write_model_run(folder / "run", args.run)
        reference: dict[str, float] | None = None
        for item in args.configs:
            name, region, precision, tile = item.split(":")
            command = [sys.executable, __file__, "case", "--run", str(run), "--scan", str(scan), "--truth",
                       str(truth_path), "--region", region, "--precision", precision, "--tile", tile,
                       "--threads", str(args.threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=False,
                                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if output.returncode != 0:
                print(f"{name}: FAILED\n{output.stderr[-2000:]}", flush=True)
                results["configs"][name] = {"error": output.stderr[-2000:]}
                continue
            result = json.loads(output.stdout.strip().splitlines()[-1])
            peak = results["matmul_gflops_float32"]
            result["fraction_of_float32_matmul"] = result["useful_gflops"] / peak
            scores = result["fracture_scores"]
            if reference is None:
                reference = scores
            common = sorted(set(scores) & set(reference))
            result["max_score_change_vs_reference"] = max(
                (abs(scores[k] - reference[k]) for k in common), default=float("nan"))
            results["configs"][name] = result
            t = result["timings"]
            print(f"{name:14s} {result['precision']:8s} region {result['region']['mode']:5s}: "
                  f"total {t['total_s']:.1f} s (load {t['load_s']:.1f}, region {t['region_s']:.1f}, inference "
                  f"{t['inference_s']:.1f}, aggregation {t['aggregation_s']:.1f}, writing {t.get('writing_s', 0):.1f}), "
                  f"computed {100 * result['region']['computed_fraction']:.1f} % of {result['voxels'] / 1e6:.1f}M voxels, "
                  f"useful {result['useful_gflops']:.0f} GFLOP/s ({100 * result['fraction_of_float32_matmul']:.0f} % of "
                  f"fp32 matmul), peak RSS {result['peak_rss_gib']:.2f} GiB, max score change "
                  f"{result['max_score_change_vs_reference']:.4f}", flush=True)
        if not args.skip_end_to_end:
            results["end_to_end"] = end_to_end_seconds(run, scan, args.threads)
            e2e = results["end_to_end"]
            print(f"end to end `vfdetect predict` (defaults, fresh process): {e2e['seconds']:.1f} s "
                  f"(returncode {e2e['returncode']})", flush=True)
    results["load_average_at_end"] = list(os.getloadavg())
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    results["wall_seconds"] = time.perf_counter() - started
    print(f"load average at end {results['load_average_at_end']}, wall {results['wall_seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


# ----------------------------------------------------------------------------------------------
# Localisation on phantoms
# ----------------------------------------------------------------------------------------------


def simulated_vertebra_probability(case: Any, truth: list[Any], rng: np.random.Generator) -> Any:
    """p(vertebra) and p(fracture) maps (internal frame, 1 mm) simulated from the phantom's truth."""
    from scipy import ndimage

    from vfdetect.labels import synthesize_labels
    from vfdetect.vertebrae import Vertebra
    from vfdetect.volume import load_scan, to_internal

    scan, _ = load_scan(case.image)
    internal = to_internal(scan, 1.0)
    shifted = [Vertebra(v.label, tuple(np.asarray(v.position_mm) + rng.normal(0, 2.0, 3)), v.grade) for v in truth]
    labels = synthesize_labels(internal.shape, internal.affine, shifted)
    vertebra = np.zeros(internal.shape, np.float32)
    fracture = np.zeros(internal.shape, np.float32)
    for value, target in ((1, vertebra), (2, vertebra)):
        target += (labels == value).astype(np.float32)
    fracture += (labels == 2).astype(np.float32)
    vertebra = ndimage.gaussian_filter(vertebra, 1.5) * float(rng.uniform(0.6, 1.0))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, internal.shape).astype(np.float32), 2.0)
    noise *= 0.1 / (noise.std() + 1e-6)
    vertebra = np.clip(vertebra + noise, 0, 1)
    fracture = np.clip(ndimage.gaussian_filter(fracture, 1.5), 0, 1)
    return internal, vertebra, fracture


def localisation(args: argparse.Namespace) -> None:
    from vfdetect.aggregate import identification, localise_vertebrae
    from vfdetect.phantom import PhantomConfig, generate_phantom
    from vfdetect.vertebrae import centroids_from_mask
    from vfdetect.volume import Volume, load_label_image

    rng = np.random.default_rng(args.seed)
    config = PhantomConfig.small() if args.small else PhantomConfig()
    predictor = None
    if args.run:
        from vfdetect.predict import PredictConfig, load_predictor

        predictor = load_predictor(args.run)
    rows: list[dict[str, Any]] = []
    out_dir = Path(args.overlays) if args.overlays else None
    for index in range(args.cases):
        case = generate_phantom(f"loc{index:03d}", np.random.default_rng([args.seed, index]), config)
        truth = list(case.vertebrae) or centroids_from_mask(load_label_image(case.mask)[0])
        if len(truth) < 2:
            continue
        lowest = min(truth, key=lambda v: v.position_mm[2])
        if predictor is None:
            internal, vertebra_map, fracture_map = simulated_vertebra_probability(case, truth, rng)
        else:
            from vfdetect.predict import predict_case

            result = predict_case(predictor, case.image, None, case=case.case,
                                  config=PredictConfig(keep_maps=True, write_overlay=False))
            maps = result.probabilities
            internal = Volume(maps.array[..., 0], maps.affine)
            vertebra_map = maps.array[..., 1] + maps.array[..., 2]
            fracture_map = maps.array[..., 2]
        volume = Volume(vertebra_map, internal.affine)
        found = localise_vertebrae(volume, anchor_level="L5")
        if found:
            # The anchor a reader would give: the true name of the lowest body found.
            bottom = np.asarray(found[-1].position_mm)
            anchor = min(truth, key=lambda v: float(np.linalg.norm(np.asarray(v.position_mm) - bottom)))
        else:
            anchor = lowest
        anchored = localise_vertebrae(volume, anchor_level=anchor.name)
        guessed = localise_vertebrae(volume)
        a = identification(anchored, truth)
        g = identification(guessed, truth)
        rows.append({"case": case.case, "true": len(truth), "found": len(anchored), "anchored": a, "guessed": g})
        print(f"{case.case}: {len(truth)} true ({truth[0].name}-{truth[-1].name}), {len(anchored)} found; "
              f"anchored id {a['identification_rate']:.2f} err {a['mean_error_mm']:.1f} mm; "
              f"guessed id {g['identification_rate']:.2f}; detection {a['detection_rate']:.2f} "
              f"nearest err {a['mean_nearest_error_mm']:.1f} mm", flush=True)
        if out_dir is not None and predictor is None:
            from vfdetect.aggregate import vertebra_scores
            from vfdetect.report import render_overlay
            from vfdetect.volume import load_scan, to_internal, world_to_voxel

            hu = to_internal(load_scan(case.image)[0], 1.0).array
            scores = vertebra_scores(Volume(fracture_map, internal.affine), anchored)
            for s in scores:
                s["predicted"] = "fracture" if s["fracture_probability"] >= 0.5 else "normal"
            centres = np.array([world_to_voxel(internal.affine, np.asarray(v.position_mm)) for v in anchored])
            render_overlay(out_dir / f"{case.case}_overlay.png", hu, fracture_map, internal.spacing, scores, centres,
                           f"{case.case} (simulated map, localised, anchor {anchor.name})",
                           vertebra_probability=vertebra_map)

    def pooled(key: str) -> tuple[float, float, float]:
        identified = sum(r[key]["identified"] for r in rows)
        true = sum(r[key]["true"] for r in rows)
        errors = [r[key]["mean_error_mm"] for r in rows if np.isfinite(r[key]["mean_error_mm"])]
        detection = sum(r[key]["detection_rate"] * r[key]["true"] for r in rows) / max(true, 1)
        return identified / max(true, 1), float(np.mean(errors)) if errors else float("nan"), detection

    for key in ("anchored", "guessed"):
        rate, error, detection = pooled(key)
        print(f"{key}: identification rate {rate:.3f}, mean localisation error {error:.2f} mm, "
              f"detection (any name, 20 mm) {detection:.3f} over {len(rows)} cases")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def main() -> None:
    from vfdetect.cli import runtime_environment

    os.environ.update(runtime_environment(verbose=False, device="auto"))  # quiet TensorFlow, no CUDA probing
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("speed", "memory", "one", "localisation", "compare", "case"):
        p = sub.add_parser(name)
        p.add_argument("--run", default=None)
        p.add_argument("--scan", default=None)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", default=None)
        if name == "speed":
            p.add_argument("--configs", nargs="+",
                           default=["float32-unfolded:82:1", "float32:82:1", "bfloat16:82:1", "bfloat16:118:1"],
                           help="precision:tile:batch, tile = HR tile edge (output = tile - 16); precision "
                           "float32-unfolded (the Keras model itself), float32 or bfloat16 (BatchNorm folded)")
        if name in ("memory", "one"):
            p.add_argument("--precision", default="float32")
            p.add_argument("--batch-size", type=int, default=1)
            p.add_argument("--max-batches", type=int, default=0)
            p.add_argument("--dtype", default="float32", help="dtype of the probability map")
        if name == "one":
            p.add_argument("--tile", type=int, default=0)
            p.add_argument("--shape", type=int, nargs=3, default=list(SPEED_SHAPE))
            p.add_argument("--save-probabilities", default=None)
        if name == "memory":
            p.set_defaults(max_batches=6)
            p.add_argument("--skip-end-to-end", action="store_true",
                           help="only predict_volume, not also vfdetect predict on a 512 x 512 x 600 phantom scan")
        if name == "compare":
            p.add_argument("--configs", nargs="+", default=list(COMPARE_CONFIGS),
                           help="name:region:precision:tile (tile = HR tile edge, 0: from the memory budget); "
                           "the first is the reference of the score changes")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--small", action="store_true", help="PhantomConfig.small() instead of the full size")
            p.add_argument("--skip-end-to-end", action="store_true")
        if name == "case":
            p.add_argument("--truth", required=True)
            p.add_argument("--region", default="spine")
            p.add_argument("--precision", default="auto")
            p.add_argument("--tile", type=int, default=0)
        if name == "localisation":
            p.add_argument("--cases", type=int, default=10)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--small", action="store_true")
            p.add_argument("--overlays", default=None)
    args = parser.parse_args()
    if args.mode == "one":
        print(json.dumps(run_one(args)))
    elif args.mode == "speed":
        speed(args)
    elif args.mode == "memory":
        memory(args)
    elif args.mode == "compare":
        compare(args)
    elif args.mode == "case":
        print(json.dumps(run_case(args)))
    else:
        localisation(args)


if __name__ == "__main__":
    main()
