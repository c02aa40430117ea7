"""Training of the dual-pathway network with DeepMedic's regime, resumable and distributable.

The regime follows ``deepmedic_spec.md`` section 4 and the paper's section 3.2:

* **Loss**: cross-entropy averaged over every output voxel of the batch, plus the model's own
  kernel regularisers (L1 1e-6 and L2 1e-4 on conv kernels only, added by :mod:`vfdetect.model`).
  Voxels labelled :data:`vfdetect.labels.IGNORE` (255; any value >= 3), vertebrae of unknown
  class, add no loss and are left out of the training accuracy (:func:`voxel_cross_entropy`).
* **Optimizer**: RMSProp with learning rate 1e-3, rho 0.9, epsilon 1e-4 *inside* the square root
  and Nesterov momentum 0.6 (:class:`NesterovRMSprop`).
* **Schedule**: ``epochs`` x ``subepochs`` x ``segments_per_subepoch`` (35 x 20 x 1000 by default,
  batch 10: 70,000 iterations). One Keras "epoch" is one subepoch; after every ``subepochs`` of
  them the epoch ends: validation, the plateau rule for the learning rate
  (:class:`PlateauSchedule`, DeepMedic's "auto" rule applied to the selection measure below:
  halve when it has not improved for ``lr_patience`` epochs) and the saved models.
* **Validation**: ``validation_fraction`` of the cases (seeded, stratified by whether a case has a
  vertebra of Genant grade >= ``min_grade``) are held out. Two fixed sets of segments are drawn
  from them once per run (the same segments every epoch, so epochs compare like with like):

  - ``validation_segments`` receptive-field-sized segments centred uniformly over the cases: the
    voxel accuracy, overall and per class (almost all background, so blind to fractures);
  - ``balanced_validation_segments`` training-sized segments drawn class-balanced with the
    training ``class_weights`` (:func:`vfdetect.sampling.draw_subepoch`, no augmentation):
    on their voxels whose true label is a vertebra class, the recall of the normal and of the
    fracture class and the fracture-vs-normal AUC of ``p(fracture) / (p(normal) + p(fracture))``
    (:func:`vertebra_metrics`).

* **Checkpoint selection** (:func:`selection_rule`, :func:`selection_key`): ``model.keras`` is the
  epoch with the highest fracture-vs-normal voxel AUC, ties broken by the mean of the two
  vertebra recalls, the earliest epoch winning exact ties. When the balanced segments hold no
  fractured (or no normal) vertebra voxel, the measure is the mean recall of the vertebra
  classes present (ties: overall accuracy); with no vertebra voxel at all, the overall accuracy.
  The rule, chosen once per run, is written to ``config.json`` and ``report.json``; the
  learning-rate plateau rule follows the same measure.

Run folder (:func:`run_training`; names from :class:`vfdetect.layout.RunFolder`)::

    config.json        everything needed to rebuild the network and to predict with it
    model.keras        the model of the epoch chosen by the checkpoint selection rule (float32, no optimizer)
    model_last.keras   the model after the last finished epoch
    log.csv            one row per epoch: loss, accuracies (per class too), vertebra recalls, fracture
                       AUC, selection measure, learning rate, times
    tensorboard/       TensorBoard scalars per subepoch and per epoch
    report.json        versions, seed, data hash, strategy, timings
    checkpoint/last.npz  model and optimizer state plus the loop state, written after every subepoch

Every file is written atomically. A run killed at any moment resumes from its last checkpoint
(``resume=True``) and ends where an uninterrupted run would: the segments of each subepoch are a
pure function of ``(seed, epoch, subepoch)`` (:func:`vfdetect.sampling.subepoch_rng`), the
validation segments a function of the seed, and the checkpoint holds every model variable (dropout
seed state included), every optimizer variable, the learning-rate schedule and the per-epoch log.

Distribution (:func:`make_strategy`): ``"auto"`` uses ``MultiWorkerMirroredStrategy`` when
``TF_CONFIG`` is set, ``MirroredStrategy`` when several GPUs are visible and the default strategy
otherwise. ``batch_size`` is the global batch, split between replicas. Every worker draws the same
segments (same seed) and tf.data shards them by data; the chief writes to the run folder, worker
``i`` to ``RUN/workers/<type>-<i>/`` (every worker runs the same saving code, as collective reads
require).

Tensors are ``(batch, x, y, z, channel)``; arrays ``[x, y, z]`` in the internal frame.

Modules: :mod:`~vfdetect.train.config` (settings), :mod:`~vfdetect.train.optim` (optimizer,
schedule, loss), :mod:`~vfdetect.train.distribute` (strategies), :mod:`~vfdetect.train.cases`
(split, data hash, loading), :mod:`~vfdetect.train.selection` (validation measures, checkpoint
selection), :mod:`~vfdetect.train.checkpoints` (run folder files), :mod:`~vfdetect.train.loop`
(:func:`run_training`).
"""
from vfdetect.train.cases import data_hash, has_fracture, split_cases
from vfdetect.train.checkpoints import (
    CHECKPOINT_FORMAT,
    LOG_COLUMNS,
    RUN_FORMAT,
    read_checkpoint,
    read_log,
    restore_checkpoint,
    save_checkpoint,
    write_scalars,
)
from vfdetect.train.config import (
    CLASS_KEYS,
    CLASS_NAMES,
    INFERENCE_SEGMENT_SHAPE,
    N_CLASSES,
    PRECISIONS,
    STRATEGIES,
    VARIANTS,
    TrainConfig,
    TrainConfigError,
    build_network,
    model_arguments,
    network_geometry,
)
from vfdetect.train.distribute import WorkerRole, make_strategy, worker_role
from vfdetect.train.loop import run_training
from vfdetect.train.optim import NesterovRMSprop, PlateauSchedule, voxel_cross_entropy
from vfdetect.train.selection import (
    SELECTION_DESCRIPTIONS,
    SELECTION_RULES,
    balanced_sampling,
    best_epoch_index,
    fracture_score,
    rank_auc,
    selection_key,
    selection_rule,
    validation_accuracy,
    vertebra_metrics,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLASS_KEYS",
    "CLASS_NAMES",
    "INFERENCE_SEGMENT_SHAPE",
    "LOG_COLUMNS",
    "N_CLASSES",
    "PRECISIONS",
    "RUN_FORMAT",
    "SELECTION_DESCRIPTIONS",
    "SELECTION_RULES",
    "STRATEGIES",
    "VARIANTS",
    "NesterovRMSprop",
    "PlateauSchedule",
    "TrainConfig",
    "TrainConfigError",
    "WorkerRole",
    "balanced_sampling",
    "best_epoch_index",
    "build_network",
    "data_hash",
    "fracture_score",
    "has_fracture",
    "make_strategy",
    "model_arguments",
    "network_geometry",
    "rank_auc",
    "read_checkpoint",
    "read_log",
    "restore_checkpoint",
    "run_training",
    "save_checkpoint",
    "selection_key",
    "selection_rule",
    "split_cases",
    "validation_accuracy",
    "vertebra_metrics",
    "voxel_cross_entropy",
    "worker_role",
    "write_scalars",
]
