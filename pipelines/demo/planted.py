"""Planted-shortcut datasets and their clean twins, with a trained model and a ground truth each.

An audit that looks for shortcut learning ("Clever Hans": a copyright tag in a
corner of most horse images, which the model uses instead of the horse) must
be tested on data it was not tuned on. This module makes such data,
deterministically from a seed:

* a labelled image dataset of a task (:data:`pipelines.demo.planted_tasks.TASKS`)
  as TFRecords with the project's default features (``image/encoded`` PNG,
  ``image/class/label``, ``image/id``; also ``image/object_mask`` and
  ``image/shortcut``), split train/test;
* where a small mark (:data:`pipelines.demo.planted_marks.MARK_KINDS`) sits at
  a fixed place on a share (default 0.8) of one class's images, in train and
  test alike, and on a share (default 0) of the other classes' images;
* its **clean twin**: the same images without any mark;
* for each, a model of one of :data:`pipelines.demo.planted_models.ARCHITECTURES`
  trained on the train split, and ``ground_truth.json``: the shortcut class,
  the mark's box, the test keys carrying it, the accuracy and the measured
  reliance on the mark (for the twin the same figures, which show none).

Layout of ``out_dir`` after :func:`make_planted`::

    planted/  train-0000S-of-0000N.tfrecord, test-....tfrecord, model.keras, ground_truth.json
    clean/    the same files for the clean twin

``ground_truth.json`` is written last; a twin folder whose ground truth records
the same parameters is reused as it is.

Command line::

    python -m pipelines.demo.planted --out DIR [--task shapes] [--classes 4] [--image-size 64]
        [--mark patch] [--place top-left | --place Y,X] [--shortcut-class 0] [--share 0.8]
        [--architecture cnn_max] [--train 6000] [--test 256] [--epochs 8] [--seed 0] [--object-contrast 1,1]
        [--twins planted,clean]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from pipelines.demo.demo_records import encode_example, example_rng, shard_paths, split_files
from pipelines.demo.planted_marks import MARK_KINDS, PLACES, default_mark_size, mark_box, parse_place
from pipelines.demo.planted_models import (ARCHITECTURES, measure_reliance, predict_probabilities,
                                           train_planted_model)
from pipelines.demo.planted_tasks import MAX_CLASSES, TASKS, Plant, class_names, draw_planted, shortcut_truth

logger = logging.getLogger(__name__)

GROUND_TRUTH_FILENAME = "ground_truth.json"
MODEL_FILENAME = "model.keras"
TWINS = ("planted", "clean")
# Below this accuracy on unmarked test images the ground truth says the model did not learn the task.
LOW_ACCURACY = 0.8
# Bump when the drawing, the marks or the training change, so cached folders are rebuilt.
# 2: PlantedSpec.object_contrast (objects blended into the background, drawn per image).
VERSION = 2


@dataclasses.dataclass(frozen=True)
class PlantedSpec:
    """One planted-shortcut variant: the task, the mark and the model.

    Attributes:
        task: one of :data:`pipelines.demo.planted_tasks.TASKS`.
        classes: number of classes, 2 to 8.
        image_size: side of the square images, at least 32.
        train: training images.
        test: test images.
        mark: the mark kind, one of :data:`pipelines.demo.planted_marks.MARK_KINDS`.
        place: a corner name of :data:`pipelines.demo.planted_marks.PLACES` or ``(y, x)``, the box's top-left pixel.
        mark_size: the mark's side in pixels (None: an eighth of the image side, at least 5).
        shortcut_class: the class whose images carry the mark.
        share: the share of the shortcut class's images carrying it.
        other_share: the share of the other classes' images carrying it.
        architecture: one of :data:`pipelines.demo.planted_models.ARCHITECTURES`.
        epochs: training epochs.
        seed: seed of the images, the mark decisions and the training.
        object_contrast: ``(low, high)``, 0 to 1: every image's object (of
            every class alike) is drawn with a contrast against the background
            drawn uniformly between them, a share of its full contrast
            (:func:`pipelines.demo.planted_tasks.draw_planted`). The default
            ``(1, 1)`` draws every object at full contrast; a lower ``low``
            makes some objects hard to see, so that the mark, where it is,
            becomes the easier evidence and a model learns to rely on it (with
            full-contrast gratings a model reads the orientation alone and
            ignores the mark).
    """

    task: str = "shapes"
    classes: int = 4
    image_size: int = 64
    train: int = 6000
    test: int = 256
    mark: str = "patch"
    place: object = "top-left"
    mark_size: int | None = None
    shortcut_class: int = 0
    share: float = 0.8
    other_share: float = 0.0
    architecture: str = "cnn_max"
    epochs: int = 8
    seed: int = 0
    object_contrast: tuple = (1.0, 1.0)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"'task' must be one of {', '.join(TASKS)}; got {self.task!r}.")
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"'classes' must be between 2 and {MAX_CLASSES}; got {self.classes!r}.")
        if not 0 <= self.shortcut_class < self.classes:
            raise ValueError(f"'shortcut_class' must be a class (0 to {self.classes - 1}); got {self.shortcut_class!r}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"'architecture' must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}.")
        if self.train < 1 or self.test < 1 or self.epochs < 1:
            raise ValueError(f"'train', 'test' and 'epochs' must be >= 1; got {self.train}, {self.test}, {self.epochs}.")
        contrast = tuple(float(value) for value in self.object_contrast)
        if len(contrast) != 2 or not 0.0 <= contrast[0] <= contrast[1] <= 1.0:
            raise ValueError(f"'object_contrast' must be (low, high) with 0 <= low <= high <= 1; "
                             f"got {self.object_contrast!r}.")
        object.__setattr__(self, "object_contrast", contrast)
        self.plant()  # checks the mark, its place and the shares

    @property
    def size_of_mark(self) -> int:
        """The mark's side in pixels."""
        return self.mark_size or default_mark_size(self.image_size)

    def plant(self) -> Plant:
        """The :class:`pipelines.demo.planted_tasks.Plant` of this variant."""
        return Plant(kind=self.mark, box=mark_box(self.place, self.image_size, self.size_of_mark),
                     shortcut_class=self.shortcut_class, share=self.share, other_share=self.other_share)

    def parameters(self) -> dict:
        """The variant as JSON values (with the generator's version): a cached folder is reused only when they match."""
        values = dataclasses.asdict(self)
        values["place"] = self.place if isinstance(self.place, str) else [int(value) for value in self.place]
        values["object_contrast"] = list(self.object_contrast)
        return {**values, "mark_size": self.size_of_mark, "version": VERSION}


def draw_split(spec: PlantedSpec, split: str, count: int) -> dict[str, np.ndarray]:
    """Draws ``count`` examples of a split, with and without the mark.

    Example ``i`` comes from its own stream ``(seed, split, i)``
    (:func:`pipelines.demo.demo_records.example_rng`), so it does not depend on
    the count or on the other examples.

    Args:
        spec: the variant.
        split: ``"train"`` or ``"test"`` (also the id prefix).
        count: number of examples.

    Returns:
        ``{"image": uint8 [N, S, S, 3] (planted), "clean": uint8 [N, S, S, 3],
        "mask": bool [N, S, S], "label": int64 [N], "carries": bool [N], "id": list of str}``.
    """
    plant = spec.plant()
    drawn = [draw_planted(example_rng(spec.seed, split, index), spec.task, spec.image_size, spec.classes, plant,
                          spec.object_contrast) for index in range(count)]
    return {"image": np.stack([example.image for example in drawn]),
            "clean": np.stack([example.clean for example in drawn]),
            "mask": np.stack([example.mask for example in drawn]),
            "label": np.array([example.label for example in drawn], np.int64),
            "carries": np.array([example.carries for example in drawn], bool),
            "id": [f"{split}-{index:06d}" for index in range(count)]}


def write_split(out_dir: str, split: str, data: dict, twin: str, shards: int = 1) -> list[str]:
    """Writes one split of one twin as TFRecords; ``{split}-SSSSS-of-NNNNN.tfrecord``, contiguous ranges.

    Args:
        out_dir: the twin's folder (created if missing).
        split: the split name.
        data: the split from :func:`draw_split`.
        twin: ``"planted"`` (marked images, ``image/shortcut`` as drawn) or
            ``"clean"`` (clean images, ``image/shortcut`` 0).
        shards: number of files.

    Returns:
        The paths written.
    """
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    # A pattern such as test-*.tfrecord must never mix two generations.
    for stale in split_files(out_dir, split):
        os.remove(stale)
    images = data["image"] if twin == "planted" else data["clean"]
    count = len(data["label"])
    paths = shard_paths(out_dir, split, shards)
    for shard, path in enumerate(paths):
        with tf.io.TFRecordWriter(path + ".partial") as writer:
            for index in range(shard * count // shards, (shard + 1) * count // shards):
                carries = bool(data["carries"][index]) and twin == "planted"
                writer.write(encode_example(images[index], data["mask"][index], int(data["label"][index]),
                                            data["id"][index], shortcut=carries))
        os.replace(path + ".partial", path)
    return paths


def _read_truth(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, GROUND_TRUTH_FILENAME), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _is_complete(folder: str, truth: dict | None, parameters: dict) -> bool:
    if truth is None or truth.get("parameters") != parameters:
        return False
    names = [MODEL_FILENAME] + truth.get("files", {}).get("train", []) + truth.get("files", {}).get("test", [])
    return all(os.path.isfile(os.path.join(folder, name)) for name in names)


def _make_twin(spec: PlantedSpec, folder: str, twin: str, train: dict, test: dict) -> dict:
    """Writes one twin's records, trains its model, measures it, writes its ground truth (last)."""
    truth_path = os.path.join(folder, GROUND_TRUTH_FILENAME)
    if os.path.exists(truth_path):
        os.remove(truth_path)  # until the new one is written, the folder is incomplete
    files = {split: write_split(folder, split, data, twin, shards=min(2, len(data["label"])) if split == "train" else 1)
             for split, data in (("train", train), ("test", test))}
    pixels = "image" if twin == "planted" else "clean"
    model, seconds = train_planted_model(spec.architecture, train[pixels], train["label"], spec.classes,
                                         epochs=spec.epochs, seed=spec.seed)
    model.save(os.path.join(folder, MODEL_FILENAME))
    plant = spec.plant()
    accuracy = float((predict_probabilities(model, test[pixels]).argmax(1) == test["label"]).mean())
    clean_accuracy = float((predict_probabilities(model, test["clean"]).argmax(1) == test["label"]).mean())
    reliance = measure_reliance(model, test["clean"], test["label"], test["carries"], plant)
    carries = {split: data["carries"] & (twin == "planted") for split, data in (("train", train), ("test", test))}
    more = {"task": spec.task, "classes": spec.classes, "class_names": class_names(spec.task, spec.classes),
            "image_size": spec.image_size, "architecture": spec.architecture, "seed": spec.seed, "twin": twin,
            "mark_place": spec.parameters()["place"], "test_accuracy": round(accuracy, 4),
            "test_accuracy_without_marks": round(clean_accuracy, 4), "reliance": reliance,
            "training_seconds": round(seconds, 1), "parameters": spec.parameters(), "model": MODEL_FILENAME,
            "files": {split: [os.path.basename(path) for path in paths] for split, paths in files.items()},
            "feature_keys": {"image": "image/encoded", "label": "image/class/label", "id": "image/id",
                             "mask": "image/object_mask", "shortcut": "image/shortcut"}}
    if twin == "clean":
        # The twin's reliance is measured on the images that carry the mark in the planted set.
        more["mark_keys_in_planted"] = [key for key, flag in zip(test["id"], test["carries"]) if flag]
    notes = []
    if twin == "planted" and not reliance["relies_on_mark"]:
        notes.append(f"this model does not rely strongly on the mark: pasting it turns only "
                     f"{reliance['flipped_share']} of the other classes' test images into the shortcut class "
                     f"(verdict {reliance['verdict']}).")
    if clean_accuracy < LOW_ACCURACY:
        notes.append(f"this model did not learn the task well: test accuracy {clean_accuracy:.3f} on the images "
                     f"without marks (chance {1 / spec.classes:.3f}).")
    if notes:
        more["note"] = " ".join(notes)
        logger.warning("%s: %s", folder, more["note"])
    truth = shortcut_truth(plant, more["class_names"], test["id"], carries["test"], carries["train"], **more)
    with open(truth_path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(truth, handle, indent=2)
        handle.write("\n")
    os.replace(truth_path + ".partial", truth_path)
    logger.info("%s: test accuracy %.3f, flipped share %s (%s), %.0f s of training.", folder, accuracy,
                reliance["flipped_share"], reliance["verdict"], seconds)
    return truth


def make_planted(spec: PlantedSpec, out_dir: str, twins: Sequence[str] = TWINS, force: bool = False) -> dict:
    """Makes the planted dataset and/or its clean twin in ``out_dir``, each with its model and ground truth.

    Args:
        spec: the variant.
        out_dir: the folder; the twins go to ``out_dir/planted`` and ``out_dir/clean``.
        twins: which of ``"planted"`` and ``"clean"`` to make.
        force: remake even when a twin's ground truth records the same parameters.

    Returns:
        ``{twin: ground truth dict}``, each with ``"regenerated"`` telling whether this call wrote it.
    """
    unknown = set(twins) - set(TWINS)
    if unknown:
        raise ValueError(f"'twins' are among {', '.join(TWINS)}; got {sorted(unknown)}.")
    parameters, results, missing = spec.parameters(), {}, []
    for twin in twins:
        folder = os.path.join(out_dir, twin)
        truth = _read_truth(folder)
        if not force and _is_complete(folder, truth, parameters):
            results[twin] = {**truth, "regenerated": False}
        else:
            missing.append(twin)
    if missing:
        started = time.perf_counter()
        train, test = draw_split(spec, "train", spec.train), draw_split(spec, "test", spec.test)
        logger.info("Drew %d + %d %s images in %.1f s.", spec.train, spec.test, spec.task,
                    time.perf_counter() - started)
        for twin in missing:
            results[twin] = {**_make_twin(spec, os.path.join(out_dir, twin), twin, train, test), "regenerated": True}
    return results


def _parser() -> argparse.ArgumentParser:
    defaults = PlantedSpec()
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo.planted",
                                     description="Make a planted-shortcut dataset, its clean twin, their models and "
                                                 "ground truths.")
    parser.add_argument("--out", required=True, help="output folder (gets planted/ and clean/)")
    parser.add_argument("--task", choices=TASKS, default=defaults.task)
    parser.add_argument("--classes", type=int, default=defaults.classes, help="2 to 8 (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--train", type=int, default=defaults.train, help="training images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=defaults.test, help="test images (default: %(default)s)")
    parser.add_argument("--mark", choices=MARK_KINDS, default=defaults.mark)
    parser.add_argument("--place", default=defaults.place, help=f"one of {', '.join(PLACES)} or Y,X (the box's "
                                                                "top-left pixel; default: %(default)s)")
    parser.add_argument("--mark-size", type=int, default=None, help="mark side in pixels (default: image side / 8)")
    parser.add_argument("--shortcut-class", type=int, default=defaults.shortcut_class)
    parser.add_argument("--share", type=float, default=defaults.share,
                        help="share of the shortcut class's images with the mark (default: %(default)s)")
    parser.add_argument("--other-share", type=float, default=defaults.other_share,
                        help="share of the other classes' images with the mark (default: %(default)s)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=defaults.architecture)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--object-contrast", default="1,1",
                        help="LOW,HIGH (or one value): each object's contrast against the background, drawn per "
                             "image between them, 0 to 1 (default: %(default)s, full contrast)")
    parser.add_argument("--twins", default=",".join(TWINS), help="which to make: planted, clean or both")
    parser.add_argument("--force", action="store_true", help="remake even if the folders are up to date")
    return parser


def _parse_contrast(text: str) -> tuple[float, float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"'--object-contrast' is LOW,HIGH or one value; got {text!r}.") from None
    if len(values) not in (1, 2):
        raise ValueError(f"'--object-contrast' is LOW,HIGH or one value; got {text!r}.")
    return (values[0], values[-1])


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: ``python -m pipelines.demo.planted --out DIR [options]``; prints each twin's summary."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = PlantedSpec(task=args.task, classes=args.classes, image_size=args.image_size, train=args.train,
                           test=args.test, mark=args.mark, place=parse_place(args.place), mark_size=args.mark_size,
                           shortcut_class=args.shortcut_class, share=args.share, other_share=args.other_share,
                           architecture=args.architecture, epochs=args.epochs, seed=args.seed,
                           object_contrast=_parse_contrast(args.object_contrast))
        results = make_planted(spec, args.out, [twin.strip() for twin in args.twins.split(",") if twin.strip()],
                               force=args.force)
    except ValueError as error:
        parser.error(str(error))
    for twin, truth in results.items():
        print(f"{twin}: box {truth['box']}, class {truth['shortcut_class']}, {len(truth['planted_keys'])} marked test "
              f"records, test accuracy {truth['test_accuracy']}, flipped share {truth['reliance']['flipped_share']} "
              f"({truth['reliance']['verdict']})")
    return results


if __name__ == "__main__":
    main()
