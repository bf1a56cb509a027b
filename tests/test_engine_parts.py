"""Unit tests of the engine's pieces: noise, targets, reductions, variants, jit.

The maps themselves are pinned by ``test_reference_maps.py``; these tests cover
the pieces' own contracts (error messages, shapes, the accumulator interface).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from transforms.engine.jit import graph_fallback
from transforms.engine.noise import sample_seeds, sigma_per_image
from transforms.engine.reductions import reduce_magnitude, reduce_signed
from transforms.engine.smoothgrad import SmoothGrad
from transforms.engine.targets import Target
from transforms.engine.variants import VARIANTS, Accumulator, SplitHalves, accumulate, get_variant


# ------------------------------------------------------------------- noise
def test_sigma_per_image_absolute_and_relative():
    images = np.zeros((2, 3, 3, 1), np.float32)
    images[0, 0, 0, 0], images[0, 1, 1, 0] = -1.0, 3.0  # spread 4
    images[1] += 5.0  # constant image: spread 0
    absolute = sigma_per_image(images, 0.25, "absolute")
    relative = sigma_per_image(images, 0.25, "relative")
    assert absolute.dtype == relative.dtype == np.float32
    np.testing.assert_array_equal(absolute, [0.25, 0.25])
    np.testing.assert_array_equal(relative, [1.0, 0.0])
    with pytest.raises(ValueError, match="'noise_mode' must be one of"):
        sigma_per_image(images, 0.25, "relatve")


def test_sample_seeds_are_example_major():
    seeds = sample_seeds(tf.constant([10, 20], tf.int64), tf.constant([3, 4, 5], tf.int64)).numpy()
    assert seeds.tolist() == [[10, 3], [10, 4], [10, 5], [20, 3], [20, 4], [20, 5]]


# ----------------------------------------------------------------- targets
@pytest.mark.parametrize("text", ["top2", "class:", "topk:0", "class:-1", "", 3])
def test_target_parse_rejects(text):
    with pytest.raises(ValueError, match="'target' must be"):
        Target.parse(text)


@pytest.mark.parametrize("text", ["top1", "label", "class:7", "topk:3"])
def test_target_round_trips(text):
    assert str(Target.parse(text)) == text


def test_check_classes():
    Target.parse("class:4").check_classes(5)
    Target.parse("topk:5").check_classes(5)
    Target.parse("label").check_classes(1)
    with pytest.raises(ValueError, match=r"0 <= K < 5 \(the model's classes\); got 'class:5'"):
        Target.parse("class:5").check_classes(5)
    with pytest.raises(ValueError, match=r"K <= 5 \(the model's classes\); got 'topk:6'"):
        Target.parse("topk:6").check_classes(5)


def test_given_classes():
    assert Target.parse("class:2").given_classes(None, 3).tolist() == [[2], [2], [2]]
    assert Target.parse("topk:2").given_classes(None, 1).shape == (1, 2)
    assert Target.parse("label").given_classes([1, 0], 2).tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="needs 'targets'"):
        Target.parse("label").given_classes(None, 2)
    with pytest.raises(ValueError, match="must be 2 whole numbers"):
        Target.parse("label").given_classes([0.5, 1.0], 2)


# -------------------------------------------------------------- reductions
def test_reductions():
    values = tf.constant([[1.0, -3.0, 2.0]])
    assert reduce_magnitude(values, "max_abs").numpy().tolist() == [3.0]
    assert reduce_magnitude(values, "sum_abs").numpy().tolist() == [6.0]
    assert reduce_signed(values, "max_abs").numpy().tolist() == [-3.0]
    assert reduce_signed(values, "sum_abs").numpy().tolist() == [0.0]
    for reduce in (reduce_magnitude, reduce_signed):
        with pytest.raises(ValueError, match="'reduce' must be one of"):
            reduce(values, "median")


# ---------------------------------------------------------------- variants
def _chunks(grads_per_sample, chunk):
    """[B, S, K, H, W, C] per-sample gradients as chunks of ``chunk`` samples, the last one shorter."""
    samples = grads_per_sample.shape[1]
    return [tf.constant(grads_per_sample[:, first:first + chunk]) for first in range(0, samples, chunk)]


@pytest.mark.parametrize("name", VARIANTS)
def test_accumulators_match_numpy(name):
    rng = np.random.default_rng(3)
    batch, samples, k, height, width, channels = 2, 5, 1, 3, 3, 2
    grads = rng.normal(size=(batch, samples, k, height, width, channels)).astype(np.float32)
    images = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    accumulator = get_variant(name, "none")
    assert isinstance(accumulator, Accumulator) and accumulator.name == name
    state = accumulator.start(batch, k, height, width, channels)
    assert isinstance(state, tuple) and all(isinstance(part, tf.Tensor) for part in state)
    for part in _chunks(grads, chunk=2):  # 2 + 2 + a remainder of 1
        state = accumulator.add(state, part)
    maps = accumulator.finish(state, tf.constant(images), samples).numpy()
    expected = {
        "smoothgrad": np.abs(grads).mean(axis=1),
        "smoothgrad_squared": np.square(grads).mean(axis=1),
        "vargrad": grads.var(axis=1),
        "signed": grads.mean(axis=1),
        "grad_x_input": images[:, None] * grads.mean(axis=1),
    }[name]
    assert maps.shape == (batch, k, height, width, channels)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("samples, chunk", [(6, 2), (7, 2), (6, 6), (5, 8)])
def test_accumulate_runs_the_loop_in_a_graph(samples, chunk):
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(1, samples, 1, 2, 2, 1)).astype(np.float32)
    accumulator = get_variant("vargrad", "mean_abs")
    asked = []

    @tf.function(autograph=False)
    def run():
        def gradients(first_sample, size):
            asked.append(size)  # at trace time: the chunk sizes the step computes
            return tf.gather(tf.constant(grads), first_sample + tf.range(size), axis=1)

        state = accumulate(accumulator, samples, chunk, gradients, (1, 1, 2, 2, 1))
        return accumulator.finish(state, tf.zeros([1, 2, 2, 1]), samples)

    np.testing.assert_allclose(run().numpy(), grads.var(axis=1)[..., 0], rtol=1e-5, atol=1e-7)
    full, rest = divmod(samples, min(chunk, samples))
    assert asked == [min(chunk, samples)] * (1 if full else 0) + ([rest] if rest else [])


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("samples, chunk", [(7, 3), (6, 2), (5, 1), (4, 8)])
def test_split_halves_fold_the_even_and_odd_samples(name, samples, chunk):
    # Chunks of odd size start at odd samples too: the parity must follow the sample, not the chunk.
    rng = np.random.default_rng(5)
    grads = rng.normal(size=(2, samples, 1, 3, 3, 2)).astype(np.float32)
    images = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
    accumulator = get_variant(name, "none")
    halves = SplitHalves(accumulator)

    @tf.function(autograph=False)
    def run():
        def gradients(first_sample, size):
            return tf.gather(tf.constant(grads), first_sample + tf.range(size), axis=1)

        state = accumulate(halves, samples, chunk, gradients, (2, 1, 3, 3, 2))
        return halves.finish(state, tf.constant(images), samples)

    every, even, odd = (part.numpy() for part in run())

    def expected(part):  # the variant over a subset of the samples, in numpy
        return {"smoothgrad": np.abs(part).mean(axis=1), "smoothgrad_squared": np.square(part).mean(axis=1),
                "vargrad": part.var(axis=1), "signed": part.mean(axis=1),
                "grad_x_input": images[:, None] * part.mean(axis=1)}[name]

    np.testing.assert_allclose(every, expected(grads), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(even, expected(grads[:, 0::2]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(odd, expected(grads[:, 1::2]), rtol=1e-5, atol=1e-6)


def test_split_halves_follow_the_global_sample_index():
    # Samples 5, 6, 7, 8 of a run continued from sample 5: the even half is samples 6 and 8.
    grads = np.random.default_rng(6).normal(size=(1, 4, 1, 2, 2, 1)).astype(np.float32)
    halves = SplitHalves(get_variant("signed", "none"), offset=5)

    @tf.function(autograph=False)
    def run():
        state = accumulate(halves, 4, 3, lambda first, size: tf.gather(tf.constant(grads), first + tf.range(size),
                                                                       axis=1), (1, 1, 2, 2, 1))
        return halves.finish(state, tf.zeros([1, 2, 2, 1]), 4)

    _, even, odd = (part.numpy() for part in run())
    np.testing.assert_allclose(even, grads[:, 1::2].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(odd, grads[:, 0::2].mean(axis=1), rtol=1e-6)


def test_get_variant_rejects_unknown():
    with pytest.raises(ValueError, match="'variant' must be one of"):
        get_variant("integrated", "mean_abs")
    with pytest.raises(ValueError, match="'reduce' must be one of"):
        get_variant("smoothgrad", "median")


# --------------------------------------------------------------------- jit
def test_graph_fallback_only_for_auto_on_the_first_xla_call():
    error = tf.errors.UnimplementedError(None, None, "no XLA kernel\n for MaxPoolGrad")
    jit_used, reason = graph_fallback("auto", "xla", 0, error)
    assert jit_used == "graph"
    assert reason == "auto: XLA failed to compile (no XLA kernel for MaxPoolGrad); plain graph"
    assert graph_fallback("xla", "xla", 0, error) is None
    assert graph_fallback("auto", "graph", 0, error) is None
    assert graph_fallback("auto", "xla", 1, error) is None
    assert graph_fallback("auto", "xla", 0, ValueError("other")) is None


# ------------------------------------------------------------ check_model
def _model(classes=3):
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.Dense(classes, activation="softmax")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


def test_check_model_counts_classes_without_compiling():
    explainer = SmoothGrad(_model(), samples=1, jit="graph", target="topk:3")
    assert explainer.check_model((4, 4, 1)) == 3
    assert explainer.num_classes == 3 and explainer.compile_count == 0
    with pytest.raises(ValueError, match="'target' must be 'topk:K' with K <= 3"):
        SmoothGrad(_model(), samples=1, jit="graph", target="topk:4").check_model((4, 4, 1))
    with pytest.raises(ValueError, match=r"Each image must be \(4, 4, 1\)"):
        explainer.check_model((5, 4, 1))


# ------------------------------------------------------------ reliability
def _conv_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(hidden))
    return keras.Model(inputs, outputs)


def test_reliability_is_the_rank_correlation_of_the_even_and_odd_sample_maps():
    from transforms.engine.statistics import rank_correlation

    model = _conv_model()
    images = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
    keys = ["a", "b", "c"]
    args = dict(noise=0.5, batch_size=2, jit="graph")
    result = SmoothGrad(model, samples=2, **args)(images, keys)
    # With N = 2 the halves are sample 0 and sample 1: one-sample explainers at offsets 0 and 1.
    first = SmoothGrad(model, samples=1, sample_offset=0, reliability=False, **args)(images, keys)
    second = SmoothGrad(model, samples=1, sample_offset=1, reliability=False, **args)(images, keys)
    assert first.reliability is None
    expected = [rank_correlation(a, b) for a, b in zip(first.maps, second.maps)]
    np.testing.assert_allclose(result.reliability, expected, rtol=1e-5)
    assert result.reliability.shape == (3,) and np.all(result.reliability < 0.999)
    # The map itself does not change when the halves are accumulated beside it.
    plain = SmoothGrad(model, samples=2, reliability=False, **args)(images, keys)
    np.testing.assert_array_equal(result.maps, plain.maps)


def test_reliability_grows_with_samples_and_does_not_depend_on_the_chunk():
    model = _conv_model()
    images = np.random.default_rng(1).normal(size=(4, 8, 8, 2)).astype(np.float32)
    keys = [f"k{index}" for index in range(4)]
    args = dict(noise=0.5, batch_size=4, jit="graph", variant="vargrad")
    few = SmoothGrad(model, samples=4, **args)(images, keys).reliability
    by_chunk = [SmoothGrad(model, samples=24, chunk=chunk, **args)(images, keys).reliability for chunk in (1, 5, 24)]
    for other in by_chunk[1:]:
        np.testing.assert_allclose(other, by_chunk[0], rtol=1e-4, atol=1e-5)
    assert by_chunk[0].mean() > few.mean()
    # Without noise both halves are the same map; with one sample there is no odd half.
    exact = SmoothGrad(model, samples=4, noise=0.0, batch_size=4, jit="graph")(images, keys).reliability
    np.testing.assert_allclose(exact, 1.0, rtol=1e-6)
    single = SmoothGrad(model, samples=1, noise=0.5, batch_size=4, jit="graph", target="topk:2")(images, keys)
    assert single.reliability.shape == (4, 2) and np.isnan(single.reliability).all()
