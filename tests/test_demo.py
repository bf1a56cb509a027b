"""Tests of the demo dataset generator and demo model (pipelines/demo/)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

from pipelines.demo import demo, demo_drawing

# Rasterisation rounds the designed 3-8% area share a little either way.
AREA_SHARE_BOUNDS = (0.025, 0.09)


def _connected_components(mask: np.ndarray) -> int:
    """Number of 8-connected blobs in a boolean mask (plain breadth-first search)."""
    seen = np.zeros_like(mask, dtype=bool)
    blobs = 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs += 1
        seen[start] = True
        queue = collections.deque([start])
        while queue:
            row, col = queue.popleft()
            for d_row in (-1, 0, 1):
                for d_col in (-1, 0, 1):
                    near = (row + d_row, col + d_col)
                    if 0 <= near[0] < height and 0 <= near[1] < width and mask[near] and not seen[near]:
                        seen[near] = True
                        queue.append(near)
    return blobs


@pytest.mark.parametrize("index", range(40))
def test_the_object_is_exactly_where_the_image_differs_from_its_background(index):
    layers = demo.draw_layers(demo.example_rng(0, "test", index), 64)
    image = layers.composite()

    differs = (image != layers.background).any(axis=-1)
    np.testing.assert_array_equal(differs, layers.mask)
    assert (image[layers.mask] == layers.colour).all()
    contrast = np.abs(layers.background[layers.mask].astype(int) - layers.colour.astype(int)).max(axis=1)
    assert contrast.min() >= demo.MIN_CONTRAST


@pytest.mark.parametrize("index", range(40))
def test_the_mask_is_one_blob_of_the_designed_size_fully_inside_the_image(index):
    image, mask, label = demo.draw_example(demo.example_rng(3, "train", index), 64)

    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert 0 <= label < len(demo.CLASS_NAMES)
    assert AREA_SHARE_BOUNDS[0] <= mask.mean() <= AREA_SHARE_BOUNDS[1]
    assert _connected_components(mask) == 1
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert not border.any()


def test_draw_example_is_the_composite_of_draw_layers_and_is_deterministic():
    layers = demo.draw_layers(np.random.default_rng(11), 48)
    image, mask, label = demo.draw_example(np.random.default_rng(11), 48)
    other_image, _, _ = demo.draw_example(np.random.default_rng(12), 48)

    np.testing.assert_array_equal(image, layers.composite())
    np.testing.assert_array_equal(mask, layers.mask)
    assert label == layers.label
    assert not np.array_equal(image, other_image)


def test_every_class_is_drawn_and_the_shapes_of_two_classes_differ():
    labels = [demo.draw_example(demo.example_rng(0, "train", index), 64)[2] for index in range(60)]

    assert sorted(set(labels)) == list(range(len(demo.CLASS_NAMES)))
    # Same centre, size and angle: two different classes cover different pixels.
    rows, cols = demo_drawing._pixel_grid(64)
    masks = [demo_drawing._shape_mask(label, (32, 32), 10.0, 0.3, rows, cols) for label in range(len(demo.CLASS_NAMES))]
    for first in range(len(masks)):
        for second in range(first + 1, len(masks)):
            assert not np.array_equal(masks[first], masks[second])


def test_draw_example_rejects_a_tiny_image():
    with pytest.raises(ValueError, match="'image_size' must be an integer >= 32"):
        demo.draw_example(np.random.default_rng(0), 16)


def _read_bytes(paths):
    contents = []
    for path in paths:
        with open(path, "rb") as handle:
            contents.append(handle.read())
    return contents


def test_write_dataset_is_deterministic_and_depends_on_seed_and_split(tmp_path):
    first = demo.write_dataset(str(tmp_path / "a"), "test", count=10, seed=5, image_size=32, shards=2)
    again = demo.write_dataset(str(tmp_path / "b"), "test", count=10, seed=5, image_size=32, shards=2)
    other_seed = demo.write_dataset(str(tmp_path / "c"), "test", count=10, seed=6, image_size=32, shards=2)
    demo.write_dataset(str(tmp_path / "d"), "train", count=10, seed=5, image_size=32, shards=2)

    assert [os.path.basename(path) for path in first] == ["test-00000-of-00002.tfrecord",
                                                         "test-00001-of-00002.tfrecord"]
    assert _read_bytes(first) == _read_bytes(again)
    assert _read_bytes(first) != _read_bytes(other_seed)
    test_images = demo.load_split(str(tmp_path / "a"), "test")["image"]
    train_images = demo.load_split(str(tmp_path / "d"), "train")["image"]
    assert not any(np.array_equal(test, train) for test in test_images for train in train_images)


def test_write_dataset_writes_the_same_bytes_in_another_process(tmp_path):
    # Another process has another string hash seed, which reorders protobuf
    # maps unless they are serialised deterministically.
    script = ("import sys, hashlib; from pipelines.demo import demo; "
              "paths = demo.write_dataset(sys.argv[1], 'test', count=3, seed=0, image_size=32); "
              "print(hashlib.sha256(open(paths[0], 'rb').read()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = []
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed, "TF_CPP_MIN_LOG_LEVEL": "3",
                       "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        finished = subprocess.run([sys.executable, "-c", script, str(tmp_path / hash_seed)], env=environment,
                                  capture_output=True, text=True, check=True)
        digests.append(finished.stdout.split()[-1])

    here = demo.write_dataset(str(tmp_path / "here"), "test", count=3, seed=0, image_size=32)
    with open(here[0], "rb") as handle:
        digests.append(hashlib.sha256(handle.read()).hexdigest())
    assert len(set(digests)) == 1


def test_sharding_does_not_change_the_examples(tmp_path):
    one_file = demo.write_dataset(str(tmp_path / "one"), "test", count=7, seed=1, image_size=32, shards=1)
    three_files = demo.write_dataset(str(tmp_path / "three"), "test", count=7, seed=1, image_size=32, shards=3)

    records_one = [record.numpy() for record in tf.data.TFRecordDataset(one_file)]
    records_three = [record.numpy() for record in tf.data.TFRecordDataset(three_files)]
    assert records_one == records_three
    assert [sum(1 for _ in tf.data.TFRecordDataset(path)) for path in three_files] == [2, 2, 3]


def test_rewriting_a_split_removes_its_older_shards(tmp_path):
    demo.write_dataset(str(tmp_path), "test", count=6, seed=0, image_size=32, shards=3)
    demo.write_dataset(str(tmp_path), "train", count=4, seed=0, image_size=32, shards=2)
    demo.write_dataset(str(tmp_path), "test", count=6, seed=0, image_size=32, shards=2)

    assert sorted(os.listdir(tmp_path)) == ["test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
                                            "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]


def test_records_round_trip_with_every_feature(tmp_path):
    paths = demo.write_dataset(str(tmp_path), "test", count=20, seed=0, image_size=64, shards=2)
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/object_mask": tf.io.FixedLenFeature([], tf.string),
        "image/id": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/shortcut": tf.io.FixedLenFeature([], tf.int64),
    }

    ids = []
    for index, record in enumerate(tf.data.TFRecordDataset(paths)):
        parsed = tf.io.parse_single_example(record, spec)
        image = tf.io.decode_png(parsed["image/encoded"]).numpy()
        mask = tf.io.decode_png(parsed["image/object_mask"]).numpy()
        label = int(parsed["image/class/label"])
        assert image.shape == (64, 64, 3)
        assert mask.shape == (64, 64, 1)
        assert set(np.unique(mask)) <= {0, 255}
        assert parsed["image/format"].numpy() == b"png"
        assert (int(parsed["image/height"]), int(parsed["image/width"])) == (64, 64)
        assert 0 <= label < len(demo.CLASS_NAMES)
        assert AREA_SHARE_BOUNDS[0] <= (mask == 255).mean() <= AREA_SHARE_BOUNDS[1]
        # PNG is lossless: the records hold exactly what the generator drew.
        drawn = demo.draw_demo_example(0, "test", index, 64)
        np.testing.assert_array_equal(image, drawn.image)
        np.testing.assert_array_equal(mask[..., 0] == 255, drawn.mask)
        assert label == drawn.label
        assert int(parsed["image/shortcut"]) == drawn.carries
        ids.append(parsed["image/id"].numpy())

    assert ids == [f"test-{index:06d}".encode() for index in range(20)]
    assert len(set(ids)) == 20
    loaded = demo.load_split(str(tmp_path), "test")
    assert loaded["image"].shape == (20, 64, 64, 3) and loaded["mask"].dtype == bool
    assert list(loaded["id"]) == ids
    assert loaded["shortcut"].dtype == bool and loaded["shortcut"].any()


def test_the_demo_plants_its_tag_on_most_triangles_only_and_off_the_objects():
    plant = demo.demo_plant(64)
    assert plant.box == (54, 54, 62, 62) and plant.kind == "ring"
    assert demo.CLASS_NAMES[plant.shortcut_class] == "triangle"
    outside = np.ones((64, 64), bool)
    outside[54:62, 54:62] = False
    carried = collections.Counter()
    for index in range(400):
        drawn = demo.draw_demo_example(0, "train", index, 64)
        carried[drawn.label, drawn.carries] += 1
        np.testing.assert_array_equal(drawn.image[outside], drawn.clean[outside])
        assert (drawn.image != drawn.clean).any() == drawn.carries
        assert not drawn.mask[53:63, 53:63].any()  # the object keeps a pixel off the tag's box
        # Without the tag, the image is the object on its background, as before.
        assert drawn.label == demo.draw_layers(demo.example_rng(0, "train", index), 64, keep_out=plant.box).label
    triangles = carried[plant.shortcut_class, True] + carried[plant.shortcut_class, False]
    assert 0.7 <= carried[plant.shortcut_class, True] / triangles <= 0.9, carried
    assert sum(count for (label, carries), count in carried.items() if carries and label != plant.shortcut_class) == 0


def test_load_split_without_files_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pipelines.demo"):
        demo.load_split(str(tmp_path), "train")


def test_the_model_ends_in_softmax_and_survives_a_safe_mode_round_trip(tmp_path):
    model = demo.build_model(32, classes=4)
    last = model.layers[-1]
    images = demo.preprocess(np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8))

    assert last.name == "predictions"
    assert keras.activations.serialize(last.activation) == "softmax"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 4)
    assert images.min() >= -1.0 and images.max() <= 1.0
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), probabilities, rtol=1e-5, atol=1e-6)


def test_ensure_demo_makes_everything_once_then_only_on_a_change(tmp_path):
    out_dir = str(tmp_path / "demo")
    options = dict(seed=0, train=16, test=8, image_size=32, epochs=1)

    card = demo.ensure_demo(out_dir, **options)
    assert card["regenerated"] is True
    expected = {"demo_card.json", "ground_truth.json", "model.keras", "test-00000-of-00002.tfrecord",
                "test-00001-of-00002.tfrecord"}
    expected |= {f"train-{shard:05d}-of-00004.tfrecord" for shard in range(4)}
    assert set(os.listdir(out_dir)) == expected
    assert (card["train_count"], card["test_count"], card["image_size"]) == (16, 8, 32)
    assert 0.0 <= card["test_accuracy"] <= 1.0
    assert AREA_SHARE_BOUNDS[0] <= card["object_area_share"]["mean"] <= AREA_SHARE_BOUNDS[1]
    assert card["versions"]["tensorflow"] == tf.__version__
    assert card["versions"]["keras"] == keras.__version__
    with open(os.path.join(out_dir, "ground_truth.json"), encoding="utf-8") as handle:
        truth = json.load(handle)
    test = demo.load_split(out_dir, "test")
    assert truth["box"] == [25, 25, 30, 30] == list(demo.demo_plant(32).box) and truth["shortcut_class"] == 2
    assert truth["planted_keys"] == [key.decode() for key, carries in zip(test["id"], test["shortcut"]) if carries]
    assert set(truth["reliance"]) >= {"remove", "paste", "flipped_share", "verdict"}
    assert card["shortcut"]["box"] == truth["box"]
    modified = {name: os.stat(os.path.join(out_dir, name)).st_mtime_ns for name in expected}

    assert demo.ensure_demo(out_dir, **options)["regenerated"] is False
    assert {name: os.stat(os.path.join(out_dir, name)).st_mtime_ns for name in expected} == modified

    os.remove(os.path.join(out_dir, "test-00001-of-00002.tfrecord"))
    assert demo.ensure_demo(out_dir, **options)["regenerated"] is True
    assert demo.ensure_demo(out_dir, **{**options, "seed": 1})["regenerated"] is True
    assert demo.ensure_demo(out_dir, **{**options, "seed": 1}, force=True)["regenerated"] is True


def test_the_command_line_rejects_bad_counts_with_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(tmp_path), "--train", "0"])

    assert stopped.value.code == 2
    assert "'train' and 'test' must be >= 1" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
