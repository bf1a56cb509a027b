"""Exactly N noisy gradients per image whatever the chunk; reduced-precision compute."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from tests import helpers
from transforms.engine.statistics import rank_correlation
from transforms.engine.smoothgrad import SmoothGrad


class _CountRows(keras.layers.Layer):
    """Identity layer that counts the image rows the model is run on (forward passes per image)."""

    def build(self, input_shape):
        self.rows = self.add_weight(shape=(), initializer="zeros", trainable=False, name="rows")

    def call(self, inputs):
        self.rows.assign_add(tf.cast(tf.shape(inputs)[0], self.rows.dtype))
        return inputs


def _counting_model(size: int = 8, classes: int = 3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    counter = _CountRows()
    x = counter(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs), counter


@pytest.mark.parametrize("samples, batch_size, chunk", [
    (10, 4, None),   # default chunk on a CPU: 5 chunks of 2
    (10, 3, None),   # default chunk on a CPU: 2 + 2 + 2 + 2 + 2
    (20, 4, 7),      # 7 + 7 + a remainder of 6
    (10, 4, 3),      # 3 + 3 + 3 + a remainder of 1
    (7, 2, None),    # one chunk of 7
    (5, 1, 2),
    (1, 3, 4),       # chunk larger than N
])
def test_exactly_n_noisy_gradients_per_image(samples, batch_size, chunk):
    model, counter = _counting_model()
    engine = SmoothGrad(model, samples=samples, noise=0.1, batch_size=batch_size, chunk=chunk, jit="graph")
    images = helpers.random_images(batch_size, size=8).astype(np.float32) / 127.5 - 1.0
    keys = [f"k{index}" for index in range(batch_size)]
    engine(images, keys)  # builds and traces (the model is also probed once on one image)
    counter.rows.assign(0.0)
    engine(images, keys)
    # one clean forward per image, then one forward (and backward) per noisy sample
    assert counter.rows.numpy() / batch_size == 1 + samples
    assert engine.chunk <= samples and engine.compile_count == 1


@pytest.mark.parametrize("noisy_per_step", [8, 32])
def test_default_chunk_never_overshoots(noisy_per_step):
    for samples in range(1, 65):
        for batch_size in (1, 2, 3, 4, 8, 16, 32, 64):
            chunk = SmoothGrad.default_chunk(samples, batch_size, noisy_per_step)
            chunks = -(-samples // chunk)
            assert chunk * batch_size <= max(noisy_per_step, batch_size)  # at most that many noisy images a step
            assert chunks == -(-samples // max(1, noisy_per_step // batch_size))  # the fewest chunks of that size
            assert (chunk - 1) * chunks < samples  # a smaller chunk would need one chunk more
    assert SmoothGrad.default_chunk(10, 4, 32) == 5 and SmoothGrad.default_chunk(20, 8, 8) == 1


def test_the_default_step_depends_on_the_device():
    expected = 32 if tf.config.list_logical_devices("GPU") else 8
    assert SmoothGrad.default_chunk(64, 1) == expected
    assert SmoothGrad(helpers.tiny_cnn(size=8), samples=64, batch_size=1).chunk == expected


def test_maps_do_not_depend_on_the_chunk():
    model = helpers.tiny_cnn(size=8)
    images = helpers.random_images(3, size=8).astype(np.float32) / 127.5 - 1.0
    keys = ["a", "b", "c"]
    maps = [SmoothGrad(model, samples=10, noise=0.2, batch_size=3, chunk=chunk, jit="graph",
                       variant=variant)(images, keys).maps
            for variant in ("smoothgrad", "vargrad") for chunk in (10, 4, 3, 1)]
    for variant_maps in (maps[:4], maps[4:]):
        for other in variant_maps[1:]:
            np.testing.assert_allclose(other, variant_maps[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_clones_the_model_and_keeps_float32_maps(precision):
    model = helpers.tiny_cnn(size=16)
    images = helpers.random_images(4, size=16).astype(np.float32) / 127.5 - 1.0
    keys = [f"k{index}" for index in range(4)]
    reference = SmoothGrad(model, samples=8, noise=0.1, batch_size=4, jit="graph")(images, keys)
    engine = SmoothGrad(model, samples=8, noise=0.1, batch_size=4, jit="graph", precision=precision)
    result = engine(images, keys)
    assert result.maps.dtype == np.float32 and result.scores.dtype == np.float32
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)  # the caller's model untouched
    assert engine.parameters()["precision"] == precision
    np.testing.assert_array_equal(result.targets, reference.targets)
    assert not np.array_equal(result.maps, reference.maps)  # really computed in the reduced dtype
    correlations = [rank_correlation(a, b) for a, b in zip(result.maps, reference.maps)]
    assert min(correlations) > 0.9, correlations


def test_unknown_precision_and_unclonable_models_are_refused():
    model = helpers.tiny_cnn(size=8)
    with pytest.raises(ValueError, match="'precision' must be one of"):
        SmoothGrad(model, precision="int8")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(keras.ops.mean(inputs, axis=(1, 2)))

    subclassed = Subclassed()
    subclassed(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="needs a Functional or Sequential"):
        SmoothGrad(subclassed, precision="bfloat16")
    SmoothGrad(subclassed, precision="float32")  # float32 needs no clone
