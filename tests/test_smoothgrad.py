"""Unit tests of the SmoothGrad engine's math on tiny models.

Every expected value is computed independently of the engine: plain gradients
with ``tf.GradientTape`` on logits rebuilt from the layers' weights, closed
forms for linear models, and ``np.var`` over per-sample gradients. The only
pieces of the engine a reference reuses are its noise generator
(``standard_normal`` seeded with ``key_seed``), so that per-sample gradients can
be recomputed one by one; the noise itself is checked for its distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from transforms.engine.noise import key_seed, standard_normal
from transforms.engine.smoothgrad import (
    REDUCTIONS,
    VARIANTS,
    SmoothGrad,
)

HEIGHT, WIDTH, CHANNELS = 8, 8, 3
CLASSES = 6


# ----------------------------------------------------------------- helpers
def _images(count: int, seed: int = 0, shape=(HEIGHT, WIDTH, CHANNELS)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count,) + tuple(shape)).astype(np.float32)


def _keys(count: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}-{index}" for index in range(count)]


def _dense_logits(dense, features):
    """Pre-activation output of a Dense layer, from its weights."""
    logits = tf.matmul(features, dense.kernel)
    return logits + dense.bias if dense.use_bias else logits


def _sequential_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((HEIGHT, WIDTH, CHANNELS)),
        keras.layers.Conv2D(4, 3, activation="tanh", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(CLASSES, activation="softmax", name="classes"),
    ])


def _sequential_logits(model, images):
    features = images
    for layer in model.layers[:-1]:
        features = layer(features)
    return _dense_logits(model.layers[-1], features)


def _functional_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((HEIGHT, WIDTH, CHANNELS), name="image")
    features = keras.layers.Conv2D(5, 3, padding="same", activation="tanh", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    flat = keras.layers.Flatten(name="flatten")(keras.layers.MaxPooling2D(2, name="pool")(features))
    joined = keras.layers.Concatenate(name="join")([pooled, flat])
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="classes")(joined)
    return keras.Model(inputs, outputs, name="functional")


def _functional_logits(model, images):
    features = model.get_layer("conv")(images)
    pooled = model.get_layer("gap")(features)
    flat = model.get_layer("flatten")(model.get_layer("pool")(features))
    joined = tf.concat([pooled, flat], axis=-1)
    return _dense_logits(model.get_layer("classes"), joined)


class TinySubclassed(keras.Model):
    """Subclassed model with linear outputs (its outputs are its scores)."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, activation="tanh")
        self.flatten = keras.layers.Flatten()
        self.classes = keras.layers.Dense(CLASSES)

    def call(self, inputs):
        return self.classes(self.flatten(self.conv(inputs)))


def _subclassed_model():
    keras.utils.set_random_seed(3)
    model = TinySubclassed()
    model(tf.zeros([1, HEIGHT, WIDTH, CHANNELS]))
    return model


def _linear_model(classes: int = CLASSES, shape=(HEIGHT, WIDTH, CHANNELS), seed: int = 4):
    """S = w·x + b with a softmax on top (explained on its logits)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(shape),
        keras.layers.Flatten(),
        keras.layers.Dense(classes, activation="softmax", name="classes"),
    ])
    kernel, bias = model.layers[-1].get_weights()
    rng = np.random.default_rng(seed)
    model.layers[-1].set_weights([rng.normal(size=kernel.shape).astype(np.float32),
                                  rng.normal(size=bias.shape).astype(np.float32)])
    return model


def _input_gradient(logits_fn, images, classes) -> np.ndarray:
    """d logits[b, classes[b]] / d images[b], [B, H, W, C], with its own tape."""
    images = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = logits_fn(images)
        chosen = tf.gather(logits, tf.constant(classes, tf.int32), batch_dims=1)
        objective = tf.reduce_sum(chosen)
    return tape.gradient(objective, images).numpy()


def _plain_map(logits_fn, images, classes) -> np.ndarray:
    return np.abs(_input_gradient(logits_fn, images, classes)).mean(axis=-1)


def _noise(seed: int, key: str, sample: int, shape) -> np.ndarray:
    """The engine's noise for (seed, key, sample), drawn one sample at a time."""
    seeds = tf.constant([[key_seed(seed, key), sample]], tf.int64)
    return standard_normal(seeds, tuple(shape)).numpy()[0]


def _per_sample_gradients(logits_fn, image, key, target, samples, sigma, seed) -> np.ndarray:
    """Gradients of each noisy copy, recomputed one by one: [samples, H, W, C]."""
    noisy = np.stack([image + sigma * _noise(seed, key, sample, image.shape)
                      for sample in range(samples)]).astype(np.float32)
    return _input_gradient(logits_fn, noisy, [target] * samples).astype(np.float64)


# ------------------------------------------- samples=1, noise=0: plain gradient
@pytest.mark.parametrize("jit", ["graph", "xla"])
@pytest.mark.parametrize("build, logits_of", [
    (_sequential_model, _sequential_logits),
    (_functional_model, _functional_logits),
    (_subclassed_model, lambda model, images: model(images)),
], ids=["sequential", "functional", "subclassed"])
def test_one_clean_sample_is_the_plain_gradient(build, logits_of, jit):
    model = build()
    images = _images(5)
    logits = logits_of(model, tf.constant(images)).numpy()
    top1 = logits.argmax(axis=-1)

    result = SmoothGrad(model, samples=1, noise=0.0, batch_size=2, jit=jit)(images, _keys(5))

    expected = _plain_map(lambda x: logits_of(model, x), images, top1)
    assert expected.max() > 1e-2  # a map that could be wrong
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.targets, top1)
    np.testing.assert_allclose(result.scores, logits[np.arange(5), top1], rtol=1e-5, atol=1e-5)


def test_model_loaded_from_a_keras_file(tmp_path):
    original = _functional_model()
    path = tmp_path / "model.keras"
    original.save(path)
    loaded = keras.models.load_model(path)  # safe_mode on by default
    images = _images(3)
    logits = _functional_logits(original, tf.constant(images)).numpy()
    top1 = logits.argmax(axis=-1)

    explainer = SmoothGrad(loaded, samples=1, noise=0.0, batch_size=3)
    result = explainer(images, _keys(3))

    assert explainer.scores_from.startswith("pre-softmax")
    expected = _plain_map(lambda x: _functional_logits(original, x), images, top1)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.scores, logits[np.arange(3), top1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ linear closed forms
def _magnitude(values, how):
    return {"mean_abs": lambda v: np.abs(v).mean(-1), "max_abs": lambda v: np.abs(v).max(-1),
            "sum_abs": lambda v: np.abs(v).sum(-1), "none": np.abs}[how](values)


def _signed(values, how):
    if how == "max_abs":
        strongest = np.abs(values).argmax(-1)[..., None]
        return np.take_along_axis(values, strongest, axis=-1)[..., 0]
    return {"mean_abs": lambda v: v.mean(-1), "sum_abs": lambda v: v.sum(-1),
            "none": lambda v: v}[how](values)


def _linear_closed_form(variant, how, weights, images):
    """The map of S = w·x for any noise: the gradient is w for every sample."""
    if variant == "smoothgrad":
        return _magnitude(weights, how)
    if variant == "smoothgrad_squared":
        return _magnitude(weights ** 2, how)
    if variant == "vargrad":
        return np.zeros_like(_magnitude(weights, how))
    if variant == "signed":
        return _signed(weights, how)
    return _signed(images * weights, how)


@pytest.mark.parametrize("how", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_model_closed_forms(variant, how):
    model = _linear_model()
    kernel, bias = (weight.astype(np.float64) for weight in model.layers[-1].get_weights())
    images = _images(3, seed=7)
    logits = images.reshape(3, -1).astype(np.float64) @ kernel + bias
    top1 = logits.argmax(axis=-1)
    weights = kernel[:, top1].T.reshape(images.shape)  # w of each image's target

    explainer = SmoothGrad(model, samples=5, noise=0.5, noise_mode="absolute", variant=variant,
                           reduce=how, batch_size=2, chunk=2, jit="graph")
    result = explainer(images, _keys(3))

    expected = _linear_closed_form(variant, how, weights, images.astype(np.float64))
    assert result.maps.shape == expected.shape
    np.testing.assert_array_equal(result.targets, top1)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-5)


def test_linear_model_without_activation_needs_no_split():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((HEIGHT, WIDTH, CHANNELS)), keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES, use_bias=True)])
    kernel = model.layers[-1].get_weights()[0]
    images = _images(2)
    explainer = SmoothGrad(model, samples=3, noise=0.5, batch_size=2)
    result = explainer(images, _keys(2))
    expected = np.abs(kernel[:, result.targets].T.reshape(2, HEIGHT, WIDTH, CHANNELS)).mean(-1)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-6)
    assert explainer.scores_from.startswith("model outputs")


# ------------------------------------------------------------------ targets
def test_top1_and_predicted_are_the_argmax_of_clean_logits():
    model = _functional_model()
    images = _images(7, seed=11)
    logits = _functional_logits(model, tf.constant(images)).numpy()
    result = SmoothGrad(model, samples=2, noise=0.2, batch_size=3)(images, _keys(7))
    np.testing.assert_array_equal(result.targets, logits.argmax(-1))
    np.testing.assert_array_equal(result.predicted, logits.argmax(-1))
    np.testing.assert_array_equal(result.target_ranks, np.zeros(7))


def test_topk_gives_k_maps_in_descending_score_order():
    model = _functional_model()
    images = _images(4, seed=12)
    logits = _functional_logits(model, tf.constant(images)).numpy()
    order = np.argsort(-logits, axis=-1)[:, :3]

    result = SmoothGrad(model, samples=1, noise=0.0, target="topk:3", batch_size=3)(images, _keys(4))

    assert result.maps.shape == (4, 3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(result.targets, order)
    np.testing.assert_array_equal(result.target_ranks, np.tile([0, 1, 2], (4, 1)))
    np.testing.assert_allclose(result.scores, np.take_along_axis(logits, order, -1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(result.scores, axis=1) < 0)
    np.testing.assert_array_equal(result.predicted, order[:, 0])
    for rank in range(3):
        expected = _plain_map(lambda x: _functional_logits(model, x), images, order[:, rank])
        np.testing.assert_allclose(result.maps[:, rank], expected, rtol=1e-5, atol=1e-5)


def test_label_target_explains_the_given_classes():
    model = _functional_model()
    images = _images(4, seed=13)
    logits = _functional_logits(model, tf.constant(images)).numpy()
    labels = np.array([5, 0, 3, 3])

    result = SmoothGrad(model, samples=1, noise=0.0, target="label", batch_size=3)(
        images, _keys(4), targets=labels)

    expected = _plain_map(lambda x: _functional_logits(model, x), images, labels)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.targets, labels)
    np.testing.assert_allclose(result.scores, logits[np.arange(4), labels], rtol=1e-5, atol=1e-5)
    expected_ranks = (logits > logits[np.arange(4), labels][:, None]).sum(-1)
    np.testing.assert_array_equal(result.target_ranks, expected_ranks)
    np.testing.assert_array_equal(result.predicted, logits.argmax(-1))


def test_fixed_class_target_explains_that_class():
    model = _sequential_model()
    images = _images(3, seed=14)
    logits = _sequential_logits(model, tf.constant(images)).numpy()
    result = SmoothGrad(model, samples=1, noise=0.0, target="class:2", batch_size=2)(images, _keys(3))
    expected = _plain_map(lambda x: _sequential_logits(model, x), images, [2, 2, 2])
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.targets, [2, 2, 2])
    np.testing.assert_allclose(result.scores, logits[:, 2], rtol=1e-5, atol=1e-5)


def test_logits_false_explains_the_probabilities():
    model = _sequential_model()
    images = _images(3, seed=15)
    probabilities = model(images).numpy()
    logits = _sequential_logits(model, tf.constant(images)).numpy()
    top1 = probabilities.argmax(-1)

    explainer = SmoothGrad(model, samples=1, noise=0.0, batch_size=2, logits=False)
    result = explainer(images, _keys(3))

    np.testing.assert_allclose(result.scores, probabilities[np.arange(3), top1], rtol=1e-5, atol=1e-6)
    assert np.all(result.scores <= 1.0)
    expected = _plain_map(lambda x: model(x), images, top1)
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-6)
    logit_map = _plain_map(lambda x: _sequential_logits(model, x), images, top1)
    assert not np.allclose(result.maps, logit_map, rtol=1e-3)  # probabilities, not logits
    assert not np.allclose(result.scores, logits[np.arange(3), top1], rtol=1e-3)


def test_caller_model_is_not_mutated():
    model = _sequential_model()
    images = _images(3, seed=16)
    before = model(images).numpy()
    layer_count = len(model.layers)
    weight_count = len(model.weights)

    explainer = SmoothGrad(model, samples=2, noise=0.1, batch_size=2)
    explainer(images, _keys(3))

    assert model.layers[-1].activation.__name__ == "softmax"
    assert len(model.layers) == layer_count and len(model.weights) == weight_count
    after = model(images).numpy()
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after.sum(-1), 1.0, rtol=1e-5)  # still probabilities


# ------------------------------------------------------------- invariances
@pytest.mark.parametrize("jit", ["graph", "xla"])
def test_map_does_not_depend_on_batch_position_or_splitting(jit):
    model = _functional_model()
    explainer = SmoothGrad(model, samples=4, noise=0.3, batch_size=4, chunk=2, jit=jit)
    target = _images(1, seed=20)
    others = _images(6, seed=21)

    alone = explainer(target, ["target"]).maps[0]
    first = explainer(np.concatenate([target, others[:3]]), ["target", "o0", "o1", "o2"]).maps[0]
    last = explainer(np.concatenate([others[:3], target]), ["o0", "o1", "o2", "target"]).maps[3]
    split = explainer(np.concatenate([others[:5], target, others[5:]]),
                      ["o0", "o1", "o2", "o3", "o4", "target", "o5"]).maps[5]

    assert alone.max() > 1e-3
    for other in (first, last, split):
        np.testing.assert_allclose(other, alone, rtol=1e-6, atol=1e-6)
    assert explainer.compile_count == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_map_does_not_depend_on_chunk_size(variant):
    model = _functional_model()
    images = _images(3, seed=22)
    samples = 7  # chunk 3 leaves a partial last chunk
    maps = [SmoothGrad(model, samples=samples, noise=0.3, variant=variant, batch_size=2,
                       chunk=chunk, jit="graph")(images, _keys(3)).maps
            for chunk in (1, 3, samples)]
    assert np.abs(maps[0]).max() > 1e-4
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], rtol=1e-5, atol=1e-6)


def test_seed_and_key_decide_the_noise():
    model = _functional_model()
    images = _images(2, seed=23)
    options = dict(samples=3, noise=0.3, batch_size=2)
    reference = SmoothGrad(model, seed=7, **options)(images, ["a", "b"]).maps
    again = SmoothGrad(model, seed=7, **options)(images, ["a", "b"]).maps
    other_seed = SmoothGrad(model, seed=8, **options)(images, ["a", "b"]).maps
    other_keys = SmoothGrad(model, seed=7, **options)(images, ["a2", "b2"]).maps
    clean = SmoothGrad(model, seed=7, **dict(options, noise=0.0))(images, ["a", "b"]).maps

    np.testing.assert_array_equal(again, reference)
    scale = np.abs(reference).max()
    for different in (other_seed, other_keys, clean):
        assert np.abs(different - reference).max() > 1e-2 * scale


def test_compile_count_stays_one():
    model = _sequential_model()
    explainer = SmoothGrad(model, samples=2, noise=0.1, batch_size=4, jit="xla")
    images = _images(9, seed=24)
    for count in (1, 2, 3, 4, 1, 4, 9, 0):
        result = explainer(images[:count], _keys(count))
        assert result.maps.shape == (count, HEIGHT, WIDTH)
    assert explainer.compile_count == 1


# ------------------------------------------------------------------- noise
def test_relative_and_absolute_noise_sigma():
    model = _sequential_model()
    images = _images(3, seed=25) * np.array([0.5, 2.0, 10.0], np.float32)[:, None, None, None]
    spread = images.reshape(3, -1).max(1) - images.reshape(3, -1).min(1)

    relative = SmoothGrad(model, samples=2, noise=0.15, noise_mode="relative", batch_size=2)
    relative_result = relative(images, _keys(3))
    np.testing.assert_allclose(relative_result.noise_sigma, 0.15 * spread, rtol=1e-6)

    absolute = SmoothGrad(model, samples=2, noise=0.15, noise_mode="absolute", batch_size=2)
    np.testing.assert_array_equal(absolute(images, _keys(3)).noise_sigma, np.full(3, 0.15, np.float32))

    # The relative σ is the one actually applied: same maps as absolute with that σ.
    for index in range(3):
        same = SmoothGrad(model, samples=2, noise=float(0.15 * spread[index]), batch_size=2)
        np.testing.assert_allclose(same(images[index:index + 1], [f"img-{index}"]).maps[0],
                                   relative_result.maps[index], rtol=1e-5, atol=1e-6)


def test_noise_is_standard_normal_times_sigma():
    # S = sum(x²)/2 has gradient x + σ·n, so the signed map recovers the noise.
    inputs = keras.Input((16, 16, 3))
    halved_square = keras.layers.Lambda(lambda x: 0.5 * tf.reduce_sum(tf.square(x), axis=[1, 2, 3]))(inputs)
    model = keras.Model(inputs, keras.layers.Reshape((1,))(halved_square))
    images = _images(4, seed=26, shape=(16, 16, 3))
    sigma = 0.25

    result = SmoothGrad(model, samples=1, noise=sigma, variant="signed", reduce="none",
                        batch_size=4, jit="graph")(images, _keys(4))
    noise = (result.maps - images) / sigma

    assert abs(noise.mean()) < 0.06 and abs(noise.std() - 1.0) < 0.04  # 3072 draws
    assert abs(np.mean(noise > 1.0) - 0.1587) < 0.02  # a normal tail, not a uniform one
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.1
    for index, key in enumerate(_keys(4)):
        np.testing.assert_allclose(noise[index], _noise(0, key, 0, (16, 16, 3)), atol=2e-3)


def test_noise_is_the_same_with_and_without_xla():
    model = _functional_model()
    images = _images(3, seed=27)
    maps = {jit: SmoothGrad(model, samples=4, noise=0.4, variant="signed", reduce="none",
                            batch_size=2, jit=jit)(images, _keys(3)).maps
            for jit in ("graph", "xla")}
    scale = np.abs(maps["graph"]).max()
    np.testing.assert_allclose(maps["xla"], maps["graph"], rtol=1e-5, atol=1e-5 * scale)
    clean = SmoothGrad(model, samples=1, noise=0.0, variant="signed", reduce="none",
                       batch_size=2)(images, _keys(3)).maps
    assert np.abs(clean - maps["graph"]).max() > 1e-2 * scale  # the noise was applied


# ---------------------------------------------------------------------- jit
def _conv_model(extra):
    keras.utils.set_random_seed(6)
    layers = [keras.Input((HEIGHT, WIDTH, CHANNELS))] + extra + [
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


@pytest.mark.skipif(bool(tf.config.list_logical_devices("GPU")), reason="auto picks xla on a GPU")
@pytest.mark.parametrize("extra, reason", [
    ([keras.layers.Conv2D(4, 3)], "XLA measured slower"),
    ([keras.layers.DepthwiseConv2D(3)], "depthwise/separable"),
    ([keras.layers.SeparableConv2D(4, 3)], "depthwise/separable"),
    ([keras.Sequential([keras.layers.Conv2D(4, 1), keras.layers.DepthwiseConv2D(3)])], "depthwise/separable"),
], ids=["conv2d", "depthwise", "separable", "nested-depthwise"])
def test_auto_jit_avoids_xla_on_cpu(extra, reason):
    explainer = SmoothGrad(_conv_model(extra), samples=1, batch_size=1, jit="auto")
    assert explainer.jit_used == "graph" and reason in explainer.jit_reason
    assert explainer.parameters()["jit_used"] == "graph"
    assert explainer(_images(1), ["a"]).maps.shape == (1, HEIGHT, WIDTH)


def test_auto_jit_picks_xla_when_an_accelerator_is_visible(monkeypatch):
    real = tf.config.list_logical_devices
    fake_gpu = tf.config.LogicalDevice(name="/device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [fake_gpu] if kind == "GPU" else real(kind))
    explainer = SmoothGrad(_conv_model([keras.layers.DepthwiseConv2D(3)]), samples=1, batch_size=1, jit="auto")
    assert explainer.jit_used == "xla" and "accelerator" in explainer.jit_reason


# ------------------------------------------------------------------ memory
def _while_bodies(graph):
    for operation in graph.get_operations():
        yield operation
        for name in ("_body_graph", "_cond_graph"):
            inner = getattr(operation, name, None)
            if inner is not None:
                yield from _while_bodies(inner)


def test_traced_step_holds_one_chunk_not_all_samples():
    # Shapes chosen so that no model dimension equals batch × samples (100).
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(5)])
    explainer = SmoothGrad(model, samples=50, noise=0.2, variant="vargrad", batch_size=2, chunk=4,
                           jit="graph")
    explainer(_images(2, shape=(6, 6, 2)), ["a", "b"])
    graph = explainer._function.get_concrete_function().graph
    leading = {tensor.shape[0] for operation in _while_bodies(graph) for tensor in operation.outputs
               if tensor.shape.rank}
    assert 2 * 4 in leading  # the noisy chunk
    assert 2 * 50 not in leading and 50 not in leading


@pytest.mark.parametrize("variant", ["vargrad", "smoothgrad", "smoothgrad_squared"])
def test_many_samples_in_small_chunks_match_per_sample_reference(variant):
    model = _functional_model()
    images = _images(2, seed=28)
    samples, sigma, seed = 64, 0.3, 3
    maps = {chunk: SmoothGrad(model, samples=samples, noise=sigma, variant=variant, batch_size=2,
                              chunk=chunk, seed=seed, jit="graph")(images, ["a", "b"]).maps
            for chunk in (64, 4, 5)}
    np.testing.assert_allclose(maps[4], maps[64], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps[5], maps[64], rtol=1e-5, atol=1e-7)

    logits = _functional_logits(model, tf.constant(images)).numpy()
    for index, key in enumerate(["a", "b"]):
        grads = _per_sample_gradients(lambda x: _functional_logits(model, x), images[index], key,
                                      logits[index].argmax(), samples, sigma, seed)
        expected = {"vargrad": grads.var(axis=0).mean(-1),
                    "smoothgrad": np.abs(grads).mean(-1).mean(0),
                    "smoothgrad_squared": (grads ** 2).mean(-1).mean(0)}[variant]
        assert expected.max() > 0
        np.testing.assert_allclose(maps[4][index], expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_vargrad_is_stable_under_a_large_constant_gradient():
    # Gradient = 1e3·w + v·(1 − tanh²(x)): a large offset over a small variance,
    # where E[g²] − E[g]² in float32 cancels catastrophically.
    keras.utils.set_random_seed(9)
    inputs = keras.Input((4, 4, 2))
    flat = keras.layers.Flatten()(inputs)
    linear = keras.layers.Dense(3, use_bias=False, name="linear")(flat)
    wiggle = keras.layers.Dense(3, use_bias=False, name="wiggle")(keras.layers.Activation("tanh")(flat))
    model = keras.Model(inputs, keras.layers.Add()([linear, wiggle]))
    rng = np.random.default_rng(9)
    model.get_layer("linear").set_weights([(1e3 * (1.0 + rng.random((32, 3)))).astype(np.float32)])
    model.get_layer("wiggle").set_weights([rng.normal(size=(32, 3)).astype(np.float32)])

    images = _images(2, seed=29, shape=(4, 4, 2))
    samples, sigma, seed = 32, 0.5, 1
    maps = {chunk: SmoothGrad(model, samples=samples, noise=sigma, variant="vargrad", reduce="none",
                              batch_size=2, chunk=chunk, seed=seed, jit="graph")(images, ["a", "b"]).maps
            for chunk in (1, 5, 32)}
    for chunk_maps in maps.values():
        assert np.all(chunk_maps >= 0)
    for chunk in (1, 5):
        np.testing.assert_allclose(maps[chunk], maps[32], rtol=1e-2, atol=1e-4)

    logits = model(images).numpy()
    for index, key in enumerate(["a", "b"]):
        grads = _per_sample_gradients(lambda x: model(x), images[index], key, logits[index].argmax(),
                                      samples, sigma, seed)
        expected = grads.var(axis=0)
        assert np.abs(grads).mean() > 1e3 and expected.mean() > 1e-3
        np.testing.assert_allclose(maps[5][index], expected, rtol=2e-2, atol=1e-3 * expected.max())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, name, allowed, given", [
    (dict(variant="smoothgrd"), "variant", "smoothgrad_squared", "'smoothgrd'"),
    (dict(reduce="mean"), "reduce", "max_abs", "'mean'"),
    (dict(noise_mode="relatve"), "noise_mode", "relative", "'relatve'"),
    (dict(jit="fast"), "jit", "xla", "'fast'"),
    (dict(target="topk:0"), "target", "K >= 1", "'topk:0'"),
    (dict(target="foo"), "target", "topk:K", "'foo'"),
    (dict(samples=0), "samples", ">= 1", "got 0"),
    (dict(noise=-1), "noise", ">= 0", "got -1"),
    (dict(batch_size=0), "batch_size", ">= 1", "got 0"),
    (dict(chunk=0), "chunk", ">= 1", "got 0"),
])
def test_invalid_options_are_named(options, name, allowed, given):
    with pytest.raises(ValueError) as error:
        SmoothGrad(_linear_model(), **options)
    message = str(error.value)
    assert f"'{name}'" in message and allowed in message and given in message


def test_invalid_calls_say_what_was_expected():
    explainer = SmoothGrad(_linear_model(), samples=1, batch_size=2)
    images = _images(2)
    with pytest.raises(ValueError, match=r"rank 3"):
        explainer(images[0], ["a"])
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*got \(9, 9, 3\)"):
        explainer(_images(2, shape=(9, 9, 3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"2 images but 3 keys"):
        explainer(images, ["a", "b", "c"])

    labelled = SmoothGrad(_linear_model(), samples=1, batch_size=2, target="label")
    with pytest.raises(ValueError, match=r"target='label' needs 'targets'"):
        labelled(images, ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 6\).*\[6\]"):
        labelled(images, ["a", "b"], targets=[0, 6])
    with pytest.raises(ValueError, match=r"one class per image"):
        labelled(images, ["a", "b"], targets=[[0, 1], [2, 3]])


@pytest.mark.parametrize("jit", ["graph", "xla"])
@pytest.mark.parametrize("target", ["class:6", "topk:7"])
def test_target_out_of_range_fails_on_every_call(target, jit):
    explainer = SmoothGrad(_linear_model(), samples=1, batch_size=2, target=target, jit=jit)
    for _ in range(2):  # the second call must not skip the check (XLA would clamp the class)
        with pytest.raises(ValueError, match=rf"'target'.*{CLASSES}.*'{target}'"):
            explainer(_images(2), ["a", "b"])


# ------------------------------------------------------------ all variants
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_with_topk(variant):
    model = _functional_model()
    images = _images(3, seed=30)
    result = SmoothGrad(model, samples=3, noise=0.2, variant=variant, target="topk:2",
                        batch_size=2, chunk=2)(images, _keys(3))
    assert result.maps.shape == (3, 2, HEIGHT, WIDTH)
    assert result.maps.dtype == np.float32 and np.all(np.isfinite(result.maps))
    assert np.all(result.targets[:, 0] != result.targets[:, 1])
    if variant in ("smoothgrad", "smoothgrad_squared", "vargrad"):
        assert np.all(result.maps >= 0)
    assert np.abs(result.maps).max() > 0
    assert not np.allclose(result.maps[:, 0], result.maps[:, 1])


def test_numpy_scalars_are_accepted_as_options():
    explainer = SmoothGrad(_conv_model([keras.layers.Conv2D(4, 3)]), samples=np.int64(2), noise=np.int64(1),
                           batch_size=np.int32(1), seed=np.int64(3), jit="graph")
    assert explainer.samples == 2 and explainer.noise == 1.0 and explainer.seed == 3


@pytest.mark.parametrize("jit", [False, True])
def test_noise_streams_side_by_side_equal_a_loop_over_them_bit_for_bit(monkeypatch, jit):
    from transforms.engine import noise

    seeds = tf.constant([[key_seed(3, f"img-{index}"), sample] for index in range(3) for sample in (0, 1, 7)],
                        tf.int64)
    draw = tf.function(lambda s: noise.standard_normal(s, (5, 4, 3)), jit_compile=jit, autograph=False)
    side_by_side = draw(seeds).numpy()
    monkeypatch.setattr(noise, "MAX_UNROLLED_STREAMS", 0)  # the loop over rows (a large step's path)
    looped = tf.function(lambda s: noise.standard_normal(s, (5, 4, 3)), jit_compile=jit, autograph=False)(seeds)
    assert side_by_side.shape == (9, 5, 4, 3)
    np.testing.assert_array_equal(side_by_side, looped.numpy())
