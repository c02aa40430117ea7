"""The custom Keras layers of the dual-pathway network, serialisable under the "vfdetect" package.

Keras 3 only (``keras`` and ``keras.ops``), so they also run under ``KERAS_BACKEND=jax``. Tensors are
``(batch, x, y, z, channel)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops

from vfdetect.errors import VfdetectError

SERIALISATION_PACKAGE = "vfdetect"


def int_tuple(values: Sequence[int], what: str, length: int | None = None) -> tuple[int, ...]:
    items = tuple(int(v) for v in values)
    if length is not None and len(items) != length:
        raise VfdetectError(f"{what} needs {length} values, got {len(items)}")
    return items


def residual_crop(kernels: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Centre crop (before, after) per axis matching what ``kernels`` remove from a tensor."""
    crop = []
    for axis in range(3):
        total = sum(int(kernel[axis]) - 1 for kernel in kernels)
        crop.append((total // 2, total - total // 2))
    return tuple(crop)



@keras.saving.register_keras_serializable(package=SERIALISATION_PACKAGE)
class ChannelBias(layers.Layer):
    """Adds a learned bias per channel (initialised to zero)."""

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise VfdetectError("ChannelBias needs a known number of channels")
        self.bias = self.add_weight(shape=(int(channels),), initializer="zeros", name="bias")

    def call(self, inputs: Any) -> Any:
        return inputs + ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package=SERIALISATION_PACKAGE)
class UpsampleRepeatCrop(layers.Layer):
    """Upsamples ``inputs[0]`` by repeating each voxel ``factor`` times per axis, then keeps the first voxels
    of each spatial axis so that it matches the spatial size of ``inputs[1]`` (DeepMedic's alignment)."""

    def __init__(self, factor: Sequence[int] = (3, 3, 3), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = int_tuple(factor, "factor", 3)

    def call(self, inputs: Sequence[Any]) -> Any:
        low_resolution, reference = inputs
        upsampled = low_resolution
        for axis, factor in enumerate(self.factor):
            if factor > 1:
                upsampled = ops.repeat(upsampled, factor, axis=axis + 1)
        size = ops.shape(reference)
        # ops.slice, not indexing: under TensorFlow the gradient of a slice is one padding, that of a
        # strided slice a generic kernel several times slower (a training step pays it every layer).
        # The channels are given as a number: a -1 there would lose the static channel count.
        channels = int(low_resolution.shape[-1])
        return ops.slice(upsampled, [0, 0, 0, 0, 0], [-1, size[1], size[2], size[3], channels])

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        low_resolution, reference = input_shapes
        return (low_resolution[0], reference[1], reference[2], reference[3], low_resolution[4])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": list(self.factor)}


@keras.saving.register_keras_serializable(package=SERIALISATION_PACKAGE)
class ResidualAdd(layers.Layer):
    """``inputs[0] + inputs[1]`` where the earlier tensor ``inputs[1]`` is centre-cropped by ``crop``
    (voxels dropped before/after per spatial axis) and zero-padded (or truncated) to the channels of
    ``inputs[0]``."""

    def __init__(self, crop: Sequence[Sequence[int]] = ((0, 0), (0, 0), (0, 0)), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crop = tuple(int_tuple(pair, "crop", 2) for pair in crop)
        if len(self.crop) != 3 or min(min(pair) for pair in self.crop) < 0:
            raise VfdetectError(f"crop needs 3 non-negative (before, after) pairs, got {crop}")

    def call(self, inputs: Sequence[Any]) -> Any:
        deep, earlier = inputs
        deep_channels, earlier_channels = int(deep.shape[-1]), int(earlier.shape[-1])
        if any(before or after for before, after in self.crop) or earlier_channels > deep_channels:
            shape = ops.shape(earlier)  # a slice (see UpsampleRepeatCrop.call) crops space and channels
            start = [0, *(before for before, _ in self.crop), 0]
            size = [-1, *(shape[axis + 1] - before - after for axis, (before, after) in enumerate(self.crop)),
                    min(deep_channels, earlier_channels)]
            earlier = ops.slice(earlier, start, size)
        if earlier_channels < deep_channels:
            earlier = ops.pad(earlier, [[0, 0]] * 4 + [[0, deep_channels - earlier_channels]])
        return deep + ops.cast(earlier, deep.dtype)

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return tuple(input_shapes[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "crop": [list(pair) for pair in self.crop]}


@keras.saving.register_keras_serializable(package=SERIALISATION_PACKAGE)
class ChannelAffine(layers.Layer):
    """``inputs * scale + shift`` per channel (an inference-mode BatchNorm that could not be folded)."""

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise VfdetectError("ChannelAffine needs a known number of channels")
        self.scale = self.add_weight(shape=(int(channels),), initializer="ones", name="scale")
        self.shift = self.add_weight(shape=(int(channels),), initializer="zeros", name="shift")

    def call(self, inputs: Any) -> Any:
        return inputs * ops.cast(self.scale, inputs.dtype) + ops.cast(self.shift, inputs.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)
