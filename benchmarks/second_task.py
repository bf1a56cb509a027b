"""A second generated image task and model, for benchmarks that should not rest on the demo alone.

The task: **the orientation of a grating patch**. Each 64×64 RGB image has a
cluttered background (a colour gradient, a soft blob, pixel noise and 4-8
thin straight strokes at random orientations) and one disc-shaped patch
(radius 8-13 px, anywhere inside the image) filled with a sinusoidal grating
between two random colours. The class is the grating's orientation: 0°, 45°,
90° or 135° (±6° of jitter), with a random period (4-7 px) and phase. The
strokes are oriented too, so the model has to find the periodic patch, not
just any edge. The patch's pixel mask comes with each image. The drawing is
``pipelines.demo.planted_tasks.draw_grating`` (4 classes, full contrast, no
mark), the model ``strided_gap`` of ``pipelines.demo.planted_models``.

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
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipelines.demo.demo_model import preprocess  # noqa: E402
from pipelines.demo.demo_records import example_rng  # noqa: E402
from pipelines.demo.planted_models import build_planted_model, predict_probabilities, train_planted_model  # noqa: E402
from pipelines.demo.planted_tasks import draw_grating  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "second_task"
CLASS_NAMES = ("0deg", "45deg", "90deg", "135deg")
IMAGE_SIZE = 64
# Bump when the drawing or the training changes, so an old cache is rebuilt.
# 2: the drawing, model and training of pipelines.demo.planted_* (strokes 9.6-38.4 px long instead of 10-40,
#    periods 4-7.1 px instead of 4-7; the same layers and training).
VERSION = 2


def draw(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """One example: ``(image uint8 [S, S, 3], patch mask bool [S, S], label)``
    (:func:`pipelines.demo.planted_tasks.draw_grating` with four orientations)."""
    return draw_grating(rng, size, len(CLASS_NAMES))


def make_split(split: str, count: int, seed: int = 0) -> dict:
    """``count`` examples of ``split``: ``images``, ``masks``, ``labels``, ``keys`` (``"<split>-000042"``)."""
    drawn = [draw(example_rng(seed, split, index)) for index in range(count)]
    return {"images": np.stack([d[0] for d in drawn]), "masks": np.stack([d[1] for d in drawn]),
            "labels": np.array([d[2] for d in drawn], np.int32),
            "keys": np.array([f"{split}-{index:06d}" for index in range(count)])}


def build_model(classes: int = len(CLASS_NAMES), size: int = IMAGE_SIZE):
    """Strided 3×3/5×5 convolutions with batch norm and ReLU, global average pooling, softmax
    (``strided_gap`` of :mod:`pipelines.demo.planted_models`)."""
    return build_planted_model("strided_gap", size, classes)


def train(train_count: int, test_count: int, epochs: int, seed: int) -> dict:
    """Draws the splits, trains and evaluates the model, writes the cache; returns the card."""
    started = time.perf_counter()
    train_split, test_split = make_split("train", train_count, seed), make_split("test", test_count, seed)
    drawing_seconds = time.perf_counter() - started
    batch_size = 32
    model, training_seconds = train_planted_model("strided_gap", train_split["images"], train_split["labels"],
                                                  len(CLASS_NAMES), epochs=epochs, seed=seed, batch_size=batch_size)
    accuracy = float((predict_probabilities(model, test_split["images"]).argmax(1) == test_split["labels"]).mean())
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save(str(CACHE / "model.keras"))
    np.savez_compressed(CACHE / "test.npz", **test_split)
    card = {"version": VERSION, "seed": seed, "train_count": train_count, "test_count": test_count,
            "epochs": epochs, "batch_size": batch_size, "classes": list(CLASS_NAMES),
            "test_accuracy": round(accuracy, 4), "parameters": int(model.count_params()),
            "drawing_seconds": round(drawing_seconds, 1), "training_seconds": round(training_seconds, 1),
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
