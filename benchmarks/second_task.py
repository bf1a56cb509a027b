"""A second generated image task and model, for benchmarks that should not rest on the demo alone.

The task: **the orientation of a grating patch**. Each 64×64 RGB image has a
cluttered background (a colour gradient, a soft blob, pixel noise and 4-8
thin straight strokes at random orientations) and one disc-shaped patch
(radius 8-13 px, anywhere inside the image) filled with a sinusoidal grating
between two random colours. The class is the grating's orientation: 0°, 45°,
90° or 135° (±6° of jitter), with a random period (4-7 px) and phase. The
strokes are oriented too, so the model has to find the periodic patch, not
just any edge. The patch's pixel mask comes with each image.

The model differs from the demo's on purpose: strided convolutions instead of
max pooling, batch normalisation, **global average** pooling (the demo uses
global max pooling), then ``Dense(4, activation="softmax", name="predictions")``.
It takes ``x / 127.5 - 1`` inputs like the demo model.

Everything is seeded: image ``i`` of split ``s`` comes from its own random
stream (``pipelines.demo.demo_records.example_rng``), the weights from
``keras.utils.set_random_seed`` with op determinism on while training.
Results are cached in ``benchmarks/.cache/second_task/`` (gitignored):
``model.keras``, ``test.npz`` (``images`` uint8, ``labels``, ``masks``, ``keys``)
and ``card.json`` (test accuracy, training time); an existing cache is reused.

Example (from the repository root; about 2-3 minutes on 2 CPU cores)::

    python benchmarks/second_task.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipelines.demo.demo_records import example_rng  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "second_task"
CLASS_NAMES = ("0deg", "45deg", "90deg", "135deg")
IMAGE_SIZE = 64
# Bump when the drawing or the training changes, so an old cache is rebuilt.
VERSION = 1


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def draw(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """One example: ``(image uint8 [S, S, 3], patch mask bool [S, S], label)``."""
    rows, cols = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (cols * math.cos(angle) + rows * math.sin(angle)) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    canvas = _colour(rng) * (1 - ramp[..., None]) + _colour(rng) * ramp[..., None]
    centre, width = rng.uniform(0, size, 2), rng.uniform(0.15, 0.3) * size
    blob = rng.uniform(0.3, 0.6) * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width ** 2))
    canvas = canvas * (1 - blob[..., None]) + _colour(rng) * blob[..., None]
    for _ in range(rng.integers(4, 9)):  # thin straight strokes at any orientation
        start = rng.uniform(0, size, 2)
        heading, length = rng.uniform(0, math.pi), rng.uniform(10, 40)
        direction = np.array([math.sin(heading), math.cos(heading)])
        along = np.clip((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1], 0, length)
        distance = np.hypot(rows - start[0] - along * direction[0], cols - start[1] - along * direction[1])
        canvas[distance <= rng.uniform(0.5, 1.0)] = _colour(rng)

    label = int(rng.integers(len(CLASS_NAMES)))
    theta = math.radians(45 * label + rng.uniform(-6, 6))
    radius = rng.uniform(8, 13)
    centre = rng.uniform(radius + 1, size - radius - 1, 2)
    mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2
    # Stripes run along theta: the phase varies across them.
    across = -(cols - centre[1]) * math.sin(theta) + (rows - centre[0]) * math.cos(theta)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * across / rng.uniform(4, 7) + rng.uniform(0, 2 * math.pi))
    first, second = _colour(rng), _colour(rng)
    while np.abs(first - second).max() < 96:  # enough contrast between the stripes
        second = _colour(rng)
    grating = first * (1 - wave[..., None]) + second * wave[..., None]
    canvas[mask] = grating[mask]
    canvas += rng.normal(0.0, rng.uniform(4.0, 10.0), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask, label


def make_split(split: str, count: int, seed: int = 0) -> dict:
    """``count`` examples of ``split``: ``images``, ``masks``, ``labels``, ``keys`` (``"<split>-000042"``)."""
    drawn = [draw(example_rng(seed, split, index)) for index in range(count)]
    return {"images": np.stack([d[0] for d in drawn]), "masks": np.stack([d[1] for d in drawn]),
            "labels": np.array([d[2] for d in drawn], np.int32),
            "keys": np.array([f"{split}-{index:06d}" for index in range(count)])}


def build_model(classes: int = len(CLASS_NAMES), size: int = IMAGE_SIZE):
    """Strided 3×3/5×5 convolutions with batch norm and ReLU, global average pooling, softmax."""
    import keras

    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    for index, (filters, kernel, stride) in enumerate(((24, 5, 2), (32, 3, 1), (48, 3, 2), (64, 3, 2), (96, 3, 1))):
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                name=f"conv{index + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{index + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pool")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="second_task_grating")


def preprocess(images: np.ndarray) -> np.ndarray:
    """``x / 127.5 - 1`` as float32, the demo model's preprocessing."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def train(train_count: int, test_count: int, epochs: int, seed: int) -> dict:
    """Draws the splits, trains and evaluates the model, writes the cache; returns the card."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    started = time.perf_counter()
    train_split, test_split = make_split("train", train_count, seed), make_split("test", test_count, seed)
    drawing_seconds = time.perf_counter() - started
    keras.utils.set_random_seed(seed)
    tf_config.enable_op_determinism()  # this process only trains; the benchmarks load the saved model
    model = build_model()
    batch_size = 32
    steps = epochs * math.ceil(train_count / batch_size)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    batches = (tf.data.Dataset.from_tensor_slices((train_split["images"], train_split["labels"]))
               .shuffle(train_count, seed=seed).batch(batch_size)
               .map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y)).prefetch(2))
    started = time.perf_counter()
    history = model.fit(batches, epochs=epochs, shuffle=False, verbose=2)
    training_seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(preprocess(test_split["images"]), test_split["labels"], batch_size=128, verbose=0)
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save(str(CACHE / "model.keras"))
    np.savez_compressed(CACHE / "test.npz", **test_split)
    card = {"version": VERSION, "seed": seed, "train_count": train_count, "test_count": test_count,
            "epochs": epochs, "batch_size": batch_size, "classes": list(CLASS_NAMES),
            "test_accuracy": round(float(accuracy), 4),
            "train_accuracy_last_epoch": round(float(history.history["accuracy"][-1]), 4),
            "parameters": int(model.count_params()), "drawing_seconds": round(drawing_seconds, 1),
            "training_seconds": round(training_seconds, 1),
            "patch_area_share": round(float(test_split["masks"].mean()), 4)}
    (CACHE / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def ensure(train_count: int = 6000, test_count: int = 256, epochs: int = 8, seed: int = 0,
           force: bool = False) -> dict:
    """The cached card, after training if the cache is missing, stale or ``force``."""
    wanted = {"version": VERSION, "seed": seed, "train_count": train_count, "test_count": test_count,
              "epochs": epochs}
    card_path = CACHE / "card.json"
    if not force and card_path.exists() and (CACHE / "model.keras").exists() and (CACHE / "test.npz").exists():
        card = json.loads(card_path.read_text())
        if all(card.get(name) == value for name, value in wanted.items()):
            return card
    return train(train_count, test_count, epochs, seed)


def load(count: int | None = None):
    """``(model, preprocessed test images [count, 64, 64, 3], keys)`` from the cache (call :func:`ensure` first)."""
    import keras

    model = keras.saving.load_model(str(CACHE / "model.keras"))
    with np.load(CACHE / "test.npz") as data:
        images, keys = data["images"][:count], [str(key) for key in data["keys"][:count]]
    return model, preprocess(images), keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the cache is up to date")
    parser.add_argument("--sheet", help="also save a PNG contact sheet of the first 16 test images here")
    args = parser.parse_args()
    card = ensure(args.train, args.test, args.epochs, args.seed, args.force)
    print(json.dumps(card, indent=2))
    if args.sheet:
        with np.load(CACHE / "test.npz") as data:
            images = data["images"][:16]
        import tensorflow as tf

        sheet = images.reshape(4, 4, IMAGE_SIZE, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
        tf.io.write_file(args.sheet, tf.io.encode_png(sheet.reshape(4 * IMAGE_SIZE, 4 * IMAGE_SIZE, 3)))


if __name__ == "__main__":
    main()
