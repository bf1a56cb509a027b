"""Decoding records: image formats, channels, resizing, preprocessing modes, keys."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.run.config import Config
from tests import helpers
from transforms.decode.decode import DecodeSettings, Example, Failed, decode_batch, image_dimensions
from transforms.decode.preprocess import Preprocessing, preprocess
from transforms.read.records import Record


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(buffer, format=image_format)
    return buffer.getvalue()


def _decode(serialized: list[bytes], **settings) -> list:
    """Decodes with the config's defaults, preprocess 'none', 8x8x3 inputs, and ``settings`` on top."""
    records = [Record("data/file.tfrecord", index, data) for index, data in enumerate(serialized)]
    defaults = DecodeSettings.from_config(Config(), image_size=(8, 8), channels=3, num_classes=None)
    settings.setdefault("preprocess", "none")
    settings["preprocess"] = Preprocessing.parse(settings["preprocess"])
    return decode_batch(records, dataclasses.replace(defaults, **settings))


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP"])
def test_every_image_format_decodes_to_its_pixels(image_format):
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:4] = (200, 40, 40)
    pixels[4:] = (40, 40, 200)
    data = _encode(pixels, image_format)
    assert image_dimensions(data) == (8, 8)
    [example] = _decode([helpers.example(data, label=1)])
    assert isinstance(example, Example) and example.label == 1
    assert example.image.shape == (8, 8, 3) and example.image.dtype == np.float32
    if image_format == "JPEG":  # lossy: chroma bleeds across the colour edge between rows 3 and 4
        rows = [0, 1, 2, 5, 6, 7]
        np.testing.assert_allclose(example.image[rows], pixels[rows], atol=12)
    else:
        np.testing.assert_array_equal(example.image, pixels)


def test_grayscale_is_repeated_and_alpha_dropped():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
    rgba = np.concatenate([np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8, 1), np.uint8)], axis=-1)
    gray_example, rgba_example = _decode([helpers.example(_encode(gray, "PNG")),
                                          helpers.example(_encode(rgba, "PNG"))])
    np.testing.assert_array_equal(gray_example.image, np.repeat(gray, 3, axis=-1).astype(np.float32))
    np.testing.assert_array_equal(rgba_example.image, np.full((8, 8, 3), 90, np.float32))
    [single] = _decode([helpers.example(_encode(np.full((8, 8, 3), 100, np.uint8), "PNG"))], channels=1)
    assert single.image.shape == (8, 8, 1) and single.image[0, 0, 0] == pytest.approx(100, abs=0.5)


def test_resize_to_the_model_input_and_preprocessing_modes():
    pixels = np.full((32, 16, 3), 255, np.uint8)
    [example] = _decode([helpers.example(helpers.png(pixels))], image_size=(8, 8), preprocess="tf")
    assert example.image.shape == (8, 8, 3)
    np.testing.assert_allclose(example.image, 1.0, atol=1e-6)
    white = np.full((1, 1, 3), 255.0, np.float32)
    np.testing.assert_allclose(preprocess(white, "unit"), 1.0)
    np.testing.assert_allclose(preprocess(white, "torch")[0, 0], (1 - np.array([0.485, 0.456, 0.406]))
                               / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    np.testing.assert_allclose(preprocess(white, "caffe")[0, 0], 255 - np.array([103.939, 116.779, 123.68]),
                               rtol=1e-6)
    from keras.applications import resnet50

    np.testing.assert_allclose(preprocess(white, "keras.applications.resnet50"),
                               resnet50.preprocess_input(white.copy()))
    np.testing.assert_array_equal(preprocess(white, "none"), white)


def test_keys_labels_masks_and_id_feature():
    mask = np.zeros((4, 4, 1), np.uint8)
    mask[1:3, 1:3] = 255
    extra = {"image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"photo-17"])),
             "image/object_mask": tf.train.Feature(bytes_list=tf.train.BytesList(value=[helpers.png(mask)]))}
    image = helpers.png(np.zeros((8, 8, 3), np.uint8))
    first, second = _decode([helpers.example(image, label=2, extra=extra), helpers.example(image)],
                            id_feature="image/id", mask_feature="image/object_mask")
    assert first.key == "photo-17" and first.label == 2
    assert first.mask.shape == (8, 8) and first.mask.sum() == 16 and first.mask[2:6, 2:6].all()
    assert second.key == "file.tfrecord:1" and second.label is None and second.mask is None


def test_label_target_needs_a_label_in_range():
    image = helpers.png(np.zeros((8, 8, 3), np.uint8))
    missing, too_big, fine = _decode([helpers.example(image), helpers.example(image, label=7),
                                      helpers.example(image, label=2)], require_label=True, num_classes=3)
    assert isinstance(missing, Failed) and "lacks" in missing.error
    assert isinstance(too_big, Failed) and "not a class of the model" in too_big.error
    assert isinstance(fine, Example) and fine.label == 2


def test_one_bad_record_does_not_spoil_its_batch():
    good = helpers.example(helpers.png(np.zeros((8, 8, 3), np.uint8)), label=0)
    wrong_type = helpers.example(helpers.png(np.zeros((8, 8, 3), np.uint8)),
                                 extra={"image/class/label": tf.train.Feature(bytes_list=tf.train.BytesList(
                                     value=[b"cat"]))})
    results = _decode([good, wrong_type, good])
    assert [type(item).__name__ for item in results] == ["Example", "Failed", "Example"]
    assert "image/class/label" in results[1].error and "\n" not in results[1].error
