"""The demo dataset on disk: sharded TFRecords of PNG images with object masks.

Each record is a ``tf.train.Example`` with ``image/encoded`` (RGB PNG),
``image/format`` (``b"png"``), ``image/class/label`` (int64),
``image/object_mask`` (single-channel PNG, 255 on the object, 0 elsewhere),
``image/id`` (``b"test-000042"``), ``image/height``, ``image/width`` and
``image/shortcut`` (int64, 1 when the image carries the planted shortcut mark).

The demo plants a shortcut (:func:`demo_plant`): a "©"-like tag in the
bottom-right corner of 80 % of the triangles, train and test alike, and of no
other image; the objects stay off the tag's box, so ``image/object_mask`` is
still exactly the object. A model can then call a triangle from the tag alone,
which is what an audit must find.

Every image is drawn from its own random stream, seeded by
``(seed, split, index)``, so the bytes do not depend on sharding and the train
and test splits never share a stream.
"""

from __future__ import annotations

import glob
import logging
import os
import zlib

import numpy as np
import tensorflow as tf

from pipelines.demo.demo_drawing import CLASS_NAMES
from pipelines.demo.planted_marks import default_mark_size, mark_box
from pipelines.demo.planted_tasks import Plant, PlantedExample, draw_planted

logger = logging.getLogger(__name__)

FEATURE_KEYS = {
    "image": "image/encoded",
    "format": "image/format",
    "label": "image/class/label",
    "mask": "image/object_mask",
    "id": "image/id",
    "height": "image/height",
    "width": "image/width",
    "shortcut": "image/shortcut",
}

# The demo's planted shortcut (see the module docstring).
DEMO_SHORTCUT_CLASS = CLASS_NAMES.index("triangle")
DEMO_MARK = "ring"
DEMO_PLACE = "bottom-right"
DEMO_SHARE = 0.8


def demo_plant(image_size: int = 64) -> Plant:
    """The demo's shortcut: the mark, its box for this image size, the class and the share carrying it."""
    box = mark_box(DEMO_PLACE, image_size, default_mark_size(image_size))
    return Plant(kind=DEMO_MARK, box=box, shortcut_class=DEMO_SHORTCUT_CLASS, share=DEMO_SHARE)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one example: it depends on (seed, split, index) only."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def shard_paths(out_dir: str, split: str, shards: int) -> list[str]:
    """The TFRecord paths of a split: ``{split}-{i:05d}-of-{n:05d}.tfrecord``."""
    return [os.path.join(out_dir, f"{split}-{shard:05d}-of-{shards:05d}.tfrecord") for shard in range(shards)]


def _bytes_feature(value: bytes) -> tf.train.Feature:
    """A feature holding one byte string."""
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value: int) -> tf.train.Feature:
    """A feature holding one int64."""
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def draw_demo_example(seed: int, split: str, index: int, image_size: int = 64) -> PlantedExample:
    """Draws demo example ``index`` of ``split``: the object, its mask, its label, and the shortcut mark if it carries it.

    Args:
        seed: global seed.
        split: split name; with ``seed`` and ``index`` it seeds the example's stream.
        index: the example's index in its split.
        image_size: image side in pixels.

    Returns:
        A :class:`pipelines.demo.planted_tasks.PlantedExample` (``.image`` as written, ``.clean`` without the mark).
    """
    return draw_planted(example_rng(seed, split, index), "shapes", image_size, len(CLASS_NAMES),
                        demo_plant(image_size))


def encode_example(image: np.ndarray, mask: np.ndarray, label: int, example_id: str,
                   shortcut: bool | None = None) -> bytes:
    """Serialises one example as a ``tf.train.Example`` (PNG image and PNG mask).

    Args:
        image: ``uint8 [H, W, 3]``.
        mask: ``bool [H, W]``, the object's pixels.
        label: the class.
        example_id: the ``image/id`` value.
        shortcut: whether the image carries a planted mark (``image/shortcut``), or None to leave the feature out.

    Returns:
        The serialised example (deterministic bytes).
    """
    height, width = mask.shape
    mask_png = tf.io.encode_png(mask.astype(np.uint8)[..., None] * np.uint8(255)).numpy()
    features = {
        FEATURE_KEYS["image"]: _bytes_feature(tf.io.encode_png(image).numpy()),
        FEATURE_KEYS["format"]: _bytes_feature(b"png"),
        FEATURE_KEYS["label"]: _int_feature(label),
        FEATURE_KEYS["mask"]: _bytes_feature(mask_png),
        FEATURE_KEYS["id"]: _bytes_feature(example_id.encode("utf-8")),
        FEATURE_KEYS["height"]: _int_feature(height),
        FEATURE_KEYS["width"]: _int_feature(width),
    }
    if shortcut is not None:
        features[FEATURE_KEYS["shortcut"]] = _int_feature(int(bool(shortcut)))
    example = tf.train.Example(features=tf.train.Features(feature=features))
    # The feature map's order otherwise changes between processes (string hash
    # seed): deterministic=True sorts it, so a re-run writes the same bytes.
    return example.SerializeToString(deterministic=True)


def write_dataset(out_dir: str, split: str, count: int, seed: int, image_size: int = 64,
                  shards: int = 1) -> list[str]:
    """Writes ``count`` demo examples of one split as sharded TFRecords.

    Example ``i`` is drawn from :func:`example_rng` ``(seed, split, i)`` and goes
    to shard ``i * shards // count`` (contiguous ranges). Same arguments, same
    bytes. Each file is written under a temporary name and renamed when
    complete; older ``{split}-*-of-*.tfrecord`` files in ``out_dir`` are removed
    so a pattern never mixes two generations.

    Args:
        out_dir: folder to write into (created if missing).
        split: split name, e.g. ``"train"`` or ``"test"``; also the id prefix.
        count: number of examples, >= 1.
        seed: global seed.
        image_size: image side in pixels.
        shards: number of files, 1 <= shards <= count.

    Returns:
        The paths written, in shard order.

    Example:

    >>> write_dataset("/tmp/demo", "test", count=20, seed=0, shards=2)
    ['/tmp/demo/test-00000-of-00002.tfrecord', '/tmp/demo/test-00001-of-00002.tfrecord']
    """
    if count < 1:
        raise ValueError(f"'count' must be >= 1; got {count!r}.")
    if not 1 <= shards <= count:
        raise ValueError(f"'shards' must be between 1 and count={count}; got {shards!r}.")
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(split)}-*-of-*.tfrecord")):
        os.remove(stale)
    paths = shard_paths(out_dir, split, shards)
    for shard, path in enumerate(paths):
        first, stop = shard * count // shards, (shard + 1) * count // shards
        partial = path + ".partial"
        with tf.io.TFRecordWriter(partial) as writer:
            for index in range(first, stop):
                drawn = draw_demo_example(seed, split, index, image_size)
                writer.write(encode_example(drawn.image, drawn.mask, drawn.label, f"{split}-{index:06d}",
                                            shortcut=drawn.carries))
        os.replace(partial, path)
    logger.info("Wrote %d %s examples to %d file(s) in %s.", count, split, shards, out_dir)
    return paths


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one demo record: ``image`` uint8 [H, W, 3], ``mask`` bool [H, W], ``label``, ``id``, ``shortcut``."""
    parsed = tf.io.parse_single_example(serialized, {
        FEATURE_KEYS["image"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_KEYS["label"]: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_KEYS["mask"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_KEYS["id"]: tf.io.FixedLenFeature([], tf.string),
        FEATURE_KEYS["shortcut"]: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    })
    return {
        "image": tf.io.decode_png(parsed[FEATURE_KEYS["image"]], channels=3),
        "mask": tf.io.decode_png(parsed[FEATURE_KEYS["mask"]], channels=1)[..., 0] > 127,
        "label": parsed[FEATURE_KEYS["label"]],
        "id": parsed[FEATURE_KEYS["id"]],
        "shortcut": parsed[FEATURE_KEYS["shortcut"]],
    }


def split_files(data_dir: str, split: str) -> list[str]:
    """The TFRecord files of a split in ``data_dir``, sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{glob.escape(split)}-*-of-*.tfrecord")))


def load_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """Reads a whole split back into numpy arrays.

    Returns:
        ``{"image": uint8 [N, H, W, 3], "mask": bool [N, H, W], "label": int64 [N],
        "id": object [N] of bytes, "shortcut": bool [N]}`` in file and record order.
    """
    files = split_files(data_dir, split)
    if not files:
        raise FileNotFoundError(f"No '{split}-*-of-*.tfrecord' files in {data_dir!r}; "
                                f"run `python -m pipelines.demo --out {data_dir}` first.")
    columns: dict[str, list] = {"image": [], "mask": [], "label": [], "id": [], "shortcut": []}
    for record in tf.data.TFRecordDataset(files).map(parse_example):
        for name, value in record.items():
            columns[name].append(value.numpy())
    return {"image": np.stack(columns["image"]), "mask": np.stack(columns["mask"]),
            "label": np.asarray(columns["label"], dtype=np.int64), "id": np.asarray(columns["id"], dtype=object),
            "shortcut": np.asarray(columns["shortcut"], dtype=bool)}
