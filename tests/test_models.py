"""Every model source: .keras (safe mode), .h5, SavedModel, keras.applications."""

from __future__ import annotations

import numpy as np
import pytest

from tests import helpers
from transforms.support.models import ModelError, describe, file_sha256, load_model
from transforms.engine.smoothgrad import SmoothGrad


@pytest.fixture(scope="module")
def tiny():
    return helpers.tiny_cnn(size=16, classes=3, softmax=True)


def _maps(model, images):
    return SmoothGrad(model, samples=2, noise=0.1, batch_size=2, jit="graph")(images, ["a", "b"]).maps


def test_keras_h5_and_savedmodel_give_the_same_maps(tiny, tmp_path):
    images = (helpers.random_images(2, 16).astype(np.float32) / 127.5) - 1.0
    keras_path, h5_path, saved_path = tmp_path / "m.keras", tmp_path / "m.h5", tmp_path / "saved"
    tiny.save(str(keras_path))
    tiny.save(str(h5_path))
    tiny.export(str(saved_path))
    reference = _maps(tiny, images)
    for path in (keras_path, h5_path):
        model = load_model(str(path))
        info = describe(model, str(path), None)
        assert info.input_shape == (16, 16, 3) and info.classes == 3 and info.sha256 == file_sha256(str(path))
        np.testing.assert_allclose(_maps(model, images), reference, rtol=1e-5, atol=1e-8)
    saved = load_model(str(saved_path))
    info = describe(saved, str(saved_path), None)
    assert info.input_shape == (16, 16, 3) and info.classes == 3 and len(info.sha256) == 64
    # A SavedModel keeps its softmax baked in: it is explained on its outputs (probabilities).
    probabilities = SmoothGrad(tiny, samples=2, noise=0.1, batch_size=2, jit="graph", logits=False)
    np.testing.assert_allclose(_maps(saved, images), probabilities(images, ["a", "b"]).maps, rtol=1e-4, atol=1e-9)


def test_keras_applications_with_random_weights():
    model = load_model("keras.applications:MobileNetV2", weights=None)
    info = describe(model, "keras.applications:MobileNetV2", None)
    assert info.input_shape == (224, 224, 3) and info.classes == 1000 and info.sha256 is None


@pytest.mark.parametrize("source, message", [
    ("keras.applications:NoSuchNet", "not a keras.applications model"),
    ("keras.applications:os.system", "not a keras.applications model"),
    ("/nonexistent/model.keras", "does not exist"),
])
def test_bad_model_sources_are_one_line_errors(source, message):
    with pytest.raises(ModelError, match=message) as error:
        load_model(source)
    assert "\n" not in str(error.value)


def test_weights_file_must_exist(tiny, tmp_path):
    path = tmp_path / "m.keras"
    tiny.save(str(path))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(path), weights=str(tmp_path / "missing.weights.h5"))
    tiny.save_weights(str(tmp_path / "w.weights.h5"))
    assert load_model(str(path), weights=str(tmp_path / "w.weights.h5")).count_params() == tiny.count_params()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_code_in_a_model_file_is_refused_in_safe_mode(tmp_path, suffix):
    import keras

    inputs = keras.Input((4, 4, 3))
    doubled = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    path = str(tmp_path / f"lambda{suffix}")
    keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(doubled))).save(path)
    with pytest.raises(ModelError, match="safe mode refuses"):
        load_model(path)
    assert load_model(path, safe_mode=False).count_params() > 0
