"""Benchmark: segments/s the sampling pipeline delivers vs segments/s the 3D model trains at.

Measures, on phantom cases from :mod:`vfdetect.phantom` (3D variant, 25^3 segments, batch 10):

* ``pipeline.draw_segments_per_s``: :meth:`TrainingSampler.draw` alone (numpy: centre sampling,
  HR/LR/label extraction, augmentation, shuffling);
* ``pipeline.tf_data_segments_per_s``: batches pulled through :func:`make_dataset` with no model
  (background drawing, ``from_generator``, prefetch);
* ``model.<precision>.train_on_batch_segments_per_s``: the compiled model on in-memory batches
  (``train_on_batch``), float32 and mixed_bfloat16, ``jit_compile=False``;
* ``model.<precision>.fit_over_pipeline_segments_per_s``: ``model.fit`` fed by :func:`make_dataset`,
  i.e. training with sampling overlapped; equal to the previous figure when the pipeline is not the
  bottleneck.

Usage::

    python benchmarks/bench_pipeline.py --out work/bench_pipeline.json

Figures taken on a machine shared with other jobs are noisy; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZE = 10
HR_SHAPE = (25, 25, 25)


def load_phantom_cases(n_cases: int, seed: int, work_dir: Path, small: bool) -> tuple[list, float]:
    """Write ``n_cases`` phantoms and their label images, and load them as training cases."""
    from vfdetect.labels import synthesize_manifest_labels
    from vfdetect.phantom import PhantomConfig, write_phantom_dataset
    from vfdetect.sampling import load_training_case
    from vfdetect.vertebrae import read_manifest

    config = PhantomConfig.small() if small else PhantomConfig()
    manifest = write_phantom_dataset(work_dir / "phantoms", n_cases, seed, config=config, quiet=True)
    cases = read_manifest(manifest)
    labels_dir = work_dir / "labels"
    synthesize_manifest_labels(cases, labels_dir, quiet=True)
    start = time.perf_counter()
    training = [load_training_case(case, labels_dir) for case in cases]
    return training, (time.perf_counter() - start) / len(cases)


def bench_pipeline(sampler: Any, subepochs: int) -> dict[str, float]:
    """Draw rate of the sampler alone, then the rate at which tf.data hands out batches."""
    from vfdetect.sampling import make_dataset

    start = time.perf_counter()
    for subepoch in range(subepochs):
        sampler.draw(0, subepoch)
    draw_rate = subepochs * sampler.segments_per_subepoch / (time.perf_counter() - start)

    # Timed from the first batch on: the first subepoch is drawn before anything can overlap it.
    dataset = make_dataset(sampler, BATCH_SIZE, subepochs_per_epoch=subepochs + 1, start=(1, 0), epochs=2)
    created = time.perf_counter()
    first_batch = None
    n_segments = 0
    for (hr, _lr), _labels in dataset:
        if first_batch is None:
            first_batch = time.perf_counter()
            continue
        n_segments += int(hr.shape[0])
    if first_batch is None:
        raise RuntimeError("the dataset delivered no batch")
    tf_data_rate = n_segments / (time.perf_counter() - first_batch)
    return {
        "draw_segments_per_s": draw_rate,
        "tf_data_segments_per_s": tf_data_rate,
        "tf_data_first_batch_seconds": first_batch - created,
        "segments_timed": n_segments,
    }


def compiled_model(precision: str, jit_compile: bool = False) -> Any:
    """The 3D model compiled with the spec's RMSProp settings (stock Keras momentum) and cross-entropy."""
    import keras

    from vfdetect.model import build_model

    model = build_model("3d", precision=precision, seed=0)
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=1e-3, rho=0.9, momentum=0.6, epsilon=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        jit_compile=jit_compile,
    )
    return model


def bench_model(sampler: Any, precision: str, warmup_steps: int, timed_steps: int,
                jit_compile: bool = False) -> dict[str, float]:
    """Training rate on in-memory batches, then with model.fit reading the streaming dataset."""
    import keras

    from vfdetect.sampling import make_dataset

    segments = sampler.draw(5, 0)
    n_batches = sampler.segments_per_subepoch // BATCH_SIZE
    batches = [
        (segments["hr"][b * BATCH_SIZE : (b + 1) * BATCH_SIZE], segments["lr"][b * BATCH_SIZE : (b + 1) * BATCH_SIZE],
         segments["labels"][b * BATCH_SIZE : (b + 1) * BATCH_SIZE].astype(np.int32))
        for b in range(n_batches)
    ]
    model = compiled_model(precision, jit_compile)
    for step in range(warmup_steps):
        hr, lr, labels = batches[step % n_batches]
        model.train_on_batch([hr, lr], labels)
    start = time.perf_counter()
    for step in range(timed_steps):
        hr, lr, labels = batches[step % n_batches]
        loss = model.train_on_batch([hr, lr], labels)
    on_batch_rate = timed_steps * BATCH_SIZE / (time.perf_counter() - start)

    class BatchClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter())

    clock = BatchClock()
    dataset = make_dataset(sampler, BATCH_SIZE, subepochs_per_epoch=1000, start=(7, 0))
    model.fit(dataset, epochs=1, steps_per_epoch=warmup_steps + timed_steps, callbacks=[clock], verbose=0)
    fit_rate = timed_steps * BATCH_SIZE / (clock.times[-1] - clock.times[warmup_steps - 1])
    return {
        "train_on_batch_segments_per_s": on_batch_rate,
        "fit_over_pipeline_segments_per_s": fit_rate,
        "last_loss": float(np.asarray(loss).reshape(-1)[0]),
        "timed_steps": timed_steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the figures to")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases to sample from (default 4)")
    parser.add_argument("--segments-per-subepoch", type=int, default=1000)
    parser.add_argument("--pipeline-subepochs", type=int, default=3, help="subepochs timed for the pipeline")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--timed-steps", type=int, default=30, help="training steps timed per measurement")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--full-size-phantoms", action="store_true", help="default PhantomConfig instead of small()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the training step")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vfdetect.fileio import write_json_atomic
    from vfdetect.geometry import geometry_for
    from vfdetect.sampling import SamplingConfig, TrainingSampler

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vfdetect-bench-") as tmp:
        cases, load_seconds = load_phantom_cases(args.cases, args.seed, Path(tmp), small=not args.full_size_phantoms)
    sampler = TrainingSampler(
        cases, geometry_for("3d"), SamplingConfig(hr_shape=HR_SHAPE), args.segments_per_subepoch, seed=args.seed
    )
    print(f"{len(cases)} phantom cases, shapes {[c.image.shape for c in cases]}, {load_seconds:.2f} s each to load")

    phantom_seconds = time.perf_counter() - started
    pipeline = bench_pipeline(sampler, args.pipeline_subepochs)
    print(f"pipeline: draw {pipeline['draw_segments_per_s']:.0f} segments/s, "
          f"tf.data {pipeline['tf_data_segments_per_s']:.0f} segments/s")

    import keras
    import tensorflow as tf

    models: dict[str, dict[str, float]] = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        models[precision] = bench_model(sampler, precision, args.warmup_steps, args.timed_steps, args.jit_compile)
        figures = models[precision]
        print(f"model {precision}: train_on_batch {figures['train_on_batch_segments_per_s']:.1f} segments/s, "
              f"fit over pipeline {figures['fit_over_pipeline_segments_per_s']:.1f} segments/s")
        keras.backend.clear_session()

    fastest = max(m["train_on_batch_segments_per_s"] for m in models.values()) if models else float("nan")
    ratio = pipeline["tf_data_segments_per_s"] / fastest
    print(f"pipeline / fastest model rate: {ratio:.1f}x")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "variant": "3d",
        "hr_shape": list(HR_SHAPE),
        "batch_size": BATCH_SIZE,
        "cases": len(cases),
        "case_shapes": [list(c.image.shape) for c in cases],
        "case_load_seconds": load_seconds,
        "pipeline": pipeline,
        "model": models,
        "pipeline_to_model_ratio": ratio,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
        "jit_compile": args.jit_compile,
        "phantom_setup_seconds": phantom_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
