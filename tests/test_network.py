"""AlexNet8 is the original's network, layer for layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import saved_model_config

from alexnet8.network import (
    FusedBatchNormalization,
    build_alexnet8,
    initialize_conv1_whitening,
    portable_model,
    refit_batch_norm_statistics,
    whitening_kernel,
)


def test_parameter_count_matches_the_original():
    assert build_alexnet8().count_params() == 9_639_178


def test_layers_are_the_originals_in_order():
    model = build_alexnet8()
    convolutions = [
        (layer.filters, layer.kernel_size, layer.padding)
        for layer in model.layers
        if layer.name.startswith("conv") and hasattr(layer, "filters")
    ]
    assert convolutions == [
        (96, (3, 3), "valid"),
        (256, (3, 3), "valid"),
        (384, (3, 3), "same"),
        (384, (3, 3), "same"),
        (256, (3, 3), "same"),
    ]
    pools = [(layer.pool_size, layer.strides) for layer in model.layers if layer.name.startswith("pool")]
    assert pools == [((3, 3), (2, 2))] * 3
    dense = [
        (layer.units, layer.activation.__name__) for layer in model.layers if layer.name.startswith(("dense", "class"))
    ]
    assert dense == [(2048, "relu"), (2048, "relu"), (10, "softmax")]
    assert [layer.rate for layer in model.layers if layer.name.startswith("dropout")] == [0.5, 0.5]


def test_outputs_are_class_probabilities():
    probabilities = build_alexnet8()(np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)).numpy()
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_width_and_classes_are_configurable():
    assert build_alexnet8(num_classes=5, dense_units=64).output_shape == (None, 5)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_alexnet8(dropout=1.0)


def test_raw_pixels_are_scaled_exactly_as_the_original_script_scales_them():
    import keras

    pixels = np.arange(256, dtype=np.uint8).repeat(12).reshape(-1, 32, 32, 3)[:1]
    pixels = np.concatenate([pixels, np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)])
    model = build_alexnet8(dense_units=16)
    scale = keras.Model(model.input, model.get_layer("scale_to_unit").output)
    original = (pixels / 255.0).astype(np.float32)  # the seed script's float64 x / 255.0, cast by Keras
    np.testing.assert_array_equal(scale.predict(pixels, verbose=0), original)
    np.testing.assert_array_equal(scale.predict(pixels.astype(np.float32), verbose=0), original)  # 0-255 floats too


def test_an_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        build_alexnet8(normalization={"name": "zscore"})


@pytest.mark.parametrize(
    "normalization", [{"name": "unit"}, {"name": "standardize", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}]
)
def test_raw_pixels_give_the_predictions_of_inputs_normalized_beforehand(normalization):
    """The saved model on raw pixels against the earlier path: pixels normalized by preprocess
    (x / 255, then (x - mean) / std in float32) fed to the network: identical for `unit`,
    equal within float rounding for `standardize` (sqrt(std²) may differ from std in the last bit)."""
    import keras

    model = build_alexnet8(dense_units=64, normalization=normalization)
    network = keras.Model(model.get_layer("conv1").input, model.output)  # the same weights, no normalization
    pixels = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    normalized = pixels.astype(np.float32) / np.float32(255.0)
    if normalization["name"] == "standardize":
        normalized -= np.float32(normalization["mean"])
        normalized /= np.float32(normalization["std"])
    raw, earlier = model.predict(pixels, verbose=0), network.predict(normalized, verbose=0)
    if normalization["name"] == "unit":
        np.testing.assert_array_equal(raw, earlier)
    else:
        np.testing.assert_allclose(raw, earlier, rtol=1e-4, atol=1e-6)
        assert np.array_equal(raw.argmax(axis=1), earlier.argmax(axis=1))


def _one_training_step(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The model's weights after one SGD step on (images, labels) from the given weights (plain SGD:
    Adam's first step would blow rounding noise in near-zero gradients up to the full step)."""
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(images, labels)
    return model.get_weights()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_batch_norm_trains_as_keras_batch_norm_up_to_rounding(seed):
    """Outputs, gradients and moving statistics of one training call, against Keras' layer.

    Compared layer by layer: through a whole network, rounding differences flip ReLUs whose
    input is near zero, and one step's weights then differ by more than rounding."""
    rng = np.random.default_rng(seed)
    inputs = tf.constant(rng.normal(1.0, 3.0, (8, 6, 6, 5)), tf.float32)
    upstream = tf.constant(rng.normal(size=(8, 6, 6, 5)), tf.float32)  # d(loss)/d(outputs)
    results = []
    for layer in (keras.layers.BatchNormalization(), FusedBatchNormalization()):
        layer.build(inputs.shape)
        layer.gamma.assign(rng.normal(1.0, 0.1, 5) if not results else results[0]["gamma"])
        layer.beta.assign(rng.normal(0.0, 0.1, 5) if not results else results[0]["beta"])
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
            loss = tf.reduce_sum(outputs * upstream)
        gradients = tape.gradient(loss, [inputs, layer.gamma.value, layer.beta.value])
        results.append(
            {
                "gamma": layer.gamma.numpy(),
                "beta": layer.beta.numpy(),
                "outputs": outputs.numpy(),
                "gradients": [gradient.numpy() for gradient in gradients],
                "moving": [layer.moving_mean.numpy(), layer.moving_variance.numpy()],
            }
        )
    keras_result, fused_result = results
    np.testing.assert_allclose(fused_result["outputs"], keras_result["outputs"], rtol=1e-5, atol=1e-5)
    for fused, expected in zip(fused_result["gradients"], keras_result["gradients"], strict=True):
        np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-5)
    # The moving variance follows the batch's biased variance, as Keras' layer does.
    for fused, expected in zip(fused_result["moving"], keras_result["moving"], strict=True):
        np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)


def test_a_model_with_fused_batch_norm_saves_as_plain_keras_with_the_same_predictions(tmp_path):
    model = build_alexnet8(dense_units=32, fused_batch_norm=True)
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _one_training_step(model, images, np.arange(4))  # moving statistics away from their start
    portable_model(model).save(tmp_path / "model.keras")

    config, packages = saved_model_config(tmp_path / "model.keras")
    # Every class in the file is Keras' own: loading it needs nothing of this package.
    assert packages == {"keras"}
    assert "FusedBatchNormalization" not in config
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("conv1_batchnorm")) is keras.layers.BatchNormalization
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


def _correlated_images(count=64, seed=0):
    """Smooth, channel-correlated images, so that neighbouring pixels' values are far from white."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, 34, 34, 1)) + 0.3 * rng.normal(size=(count, 34, 34, 3))
    return (noise[:, :-2, :-2] + noise[:, 1:-1, 1:-1] + noise[:, 2:, 2:]).astype(np.float32)


def test_whitening_kernel_whitens_the_patches_it_was_computed_from():
    images = _correlated_images()
    kernel = whitening_kernel(images, epsilon=1e-8)
    assert kernel.shape == (3, 3, 3, 54)
    responses = tf.nn.conv2d(images, kernel, strides=1, padding="VALID").numpy().reshape(-1, 54)
    moments = responses.T @ responses / len(responses)
    np.testing.assert_allclose(moments[:27, :27], np.eye(27), atol=1e-3)  # uncorrelated, unit second moment
    np.testing.assert_allclose(kernel[..., 27:], -kernel[..., :27])  # the negated copies
    norms = np.linalg.norm(kernel[..., :27].reshape(27, 27), axis=0)
    assert np.all(np.diff(norms) >= 0)  # strongest component (smallest gain) first


def test_whitening_init_sets_conv1s_first_54_filters_and_keeps_the_rest(seed=1):
    keras.utils.set_random_seed(seed)
    model = build_alexnet8(dense_units=16, normalization={"name": "unit"})
    before = model.get_layer("conv1").get_weights()[0]
    images = np.random.default_rng(seed).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    initialize_conv1_whitening(model, images)
    kernel, bias = model.get_layer("conv1").get_weights()
    np.testing.assert_allclose(
        kernel[..., :54], whitening_kernel(images / 255.0), rtol=1e-4, atol=1e-6
    )  # on [0, 1] inputs
    np.testing.assert_array_equal(kernel[..., 54:], before[..., 54:])
    assert not np.any(bias)


def test_batch_norm_momentum_reaches_both_batch_norms():
    model = build_alexnet8(dense_units=16, batch_norm_momentum=0.6, fused_batch_norm=True)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [norm.name for norm in norms] == ["conv1_batchnorm", "conv2_batchnorm"]
    assert {norm.momentum for norm in norms} == {0.6}


def test_refit_batch_norm_statistics_sets_the_mean_of_the_batch_statistics(seed=3):
    keras.utils.set_random_seed(seed)
    model = build_alexnet8(dense_units=16)
    images = np.random.default_rng(seed).integers(0, 256, size=(30, 32, 32, 3)).astype(np.float32)
    before = model.predict(images[:4], verbose=0)

    refit_batch_norm_statistics(model, images, batch_size=10)

    # conv1's batch norm sees conv1's outputs: the mean of the three batches' means and (biased) variances.
    conv1 = keras.Model(model.input, model.get_layer("conv1").output)
    outputs = [keras.ops.convert_to_numpy(conv1(images[start : start + 10])) for start in (0, 10, 20)]
    norm = model.get_layer("conv1_batchnorm")
    np.testing.assert_allclose(
        norm.moving_mean.numpy(), np.mean([o.mean(axis=(0, 1, 2)) for o in outputs], axis=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), np.mean([o.var(axis=(0, 1, 2)) for o in outputs], axis=0), rtol=1e-4, atol=1e-5
    )
    assert norm.momentum == 0.99  # restored
    assert not np.allclose(model.predict(images[:4], verbose=0), before)  # inference uses the new statistics
