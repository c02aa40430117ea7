"""The dual-pathway 3D CNN of Nicolaes et al. (2019), a DeepMedic network, in Keras 3 only.

Only ``keras`` and ``keras.ops`` are used (no TensorFlow calls), so the model also builds and runs under
``KERAS_BACKEND=jax``. Tensors are ``(batch, x, y, z, channel)``; kernel shapes are ``(x, y, z)``.

Topology (DeepMedic's defaults, see ``deepmedic_spec.md`` sections 1 and 2):

* a **normal pathway** of 8 valid 3D convolutions on the high-resolution (HR) segment;
* a **subsampled pathway** with the same kernels and its own weights on the low-resolution (LR)
  context window (:mod:`vfdetect.geometry`), upsampled by repetition and cropped to the normal
  pathway's output by keeping the **first** voxels of each axis;
* the two concatenated (normal first), then BN + PReLU, two fully connected layers of 150 as
  1x1x1 convolutions (input dropout 0 and 0.5) and a 3-class 1x1x1 classifier (input dropout 0.5)
  with a separate per-class bias and a softmax (background, normal vertebra, fractured vertebra).

Every conv layer is a pre-activation block ``BN -> PReLU -> dropout -> conv`` without conv bias. Block 0
of each conv pathway instead has a learned bias on the input channel and a linear activation, so the
raw image is never normalised or rectified (1 parameter per pathway; ``input_bias=False`` drops them).
Residual connections at conv layers 4, 6, 8 of both pathways and at FC layer 2 add the input of the
previous layer, centre-cropped and zero-padded in channels, to the layer's conv output. Conv kernels
are initialised from an untruncated He fan-in normal and regularised with L1 1e-6 + L2 1e-4 through
``kernel_regularizer`` (FC and classifier kernels included; BN, PReLU and biases are not). Keras' BN
keeps an exponential moving average (momentum 0.98, about DeepMedic's 60-batch window) instead of a
ring buffer, and its dropout is inverted, the same in expectation.

The widths per variant are the spec's proposal, giving about 230K trainable parameters each:
229,271 (3d), 229,955 (5slices), 229,643 (1slice), input biases included.

The custom layers live in :mod:`vfdetect.keras_layers` and the inference transform in
:mod:`vfdetect.folding`; both are re-exported here.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from vfdetect.errors import InputError, VfdetectError, refuse_unknown_fields
from vfdetect.folding import fold_batchnorm
from vfdetect.geometry import VARIANT_KERNELS, VARIANT_SUBSAMPLE_FACTOR, VARIANTS, NetworkGeometry
from vfdetect.keras_layers import (
    SERIALISATION_PACKAGE,
    ChannelAffine,
    ChannelBias,
    ResidualAdd,
    UpsampleRepeatCrop,
    int_tuple,
    residual_crop,
)

VARIANT_WIDTHS: dict[str, tuple[int, ...]] = {
    "3d": (17, 17, 23, 23, 23, 23, 27, 27),
    "5slices": (29, 29, 38, 38, 38, 38, 48, 48),
    "1slice": (30, 30, 38, 38, 38, 38, 48, 48),
}
"""Conv widths of layers 1..8 (both pathways) per variant: DeepMedic's 3:3:4:4:4:4:5:5 profile at ~230K."""

PAPER_PARAMETER_BUDGET = 230_000
"""Trainable parameters of each variant in the paper."""

CLASS_NAMES: tuple[str, ...] = ("background", "normal", "fracture")
"""Output channels of the classifier, in order (label values 0, 1, 2)."""


@dataclass(frozen=True)
class DeepMedicConfig:
    """Every argument that defines the network; ``None`` fields take the variant's defaults.

    ``widths``/``subsampled_widths``: conv widths of the normal/subsampled pathway (default: the
    variant's :data:`VARIANT_WIDTHS`, the same for both). ``kernels``/``subsample_factor``: default from
    :func:`vfdetect.geometry.geometry_for`. ``residual_layers`` are 1-based conv layer numbers of both
    pathways, ``fc_residual_layers`` 1-based FC layer numbers. ``fc_dropout`` gives the input dropout of
    FC1, FC2 and the classifier. ``precision`` is a Keras dtype policy name for every layer
    (``"float32"``, ``"mixed_bfloat16"``, ...); ``None`` uses the global policy. The softmax (and the
    class bias before it) always runs in float32. ``seed`` seeds initialisers and dropout.
    """

    variant: str = "3d"
    widths: tuple[int, ...] | None = None
    subsampled_widths: tuple[int, ...] | None = None
    fc_widths: tuple[int, ...] = (150, 150)
    num_classes: int = 3
    kernels: tuple[tuple[int, int, int], ...] | None = None
    subsample_factor: tuple[int, int, int] | None = None
    fc_dropout: tuple[float, ...] = (0.0, 0.5, 0.5)
    residual_layers: tuple[int, ...] = (4, 6, 8)
    fc_residual_layers: tuple[int, ...] = (2,)
    input_bias: bool = True
    l1: float = 1e-6
    l2: float = 1e-4
    batchnorm_momentum: float = 0.98
    batchnorm_epsilon: float = 1e-5
    prelu_alpha: float = 0.01
    precision: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise VfdetectError(f"unknown network variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        given_kernels: Sequence[Sequence[int]] = VARIANT_KERNELS[self.variant] if self.kernels is None else self.kernels
        kernels = tuple(int_tuple(kernel, "a kernel shape", 3) for kernel in given_kernels)
        given_factor: Sequence[int] = VARIANT_SUBSAMPLE_FACTOR[self.variant] if self.subsample_factor is None else self.subsample_factor
        factor = int_tuple(given_factor, "subsample_factor", 3)
        NetworkGeometry(kernels=kernels, subsample_factor=factor)  # type: ignore[arg-type]  # validates
        widths = VARIANT_WIDTHS[self.variant] if self.widths is None else self.widths
        widths = int_tuple(widths, "widths", len(kernels))
        subsampled = widths if self.subsampled_widths is None else self.subsampled_widths
        subsampled = int_tuple(subsampled, "subsampled_widths", len(kernels))
        fc_widths = int_tuple(self.fc_widths, "fc_widths")
        fc_dropout = tuple(float(rate) for rate in self.fc_dropout)
        if len(fc_dropout) != len(fc_widths) + 1:
            raise VfdetectError(f"fc_dropout needs {len(fc_widths) + 1} rates (FC layers and classifier), got {len(fc_dropout)}")
        if any(not 0.0 <= rate < 1.0 for rate in fc_dropout):
            raise VfdetectError(f"dropout rates must lie in [0, 1), got {fc_dropout}")
        if min(widths + subsampled + fc_widths) < 1 or int(self.num_classes) < 2:
            raise VfdetectError("widths must be positive and there must be at least 2 classes")
        residual = int_tuple(self.residual_layers, "residual_layers")
        if any(not 3 <= layer <= len(kernels) for layer in residual):
            raise VfdetectError(f"residual conv layers must lie in 3..{len(kernels)}, got {residual}")
        fc_residual = int_tuple(self.fc_residual_layers, "fc_residual_layers")
        if any(not 2 <= layer <= len(fc_widths) + 1 for layer in fc_residual):
            raise VfdetectError(f"residual FC layers must lie in 2..{len(fc_widths) + 1}, got {fc_residual}")
        values = {
            "kernels": kernels,
            "subsample_factor": factor,
            "widths": widths,
            "subsampled_widths": subsampled,
            "fc_widths": fc_widths,
            "fc_dropout": fc_dropout,
            "residual_layers": residual,
            "fc_residual_layers": fc_residual,
            "num_classes": int(self.num_classes),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def geometry(self) -> NetworkGeometry:
        """The network's size arithmetic (receptive field, LR window, ...)."""
        return NetworkGeometry(kernels=self.kernels, subsample_factor=self.subsample_factor)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly arguments (lists instead of tuples), enough to rebuild the network."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple | list):
                return [plain(item) for item in value]
            return value

        return {key: plain(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeepMedicConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        refuse_unknown_fields(cls, values, "model arguments")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# Blocks


class _LayerFactory:
    """Creates the network's layers with shared settings and distinct seeds."""

    def __init__(self, config: DeepMedicConfig) -> None:
        self.config = config
        self._next_seed = config.seed

    def seed(self) -> int | None:
        if self._next_seed is None:
            return None
        value = self._next_seed
        self._next_seed += 1
        return value

    def conv(self, width: int, kernel: Sequence[int], name: str) -> layers.Conv3D:
        return layers.Conv3D(
            width,
            tuple(kernel),
            padding="valid",
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(
                scale=2.0, mode="fan_in", distribution="untruncated_normal", seed=self.seed()
            ),
            kernel_regularizer=keras.regularizers.L1L2(l1=self.config.l1, l2=self.config.l2),
            dtype=self.config.precision,
            name=name,
        )

    def batchnorm(self, name: str) -> layers.BatchNormalization:
        return layers.BatchNormalization(
            momentum=self.config.batchnorm_momentum,
            epsilon=self.config.batchnorm_epsilon,
            dtype=self.config.precision,
            name=name,
        )

    def prelu(self, name: str) -> layers.PReLU:
        return layers.PReLU(
            alpha_initializer=keras.initializers.Constant(self.config.prelu_alpha),
            shared_axes=[1, 2, 3],
            dtype=self.config.precision,
            name=name,
        )

    def dropout(self, rate: float, name: str) -> layers.Dropout:
        return layers.Dropout(rate, seed=self.seed(), dtype=self.config.precision, name=name)


def apply_conv_block(
    inputs: Any,
    factory: _LayerFactory,
    width: int,
    kernel: Sequence[int],
    name: str,
    *,
    first: bool = False,
    dropout: float = 0.0,
) -> Any:
    """Pre-activation block: BN -> PReLU -> dropout -> conv (no bias); ``first``: input bias, linear."""
    x = inputs
    if first:
        if factory.config.input_bias:
            x = ChannelBias(dtype=factory.config.precision, name=f"{name}_input_bias")(x)
    else:
        x = factory.batchnorm(f"{name}_bn")(x)
        x = factory.prelu(f"{name}_prelu")(x)
    if dropout >= 0.001:  # DeepMedic: rates below 0.001 mean no dropout
        x = factory.dropout(dropout, f"{name}_dropout")(x)
    return factory.conv(width, kernel, f"{name}_conv")(x)



def apply_conv_pathway(inputs: Any, factory: _LayerFactory, widths: Sequence[int], name: str) -> Any:
    """The 8 conv blocks of one pathway, with residual connections at ``config.residual_layers``."""
    kernels = factory.config.geometry.kernels
    outputs = [inputs]  # outputs[k] = output of layer k (after its residual); outputs[0] = pathway input
    for index, (width, kernel) in enumerate(zip(widths, kernels, strict=True)):
        number = index + 1
        x = apply_conv_block(outputs[-1], factory, width, kernel, f"{name}_{number}", first=index == 0)
        if number in factory.config.residual_layers:
            earlier = outputs[number - 2]  # the input of layer number - 1
            crop = residual_crop(kernels[number - 2 : number])
            x = ResidualAdd(crop=crop, dtype=factory.config.precision, name=f"{name}_{number}_residual")([x, earlier])
        outputs.append(x)
    return outputs[-1]


def apply_classifier(features: Any, factory: _LayerFactory) -> Any:
    """FC layers (1x1x1 convs) and the classifier on the concatenated features; returns logits (float32)."""
    config = factory.config
    widths = (*config.fc_widths, config.num_classes)
    outputs = [features]
    for index, (width, rate) in enumerate(zip(widths, config.fc_dropout, strict=True)):
        number = index + 1
        name = f"fc_{number}" if number <= len(config.fc_widths) else "classifier"
        x = apply_conv_block(outputs[-1], factory, width, (1, 1, 1), name, dropout=rate)
        if number in config.fc_residual_layers:
            x = ResidualAdd(dtype=config.precision, name=f"{name}_residual")([x, outputs[number - 2]])
        outputs.append(x)
    return ChannelBias(dtype="float32", name="class_bias")(outputs[-1])


@keras.saving.register_keras_serializable(package=SERIALISATION_PACKAGE)
class DeepMedic(keras.Model):
    """Dual-pathway voxel classifier of Nicolaes et al. 2019 (DeepMedic, Kamnitsas et al. 2017).

    Inputs ``[hr, lr]``: the HR segment ``(batch, X, Y, Z, 1)`` and its LR context window
    ``(batch, x, y, z, 1)`` (see :mod:`vfdetect.geometry`); output: softmax probabilities
    ``(batch, X - rf + 1, Y - rf + 1, Z - rf + 1, 3)`` for background, normal and fractured vertebra.
    Fully convolutional: any segment size of at least the receptive field works, with the matching LR
    window. Constructor arguments are those of :class:`DeepMedicConfig` and are returned by
    :meth:`get_config`.
    """

    def __init__(self, variant: str = "3d", name: str | None = None, trainable: bool = True, **arguments: Any) -> None:
        config = DeepMedicConfig.from_dict({"variant": variant, **arguments})
        factory = _LayerFactory(config)
        hr = keras.Input(shape=(None, None, None, 1), name="hr")
        lr = keras.Input(shape=(None, None, None, 1), name="lr")
        normal = apply_conv_pathway(hr, factory, config.widths, "normal")  # type: ignore[arg-type]
        subsampled = apply_conv_pathway(lr, factory, config.subsampled_widths, "subsampled")  # type: ignore[arg-type]
        subsampled = UpsampleRepeatCrop(
            factor=config.subsample_factor, dtype=config.precision, name="subsampled_upsample"  # type: ignore[arg-type]
        )([subsampled, normal])
        features = layers.Concatenate(axis=-1, dtype=config.precision, name="concatenate")([normal, subsampled])
        logits = apply_classifier(features, factory)
        probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
        super().__init__(inputs=[hr, lr], outputs=probabilities, name=name or f"deepmedic_{config.variant}", trainable=trainable)
        self.deepmedic_config = config

    @property
    def geometry(self) -> NetworkGeometry:
        """Size arithmetic of this network (receptive field, output and LR window sizes)."""
        return self.deepmedic_config.geometry

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable, **self.deepmedic_config.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> DeepMedic:
        return cls(**config)


def build_model(variant: str = "3d", **overrides: Any) -> keras.Model:
    """The dual-pathway network for ``variant`` (``"3d"``, ``"5slices"``, ``"1slice"``).

    ``overrides`` are :class:`DeepMedicConfig` fields (``widths``, ``precision="mixed_bfloat16"``,
    ``seed``, ...) or ``name``. The model is not compiled.
    """
    return DeepMedic(variant=variant, **overrides)


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """Load a model saved with ``model.save(path)``: a ``.keras`` file only, with Keras' safe mode on.

    ``compile=True`` also restores the optimizer and loss, which must then be importable (registered).
    Raises :class:`InputError` for a missing file, another format or a file that is not a saved model.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise InputError(path, "not a .keras model file (only the Keras v3 '.keras' format is loaded)")
    if not path.is_file():
        raise InputError(path, "model file not found")
    if not zipfile.is_zipfile(path):
        raise InputError(path, "not a valid .keras model file (not a zip archive)")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise InputError(path, f"cannot load the model: {error}") from error


def with_random_statistics(model: keras.Model, seed: int) -> keras.Model:
    """``model`` with non-trivial BatchNorm statistics, PReLU slopes and biases, in place.

    An untrained model has identities there, which would let a wrong BatchNorm folding pass; tests
    and the benchmarks' stand-in network (speed does not depend on the weights) use this.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape),
                               rng.normal(0, 0.3, shape), rng.uniform(0.5, 2.0, shape)])
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([rng.uniform(0.0, 0.3, layer.alpha.shape)])
        elif layer.name.endswith("input_bias") or layer.name == "class_bias":
            layer.set_weights([rng.normal(0, 0.5, layer.bias.shape)])
    return model


def count_trainable_parameters(model: keras.Model) -> int:
    """Number of trainable scalars (kernels, BN scale/offset, PReLU slopes, biases)."""
    return int(sum(math.prod(int(d) for d in weight.shape) for weight in model.trainable_weights))


# ----------------------------------------------------------------------------------------------------------
# Arithmetic without building the model


def expected_trainable_parameters(variant: str = "3d", **overrides: Any) -> int:
    """Trainable parameters of the network by arithmetic (spec section 2); equals the built model's count."""
    config = DeepMedicConfig.from_dict({"variant": variant, **overrides})
    total = 0
    for widths in (config.widths, config.subsampled_widths):
        channels = 1
        for index, (width, kernel) in enumerate(zip(widths, config.kernels, strict=True)):  # type: ignore[arg-type]
            total += channels * width * math.prod(kernel)
            total += (1 if config.input_bias else 0) if index == 0 else 3 * channels  # BN gamma, beta, PReLU
            channels = width
    channels = config.widths[-1] + config.subsampled_widths[-1]  # type: ignore[index]
    for width in (*config.fc_widths, config.num_classes):
        total += channels * width + 3 * channels
        channels = width
    return total + config.num_classes  # class bias


def _pathway_multiply_adds(widths: Sequence[int], kernels: Sequence[Sequence[int]], input_shape: Sequence[int]) -> int:
    size = list(input_shape)
    channels = 1
    total = 0
    for width, kernel in zip(widths, kernels, strict=True):
        size = [n - k + 1 for n, k in zip(size, kernel, strict=True)]
        total += math.prod(size) * channels * width * math.prod(kernel)
        channels = width
    return total


def multiply_adds_per_segment(variant: str = "3d", hr_shape: Sequence[int] = (25, 25, 25), **overrides: Any) -> int:
    """Multiply-adds of one forward pass on an HR segment of ``hr_shape`` and its LR window (convs only)."""
    config = DeepMedicConfig.from_dict({"variant": variant, **overrides})
    geometry = config.geometry
    out = geometry.output_shape(hr_shape)
    normal = _pathway_multiply_adds(config.widths, config.kernels, hr_shape)  # type: ignore[arg-type]
    subsampled = _pathway_multiply_adds(config.subsampled_widths, config.kernels, geometry.lr_input_shape(out))  # type: ignore[arg-type]
    channels = config.widths[-1] + config.subsampled_widths[-1]  # type: ignore[index]
    fc = 0
    for width in (*config.fc_widths, config.num_classes):
        fc += channels * width
        channels = width
    return normal + subsampled + math.prod(out) * fc


def flops_per_output_voxel(variant: str = "3d", **overrides: Any) -> float:
    """Forward multiply-adds per output voxel for large tiles (no border overhead; convs only).

    Normal pathway: sum of ``c_in * c_out * kernel volume``; subsampled pathway: the same divided by the
    product of the subsampling factors (each LR voxel serves that many output voxels); plus the FC layers.
    Multiply by 2 for floating-point operations, and by about 3 for a training step (forward + backward).
    """
    config = DeepMedicConfig.from_dict({"variant": variant, **overrides})

    def per_voxel(widths: Sequence[int]) -> int:
        channels, total = 1, 0
        for width, kernel in zip(widths, config.kernels, strict=True):  # type: ignore[arg-type]
            total += channels * width * math.prod(kernel)
            channels = width
        return total

    channels = config.widths[-1] + config.subsampled_widths[-1]  # type: ignore[index]
    fc = 0
    for width in (*config.fc_widths, config.num_classes):
        fc += channels * width
        channels = width
    subsampled = per_voxel(config.subsampled_widths) / math.prod(config.subsample_factor)  # type: ignore[arg-type]
    return float(per_voxel(config.widths) + subsampled + fc)  # type: ignore[arg-type]


def geometry_of(model: keras.Model) -> NetworkGeometry:
    """Geometry of a built or loaded :class:`DeepMedic` model."""
    if isinstance(model, DeepMedic):
        return model.geometry
    raise VfdetectError(f"model {getattr(model, 'name', model)!r} is not a vfdetect DeepMedic network")



def predict_probabilities(model: keras.Model, hr: np.ndarray, lr: np.ndarray, batch_size: int = 10) -> np.ndarray:
    """Run ``model`` in inference mode on stacked segments ``(N, X, Y, Z[, 1])``; float32 probabilities."""
    hr = np.asarray(hr, dtype=np.float32)
    lr = np.asarray(lr, dtype=np.float32)
    if hr.ndim == 4:
        hr = hr[..., None]
    if lr.ndim == 4:
        lr = lr[..., None]
    results = [
        np.asarray(keras.ops.convert_to_numpy(model([hr[i : i + batch_size], lr[i : i + batch_size]], training=False)), dtype=np.float32)
        for i in range(0, len(hr), batch_size)
    ]
    return np.concatenate(results, axis=0)


__all__ = [
    "CLASS_NAMES",
    "PAPER_PARAMETER_BUDGET",
    "VARIANT_WIDTHS",
    "ChannelAffine",
    "ChannelBias",
    "DeepMedic",
    "DeepMedicConfig",
    "ResidualAdd",
    "UpsampleRepeatCrop",
    "build_model",
    "count_trainable_parameters",
    "expected_trainable_parameters",
    "flops_per_output_voxel",
    "fold_batchnorm",
    "geometry_of",
    "load_model",
    "multiply_adds_per_segment",
    "predict_probabilities",
]
