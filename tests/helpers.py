"""Small datasets and models made inside the tests (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import keras


def png(pixels: np.ndarray) -> bytes:
    return tf.io.encode_png(np.asarray(pixels, np.uint8)).numpy()


def example(image_bytes: bytes | None = None, label: int | None = None, extra: dict | None = None) -> bytes:
    """A serialized tf.train.Example with the default feature names."""
    feature = {}
    if image_bytes is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    feature.update(extra or {})
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def random_images(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def write_tfrecords(path: str, serialized: list[bytes]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for data in serialized:
            writer.write(data)
    return path


def write_image_dataset(folder: str, files: int = 2, per_file: int = 5, size: int = 16, classes: int = 3,
                        seed: int = 0) -> list[str]:
    """TFRecord files of random PNG images with labels; returns their paths."""
    paths, rng = [], np.random.default_rng(seed)
    for index in range(files):
        images = random_images(per_file, size, seed + index)
        records = [example(png(image), int(rng.integers(0, classes))) for image in images]
        paths.append(write_tfrecords(os.path.join(folder, f"part-{index}.tfrecord"), records))
    return paths


def tiny_cnn(size: int = 16, classes: int = 3, seed: int = 0, softmax: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax" if softmax else None, name="predictions")(x)
    return keras.Model(inputs, outputs)


def save_tiny_cnn(folder: str, **kwargs) -> str:
    path = os.path.join(folder, "tiny.keras")
    tiny_cnn(**kwargs).save(path)
    return path


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process, what: str, seconds: float = 60.0) -> None:
    """Waits until ``process`` (a ``subprocess.Popen``) listens on ``port``; raises RuntimeError naming ``what``."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds:.0f} s")


#: Corpus columns computed by the batched noisy pass: equal at every batch position in every configuration
#: measured, but not by construction (a kernel may round a row by where it sits), so compared within MAP_ULPS.
NOISY_PASS_COLUMNS = ("saliency", "reliability")
MAP_ULPS = 4


def assert_within_ulp(first, second, what: str, ulps: int = MAP_ULPS) -> None:
    """Asserts two float arrays (or Arrow columns of them) differ by at most ``ulps`` float32 units in the last place.

    NaN must meet NaN; the shapes must be equal.
    """
    def flat(values):
        if hasattr(values, "combine_chunks"):  # an Arrow column: tensors or scalars, nulls as NaN
            values = values.combine_chunks()
            values = values.to_numpy_ndarray() if hasattr(values, "to_numpy_ndarray") \
                else values.to_numpy(zero_copy_only=False)
        return np.asarray(values, np.float32)

    first, second = flat(first), flat(second)
    assert first.shape == second.shape, f"{what}: shapes {first.shape} and {second.shape}"
    assert np.array_equal(np.isnan(first), np.isnan(second)), f"{what}: NaN in different places"
    distance = ulp_distance(first, second)
    assert distance <= ulps, f"{what}: {distance} ulp apart (at most {ulps})"


def ulp_distance(first, second) -> int:
    """The largest distance between two float arrays in float32 units in the last place (NaN meets NaN at 0)."""
    first, second = np.asarray(first, np.float32).ravel(), np.asarray(second, np.float32).ravel()

    def ordered(values):
        bits = np.nan_to_num(values).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    distance = np.abs(ordered(first) - ordered(second))
    distance[np.isnan(first) & np.isnan(second)] = 0
    return int(distance.max()) if distance.size else 0


def files_in_run(run_dir: str) -> list[str]:
    """Every file under a local run folder, as sorted paths relative to it (the ``_audit/`` files included)."""
    found = []
    for folder, _, names in os.walk(run_dir):
        found += [os.path.relpath(os.path.join(folder, name), run_dir).replace(os.sep, "/") for name in names]
    return sorted(found)


def files_listed(manifest: dict) -> list[str]:
    """The files a run folder holds: the manifest, every ``outputs`` list, and what the audit writes after them.

    With ``audit: true`` the audit writes ``_FINDINGS.json`` and its evidence (``_audit/evidence.*``), after the
    manifest (which therefore does not list them).
    """
    listed = ["_MANIFEST.json", *(name for names in manifest["outputs"].values() for name in names)]
    if (manifest.get("config") or {}).get("audit"):
        listed.append("_FINDINGS.json")
        if manifest.get("audit"):
            listed += ["_audit/evidence.json", "_audit/evidence.npz"]
    return sorted(listed)


def assert_same_audit(run_dir: str, other_dir: str) -> None:
    """Asserts two runs on the same data have the same class saliency (to float64 rounding) and samples."""
    from transforms.audit.read import read_class_saliency, read_samples

    first, second = read_class_saliency(run_dir), read_class_saliency(other_dir)
    assert first and [(item.target, item.group, item.count) for item in first] \
        == [(item.target, item.group, item.count) for item in second]
    for one, other in zip(first, second):  # sums may be added in another order
        np.testing.assert_allclose(one.mean, other.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(one.std, other.std, rtol=1e-9, atol=1e-12)
    samples, other_samples = read_samples(run_dir), read_samples(other_dir)
    assert sorted(samples) == sorted(other_samples)
    for target, sample in samples.items():
        assert [item.key for item in sample] == [item.key for item in other_samples[target]]
        np.testing.assert_array_equal(np.stack([item.pooled for item in sample]),
                                      np.stack([item.pooled for item in other_samples[target]]))
