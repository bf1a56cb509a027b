"""Decoding ``tf.train.Example`` records into model-ready images, and the Beam step that does it.

Records are parsed in batches with ``tf.io.parse_example``; when a batch fails
(one malformed record poisons the whole call) its records are parsed one by
one so that only the bad ones become errors. Images are decoded with
TensorFlow (JPEG, PNG, GIF, BMP), turned into the model's channel count
(grayscale is repeated, alpha dropped), resized to the model input and
preprocessed with the configured mode.
"""

from __future__ import annotations

import dataclasses
import struct

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.support.errors import ERRORS, NAMESPACE, error_row, one_line
from transforms.decode.preprocess import Preprocessing
from transforms.read.records import Record, record_key


class DecodeError(ValueError):
    """A record that cannot become a model input; one-line message."""


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How records become model inputs.

    The option fields carry the run config's values (see :meth:`from_config`);
    ``image_size``, ``channels``, ``require_label`` and ``num_classes`` come
    from the model and the target.
    """

    image_size: tuple            # (H, W) of the model input
    channels: int                # C of the model input
    image_feature: str | None
    label_feature: str | None
    id_feature: str | None
    raw_feature: str | None
    raw_shape: tuple | None
    mask_feature: str | None
    resize_method: str
    preprocess: Preprocessing
    max_image_pixels: int
    require_label: bool          # the target is the label: a record without one is an error
    num_classes: int | None      # labels must be below it when they are the target

    @classmethod
    def from_config(cls, config, image_size: tuple, channels: int, num_classes: int | None) -> "DecodeSettings":
        """Settings from a run config (any object with the option fields as attributes).

        Args:
            config: the parsed run configuration.
            image_size: (H, W) of the model input.
            channels: C of the model input.
            num_classes: the model's class count.

        Returns:
            The decode settings.
        """
        derived = {"image_size": tuple(image_size), "channels": int(channels), "num_classes": num_classes,
                   "require_label": config.target.mode == "label"}
        options = {field.name: getattr(config, field.name) for field in dataclasses.fields(cls)
                   if field.name not in derived}
        options["raw_shape"] = tuple(options["raw_shape"]) if options["raw_shape"] else None
        options["preprocess"] = Preprocessing.parse(options["preprocess"])
        return cls(**options, **derived)


@dataclasses.dataclass
class Example:
    """A decoded record, ready to explain."""

    key: str
    source_file: str
    record_index: int
    label: int | None
    image: np.ndarray           # float32 [H, W, C], model input units
    mask: np.ndarray | None     # bool [H, W] at the model input size
    record_sha256: str | None = None  # hex SHA-256 of the record's bytes as read


@dataclasses.dataclass(frozen=True)
class Failed:
    """A record that failed at the decode stage."""

    key: str
    source_file: str
    record_index: int
    error: str
    record_sha256: str | None = None


def _feature_spec(settings: DecodeSettings) -> dict:
    import tensorflow as tf

    spec = {}
    for name, dtype in ((settings.image_feature, tf.string), (settings.label_feature, tf.int64),
                        (settings.id_feature, tf.string), (settings.mask_feature, tf.string),
                        (settings.raw_feature, tf.float32)):
        if name:
            spec[name] = tf.io.RaggedFeature(dtype=dtype)
    if settings.raw_feature:
        spec.pop(settings.image_feature, None)
    return spec


def _parse(serialized: list[bytes], spec: dict) -> list[dict]:
    import tensorflow as tf

    parsed = tf.io.parse_example(tf.constant(serialized, dtype=tf.string), spec)
    columns = {}
    for name, ragged in parsed.items():
        values = ragged.flat_values.numpy()
        splits = ragged.row_splits.numpy()
        columns[name] = [values[splits[i]:splits[i + 1]] for i in range(len(serialized))]
    return [{name: columns[name][i] for name in spec} for i in range(len(serialized))]


def parse_batch(records: list[Record], settings: DecodeSettings) -> list[dict | str]:
    """Parses records; each item is a feature dict or an error line."""
    import tensorflow as tf

    spec = _feature_spec(settings)
    serialized = [record.data for record in records]
    try:
        return _parse(serialized, spec)
    except (tf.errors.InvalidArgumentError, ValueError):
        pass
    out = []
    for data in serialized:
        try:
            tf.train.Example.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            out.append("record is not a serialized tf.train.Example (protobuf parsing failed)")
            continue
        try:
            out.append(_parse([data], spec)[0])
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            out.append(f"not a valid tf.train.Example with the configured features: {one_line(error)}")
    return out


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(height, width) read from an image header without decoding, or None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return height, width
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width)
    if data[:2] == b"\xff\xd8":
        import tensorflow as tf

        try:
            height, width, _ = tf.image.extract_jpeg_shape(data).numpy()
            return int(height), int(width)
        except tf.errors.InvalidArgumentError:
            return None
    return None


def _decode_pixels(data: bytes, what: str, max_pixels: int, channels: int = 0) -> np.ndarray:
    import tensorflow as tf

    if not data:
        raise DecodeError(f"{what} is empty (0 bytes)")
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise DecodeError(f"{what} is {size[1]}x{size[0]} ({size[0] * size[1]} pixels), more than "
                          f"max_image_pixels={max_pixels}")
    try:
        pixels = tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise DecodeError(f"{what} is not a decodable JPEG/PNG/GIF/BMP image: {one_line(error)}") from None
    if int(pixels.shape[0]) * int(pixels.shape[1]) > max_pixels:
        raise DecodeError(f"{what} is {pixels.shape[1]}x{pixels.shape[0]}, more than "
                          f"max_image_pixels={max_pixels}")
    return pixels.numpy()


def _match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    have = pixels.shape[-1]
    if have in (2, 4):  # drop alpha
        pixels, have = pixels[..., :have - 1], have - 1
    if have == channels:
        return pixels
    if channels == 3 and have == 1:
        return np.repeat(pixels, 3, axis=-1)
    if channels == 1 and have == 3:
        weights = np.array([0.2989, 0.5870, 0.1140], np.float32)
        return (pixels.astype(np.float32) @ weights)[..., None]
    raise DecodeError(f"image has {have} channels; the model takes {channels}")


def _resize(pixels: np.ndarray, size: tuple, method: str, antialias: bool = True) -> np.ndarray:
    import tensorflow as tf

    if tuple(pixels.shape[:2]) == tuple(size):
        return pixels.astype(np.float32)
    resized = tf.image.resize(tf.convert_to_tensor(pixels, tf.float32), size, method=method,
                              antialias=antialias and method != "nearest")
    return resized.numpy()


def _single(values, name: str, kind: str):
    if len(values) != 1:
        raise DecodeError(f"feature '{name}' has {len(values)} values; one {kind} expected")
    return values[0]


def decode_example(record: Record, features: dict, settings: DecodeSettings) -> Example:
    """Turns one parsed record into an :class:`Example`; raises :class:`DecodeError`."""
    key = record_key(record.source_file, record.record_index)
    if settings.id_feature:
        ids = features[settings.id_feature]
        if len(ids) == 1 and ids[0]:
            key = ids[0].decode("utf-8", errors="replace")
        elif len(ids):
            raise DecodeError(f"feature '{settings.id_feature}' has {len(ids)} values; one id expected")
    label = None
    if settings.label_feature and len(features[settings.label_feature]):
        label = int(_single(features[settings.label_feature], settings.label_feature, "int64 label"))
    if settings.require_label:
        if label is None:
            raise DecodeError(f"target 'label' needs feature '{settings.label_feature}', which this record lacks")
        if settings.num_classes is not None and not 0 <= label < settings.num_classes:
            raise DecodeError(f"label {label} is not a class of the model (0 to {settings.num_classes - 1})")
    height, width = settings.image_size
    if settings.raw_feature:
        values = features[settings.raw_feature]
        shape = tuple(settings.raw_shape or (height, width, settings.channels))
        if len(values) == 0:
            raise DecodeError(f"missing feature '{settings.raw_feature}' (raw float tensor)")
        if len(values) != int(np.prod(shape)):
            raise DecodeError(f"feature '{settings.raw_feature}' has {len(values)} floats; "
                              f"shape {list(shape)} needs {int(np.prod(shape))}")
        image = np.asarray(values, np.float32).reshape(shape)
        if shape != (height, width, settings.channels):
            raise DecodeError(f"raw tensor shape {list(shape)} is not the model input "
                              f"{[height, width, settings.channels]}")
    else:
        encoded = features[settings.image_feature]
        if len(encoded) == 0:
            raise DecodeError(f"missing feature '{settings.image_feature}' (encoded image bytes)")
        data = _single(encoded, settings.image_feature, "encoded image")
        pixels = _decode_pixels(data, f"'{settings.image_feature}'", settings.max_image_pixels)
        pixels = _match_channels(pixels, settings.channels)
        resized = np.clip(_resize(pixels, (height, width), settings.resize_method), 0.0, 255.0)
        image = settings.preprocess(resized)
    if not np.all(np.isfinite(image)):
        raise DecodeError("image holds NaN or Inf values")
    mask = None
    if settings.mask_feature and len(features[settings.mask_feature]):
        data = _single(features[settings.mask_feature], settings.mask_feature, "mask image")
        mask_pixels = _decode_pixels(data, f"mask '{settings.mask_feature}'", settings.max_image_pixels, channels=1)
        mask = _resize(mask_pixels, (height, width), "nearest")[..., 0] > 0
    return Example(key=key, source_file=record.source_file, record_index=record.record_index,
                   label=label, image=image.astype(np.float32), mask=mask, record_sha256=record.sha256())


def decode_batch(records: list[Record], settings: DecodeSettings) -> list[Example | Failed]:
    """Decodes a batch; each record becomes an :class:`Example` or a :class:`Failed`."""
    out = []
    for record, features in zip(records, parse_batch(records, settings)):
        try:
            if isinstance(features, str):
                raise DecodeError(features)
            out.append(decode_example(record, features, settings))
        except DecodeError as error:
            message = one_line(str(error))
        except Exception as error:  # noqa: BLE001 - an unforeseen fault must not drop the record
            message = f"{type(error).__name__}: {one_line(error)}"
        else:
            continue
        out.append(Failed(record_key(record.source_file, record.record_index), record.source_file,
                          record.record_index, message, record.sha256()))
    return out


# ------------------------------------------------------------------ Beam step
class DecodeRecords(beam.DoFn):
    """Batches of :class:`Record` → :class:`Example` (main output) and decode error rows (``errors``).

    Args:
        settings: how records become model inputs.
    """

    def __init__(self, settings: DecodeSettings):
        self.settings = settings
        self.decoded = Metrics.counter(NAMESPACE, "records_decoded")
        self.failed = Metrics.counter(NAMESPACE, "errors_decode")

    def process(self, records):
        """Decodes one batch of records."""
        for item in decode_batch(list(records), self.settings):
            if isinstance(item, Failed):
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(item.key, item.source_file, item.record_index,
                                                                  "decode", item.error, item.record_sha256))
            else:
                self.decoded.inc()
                yield item
