"""DeepMedic's optimizer (:class:`NesterovRMSprop`), learning-rate rule and voxel loss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from vfdetect.train.config import N_CLASSES


@keras.saving.register_keras_serializable(package="vfdetect")
class NesterovRMSprop(keras.optimizers.RMSprop):
    """RMSProp with Nesterov momentum and epsilon inside the square root, as DeepMedic trains.

    Per variable, with gradient ``g``, accumulator ``a`` and momentum buffer ``m``::

        a <- rho * a + (1 - rho) * g**2
        step = lr * g / sqrt(a + epsilon)
        m <- momentum * m + step
        w <- w - (momentum * m + step)

    DeepMedic writes the same with ``v = -m``: ``v <- mu v - step; w <- w + mu v - step``
    (non-normalised momentum). Keras' own RMSprop applies classic momentum (``w <- w - m``); this
    subclass only changes that last line, so slots, serialisation and distribution behave as in Keras.
    With ``nesterov=False`` or ``momentum=0`` it is Keras' RMSprop.
    """

    def __init__(
        self,
        learning_rate: float = 1e-3,
        rho: float = 0.9,
        momentum: float = 0.6,
        epsilon: float = 1e-4,
        centered: bool = False,
        nesterov: bool = True,
        name: str = "nesterov_rmsprop",
        **kwargs: Any,
    ) -> None:
        if centered:
            raise ValueError("NesterovRMSprop does not implement the centered variant")
        super().__init__(
            learning_rate=learning_rate, rho=rho, momentum=momentum, epsilon=epsilon, centered=False, name=name, **kwargs
        )
        self.nesterov = bool(nesterov)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one update to ``variable`` (see the class docstring)."""
        if not self.nesterov or self.momentum <= 0:
            super().update_step(gradient, variable, learning_rate)
            return
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        accumulator = self._velocities[index]
        momentum_buffer = self._momentums[index]
        self.assign(
            accumulator,
            ops.add(ops.multiply(self.rho, accumulator), ops.multiply(1.0 - self.rho, ops.square(gradient))),
        )
        step = ops.divide(ops.multiply(lr, gradient), ops.sqrt(ops.add(accumulator, self.epsilon)))
        self.assign(momentum_buffer, ops.add(ops.multiply(self.momentum, momentum_buffer), step))
        self.assign_sub(variable, ops.add(ops.multiply(self.momentum, momentum_buffer), step))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["nesterov"] = self.nesterov
        return config


@dataclass
class PlateauSchedule:
    """DeepMedic's "auto" learning-rate rule, driven by a validation score of each epoch (higher is better).

    DeepMedic feeds it the validation accuracy; :func:`run_training` feeds it the selection measure
    of :func:`selection_key` (the fracture-vs-normal voxel AUC by default), so the rate is lowered
    when the measure that picks ``model.keras`` stalls.

    At the end of epoch ``e`` (0-based): if the score beats the best so far by more than
    ``min_increase``, ``e`` becomes the best epoch (a NaN score never does). If ``e >= best_epoch + patience`` and
    ``e >= last_lowered + patience``, the rate is divided by ``factor`` and ``last_lowered = e``
    (``last_lowered`` starts at 0, so the first halving comes no earlier than epoch ``patience``).
    """

    learning_rate: float
    patience: int = 10
    factor: float = 2.0
    min_increase: float = 0.0
    best_score: float | None = None
    best_epoch: int = -1
    last_lowered: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch ``epoch``'s validation score; return True when the rate was lowered."""
        if math.isfinite(score) and (self.best_score is None or score > self.best_score + self.min_increase):
            self.best_score = float(score)
            self.best_epoch = int(epoch)
        if epoch >= self.best_epoch + self.patience and epoch >= self.last_lowered + self.patience:
            self.learning_rate = self.learning_rate / self.factor
            self.last_lowered = int(epoch)
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PlateauSchedule:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(values))


def voxel_cross_entropy(labels: Any, probabilities: Any) -> Any:
    """Cross-entropy per output voxel, ``-log p_label`` (probabilities clipped), 0 where ignored.

    ``labels`` (batch, x, y, z) integers, ``probabilities`` (batch, x, y, z, 3) softmax output;
    returns (batch, x, y, z) float32 whatever the model's compute dtype. A label >= 3 (the label
    images' :data:`vfdetect.labels.IGNORE`, 255: a vertebra of unknown class) gets loss 0. The
    training loss divides the sum by every output voxel of the batch, ignored ones included, so an
    ignored voxel only removes its own term.
    """
    probabilities = ops.cast(probabilities, "float32")
    labels = ops.cast(labels, "int32")
    known = ops.less(labels, N_CLASSES)
    per_voxel = keras.losses.sparse_categorical_crossentropy(
        ops.where(known, labels, 0), probabilities, from_logits=False
    )
    return ops.where(known, per_voxel, ops.zeros_like(per_voxel))
