"""The tf.data wiring of training: batches streamed from a :class:`vfdetect.segments.TrainingSampler`.

TensorFlow is imported only inside :func:`segments_dataset` and :func:`make_dataset`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.segments import subepoch_positions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorflow as tf

    from vfdetect.segments import TrainingSampler


def segments_dataset(segments: Mapping[str, np.ndarray], batch_size: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``((hr, lr), labels)`` batches over already drawn segments, in order.

    ``hr``/``lr`` are float32 ``(batch, x, y, z, 1)``; ``labels`` int32 ``(batch, ox, oy, oz)``.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(
        ((segments["hr"], segments["lr"]), segments["labels"].astype(np.int32))
    )
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def make_dataset(
    sampler: TrainingSampler,
    batch_size: int,
    subepochs_per_epoch: int,
    start: tuple[int, int] = (0, 0),
    epochs: int | None = None,
    shard: tuple[int, int] = (0, 1),
    prefetch_batches: int = 4,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` streaming training batches ``((hr, lr), labels)`` subepoch after subepoch.

    Each subepoch contributes ``segments_per_subepoch // batch_size`` full batches (DeepMedic trains
    on that many; a leftover partial batch is dropped so batches never straddle subepochs). The
    next subepoch is drawn in a background thread while the current one is consumed, and tf.data
    prefetches ``prefetch_batches`` batches, so sampling overlaps training. The stream starts at
    ``start = (epoch, subepoch)`` (for resuming) and ends before epoch ``epochs`` (``None``: never).
    ``shard = (index, count)`` keeps only batches ``b`` with ``b % count == index`` of each
    subepoch, for workers that share one seed. Shapes are static: hr ``(batch_size, *hr_shape, 1)``,
    lr ``(batch_size, *lr_shape, 1)`` float32, labels ``(batch_size, *output_shape)`` int32.
    """
    import tensorflow as tf

    if batch_size < 1 or batch_size > sampler.segments_per_subepoch:
        raise VfdetectError(
            f"batch_size must be between 1 and segments_per_subepoch ({sampler.segments_per_subepoch}), got {batch_size}"
        )
    shard_index, shard_count = (int(shard[0]), int(shard[1]))
    if not 0 <= shard_index < shard_count:
        raise VfdetectError(f"shard index must be in [0, {shard_count}), got {shard_index}")
    n_batches = sampler.segments_per_subepoch // batch_size

    def batches() -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
        positions = subepoch_positions(subepochs_per_epoch, start, epochs)
        for _, segments in sampler.iterate(positions):
            labels = segments["labels"].astype(np.int32)
            for b in range(shard_index, n_batches, shard_count):
                rows = slice(b * batch_size, (b + 1) * batch_size)
                yield (segments["hr"][rows], segments["lr"][rows]), labels[rows]

    signature = (
        (
            tf.TensorSpec((batch_size, *sampler.config.hr_shape, 1), tf.float32),
            tf.TensorSpec((batch_size, *sampler.lr_shape, 1), tf.float32),
        ),
        tf.TensorSpec((batch_size, *sampler.output_shape), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    return dataset.prefetch(prefetch_batches)
