"""The training loop: one run process, its distributed step, resuming, :func:`run_training`."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from vfdetect.errors import InputError, VfdetectError
from vfdetect.fileio import write_json_atomic
from vfdetect.layout import LabelFolder, RunFolder
from vfdetect.train.cases import _load_cases, data_hash, split_cases
from vfdetect.train.checkpoints import (
    RUN_FORMAT,
    json_number,
    restore_checkpoint,
    run_description,
    save_checkpoint,
    save_model,
    utc_now,
    versions,
    write_log,
    write_scalars,
)
from vfdetect.train.config import N_CLASSES, TrainConfig, build_network, network_geometry
from vfdetect.train.distribute import make_strategy, worker_role
from vfdetect.train.optim import NesterovRMSprop, PlateauSchedule, voxel_cross_entropy
from vfdetect.train.selection import (
    SELECTION_DESCRIPTIONS,
    SELECTION_RULES,
    Validator,
    balanced_sampling,
    selection_key,
    selection_rule,
    selection_summary,
)
from vfdetect.vertebrae import Case

_LOGGER = logging.getLogger(__name__)


def _new_state(config: TrainConfig, hash_of_data: str, rule: str) -> dict[str, Any]:
    return {
        "next_subepoch": 0,  # global index: epoch * subepochs + subepoch
        "schedule": PlateauSchedule(config.learning_rate, config.lr_patience, config.lr_factor,
                                    config.lr_min_increase).to_dict(),
        "epoch_partial": {"losses": [], "accuracies": [], "train_time_s": 0.0, "started_elapsed_s": 0.0},
        "log": [],
        "selection_rule": rule,
        "best_epoch": None,  # 0-based index into "log" of the epoch saved as model.keras
        "elapsed_s": 0.0,
        "train_time_s": 0.0,
        "validation_time_s": 0.0,
        "segments_trained": 0,
        "steady_segments": 0,
        "steady_time_s": 0.0,
        "data_hash": hash_of_data,
        "sessions": [],
    }


class _StepRunner:
    """One distributed training step: forward, cross-entropy + regularisers, gradients, update.

    Each replica divides its summed voxel losses by the voxels of the *global* batch and its share
    of the regularisers by the number of replicas; the optimizer sums the gradients over replicas
    (Keras' all-reduce), so the update equals that of one device on the whole batch. Returns the
    global loss, the number of correctly classified output voxels and the number of output voxels
    with a known class (labels < 3; ignored voxels count in neither).
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy,
                 global_batch: int, voxels_per_segment: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.voxels_per_segment = int(voxels_per_segment)
        self.global_voxels = float(global_batch * voxels_per_segment)
        self.step = tf.function(self._step, jit_compile=False)
        self._average: Any = None

    def _replica_step(self, inputs: Any, labels: Any) -> tuple[Any, Any, Any]:
        replicas = float(tf.distribute.get_replica_context().num_replicas_in_sync)
        with tf.GradientTape() as tape:
            probabilities = self.model(list(inputs), training=True)
            per_voxel = voxel_cross_entropy(labels, probabilities)
            loss = tf.reduce_sum(per_voxel) / self.global_voxels
            if self.model.losses:
                loss += tf.add_n([tf.cast(term, tf.float32) for term in self.model.losses]) / replicas
        variables = self.model.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        labels = tf.cast(labels, tf.int32)
        known = tf.less(labels, N_CLASSES)
        correct = tf.reduce_sum(tf.cast(tf.logical_and(tf.equal(predicted, labels), known), tf.float32))
        return loss, correct, tf.reduce_sum(tf.cast(known, tf.float32))

    def average_statistics(self) -> None:
        """Replace the batch-norm moving statistics by their mean over all replicas.

        Normalisation uses each replica's own batch statistics (as DeepMedic on one device), so the
        moving averages drift apart between workers while the trained weights stay identical;
        averaging them after every subepoch gives every worker the same model. No-op on one replica.
        """
        if self.strategy.num_replicas_in_sync == 1:
            return
        if self._average is None:
            statistics = [v for v in self.model.non_trainable_variables
                          if "moving_mean" in v.path or "moving_variance" in v.path]

            def average() -> None:
                values = self.strategy.run(lambda: [tf.identity(v.value) for v in statistics])
                for variable, value in zip(statistics, values, strict=True):
                    variable.assign(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))

            self._average = tf.function(average, jit_compile=False)
        self._average()

    def _step(self, iterator: Any) -> tuple[Any, Any, Any]:
        inputs, labels = next(iterator)
        results = self.strategy.run(self._replica_step, args=(inputs, labels))
        return tuple(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results)


class _Run:
    """State and side effects of one training process (see :func:`run_training`)."""

    def __init__(self, config: TrainConfig, out_dir: Path, quiet: bool, keep_epoch_models: bool = False) -> None:
        self.config = config
        self.out_dir = out_dir
        self.quiet = quiet
        self.keep_epoch_models = keep_epoch_models
        self.folder = RunFolder(out_dir)
        self.checkpoint_path = self.folder.checkpoint
        self.state: dict[str, Any] = {}
        self.model: keras.Model
        self.optimizer: keras.optimizers.Optimizer
        self.export_model: keras.Model
        self.validator: Validator
        self.writer: Any = None
        self.session_started = time.perf_counter()
        self.elapsed_at_session_start = 0.0
        self.report: dict[str, Any] = {}

    # -- per subepoch -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_at_session_start + time.perf_counter() - self.session_started

    def end_subepoch(self, global_subepoch: int, loss: float, accuracy: float, train_time: float,
                     first_of_session: bool = False) -> None:
        config, state = self.config, self.state
        epoch, subepoch = divmod(global_subepoch, config.subepochs)
        partial = state["epoch_partial"]
        if subepoch == 0:
            partial.update(losses=[], accuracies=[], train_time_s=0.0, started_elapsed_s=state["elapsed_s"])
        partial["losses"].append(loss)
        partial["accuracies"].append(accuracy)
        partial["train_time_s"] += train_time
        segments = config.batches_per_subepoch * config.batch_size
        state["segments_trained"] += segments
        state["train_time_s"] += train_time
        if not first_of_session:  # the first subepoch of a process also traces the graph
            state["steady_segments"] += segments
            state["steady_time_s"] += train_time
        state["next_subepoch"] = global_subepoch + 1
        write_scalars(self.writer, global_subepoch + 1, {
            "subepoch/loss": loss,
            "subepoch/train_accuracy": accuracy,
            "subepoch/segments_per_s": segments / max(train_time, 1e-9),
        })
        if subepoch == config.subepochs - 1:
            self.end_epoch(epoch)
        state["elapsed_s"] = self.elapsed()
        self.save_checkpoint()

    def train(self, dataset: tf.data.Dataset, strategy: tf.distribute.Strategy, runner: _StepRunner) -> None:
        """Train from the state's next subepoch to the end of the schedule."""
        config, state = self.config, self.state
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        first = int(state["next_subepoch"])
        for global_subepoch in range(first, config.total_subepochs):
            epoch, subepoch = divmod(global_subepoch, config.subepochs)
            started = time.perf_counter()
            loss_sum, correct_sum, known_sum = 0.0, 0.0, 0.0
            with tqdm(total=config.batches_per_subepoch, unit="batch", disable=self.quiet, leave=False,
                      desc=f"epoch {epoch + 1}/{config.epochs} subepoch {subepoch + 1}/{config.subepochs}") as bar:
                for batch in range(config.batches_per_subepoch):
                    loss, correct, known = runner.step(iterator)
                    loss_sum += float(loss)
                    correct_sum += float(correct)
                    known_sum += float(known)
                    bar.update(1)
                    if batch % 10 == 9:
                        bar.set_postfix(loss=f"{loss_sum / (batch + 1):.4f}",
                                        acc=f"{correct_sum / max(known_sum, 1.0):.3f}", refresh=False)
            runner.average_statistics()
            self.end_subepoch(global_subepoch, loss_sum / config.batches_per_subepoch,
                              correct_sum / known_sum if known_sum else math.nan, time.perf_counter() - started,
                              first_of_session=global_subepoch == first)

    def end_epoch(self, epoch: int) -> None:
        config, state = self.config, self.state
        partial = state["epoch_partial"]
        self.export_model.set_weights(self.model.get_weights())
        started = time.perf_counter()
        scores = self.validator()
        validation_time = time.perf_counter() - started
        state["validation_time_s"] += validation_time
        rule = state["selection_rule"]
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(np.nanmean(partial["losses"])),
            "train_accuracy": float(np.nanmean(partial["accuracies"])),
            "val_accuracy": scores["accuracy"],
            "val_accuracy_background": scores["background"],
            "val_accuracy_normal": scores["normal"],
            "val_accuracy_fracture": scores["fracture"],
            "val_recall_normal": scores["recall_normal"],
            "val_recall_fracture": scores["recall_fracture"],
            "val_mean_recall": scores["mean_recall"],
            "val_fracture_auc": scores["fracture_auc"],
        }
        row["selection_measure"] = row[SELECTION_RULES[rule][0]]
        row = {k: json_number(v) if isinstance(v, float) else v for k, v in row.items()}
        schedule = PlateauSchedule.from_dict(state["schedule"])
        learning_rate = schedule.learning_rate
        measure = row["selection_measure"]
        lowered = schedule.update(epoch, math.nan if measure is None else measure)
        state["schedule"] = schedule.to_dict()
        if lowered:
            self.optimizer.learning_rate.assign(schedule.learning_rate)
        best = state["best_epoch"]
        selected = best is None or selection_key(row, rule) > selection_key(state["log"][best], rule)
        if selected:
            state["best_epoch"] = len(state["log"])
            save_model(self.export_model, self.folder.model)
        save_model(self.export_model, self.folder.model_last)
        if self.keep_epoch_models:
            save_model(self.export_model, self.folder.epoch_model(epoch + 1))
        elapsed = self.elapsed()
        segments = config.subepochs * config.batches_per_subepoch * config.batch_size
        row.update({
            "selected": int(selected),
            "learning_rate": learning_rate,
            "lr_halved": int(lowered),
            "epoch_time_s": elapsed - partial["started_elapsed_s"],
            "train_time_s": partial["train_time_s"],
            "validation_time_s": validation_time,
            "segments_per_s": segments / max(partial["train_time_s"], 1e-9),
            "elapsed_s": elapsed,
        })
        state["log"].append({k: json_number(v) if isinstance(v, float) else v for k, v in row.items()})
        write_log(self.folder.log, state["log"])
        keys = ("loss", "train_accuracy", "val_accuracy", "val_accuracy_background", "val_accuracy_normal",
                "val_accuracy_fracture", "val_recall_normal", "val_recall_fracture", "val_mean_recall",
                "val_fracture_auc", "selection_measure", "learning_rate", "segments_per_s")
        write_scalars(self.writer, epoch + 1, {f"epoch/{key}": row[key] for key in keys})
        self.writer.flush()

    def save_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.state)
        self.write_report(status="running")

    def write_report(self, status: str) -> None:
        state = self.state
        best = state["best_epoch"]
        rule = state["selection_rule"]
        measure, tie_break = SELECTION_RULES[rule]
        best_row = state["log"][best] if best is not None else {}
        self.report.update(
            status=status,
            updated=utc_now(),
            subepochs_done=state["next_subepoch"],
            epochs_done=len(state["log"]),
            best_epoch=None if best is None else best + 1,
            checkpoint_selection={
                **selection_summary(rule),
                "best_epoch": None if best is None else best + 1,
                "measure_value": best_row.get(measure),
                "tie_break_value": best_row.get(tie_break),
                "val_accuracy": best_row.get("val_accuracy"),
            },
            final_learning_rate=PlateauSchedule.from_dict(state["schedule"]).learning_rate,
            timings={
                "elapsed_s": state["elapsed_s"],
                "train_s": state["train_time_s"],
                "validation_s": state["validation_time_s"],
                "segments_trained": state["segments_trained"],
                "segments_per_s": state["segments_trained"] / max(state["train_time_s"], 1e-9),
                "segments_per_s_after_first_subepoch": (
                    state["steady_segments"] / state["steady_time_s"] if state["steady_time_s"] > 0 else None
                ),
                "sessions": state["sessions"],
            },
        )
        write_json_atomic(self.folder.report, self.report)


def _compatible(saved: TrainConfig, config: TrainConfig, path: Path) -> None:
    differing = [name for name in saved.differences(config) if name not in ("epochs", "strategy")]
    if differing:
        raise InputError(
            path,
            f"the run was started with other settings ({', '.join(differing)}); resume with the same ones "
            "(only --epochs and --strategy may change)",
        )


def run_training(
    cases: Sequence[Case],
    labels_dir: Path,
    run_dir: Path,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    quiet: bool = False,
    validation_cases: Sequence[Case] | None = None,
    cache_dir: Path | None = None,
    keep_epoch_models: bool = False,
) -> Path:
    """Train a network on ``cases`` (label images in ``labels_dir``) into the run folder ``run_dir``.

    ``validation_cases`` replaces the seeded hold-out split (then every case of ``cases`` trains).
    ``cache_dir``: a preprocessing cache (``vfdetect preprocess``) the cases are read from; missing
    or stale cases are prepared and added to it. ``keep_epoch_models``: also keep the weights after
    every epoch (``model_epoch<NNN>.keras``), e.g. to score a longer run at a shorter schedule.
    With ``resume`` the run continues from ``run_dir``'s last checkpoint (starting afresh when there
    is none); settings must match the run's ``config.json`` except ``epochs`` (which may grow) and
    ``strategy``. ``config.min_grade`` must equal the ``min_grade`` recorded in
    ``labels_dir/label_config.json`` when that file exists. Returns ``run_dir``.
    """
    run_dir, labels_dir = Path(run_dir), Path(labels_dir)
    cases = list(cases)
    if not cases:
        raise VfdetectError("no training cases given")
    if not labels_dir.is_dir():
        raise InputError(labels_dir, "label folder not found")
    from vfdetect.labels import read_label_min_grade

    label_min_grade = read_label_min_grade(labels_dir)
    if label_min_grade is not None and label_min_grade != config.min_grade:
        raise InputError(
            LabelFolder(labels_dir).config,
            f"the label images count grade >= {label_min_grade} as fractured, the training asks for min_grade "
            f"{config.min_grade}; train with the same min_grade or synthesise the labels again with it",
        )
    strategy = make_strategy(config.strategy)  # before any other TensorFlow operation
    role = worker_role(strategy)
    folder = RunFolder(run_dir) if role.is_chief else RunFolder(run_dir).worker(role.name)
    out_dir = folder.path
    config_path = folder.config
    run = _Run(config, out_dir, quiet=quiet or not role.is_chief, keep_epoch_models=keep_epoch_models)

    existing = config_path.is_file() or run.checkpoint_path.is_file()
    if existing and not resume:
        raise InputError(run_dir, "already holds a training run; resume it (--resume) or choose another folder")
    if resume and config_path.is_file():
        try:
            saved = TrainConfig.from_dict(json.loads(config_path.read_text())["train_config"])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise InputError(config_path, f"unreadable run configuration: {error}") from None
        _compatible(saved, config, config_path)

    if validation_cases is None:
        training_cases, held_out = split_cases(cases, config.validation_fraction, config.seed, config.min_grade)
    else:
        training_cases, held_out = cases, list(validation_cases)
    validation_on_training = not held_out
    hash_of_data = data_hash([*training_cases, *held_out], labels_dir)

    from vfdetect.sampling import (
        TrainingSampler,
        draw_subepoch,
        make_dataset,
        subepoch_rng,
        uniform_validation_segments,
    )

    load_started = time.perf_counter()
    geometry = network_geometry(config)
    train_loaded = _load_cases(training_cases, labels_dir, config.spacing, run.quiet, "training", cache_dir)
    sampler = TrainingSampler(train_loaded, geometry, config.sampling, config.segments_per_subepoch, config.seed)
    val_loaded = (
        _load_cases(held_out, labels_dir, config.spacing, run.quiet, "validation", cache_dir)
        if held_out else train_loaded
    )
    del train_loaded  # the sampler holds the padded copies
    validation_segments = uniform_validation_segments(
        val_loaded, geometry, config.validation_segments, subepoch_rng(config.seed, 0, 0, validation=True)
    )
    balanced_segments = draw_subepoch(
        val_loaded, geometry, balanced_sampling(config.sampling, len(val_loaded)),
        config.balanced_validation_segments, subepoch_rng(config.seed, 0, 1, validation=True),
    )
    del val_loaded
    rule = selection_rule(balanced_segments["labels"])
    if rule != "fracture_auc" and not run.quiet:
        _LOGGER.warning("checkpoint selection: %s", SELECTION_DESCRIPTIONS[rule])
    load_time = time.perf_counter() - load_started

    with strategy.scope():
        model = build_network(config, config.precision)
        optimizer = NesterovRMSprop(
            learning_rate=config.learning_rate, rho=config.rho, momentum=config.momentum,
            epsilon=config.epsilon, nesterov=config.nesterov,
        )
        optimizer.build(model.trainable_variables)
    export_model = build_network(config, "float32")
    from vfdetect.model import count_trainable_parameters

    trainable = int(count_trainable_parameters(export_model))
    run.model, run.optimizer, run.export_model = model, optimizer, export_model
    run.validator = Validator(export_model, validation_segments, balanced_segments, config.validation_batch_size)

    state = _new_state(config, hash_of_data, rule)
    if resume and run.checkpoint_path.is_file():
        state = restore_checkpoint(run.checkpoint_path, model, optimizer, hash_of_data)
    run.state = state
    run.elapsed_at_session_start = float(state["elapsed_s"])
    run.session_started = time.perf_counter()
    state["sessions"].append({"started": utc_now(), "at_subepoch": state["next_subepoch"], "load_s": load_time})

    description = run_description(config, trainable, training_cases, held_out, validation_on_training, hash_of_data,
                                   rule)
    if config_path.is_file():
        saved_description = json.loads(config_path.read_text())
        description["created"] = saved_description.get("created", description["created"])
    write_json_atomic(config_path, description)
    run.report = {
        "format": RUN_FORMAT,
        "versions": versions(),
        "seed": config.seed,
        "data_hash": hash_of_data,
        "cases": {"training": len(training_cases), "validation": len(held_out)},
        "strategy": {"name": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync),
                     "workers": role.num_workers, "role": role.name},
        "precision": config.precision,
        "jit_compile": False,
        "command": " ".join(sys.argv),
    }
    run.writer = tf.summary.create_file_writer(str(folder.tensorboard))

    start = int(state["next_subepoch"])
    if start < config.total_subepochs:
        dataset = make_dataset(
            sampler, config.batch_size, config.subepochs,
            start=divmod(start, config.subepochs), epochs=config.epochs,
        )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
        runner = _StepRunner(model, optimizer, strategy, config.batch_size, int(np.prod(sampler.output_shape)))
        run.train(dataset, strategy, runner)
    state["elapsed_s"] = run.elapsed()
    finished = state["next_subepoch"] >= config.total_subepochs
    run.write_report(status="finished" if finished else "interrupted")
    run.writer.close()
    return run_dir
