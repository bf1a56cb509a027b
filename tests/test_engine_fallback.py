"""jit="auto" never leaves the user without maps when XLA cannot compile the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from transforms.engine.smoothgrad import SmoothGrad


@pytest.fixture
def op_determinism():
    from tensorflow.python.framework import config as tf_config  # the only switch back off

    tf_config.enable_op_determinism()
    yield
    tf_config.disable_op_determinism()


def _maxpool_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalMaxPooling2D()(x))
    return keras.Model(inputs, outputs)


def test_auto_falls_back_to_graph_when_xla_cannot_compile(op_determinism, monkeypatch):
    # Under op determinism XLA has no MaxPool gradient: it refuses to compile.
    # auto picks XLA only with an accelerator in sight: pretend there is one.
    real = tf.config.list_logical_devices
    fake_gpu = tf.config.LogicalDevice(name="/device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [fake_gpu] if kind == "GPU" else real(kind))
    model = _maxpool_model()
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    with pytest.raises(tf.errors.UnimplementedError):
        SmoothGrad(model, samples=2, batch_size=2, jit="xla")(images, ["a", "b"])
    auto = SmoothGrad(model, samples=2, batch_size=2, jit="auto")
    assert auto.jit_used == "xla"
    maps = auto(images, ["a", "b"]).maps
    assert auto.jit_used == "graph" and "XLA failed" in auto.jit_reason
    graph = SmoothGrad(model, samples=2, batch_size=2, jit="graph")(images, ["a", "b"]).maps
    np.testing.assert_allclose(maps, graph, rtol=1e-6)
    auto(images[:1], ["a"])  # later calls use the graph function without recompiling
    assert auto.compile_count == 2  # the failed XLA trace and the graph one
