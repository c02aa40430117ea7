"""Tests of vfdetect.model: sizes, parameter budget, layer settings, serialisation, other backends."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import bfloat16_error_bound

from vfdetect.model import with_random_statistics

keras = pytest.importorskip("keras")

from vfdetect.errors import InputError, VfdetectError  # noqa: E402
from vfdetect.geometry import extract_segments, geometry_for, pad_volume  # noqa: E402
from vfdetect.model import (  # noqa: E402
    PAPER_PARAMETER_BUDGET,
    ChannelBias,
    DeepMedic,
    ResidualAdd,
    UpsampleRepeatCrop,
    build_model,
    count_trainable_parameters,
    expected_trainable_parameters,
    flops_per_output_voxel,
    load_model,
    multiply_adds_per_segment,
    predict_probabilities,
)

# Trainable parameters (spec section 2, input biases included) and Keras' BN moving statistics.
SPEC_COUNTS = {"3d": (229_271, 1_320), "5slices": (229_955, 1_824), "1slice": (229_643, 1_832)}


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    return {variant: build_model(variant, seed=7) for variant in SPEC_COUNTS}


def _inputs(variant: str, hr_shape, batch: int = 1, seed: int = 0, **geometry_args):
    geometry = geometry_for(variant, **geometry_args)
    rng = np.random.default_rng(seed)
    hr = rng.normal(size=(batch, *hr_shape, 1)).astype(np.float32)
    lr = rng.normal(size=(batch, *geometry.lr_shape_for(hr_shape), 1)).astype(np.float32)
    return hr, lr


def _scalars(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.mark.parametrize("variant", sorted(SPEC_COUNTS))
def test_parameter_counts_match_the_paper_budget(models, variant: str) -> None:
    model = models[variant]
    trainable, moving_statistics = SPEC_COUNTS[variant]
    assert count_trainable_parameters(model) == trainable
    assert abs(count_trainable_parameters(model) - PAPER_PARAMETER_BUDGET) <= 0.01 * PAPER_PARAMETER_BUDGET
    assert expected_trainable_parameters(variant) == trainable
    assert _scalars(model.non_trainable_weights) == moving_statistics
    # the arithmetic follows overrides too
    small = build_model(variant, widths=(4,) * 8, subsampled_widths=(5,) * 8, fc_widths=(6, 7), input_bias=False)
    assert count_trainable_parameters(small) == expected_trainable_parameters(
        variant, widths=(4,) * 8, subsampled_widths=(5,) * 8, fc_widths=(6, 7), input_bias=False
    )


@pytest.mark.parametrize("variant", sorted(SPEC_COUNTS))
@pytest.mark.parametrize("hr_shape", [(25, 25, 25), (45, 45, 45), (17, 23, 31), (27, 19, 20)])
def test_output_shapes_follow_the_geometry(models, variant: str, hr_shape) -> None:
    hr, lr = _inputs(variant, hr_shape)
    probabilities = np.asarray(models[variant]([hr, lr], training=False))
    assert probabilities.shape == (1, *geometry_for(variant).output_shape(hr_shape), 3)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(probabilities >= 0)


def test_expected_sizes_for_the_spec_segments(models) -> None:
    hr, lr = _inputs("3d", (25, 25, 25))
    assert lr.shape[1:4] == (19, 19, 19)
    assert models["3d"]([hr, lr], training=False).shape == (1, 9, 9, 9, 3)
    hr, lr = _inputs("3d", (45, 45, 45))
    assert lr.shape[1:4] == (26, 26, 26)
    assert models["3d"]([hr, lr], training=False).shape == (1, 29, 29, 29, 3)


def test_inputs_are_fully_convolutional(models) -> None:
    model = models["3d"]
    assert [tuple(t.shape) for t in model.inputs] == [(None, None, None, None, 1)] * 2
    assert [t.name for t in model.inputs] == ["hr", "lr"]
    assert tuple(model.outputs[0].shape) == (None, None, None, None, 3)


def test_layer_settings_follow_deepmedic(models) -> None:
    model = models["3d"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]
    assert len(convs) == 8 + 8 + 3
    for conv in convs:
        assert conv.use_bias is False and conv.padding == "valid" and conv.strides == (1, 1, 1)
        assert isinstance(conv.kernel_regularizer, keras.regularizers.L1L2)
        assert conv.kernel_regularizer.l1 == pytest.approx(1e-6) and conv.kernel_regularizer.l2 == pytest.approx(1e-4)
        initializer = conv.kernel_initializer
        assert isinstance(initializer, keras.initializers.VarianceScaling)
        assert (initializer.scale, initializer.mode, initializer.distribution) == (2.0, "fan_in", "untruncated_normal")
    assert [c.kernel_size for c in convs if c.name.startswith("normal")] == [(3, 3, 3)] * 8
    assert [c.filters for c in convs if c.name.startswith("fc") or c.name.startswith("classifier")] == [150, 150, 3]
    for prelu in (layer for layer in model.layers if isinstance(layer, keras.layers.PReLU)):
        assert prelu.shared_axes == [1, 2, 3]
        np.testing.assert_allclose(np.asarray(prelu.alpha), 0.01)
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batchnorms) == 7 + 7 + 3  # none on the raw inputs; one on the concatenated features
    assert all(bn.momentum == pytest.approx(0.98) and bn.epsilon == pytest.approx(1e-5) for bn in batchnorms)
    assert {layer.name: layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)} == {
        "fc_2_dropout": 0.5,
        "classifier_dropout": 0.5,
    }
    # block 0 of each pathway: an input bias and no activation; the class bias before the softmax
    assert {layer.name for layer in model.layers if isinstance(layer, ChannelBias)} == {
        "normal_1_input_bias",
        "subsampled_1_input_bias",
        "class_bias",
    }
    assert model.get_layer("normal_1_conv").input is model.get_layer("normal_1_input_bias").output
    residuals = sorted(layer.name for layer in model.layers if isinstance(layer, ResidualAdd))
    assert residuals == sorted(
        [f"{path}_{n}_residual" for path in ("normal", "subsampled") for n in (4, 6, 8)] + ["fc_2_residual"]
    )
    assert model.get_layer("concatenate").input[0] is model.get_layer("normal_8_residual").output


def test_regularisation_covers_conv_kernels_only(models) -> None:
    model = models["1slice"]
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]
    expected = sum(1e-6 * np.abs(np.asarray(k)).sum() + 1e-4 * np.square(np.asarray(k)).sum() for k in kernels)
    losses = [float(np.asarray(loss)) for loss in model.losses]
    assert len(losses) == 19
    assert sum(losses) == pytest.approx(expected, rel=1e-4)


def test_upsampling_repeats_and_keeps_the_first_voxels() -> None:
    low = np.arange(3 * 4 * 2, dtype=np.float32).reshape(1, 3, 4, 2, 1)
    reference = np.zeros((1, 7, 10, 5, 2), dtype=np.float32)
    result = np.asarray(UpsampleRepeatCrop(factor=(3, 3, 3))([low, reference]))
    assert result.shape == (1, 7, 10, 5, 1)
    i, j, k = np.meshgrid(np.arange(7), np.arange(10), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(result[0, ..., 0], low[0, i // 3, j // 3, k // 3, 0])
    anisotropic = np.asarray(UpsampleRepeatCrop(factor=(1, 3, 3))([low, np.zeros((1, 3, 12, 6, 1))]))
    np.testing.assert_array_equal(anisotropic[0, :, 5, 4, 0], low[0, :, 1, 1, 0])


def test_residual_centre_crops_and_pads_channels() -> None:
    rng = np.random.default_rng(3)
    deep = rng.normal(size=(1, 5, 6, 7, 4)).astype(np.float32)
    earlier = rng.normal(size=(1, 9, 6, 11, 3)).astype(np.float32)
    result = np.asarray(ResidualAdd(crop=((2, 2), (0, 0), (2, 2)))([deep, earlier]))
    expected = deep.copy()
    expected[..., :3] += earlier[:, 2:7, :, 2:9, :]
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    narrower = np.asarray(ResidualAdd(crop=((2, 2), (0, 0), (2, 2)))([deep[..., :2], earlier]))
    np.testing.assert_allclose(narrower, deep[..., :2] + earlier[:, 2:7, :, 2:9, :2], rtol=1e-6)


def test_crops_are_plain_slices_that_keep_the_channel_count(models) -> None:
    """Traced with unknown sizes (as validation and tiling call it), the network still knows its channels,
    and the training gradient of the crops is a padding, not TensorFlow's slow strided-slice gradient."""
    tf = pytest.importorskip("tensorflow")
    model = models["3d"]
    spec = tf.TensorSpec((None, None, None, None, 1), tf.float32)
    traced = tf.function(lambda hr, lr: model([hr, lr], training=False)).get_concrete_function(spec, spec)
    assert traced.structured_outputs.shape[-1] == 3

    @tf.function(input_signature=[spec, spec])
    def gradients(hr, lr):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model([hr, lr], training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = gradients.get_concrete_function().graph.as_graph_def()
    operations = {node.op for node in graph.node} | {node.op for function in graph.library.function for node in function.node_def}
    assert "Pad" in operations
    assert "StridedSliceGrad" not in operations


@pytest.mark.parametrize(("variant", "offset", "aligned"), [("3d", (3, 6, 9), True), ("3d", (1, 6, 9), False), ("1slice", (1, 3, 6), True)])
def test_tile_and_small_segments_agree_when_the_lr_grid_is_aligned(models, variant, offset, aligned) -> None:
    """A large tile and a small segment inside it give the same output where the LR grids coincide:
    checks the LR window placement, the upsampling crop and full convolutionality together."""
    model = models[variant]
    geometry = geometry_for(variant)
    volume = np.random.default_rng(4).normal(size=(40, 40, 40)).astype(np.float32)
    padded = pad_volume(volume, geometry, min_shape=(45, 45, 45))
    fill = -3.0
    big_hr, big_lr = extract_segments(padded, (0, 0, 0), (45, 45, 45), geometry, fill)
    small_hr, small_lr = extract_segments(padded, offset, (25, 25, 25), geometry, fill)
    big = np.asarray(model([big_hr[None, ..., None], big_lr[None, ..., None]], training=False))[0]
    small = np.asarray(model([small_hr[None, ..., None], small_lr[None, ..., None]], training=False))[0]
    out = small.shape[:3]
    window = big[tuple(slice(o, o + n) for o, n in zip(offset, out, strict=True))]
    assert np.std(small[..., 0]) > 1e-4  # the comparison has power: outputs vary across voxels
    if aligned:
        np.testing.assert_allclose(window, small, atol=2e-5)
    else:
        assert np.abs(window - small).max() > 1e-4


def test_get_config_round_trip(models) -> None:
    model = models["5slices"]
    config = model.get_config()
    assert config["variant"] == "5slices" and config["widths"] == [29, 29, 38, 38, 38, 38, 48, 48]
    assert json.loads(json.dumps(config)) == config
    rebuilt = DeepMedic.from_config(config)
    assert rebuilt.get_config() == config
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in model.layers]
    assert count_trainable_parameters(rebuilt) == count_trainable_parameters(model)
    custom = build_model("3d", widths=(5,) * 8, fc_widths=(8, 9), residual_layers=(4,), name="tiny")
    assert DeepMedic.from_config(custom.get_config()).get_config() == custom.get_config()
    assert custom.get_config()["name"] == "tiny"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(VfdetectError, match="unknown network variant"):
        build_model("2d")
    with pytest.raises(VfdetectError, match="widths needs 8 values"):
        build_model("3d", widths=(4, 4))
    with pytest.raises(VfdetectError, match="unknown model arguments"):
        build_model("3d", width=4)
    with pytest.raises(VfdetectError, match="fc_dropout"):
        build_model("3d", fc_dropout=(0.5,))


def test_save_and_load_keras_file(tmp_path: Path) -> None:
    model = build_model("3d", widths=(6,) * 8, fc_widths=(10, 10), seed=11)
    hr, lr = _inputs("3d", (25, 25, 25), batch=2, seed=5)
    # non-trivial BN statistics and weights, as after training
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.1, np.float32))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 2.0, np.float32))
    model.get_layer("class_bias").bias.assign(np.array([0.3, -0.2, 0.1], np.float32))
    expected = np.asarray(model([hr, lr], training=False))
    np.testing.assert_allclose(predict_probabilities(model, hr[..., 0], lr, batch_size=1), expected, atol=1e-6)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_model(path)
    assert isinstance(loaded, DeepMedic)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(np.asarray(loaded([hr, lr], training=False)), expected)


def test_load_model_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not a \.keras model file"):
        load_model(tmp_path / "model.h5")
    with pytest.raises(InputError, match=r"not a \.keras model file"):
        load_model(tmp_path / "model.weights.h5")
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing.keras")
    text = tmp_path / "text.keras"
    text.write_text("not a model")
    with pytest.raises(InputError, match="not a zip archive") as raised:
        load_model(text)
    assert str(raised.value).startswith(str(text))
    empty = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    with pytest.raises(InputError, match="cannot load the model"):
        load_model(empty)


def test_mixed_precision_keeps_a_float32_softmax(tmp_path: Path) -> None:
    model = build_model("3d", precision="mixed_bfloat16", seed=1)
    assert model.get_layer("normal_2_conv").compute_dtype == "bfloat16"
    assert model.get_layer("normal_2_conv").variable_dtype == "float32"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    assert count_trainable_parameters(model) == SPEC_COUNTS["3d"][0]
    hr, lr = _inputs("3d", (25, 25, 25))
    probabilities = np.asarray(model([hr, lr], training=False))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    model.save(tmp_path / "mixed.keras")
    assert load_model(tmp_path / "mixed.keras").get_layer("normal_2_conv").compute_dtype == "bfloat16"


def test_one_training_step_changes_the_weights() -> None:
    model = build_model("3d", widths=(4,) * 8, fc_widths=(8, 8), seed=2)
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-3), loss="sparse_categorical_crossentropy", jit_compile=False, run_eagerly=True
    )
    hr, lr = _inputs("3d", (25, 25, 25), batch=2)
    labels = np.random.default_rng(0).integers(0, 3, size=(2, 9, 9, 9))
    before = np.asarray(model.get_layer("normal_1_conv").kernel).copy()
    loss = model.train_on_batch([hr, lr], labels)
    assert np.isfinite(loss)
    assert not np.array_equal(before, np.asarray(model.get_layer("normal_1_conv").kernel))


def test_multiply_adds() -> None:
    per_pathway = 459 + 7_803 + 10_557 + 3 * 14_283 + 16_767 + 19_683
    assert per_pathway == 98_118
    assert flops_per_output_voxel("3d") == pytest.approx(per_pathway + per_pathway / 27 + 31_050)
    # the slice variants decimate only in the sagittal plane, so the LR pathway costs 1/9 per voxel
    assert flops_per_output_voxel("1slice") == pytest.approx(94_770 + 94_770 / 9 + 37_350)
    per_segment = multiply_adds_per_segment("3d", (25, 25, 25))
    # about 2.7 GFLOP per training segment (forward + backward = 3 x 2 FLOP per multiply-add)
    assert 2.6e9 < 6 * per_segment < 2.8e9
    sizes = [25 - 2 * (i + 1) for i in range(8)]
    lr_sizes = [19 - 2 * (i + 1) for i in range(8)]
    channels = [1, 17, 17, 23, 23, 23, 23, 27, 27]
    pathway = sum(s**3 * channels[i] * channels[i + 1] * 27 for i, s in enumerate(sizes))
    lr_pathway = sum(s**3 * channels[i] * channels[i + 1] * 27 for i, s in enumerate(lr_sizes))
    assert per_segment == pathway + lr_pathway + 9**3 * 31_050


JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from vfdetect.model import build_model, count_trainable_parameters, expected_trainable_parameters, load_model
    folder = sys.argv[1]
    data = np.load(folder + "/io.npz")
    loaded = load_model(folder + "/model.keras")
    np.testing.assert_allclose(np.asarray(loaded([data["hr"], data["lr"]], training=False)), data["out"], atol=1e-5)
    model = build_model("1slice", widths=(4,) * 8, fc_widths=(6, 6), seed=0)
    assert count_trainable_parameters(model) == expected_trainable_parameters("1slice", widths=(4,) * 8, fc_widths=(6, 6))
    out = model([np.zeros((1, 5, 21, 23, 1), "float32"), np.zeros((1, 5, 19, 19, 1), "float32")], training=False)
    assert tuple(out.shape) == (1, 5, 5, 7, 3), out.shape
    print("jax ok")
    """
)


@pytest.mark.slow
def test_model_builds_and_runs_under_jax(tmp_path: Path) -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'jax[cpu]' to test the JAX backend)")
    # a model saved from this backend must give the same outputs under JAX
    model = build_model("3d", widths=(4,) * 8, fc_widths=(6, 6), seed=3)
    hr, lr = _inputs("3d", (21, 19, 23), seed=9)
    np.savez(tmp_path / "io.npz", hr=hr, lr=lr, out=np.asarray(model([hr, lr], training=False)))
    model.save(tmp_path / "model.keras")
    environment = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jax ok" in result.stdout


# ----------------------------------------------------------------------------------------------------------
# BatchNorm folding


def _with_random_statistics(model: keras.Model, seed: int) -> keras.Model:
    return with_random_statistics(model, seed)


@pytest.mark.parametrize(
    "variant, overrides",
    [
        ("3d", {}),
        ("5slices", {"widths": (4, 4, 5, 5, 5, 5, 6, 6), "fc_widths": (7, 7)}),
        ("3d", {"widths": (3,) * 8, "residual_layers": (3, 5), "fc_residual_layers": (2, 3), "fc_widths": (6, 5),
                "input_bias": False}),
    ],
)
def test_folded_model_equals_the_model(variant: str, overrides: dict) -> None:
    from vfdetect.model import fold_batchnorm

    model = _with_random_statistics(build_model(variant, seed=5, **overrides), seed=6)
    folded = fold_batchnorm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in folded.layers)
    rng = np.random.default_rng(7)
    hr_shape = (19, 23, 21)
    hr = rng.normal(size=(2, *hr_shape, 1)).astype(np.float32)
    lr = rng.normal(size=(2, *model.geometry.lr_shape_for(hr_shape), 1)).astype(np.float32)
    reference = np.asarray(model([hr, lr], training=False))
    np.testing.assert_allclose(np.asarray(folded([hr, lr])), reference, atol=2e-5)
    bf16 = np.asarray(fold_batchnorm(model, "mixed_bfloat16")([hr, lr]))
    assert bf16.dtype == np.float32 and np.abs(bf16 - reference).mean() < bfloat16_error_bound()


def test_folding_refuses_other_models() -> None:
    from vfdetect.model import fold_batchnorm

    inputs = keras.Input((4,))
    with pytest.raises(VfdetectError, match="not a vfdetect DeepMedic"):
        fold_batchnorm(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
