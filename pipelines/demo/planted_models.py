"""Models for the planted-shortcut datasets: four architectures, their training, and the measured reliance.

Every model takes images preprocessed in the ``tf`` mode (``x / 127.5 - 1``,
done by the pipeline, not by the model), ends in
``Dense(classes, activation="softmax", name="predictions")`` and uses standard
layers only, so it loads with ``keras.saving.load_model(path, safe_mode=True)``.
Different families on purpose: an audit tuned on one kind of saliency map
(e.g. the sparse maps of global max pooling) must not be tested on that kind
alone. Measured with the defaults of :class:`pipelines.demo.planted.PlantedSpec`
(6000 images, 8 epochs): ``cnn_max`` learns both tasks; the global-average-
pooling families (``strided_gap``) learnt the gratings but stayed at chance on
the shapes, whose small objects global max pooling finds better.

:func:`measure_reliance` tells whether a trained model really uses the mark:
it removes the mark from the shortcut class's marked images and pastes it onto
the other classes' images, and compares the predictions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np

from pipelines.demo.demo_model import build_model as build_demo_model, preprocess
from pipelines.demo.planted_marks import apply_mark

logger = logging.getLogger(__name__)

ARCHITECTURES = ("cnn_max", "strided_gap", "residual", "flatten_dense")
#: Two more families, for the model zoo of the adaptive-samples calibration (``benchmarks/model_zoo.py``).
MORE_ARCHITECTURES = ("conv3_max", "separable", "attention")
# A model relies on the mark when pasting it flips at least this share of the
# other classes' images into the shortcut class (``partial`` from the second).
RELIANCE_STRONG, RELIANCE_PARTIAL = 0.5, 0.1


def _strided_gap(keras, image_size: int, classes: int):
    """Strided 5x5/3x3 convolutions with batch norm and ReLU, global **average** pooling."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    for index, (filters, kernel, stride) in enumerate(((24, 5, 2), (32, 3, 1), (48, 3, 2), (64, 3, 2), (96, 3, 1))):
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                name=f"conv{index + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{index + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pool")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="planted_strided_gap")


def _residual(keras, image_size: int, classes: int):
    """A small ResNet: a stem, three stages of one two-convolution residual block (stride 2), GAP."""
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for stage, filters in enumerate((32, 64, 96), start=1):
        shortcut = layers.Conv2D(filters, 1, strides=2, use_bias=False, name=f"block{stage}_project")(x)
        shortcut = layers.BatchNormalization(name=f"block{stage}_project_bn")(shortcut)
        y = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{stage}_conv1")(x)
        y = layers.ReLU(name=f"block{stage}_relu1")(layers.BatchNormalization(name=f"block{stage}_bn1")(y))
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{stage}_conv2")(y)
        y = layers.BatchNormalization(name=f"block{stage}_bn2")(y)
        x = layers.ReLU(name=f"block{stage}_out")(layers.Add(name=f"block{stage}_add")([shortcut, y]))
    x = layers.GlobalAveragePooling2D(name="global_average_pool")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="planted_residual")


def _flatten_dense(keras, image_size: int, classes: int):
    """Three conv + max-pool stages, then Flatten and a Dense head: every position has its own weights."""
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    for stage, filters in enumerate((32, 48, 64), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{stage}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    x = layers.Dropout(0.3, seed=0, name="dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="planted_flatten_dense")


def _conv3_max(keras, image_size: int, classes: int):
    """Three 3x3 convolutions (no pooling between), global **max** pooling: each class score has one 7x7 window."""
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    for stage, filters in enumerate((16, 32, 32), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{stage}")(x)
    x = layers.GlobalMaxPooling2D(name="global_max_pool")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="zoo_conv3_max")


def _separable(keras, image_size: int, classes: int):
    """MobileNet-like: a strided stem, four depthwise-separable blocks (3x3 depthwise, 1x1 pointwise, BN, ReLU6), GAP."""
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for block, (filters, stride) in enumerate(((32, 1), (48, 2), (64, 2), (96, 1)), start=1):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"block{block}_dw")(x)
        x = layers.ReLU(6.0, name=f"block{block}_dw_relu")(layers.BatchNormalization(name=f"block{block}_dw_bn")(x))
        x = layers.Conv2D(filters, 1, use_bias=False, name=f"block{block}_pw")(x)
        x = layers.ReLU(6.0, name=f"block{block}_pw_relu")(layers.BatchNormalization(name=f"block{block}_pw_bn")(x))
    x = layers.GlobalAveragePooling2D(name="global_average_pool")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="zoo_separable")


def _attention(keras, image_size: int, classes: int, patch: int = 8, width: int = 64):
    """ViT-like: 8x8 patches embedded, a depthwise 3x3 position encoding, two pre-norm transformer blocks, mean token."""
    layers = keras.layers
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Conv2D(width, patch, strides=patch, name="patch_embed")(inputs)
    x = layers.Add(name="position_add")([x, layers.DepthwiseConv2D(3, padding="same", name="position")(x)])
    side = image_size // patch
    x = layers.Reshape((side * side, width), name="tokens")(x)
    for block in (1, 2):
        y = layers.LayerNormalization(name=f"block{block}_norm1")(x)
        y = layers.MultiHeadAttention(4, width // 4, name=f"block{block}_attention")(y, y)
        x = layers.Add(name=f"block{block}_add1")([x, y])
        y = layers.LayerNormalization(name=f"block{block}_norm2")(x)
        y = layers.Dense(2 * width, activation="gelu", name=f"block{block}_mlp1")(y)
        x = layers.Add(name=f"block{block}_add2")([x, layers.Dense(width, name=f"block{block}_mlp2")(y)])
    x = layers.GlobalAveragePooling1D(name="mean_token")(layers.LayerNormalization(name="final_norm")(x))
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="zoo_attention")


def build_planted_model(architecture: str, image_size: int, classes: int):
    """An uncompiled Keras model of one of :data:`ARCHITECTURES`.

    Args:
        architecture: ``cnn_max`` (the demo's CNN: 3x3 convolutions, batch norm,
            max pooling, global max pooling), ``strided_gap`` (strided
            convolutions, batch norm, global average pooling), ``residual`` (a
            small ResNet with global average pooling) or ``flatten_dense``
            (convolutions and max pooling, then Flatten and a Dense head); or
            one of :data:`MORE_ARCHITECTURES`: ``conv3_max`` (three 3x3
            convolutions, global max pooling: sparse gradients), ``separable``
            (MobileNet-like) or ``attention`` (ViT-like).
        image_size: side of the square RGB input.
        classes: number of output classes.

    Returns:
        A ``keras.Model`` ending in ``Dense(classes, activation="softmax", name="predictions")``.
    """
    import keras

    if architecture == "cnn_max":
        return build_demo_model(image_size, classes)
    builders = {"strided_gap": _strided_gap, "residual": _residual, "flatten_dense": _flatten_dense,
                "conv3_max": _conv3_max, "separable": _separable, "attention": _attention}
    if architecture not in builders:
        raise ValueError(f"'architecture' must be one of {', '.join(ARCHITECTURES + MORE_ARCHITECTURES)}; "
                         f"got {architecture!r}.")
    return builders[architecture](keras, image_size, classes)


@contextlib.contextmanager
def _op_determinism():
    """TensorFlow op determinism for the block, restored afterwards.

    It is process-wide and stops XLA from compiling MaxPool gradients, so it
    is on while training only (TensorFlow has no public switch to turn it off:
    use the one behind ``tf.config.experimental.enable_op_determinism``).
    """
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def train_planted_model(architecture: str, images: np.ndarray, labels: np.ndarray, classes: int, *, epochs: int,
                        seed: int = 0, batch_size: int = 32, learning_rate: float = 3e-3):
    """Trains a model of ``architecture`` on uint8 images, deterministically from ``seed``.

    Adam with a cosine learning-rate decay to zero, as the demo model; Keras
    seeded and op determinism on while training, so a re-run on the same
    machine gives the same weights.

    Args:
        architecture: one of :data:`ARCHITECTURES` or :data:`MORE_ARCHITECTURES`.
        images: ``uint8 [N, S, S, 3]``.
        labels: ``int [N]``.
        classes: number of classes.
        epochs: training epochs.
        seed: seed of the weights and of the batch order.
        batch_size: training batch size.
        learning_rate: initial Adam learning rate.

    Returns:
        ``(model, seconds)``: the trained model and the training time.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    with _op_determinism():
        model = build_planted_model(architecture, int(images.shape[1]), classes)
        steps = max(1, epochs * math.ceil(len(labels) / batch_size))
        model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        batches = (tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
                   .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
                   .map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y)).prefetch(2))
        log_epoch = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logger.info(
            "%s epoch %d/%d: loss %.4f, accuracy %.4f.", architecture, epoch + 1, epochs, logs["loss"],
            logs["accuracy"]))
        started = time.perf_counter()
        # shuffle=False: the dataset shuffles itself, with the seed.
        model.fit(batches, epochs=epochs, shuffle=False, verbose=0, callbacks=[log_epoch])
    return model, time.perf_counter() - started


def predict_probabilities(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The model's class probabilities for uint8 images, ``float32 [N, classes]``."""
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.asarray(model.predict(preprocess(images), batch_size=batch_size, verbose=0), np.float32)


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def measure_reliance(model, clean: np.ndarray, labels: np.ndarray, carries: np.ndarray, plant) -> dict:
    """How much the model's predictions depend on the mark, on images whose unmarked version is known.

    * ``remove``: the shortcut class's images that carry the mark in the
      planted set, with the mark and without it (their clean version):
      accuracy and mean shortcut-class probability each way.
    * ``paste``: the other classes' images without the mark, as they are and
      with the mark pasted into its box: the share predicted as the shortcut
      class each way, the mean shortcut-class probability, and ``flipped_share``,
      the share of those not predicted as the shortcut class that the mark
      turns into it.

    The same figures for a model trained on the clean twin show what the mark
    does to a model that never saw it (no reliance: about zero).

    Args:
        model: a Keras model on ``tf``-mode inputs.
        clean: ``uint8 [N, S, S, 3]``, the images without any mark.
        labels: ``int [N]``.
        carries: ``bool [N]``, which images carry the mark in the planted set.
        plant: a :class:`pipelines.demo.planted_tasks.Plant` (mark kind, box, shortcut class).

    Returns:
        ``{"remove": {...}, "paste": {...}, "flipped_share", "accuracy_drop", "verdict", "relies_on_mark"}``;
        ``verdict`` is ``strong`` (flipped share >= 0.5), ``partial`` (>= 0.1) or ``none``.
    """
    target = plant.shortcut_class
    labels, carries = np.asarray(labels), np.asarray(carries, bool)
    removed_set = (labels == target) & carries
    pasted_set = (labels != target) & ~carries
    with_mark = predict_probabilities(model, apply_mark(clean[removed_set], plant.kind, plant.box))
    without_mark = predict_probabilities(model, clean[removed_set])
    before = predict_probabilities(model, clean[pasted_set])
    after = predict_probabilities(model, apply_mark(clean[pasted_set], plant.kind, plant.box))
    remove = {"images": int(removed_set.sum()),
              "accuracy_with_mark": _mean(with_mark.argmax(1) == target),
              "accuracy_without_mark": _mean(without_mark.argmax(1) == target),
              "probability_with_mark": _mean(with_mark[:, target]),
              "probability_without_mark": _mean(without_mark[:, target])}
    not_before = before.argmax(1) != target
    paste = {"images": int(pasted_set.sum()),
             "shortcut_share_without_mark": _mean(before.argmax(1) == target),
             "shortcut_share_with_mark": _mean(after.argmax(1) == target),
             "probability_without_mark": _mean(before[:, target]),
             "probability_with_mark": _mean(after[:, target]),
             "flipped_share": _mean(after.argmax(1)[not_before] == target)}
    flipped = paste["flipped_share"] or 0.0
    drop = None
    if remove["images"]:
        drop = round(remove["accuracy_with_mark"] - remove["accuracy_without_mark"], 4)
    verdict = "strong" if flipped >= RELIANCE_STRONG else "partial" if flipped >= RELIANCE_PARTIAL else "none"
    return {"remove": remove, "paste": paste, "flipped_share": paste["flipped_share"], "accuracy_drop": drop,
            "verdict": verdict, "relies_on_mark": verdict == "strong"}
