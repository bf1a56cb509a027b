"""Bad input and faults: clear one-line errors, exact accounting, nothing lost."""

from __future__ import annotations

import glob
import json
import os

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipelines import smoothgrad_audit
from tests import helpers
from transforms.audit.read import read_class_saliency, read_samples
from transforms.read.records import encode_record
from transforms.engine.smoothgrad import SmoothGrad


def _float_feature(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """One dataset holding every kind of data fault, and the expected fate of each record."""
    folder = tmp_path_factory.mktemp("faults")
    data = folder / "data"
    data.mkdir()
    images = helpers.random_images(6, size=16, seed=3)
    good = [helpers.example(helpers.png(image), label=1) for image in images]
    expected = {}  # key -> stage of its error, or "explained"

    (data / "good.tfrecord").write_bytes(b"".join(encode_record(record) for record in good[:3]))
    expected.update({f"good.tfrecord:{index}": "explained" for index in range(3)})

    frames = [bytearray(encode_record(record)) for record in good[:4]]
    frames[2][-5] ^= 0xFF  # corrupt the last data byte of record 2: its data CRC fails
    (data / "crc.tfrecord").write_bytes(b"".join(bytes(frame) for frame in frames))
    expected.update({"crc.tfrecord:0": "explained", "crc.tfrecord:1": "explained",
                     "crc.tfrecord:2": "read", "crc.tfrecord:3": "explained"})

    whole = b"".join(encode_record(record) for record in good[:3])
    (data / "cut.tfrecord").write_bytes(whole[:-40])  # cut off inside record 2
    expected.update({"cut.tfrecord:0": "explained", "cut.tfrecord:1": "explained", "cut.tfrecord:2": "read"})

    (data / "text.tfrecord").write_bytes(b"this is a CSV file, not a TFRecord\n1,2,3\n" * 20)
    expected["text.tfrecord"] = "read"
    (data / "empty.tfrecord").write_bytes(b"")
    expected["empty.tfrecord"] = "read"

    huge = tf.io.encode_png(np.zeros((8000, 8000, 1), np.uint8)).numpy()
    decode_records = [
        helpers.example(b"\x00\x01 definitely not an image", label=0),
        helpers.example(None, label=0),
        helpers.example(helpers.png(images[4]), extra={"image/class/label": _float_feature([1.5])}),
        helpers.example(helpers.png(np.full((1, 1, 3), 200, np.uint8)), label=2),
        helpers.example(huge, label=0),
        b"\xff\xfe random bytes that are no protobuf",
    ]
    (data / "decode.tfrecord").write_bytes(b"".join(encode_record(record) for record in decode_records))
    expected.update({"decode.tfrecord:0": "decode", "decode.tfrecord:1": "decode", "decode.tfrecord:2": "decode",
                     "decode.tfrecord:3": "explained", "decode.tfrecord:4": "decode",
                     "decode.tfrecord:5": "decode"})
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    return {"folder": folder, "pattern": str(data / "*.tfrecord"), "model": model, "expected": expected}


def _read_run(run_dir):
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        manifest = json.load(handle)
    saliency = pq.read_table(glob.glob(os.path.join(run_dir, "saliency-*.parquet")), partitioning=None)
    errors = pq.read_table(glob.glob(os.path.join(run_dir, "errors-*.parquet")), partitioning=None)
    return manifest, saliency, errors


def test_every_data_fault_is_an_error_row_and_counted(faulty, monkeypatch, capsys):
    original = SmoothGrad.__call__

    def failing_call(self, images, keys, targets=None):  # a worker fault on any batch holding this record
        if "good.tfrecord:1" in keys:
            raise RuntimeError("injected fault")
        return original(self, images, keys, targets)

    monkeypatch.setattr(SmoothGrad, "__call__", failing_call)
    expected = dict(faulty["expected"], **{"good.tfrecord:1": "explain"})
    output = str(faulty["folder"] / "out")
    status = smoothgrad_audit.main(["--input", faulty["pattern"], "--output", output, "--model", faulty["model"],
                                    "--run_id", "faults", "--samples", "2", "--batch_size", "4"])
    assert status == 0
    manifest, saliency, errors = _read_run(os.path.join(output, "run_id=faults"))

    outcome = {key: "explained" for key in saliency.column("key").to_pylist()}
    assert len(outcome) == saliency.num_rows  # no duplicated rows
    for row in errors.to_pylist():
        assert row["key"] not in outcome, f"{row['key']} is both explained and an error"
        outcome[row["key"]] = row["stage"]
        assert "\n" not in row["error"] and len(row["error"]) < 500  # one line, no hex dump
    assert outcome == expected

    by_key = {row["key"]: row for row in errors.to_pylist()}
    assert by_key["text.tfrecord"]["record_index"] is None and by_key["empty.tfrecord"]["record_index"] is None
    assert by_key["crc.tfrecord:2"]["record_index"] == 2 and "CRC" in by_key["crc.tfrecord:2"]["error"]
    assert "cut off" in by_key["cut.tfrecord:2"]["error"]
    assert "max_image_pixels" in by_key["decode.tfrecord:4"]["error"]
    assert "image/encoded" in by_key["decode.tfrecord:1"]["error"]
    assert "injected fault" in by_key["good.tfrecord:1"]["error"]

    stages = [stage for stage in expected.values() if stage != "explained"]
    assert manifest["records_read"] == len(expected)
    assert manifest["records_explained"] == sum(stage == "explained" for stage in expected.values())
    assert manifest["errors"] == {stage: stages.count(stage) for stage in ("read", "decode", "explain")}
    assert manifest["records_read"] == manifest["records_explained"] + manifest["errors_total"]
    assert manifest["invariant_holds"] is True
    for path, entry in manifest["files"].items():
        name = os.path.basename(path)
        fates = [stage for key, stage in expected.items() if key.split(":")[0] == name]
        assert entry["records_read"] == len(fates), name
        assert entry["records_explained"] == fates.count("explained"), name
        assert entry["records_read"] == entry["records_explained"] + entry["errors_total"], name


def test_raw_tensor_faults_and_non_finite_maps(tmp_path):
    folder = tmp_path
    inputs = keras.Input((4, 4, 1))
    squared = keras.layers.Multiply()([inputs, inputs])  # gradient 2x: infinite for huge x
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(squared))
    model_path = str(folder / "square.keras")
    keras.Model(inputs, outputs).save(model_path)
    records = [
        helpers.example(extra={"raw": _float_feature(np.linspace(-1, 1, 16))}),
        helpers.example(extra={"raw": _float_feature(np.zeros(15))}),
        helpers.example(extra={"raw": _float_feature(np.full(16, 3e38))}),
        helpers.example(extra={"other": _bytes_feature(b"x")}),
    ]
    helpers.write_tfrecords(str(folder / "raw.tfrecord"), records)
    status = smoothgrad_audit.main(["--input", str(folder / "raw.tfrecord"), "--output", str(folder / "out"),
                                    "--model", model_path, "--raw_feature", "raw", "--run_id", "raw",
                                    "--samples", "2", "--noise", "0", "--batch_size", "2"])
    assert status == 0
    manifest, saliency, errors = _read_run(str(folder / "out" / "run_id=raw"))
    assert saliency.column("key").to_pylist() == ["raw.tfrecord:0"]
    fates = {row["key"]: (row["stage"], row["error"]) for row in errors.to_pylist()}
    assert fates["raw.tfrecord:1"][0] == "decode" and "15 floats" in fates["raw.tfrecord:1"][1]
    assert fates["raw.tfrecord:2"][0] == "explain" and "NaN or Inf" in fates["raw.tfrecord:2"][1]
    assert fates["raw.tfrecord:3"][0] == "decode" and "missing feature 'raw'" in fates["raw.tfrecord:3"][1]
    assert manifest["invariant_holds"] and manifest["errors"] == {"read": 0, "decode": 2, "explain": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    helpers.write_image_dataset(str(folder / "data"), files=1, per_file=3, size=16)
    return {"folder": folder, "pattern": str(folder / "data" / "*.tfrecord"),
            "model": helpers.save_tiny_cnn(str(folder), size=16, classes=3)}


def _args(small, *extra, run_id="ok"):
    return ["--input", small["pattern"], "--output", str(small["folder"] / "out"), "--model", small["model"],
            "--run_id", run_id, "--samples", "2", *extra]


def _one_line_failure(capsys, argv):
    status = smoothgrad_audit.main(argv)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("smoothgrad-audit: error:")]
    assert status == 2
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["--samples", "0"], "'samples'"),
    (["--samples", "many"], "'samples'"),
    (["--noise", "-0.1"], "'noise'"),
    (["--batch_size", "0"], "'batch_size'"),
    (["--variant", "smoothgard"], "'variant'"),
    (["--noise_mode", "relatve"], "'noise_mode'"),
    (["--jit", "fast"], "'jit'"),
    (["--target", "topk:0"], "'target'"),
    (["--target", "class:7"], "'target'"),
    (["--normalize", "percentile:150"], "'normalize'"),
    (["--preprocess", "imagenet"], "'preprocess'"),
    (["--run_id", "../escape"], "'run_id'"),
    (["--run_id", "a/b"], "'run_id'"),
    (["--overwrite", "--dtype", "float64"], "'dtype'"),
])
def test_bad_options_fail_in_one_line(small, capsys, extra, expected):
    line = _one_line_failure(capsys, _args(small, *extra))
    assert expected in line
    assert "got" in line or "expected" in line


def test_bad_config_files_and_paths_fail_in_one_line(small, capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("samples: 3\nnoize: 0.1\n")
    assert "unknown config key 'noize'" in _one_line_failure(capsys, ["--config", str(config)] + _args(small))
    config.write_text("- a\n- list\n")
    assert "flat mapping" in _one_line_failure(capsys, ["--config", str(config)])
    config.write_text("samples: [1, 2\n")
    assert "not valid YAML" in _one_line_failure(capsys, ["--config", str(config)])
    line = _one_line_failure(capsys, ["--input", str(tmp_path / "nothing-*.tfrecord"), "--output", str(tmp_path),
                                      "--model", small["model"]])
    assert "matches no file" in line
    line = _one_line_failure(capsys, ["--input", small["pattern"], "--output", str(tmp_path),
                                      "--model", str(tmp_path / "missing.keras")])
    assert "does not exist" in line
    (tmp_path / "a-file").write_text("x")
    line = _one_line_failure(capsys, ["--input", small["pattern"], "--output", str(tmp_path / "a-file"),
                                      "--model", small["model"]])
    assert "'output'" in line and "is a file" in line
    dense = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    dense.save(str(tmp_path / "dense.keras"))
    line = _one_line_failure(capsys, ["--input", small["pattern"], "--output", str(tmp_path),
                                      "--model", str(tmp_path / "dense.keras")])
    assert "image batch" in line


def test_unknown_flags_and_stray_arguments_are_refused(small, capsys):
    line = _one_line_failure(capsys, _args(small, "--sampels", "3"))
    assert "unknown option '--sampels'" in line and "--samples" in line
    line = _one_line_failure(capsys, _args(small, "stray.tfrecord"))
    assert "unexpected argument 'stray.tfrecord'" in line


def test_shell_expanded_input_list_reads_every_file(small, tmp_path):
    paths = helpers.write_image_dataset(str(tmp_path / "data"), files=3, per_file=2, size=16)
    argv = ["--input", *paths, "--output", str(tmp_path / "out"), "--model", small["model"], "--samples", "1",
            "--run_id", "expanded", "--direct_num_workers", "1"]  # a Beam option passes through
    assert smoothgrad_audit.main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "run_id=expanded" / "_MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == sorted(paths) and manifest["records_read"] == 6


def test_lambda_model_is_refused_unless_unsafe_loading(small, capsys, tmp_path):
    inputs = keras.Input((16, 16, 3))
    doubled = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(doubled))
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    argv = ["--input", small["pattern"], "--output", str(tmp_path / "out"), "--model", path, "--samples", "1",
            "--run_id", "lambda"]
    line = _one_line_failure(capsys, argv)
    assert "safe mode" in line and "--unsafe_model_loading" in line
    assert smoothgrad_audit.main(argv + ["--unsafe-model-loading"]) == 0
    assert (tmp_path / "out" / "run_id=lambda" / "_MANIFEST.json").exists()


def test_completed_run_refused_then_overwritten_without_old_shards(small, capsys):
    run_dir = small["folder"] / "out" / "run_id=rerun"
    assert smoothgrad_audit.main(_args(small, "--num_shards", "3", run_id="rerun")) == 0
    assert len(glob.glob(str(run_dir / "saliency-*-of-00003.parquet"))) == 3
    line = _one_line_failure(capsys, _args(small, run_id="rerun"))
    assert "already holds a completed run" in line and "--overwrite" in line
    assert smoothgrad_audit.main(_args(small, "--num_shards", "1", "--overwrite", run_id="rerun")) == 0
    manifest = json.loads((run_dir / "_MANIFEST.json").read_text())
    assert helpers.files_in_run(str(run_dir)) == helpers.files_listed(manifest)
    assert manifest["outputs"]["saliency"] == ["saliency-00000-of-00001.parquet"]


def test_interrupted_run_is_cleaned_up(small):
    run_dir = small["folder"] / "out" / "run_id=interrupted"
    run_dir.mkdir(parents=True)
    (run_dir / "saliency-00000-of-00007.parquet").write_bytes(b"half a file")
    (run_dir / "beam-temp-saliency-123").mkdir()
    assert smoothgrad_audit.main(_args(small, run_id="interrupted")) == 0  # no manifest: not a completed run
    manifest = json.loads((run_dir / "_MANIFEST.json").read_text())
    assert not (run_dir / "saliency-00000-of-00007.parquet").exists()
    assert helpers.files_in_run(str(run_dir)) == helpers.files_listed(manifest)


def test_a_retried_bundle_does_not_duplicate_rows(small, monkeypatch, tmp_path):
    """A bundle that fails after emitting rows is retried by the runner; only one attempt counts."""
    from transforms.rows.rows import ToRows

    original = ToRows._row
    failures = []

    def flaky_row(self, example, *args):
        if example.key.endswith(":2") and not failures:  # first attempt only, after earlier rows went out
            failures.append(example.key)
            raise ConnectionError("worker lost its connection (simulated)")
        return original(self, example, *args)

    monkeypatch.setattr(ToRows, "_row", flaky_row)
    argv = ["--input", small["pattern"], "--output", str(tmp_path / "out"), "--model", small["model"],
            "--samples", "1", "--run_id", "retry", "--batch_size", "3",
            # Beam's bundle-based local runner retries failed bundles, as Dataflow does.
            "--runner", "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"]
    assert smoothgrad_audit.main(argv) == 0
    assert failures == ["part-0.tfrecord:2"]
    manifest, saliency, errors = _read_run(str(tmp_path / "out" / "run_id=retry"))
    keys = saliency.column("key").to_pylist()
    assert sorted(keys) == ["part-0.tfrecord:0", "part-0.tfrecord:1", "part-0.tfrecord:2"]  # once each
    assert errors.num_rows == 0 and manifest["invariant_holds"] and manifest["rows_written"] == 3
    # the retried bundle's maps count once in the audit's class saliency and sample too
    class_saliency = read_class_saliency(str(tmp_path / "out" / "run_id=retry"))
    assert sum(item.count for item in class_saliency if item.group == "all") == 3
    assert sorted(item.key for sample in read_samples(str(tmp_path / "out" / "run_id=retry")).values()
                  for item in sample) == sorted(keys)
