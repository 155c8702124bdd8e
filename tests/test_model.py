"""AlexNet8 is the original's network, layer for layer."""

import numpy as np
import pytest

from alexnet8.model import build_alexnet8


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
