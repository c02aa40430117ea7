"""BatchNorm folded into the convolutions of a trained :class:`vfdetect.model.DeepMedic`, for inference.

Keras 3 only; the folded copy uses the layers of :mod:`vfdetect.keras_layers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import layers

from vfdetect.keras_layers import ChannelAffine, ChannelBias, ResidualAdd, UpsampleRepeatCrop, residual_crop

if TYPE_CHECKING:
    from vfdetect.model import DeepMedicConfig


def _batchnorm_affine(layer: layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BatchNorm as ``x * scale + shift`` per channel (float64)."""
    values = {weight.path.split("/")[-1]: np.asarray(weight.numpy(), dtype=np.float64) for weight in layer.weights}
    gamma = values.get("gamma", 1.0)
    scale = gamma / np.sqrt(values["moving_variance"] + float(layer.epsilon))
    return scale, values.get("beta", 0.0) - values["moving_mean"] * scale


def _weights(model: keras.Model, name: str, attribute: str) -> np.ndarray:
    return np.asarray(getattr(model.get_layer(name), attribute).numpy(), dtype=np.float64)


def fold_batchnorm(model: keras.Model, precision: str | None = "float32") -> keras.Model:
    """An inference-only copy of a :class:`DeepMedic` network with every BatchNorm folded away.

    Same inputs ``[hr, lr]`` and outputs as ``model(..., training=False)`` (equal up to float rounding);
    ``precision`` is the Keras dtype policy of the copy (``"float32"``, ``"mixed_bfloat16"``); the
    class bias and softmax stay float32. Dropout, the identity at inference, is left out.

    The blocks are pre-activation (BN -> PReLU -> conv), so a BatchNorm cannot go into the conv
    after it; but it normalises the raw output of the previous conv, and a conv followed by a
    per-channel affine map is a conv with a bias. So each BN is folded into the *preceding* conv
    (kernel x scale, bias = shift) wherever that conv's raw output is needed nowhere else. Where it
    is (outputs feeding a residual connection, outputs receiving one, the concatenated features
    under an FC residual), the conv stays and a :class:`ChannelAffine` applies the BN after the add.
    A pathway's input bias becomes a bias of its first conv (exact for valid convolutions); the
    subsampled pathway's share of the features' BN commutes with the upsampling by repetition.
    """
    from vfdetect.model import geometry_of

    geometry_of(model)  # refuses anything but a vfdetect network
    config: DeepMedicConfig = model.deepmedic_config
    kernels = config.kernels
    depth = len(kernels)  # type: ignore[arg-type]
    residual = set(config.residual_layers)
    raw_needed = {number - 2 for number in residual}
    fc_residual = set(config.fc_residual_layers)
    fc_raw_needed = {number - 2 for number in fc_residual}
    fc_scale, fc_shift = _batchnorm_affine(model.get_layer("fc_1_bn"))
    normal_width = config.widths[-1]  # type: ignore[index]

    def conv(inputs: Any, kernel: np.ndarray, bias: np.ndarray | None, name: str) -> Any:
        layer = layers.Conv3D(kernel.shape[-1], kernel.shape[:3], padding="valid", use_bias=bias is not None,
                              dtype=precision, name=name)
        outputs = layer(inputs)
        layer.set_weights([kernel] if bias is None else [kernel, bias])
        return outputs

    def affine(inputs: Any, scale: np.ndarray, shift: np.ndarray, name: str) -> Any:
        layer = ChannelAffine(dtype=precision, name=name)
        outputs = layer(inputs)
        layer.set_weights([scale, shift])
        return outputs

    def prelu(inputs: Any, name: str) -> Any:
        layer = layers.PReLU(shared_axes=[1, 2, 3], dtype=precision, name=name)
        outputs = layer(inputs)
        layer.set_weights([model.get_layer(name).get_weights()[0]])
        return outputs

    def pathway(inputs: Any, name: str, feature_channels: slice) -> tuple[Any, Any]:
        """(raw output of the last layer or None, its BN-normalised version)."""
        raw: list[Any] = [inputs]
        activated = inputs
        normalised = inputs
        for number in range(1, depth + 1):
            kernel = _weights(model, f"{name}_{number}_conv", "kernel")
            bias = np.zeros(kernel.shape[-1])
            if number == 1 and config.input_bias:
                bias += _weights(model, f"{name}_1_input_bias", "bias")[0] * kernel.sum(axis=(0, 1, 2, 3))
            if number < depth:
                scale, shift = _batchnorm_affine(model.get_layer(f"{name}_{number + 1}_bn"))
            else:
                scale, shift = fc_scale[feature_channels], fc_shift[feature_channels]
            keep_raw = number in residual or number in raw_needed or (number == depth and 0 in fc_raw_needed)
            if keep_raw:
                x = conv(activated, kernel, bias if np.any(bias) else None, f"{name}_{number}_conv")
                if number in residual:
                    crop = residual_crop(kernels[number - 2 : number])  # type: ignore[index]
                    x = ResidualAdd(crop=crop, dtype=precision, name=f"{name}_{number}_residual")([x, raw[number - 2]])
                raw.append(x)
                normalised = affine(x, scale, shift, f"{name}_{number}_affine")
            else:
                raw.append(None)
                normalised = conv(activated, kernel * scale, bias * scale + shift, f"{name}_{number}_conv")
            if number < depth:
                activated = prelu(normalised, f"{name}_{number + 1}_prelu")
        return raw[-1], normalised

    hr = keras.Input(shape=(None, None, None, 1), name="hr")
    lr = keras.Input(shape=(None, None, None, 1), name="lr")
    normal_raw, normal = pathway(hr, "normal", slice(0, normal_width))
    subsampled_raw, subsampled = pathway(lr, "subsampled", slice(normal_width, None))
    factor = config.subsample_factor
    subsampled = UpsampleRepeatCrop(factor=factor, dtype=precision, name="subsampled_upsample")(  # type: ignore[arg-type]
        [subsampled, normal])
    features = layers.Concatenate(axis=-1, dtype=precision, name="concatenate")([normal, subsampled])
    outputs: list[Any] = [None]
    if 0 in fc_raw_needed:
        upsampled_raw = UpsampleRepeatCrop(factor=factor, dtype=precision, name="subsampled_upsample_raw")(  # type: ignore[arg-type]
            [subsampled_raw, normal_raw])
        outputs[0] = layers.Concatenate(axis=-1, dtype=precision, name="concatenate_raw")([normal_raw, upsampled_raw])
    activated = prelu(features, "fc_1_prelu")
    names = [f"fc_{number}" for number in range(1, len(config.fc_widths) + 1)] + ["classifier"]
    x = activated
    for index, name in enumerate(names):
        number = index + 1
        kernel = _weights(model, f"{name}_conv", "kernel")
        if number == len(names):  # the classifier: no BN after it
            x = conv(activated, kernel, None, f"{name}_conv")
            if number in fc_residual:
                x = ResidualAdd(dtype=precision, name=f"{name}_residual")([x, outputs[number - 2]])
            break
        scale, shift = _batchnorm_affine(model.get_layer(f"{names[index + 1]}_bn"))
        if number in fc_residual or number in fc_raw_needed:
            x = conv(activated, kernel, None, f"{name}_conv")
            if number in fc_residual:
                x = ResidualAdd(dtype=precision, name=f"{name}_residual")([x, outputs[number - 2]])
            outputs.append(x)
            normalised = affine(x, scale, shift, f"{name}_affine")
        else:
            outputs.append(None)
            normalised = conv(activated, kernel * scale, shift, f"{name}_conv")
        activated = prelu(normalised, f"{names[index + 1]}_prelu")
    class_bias = ChannelBias(dtype="float32", name="class_bias")
    logits = class_bias(x)
    class_bias.set_weights(model.get_layer("class_bias").get_weights())
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs=[hr, lr], outputs=probabilities, name=f"{model.name}_folded")
