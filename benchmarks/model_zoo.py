"""A zoo of small models of different families, trained on the project's generated tasks, for calibrating ``samples: auto``.

Saliency maps differ by family: a global **max** pooling head on a small
receptive field makes each noisy gradient sparse (only the window that wins
the max gets gradient), a Flatten + Dense head gives every position its own
weights, attention mixes all patches. A stopping rule tuned on one family must be tested on the
others, so each family here is left out in turn by ``benchmarks/adaptive.py``.

=============  =========  =====================================================
family         task       model
=============  =========  =====================================================
gap            gratings   the model of ``benchmarks/second_task.py`` (strided
                          convolutions, batch norm, global average pooling),
                          reused from its cache
gmp            gratings   ``conv3_max``: three 3x3 convolutions, global max
                          pooling (each noisy gradient reaches one 7x7 window)
demo_cnn       shapes     ``cnn_max``: the demo's CNN (batch norm, max pooling
                          between stages, global max pooling)
flatten_dense  gratings   ``flatten_dense``: conv + max pooling, Flatten, Dense
residual       gratings   ``residual``: a small ResNet with batch norm, GAP
separable      gratings   ``separable``: MobileNet-like depthwise-separable
attention      gratings   ``attention``: ViT-like, 8x8 patches, two blocks
=============  =========  =====================================================

Architectures are :mod:`pipelines.demo.planted_models`' (trained with its
``train_planted_model``), tasks :func:`pipelines.demo.planted_tasks.draw_task`
(``shapes`` is the demo's shapes on clutter, without the planted mark),
drawn from :func:`pipelines.demo.demo_records.example_rng` with the split
names ``zoo-train`` / ``zoo-test``. The global-average-pooling families learn
the gratings, not the small shapes (see ``planted_models``), hence the tasks.
Everything is seeded. The cache is ``benchmarks/.cache/zoo/<family>/``
(gitignored): ``model.keras``, ``test.npz`` and ``card.json`` (test accuracy,
seconds); an existing cache with the same settings is reused.

Example (from the repository root; about 2-5 minutes per family on 2 CPU cores)::

    python benchmarks/model_zoo.py                 # every family
    python benchmarks/model_zoo.py --families gmp
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "zoo"
#: family -> (task, architecture, learning rate, training images, epochs); ``gap`` is ``second_task``'s model.
FAMILIES = {
    "gap": ("gratings", "strided_gap", 3e-3, 6000, 8),
    "gmp": ("gratings", "conv3_max", 3e-3, 3000, 5),
    "demo_cnn": ("shapes", "cnn_max", 3e-3, 4000, 6),
    "flatten_dense": ("gratings", "flatten_dense", 1e-3, 6000, 8),
    "residual": ("gratings", "residual", 3e-3, 4000, 6),
    "separable": ("gratings", "separable", 3e-3, 4000, 6),
    "attention": ("gratings", "attention", 2e-3, 6000, 12),
}
CLASSES, IMAGE_SIZE = 4, 64
# Bump when the drawing or the training changes, so an old cache is rebuilt.
VERSION = 1


def draw_split(task: str, split: str, count: int, seed: int = 0) -> dict:
    """``count`` clean examples of ``task``: ``images`` uint8, ``labels``, ``keys`` (``"zoo-test-000042"``)."""
    from pipelines.demo.demo_records import example_rng
    from pipelines.demo.planted_tasks import draw_task

    drawn = [draw_task(task, example_rng(seed, f"zoo-{split}", index), IMAGE_SIZE, CLASSES) for index in range(count)]
    return {"images": np.stack([d[0] for d in drawn]), "labels": np.array([d[2] for d in drawn], np.int32),
            "keys": np.array([f"zoo-{split}-{index:06d}" for index in range(count)])}


def ensure(family: str, test_count: int = 128, seed: int = 0) -> dict:
    """The family's card, after training it if its cache is missing or stale."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if family == "gap":
        import second_task

        return second_task.ensure()
    task, architecture, learning_rate, train_count, epochs = FAMILIES[family]
    wanted = {"version": VERSION, "family": family, "task": task, "architecture": architecture, "seed": seed,
              "train_count": train_count, "test_count": test_count, "epochs": epochs, "learning_rate": learning_rate}
    folder = CACHE / family
    card_path = folder / "card.json"
    if card_path.exists() and (folder / "model.keras").exists() and (folder / "test.npz").exists():
        card = json.loads(card_path.read_text())
        if all(card.get(name) == value for name, value in wanted.items()):
            return card
    from pipelines.demo.demo_model import preprocess
    from pipelines.demo.planted_models import train_planted_model

    started = time.perf_counter()
    train, test = draw_split(task, "train", train_count, seed), draw_split(task, "test", test_count, seed)
    drawing = time.perf_counter() - started
    model, seconds = train_planted_model(architecture, train["images"], train["labels"], CLASSES, epochs=epochs,
                                         seed=seed, learning_rate=learning_rate)
    predicted = np.argmax(model.predict(preprocess(test["images"]), batch_size=128, verbose=0), axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder / "model.keras"))
    np.savez_compressed(folder / "test.npz", **test)
    card = dict(wanted, test_accuracy=round(float(np.mean(predicted == test["labels"])), 4),
                parameters=int(model.count_params()), drawing_seconds=round(drawing, 1),
                training_seconds=round(seconds, 1))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def load(family: str, count: int | None = None):
    """``(model, preprocessed test images [count, 64, 64, 3], keys)`` of a trained family (call :func:`ensure` first)."""
    import keras

    if family == "gap":
        import second_task

        return second_task.load(count)
    from pipelines.demo.demo_model import preprocess

    model = keras.saving.load_model(str(CACHE / family / "model.keras"))
    with np.load(CACHE / family / "test.npz") as data:
        images, keys = data["images"][:count], [str(key) for key in data["keys"][:count]]
    return model, preprocess(images), keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    for family in args.families.split(","):
        card = ensure(family)
        print(family, json.dumps({key: card.get(key) for key in ("test_accuracy", "parameters", "training_seconds")}),
              flush=True)


if __name__ == "__main__":
    main()
