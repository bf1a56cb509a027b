"""Scheduled audits: a run reuses a baseline run's rows for records whose key and content did not change."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import smoothgrad_audit
from pipelines.run.baseline import fingerprint, resolve
from pipelines.run.command_line import parse
from pipelines.run.config import ConfigError
from tests import helpers
from tests.test_faults import faulty  # noqa: F401 - the fault dataset, reused with a baseline
from transforms.read.records import encode_record



def _write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"".join(encode_record(record) for record in records))


def _records(count, seed, id_prefix=None, labels=3):
    images = helpers.random_images(count, size=16, seed=seed)
    return [helpers.example(helpers.png(image), label=index % labels,
                            extra=None if id_prefix is None else {"image/id": _bytes(f"{id_prefix}-{index}")})
            for index, image in enumerate(images)]


def _bytes(text):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))


def _run(pattern, output, run_id, model, *extra):
    result = smoothgrad_audit.run(["--input", pattern, "--output", output, "--model", model, "--run_id", run_id,
                                   "--samples", "3", "--noise", "0.2", "--batch_size", "4", *extra])
    run_dir = os.path.join(output, f"run_id={run_id}")
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        manifest = json.load(handle)
    rows = pq.read_table(glob.glob(os.path.join(run_dir, "saliency-*.parquet")), partitioning=None)
    errors = pq.read_table(glob.glob(os.path.join(run_dir, "errors-*.parquet")), partitioning=None)
    return result, manifest, rows.sort_by([("key", "ascending"), ("target_rank", "ascending")]), errors


def _counter(result, name):
    return sum(item.committed for item in result.metrics().query()["counters"] if item.key.metric.name == name)


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    """Runs A (old data), B (new data, baseline A) and C (new data, no baseline)."""
    folder = tmp_path_factory.mktemp("baseline")
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    first, second, third = _records(6, 1), _records(6, 2), _records(6, 3)
    _write(str(folder / "old" / "a.tfrecord"), first)
    _write(str(folder / "old" / "b.tfrecord"), second)
    _write(str(folder / "old" / "c.tfrecord"), third)
    changed_pixels = _records(2, 9)
    _write(str(folder / "new" / "a.tfrecord"), changed_pixels + first[2:])  # records 0 and 1 changed
    _write(str(folder / "new" / "b.tfrecord"), second[:4])  # records 4 and 5 removed
    _write(str(folder / "new" / "c2.tfrecord"), third)  # c renamed: its default keys change
    _write(str(folder / "new" / "d.tfrecord"), _records(4, 4))  # added
    output = str(folder / "out")
    runs = {"A": _run(str(folder / "old" / "*.tfrecord"), output, "A", model)}
    runs["B"] = _run(str(folder / "new" / "*.tfrecord"), output, "B", model, "--baseline", os.path.join(output, "run_id=A"))
    runs["C"] = _run(str(folder / "new" / "*.tfrecord"), output, "C", model)
    return {"folder": folder, "model": model, "output": output, "runs": runs}


def test_reused_rows_equal_a_fresh_run_and_only_changes_are_explained(changed):
    result_b, manifest_b, rows_b, errors_b = changed["runs"]["B"]
    result_c, manifest_c, rows_c, _ = changed["runs"]["C"]
    assert rows_b.column("key").to_pylist() == rows_c.column("key").to_pylist()
    assert rows_b.schema == rows_c.schema and "record_sha256" in rows_b.schema.names
    for name in rows_b.schema.names:  # bit-identical but the maps and reliability, which are within a few ulp
        if name in helpers.NOISY_PASS_COLUMNS:
            helpers.assert_within_ulp(rows_b.column(name), rows_c.column(name), name)
        else:
            assert rows_b.column(name).equals(rows_c.column(name)), name
    assert errors_b.num_rows == 0
    # reused: a.tfrecord 2..5 and b.tfrecord 0..3; changed: a 0, 1; new: c2 (renamed) and d; removed: b 4, 5 and c
    assert manifest_b["records_reused"] == 8 and manifest_b["records_changed"] == 2
    assert manifest_b["records_new"] == 10 and manifest_b["records_removed"] == 8
    assert manifest_b["records_retried"] == 0
    assert manifest_b["records_read"] == manifest_b["records_explained"] + manifest_b["records_reused"] \
        + manifest_b["errors_total"] == 20
    assert manifest_b["invariant_holds"] is True
    assert all(entry["invariant_holds"] for entry in manifest_b["files"].values())
    assert manifest_b["files"][os.path.join(str(changed["folder"] / "new"), "a.tfrecord")]["records_reused"] == 4
    assert manifest_b["baseline"]["run_id"] == "A"
    # the engine saw only the new and changed records
    assert _counter(result_b, "num_inferences") == manifest_b["records_explained"] == 12
    assert _counter(result_c, "num_inferences") == 20
    assert manifest_c["baseline"] is None and "records_reused" in manifest_c
    assert manifest_b["fingerprint"] == manifest_c["fingerprint"]


def test_record_sha256_is_the_hash_of_the_record_bytes(changed):
    import hashlib

    import tensorflow as tf

    _, _, rows, _ = changed["runs"]["C"]
    path = str(changed["folder"] / "new" / "d.tfrecord")
    hashes = [hashlib.sha256(data).hexdigest() for data in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    by_key = dict(zip(rows.column("key").to_pylist(), rows.column("record_sha256").to_pylist()))
    assert [by_key[f"d.tfrecord:{index}"] for index in range(4)] == hashes


def test_a_renamed_file_is_reused_when_keys_come_from_an_id_feature(tmp_path):
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)
    records = _records(5, 5, id_prefix="img")
    _write(str(tmp_path / "old" / "x.tfrecord"), records)
    _write(str(tmp_path / "new" / "y.tfrecord"), records[::-1])  # renamed and re-ordered
    output = str(tmp_path / "out")
    _run(str(tmp_path / "old" / "*.tfrecord"), output, "A", model, "--id_feature", "image/id")
    _, manifest, rows, _ = _run(str(tmp_path / "new" / "*.tfrecord"), output, "B", model, "--id_feature", "image/id",
                                "--baseline", "latest")
    _, _, fresh, _ = _run(str(tmp_path / "new" / "*.tfrecord"), output, "C", model, "--id_feature", "image/id")
    assert manifest["records_reused"] == 5 and manifest["records_explained"] == 0
    for name in rows.schema.names:  # where each record is now, from this run's read
        assert rows.column(name).equals(fresh.column(name)), name
    assert set(rows.column("source_file").to_pylist()) == {str(tmp_path / "new" / "y.tfrecord")}
    assert rows.column("record_index").to_pylist() == [4, 3, 2, 1, 0]  # img-0 .. img-4


def _fingerprint_of(argv):
    config, _ = parse(argv)
    planned = smoothgrad_audit.plan(config)
    return config, fingerprint(config, planned.info, planned.engine.chunk)


@pytest.mark.parametrize("flag, value, field", [("--samples", "4", "samples"), ("--seed", "7", "seed"),
                                                ("--model", None, "model_sha256")])
def test_a_baseline_with_other_settings_is_not_used_and_the_log_names_the_field(changed, tmp_path, caplog, flag,
                                                                                 value, field):
    if value is None:  # another model: other weights
        value = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3, seed=5)
    argv = ["--input", str(changed["folder"] / "new" / "*.tfrecord"), "--output", changed["output"],
            "--model", changed["model"], "--run_id", "D", "--samples", "3", "--noise", "0.2", "--batch_size", "4",
            "--baseline", os.path.join(changed["output"], "run_id=A"), flag, value]
    config, own = _fingerprint_of(argv)
    caplog.set_level(logging.INFO, logger="pipelines.run.baseline")
    assert resolve(config, own) is None
    [line] = [record.getMessage() for record in caplog.records if "not used" in record.getMessage()]
    assert f"differs from this run's: {field} (" in line and "Explaining every record" in line
    # the same settings are accepted
    same, fingerprint_a = _fingerprint_of(argv[:-2])
    assert resolve(same, fingerprint_a).run_id == "A"


def test_latest_picks_the_most_recent_completed_run_and_none_is_a_full_run(changed, tmp_path, caplog):
    argv = ["--input", str(changed["folder"] / "new" / "*.tfrecord"), "--output", changed["output"],
            "--model", changed["model"], "--run_id", "E", "--samples", "3", "--noise", "0.2", "--batch_size", "4",
            "--baseline", "latest"]
    config, own = _fingerprint_of(argv)
    assert resolve(config, own).run_id == "C"  # A, B, C finished in that order; all three have this fingerprint
    empty, own_empty = _fingerprint_of(argv[:3] + [str(tmp_path / "nothing")] + argv[4:])
    caplog.set_level(logging.INFO, logger="pipelines.run.baseline")
    assert resolve(empty, own_empty) is None
    assert any("no completed run" in record.getMessage() for record in caplog.records)


def test_a_missing_incomplete_or_damaged_baseline_fails_before_the_run(changed, tmp_path, capsys):
    source = os.path.join(changed["output"], "run_id=A")
    broken = {name: str(tmp_path / name) for name in ("missing_shard", "damaged", "incomplete")}
    for folder in broken.values():
        shutil.copytree(source, folder)
    os.remove(glob.glob(os.path.join(broken["missing_shard"], "saliency-*.parquet"))[0])
    shard = glob.glob(os.path.join(broken["damaged"], "saliency-*.parquet"))[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    os.remove(os.path.join(broken["incomplete"], "_MANIFEST.json"))
    expectations = {"missing_shard": "which is missing", "damaged": "not a readable Parquet file",
                    "incomplete": "is incomplete (it has no _MANIFEST.json)",
                    "nowhere": "does not exist"}
    broken["nowhere"] = str(tmp_path / "nowhere")
    for name, folder in broken.items():
        status = smoothgrad_audit.main(["--input", str(changed["folder"] / "new" / "*.tfrecord"),
                                        "--output", str(tmp_path / "out"), "--model", changed["model"],
                                        "--run_id", name, "--samples", "3", "--noise", "0.2", "--batch_size", "4",
                                        "--baseline", folder])
        error = capsys.readouterr().err.strip().splitlines()
        assert status == 2, name
        assert len(error) == 1 and error[0].startswith("smoothgrad-audit: error: config key 'baseline'"), error
        assert expectations[name] in error[0], error
        assert not os.path.exists(str(tmp_path / "out" / f"run_id={name}"))  # nothing ran
    with pytest.raises(ConfigError, match="this run's own folder"):
        smoothgrad_audit.run(["--input", str(changed["folder"] / "new" / "*.tfrecord"), "--output", changed["output"],
                              "--model", changed["model"], "--run_id", "A", "--overwrite", "--baseline", source])


def test_fault_accounting_holds_with_a_baseline(faulty):  # noqa: F811 - the imported fixture
    output = str(faulty["folder"] / "out-baseline")
    _, first, rows_a, errors_a = _run(faulty["pattern"], output, "A", faulty["model"])
    _, second, rows_b, errors_b = _run(faulty["pattern"], output, "B", faulty["model"],
                                       "--baseline", os.path.join(output, "run_id=A"))
    assert second["invariant_holds"] is True and all(entry["invariant_holds"] for entry in second["files"].values())
    assert second["records_read"] == first["records_read"] == len(faulty["expected"])
    assert second["records_reused"] == first["records_explained"] and second["records_explained"] == 0
    assert second["errors"] == first["errors"]
    assert second["records_retried"] == first["errors"]["decode"]  # failed in A: tried again, failed again
    fates = lambda table: sorted((row["key"], row["stage"], row["record_sha256"]) for row in table.to_pylist())  # noqa: E731
    assert fates(errors_b) == fates(errors_a)
    for name in rows_a.schema.names:
        assert rows_a.column(name).equals(rows_b.column(name)), name
    assert np.all([value is not None for value in rows_b.column("record_sha256").to_pylist()])


def test_the_report_of_a_scheduled_run_shows_what_the_baseline_gave(changed, tmp_path):
    from pipelines.report import report
    from tests.test_report import read_page

    _, manifest, _, _ = changed["runs"]["B"]
    index = report.build_report(os.path.join(changed["output"], "run_id=B"), out=str(tmp_path / "page"), top=3)
    _, page = read_page(os.path.dirname(index))
    for name in ("records_reused", "records_new", "records_changed", "records_removed", "records_explained"):
        assert page.counts[name] == str(manifest[name]), name


def test_the_manifest_and_fingerprint_record_the_kind_of_device(changed):
    from transforms.engine.device import current_device_kind

    _, manifest, _, _ = changed["runs"]["A"]
    assert manifest["devices_used"] == [current_device_kind()]
    assert manifest["fingerprint"]["device"] == current_device_kind() and manifest["mixed_devices"] is False
    assert manifest["fingerprint"]["cpu_kernels"] == manifest["config"]["cpu_kernels"]


def test_a_baseline_from_another_kind_of_device_is_not_used(changed, tmp_path, caplog):
    from transforms.engine.device import current_device_kind

    output = tmp_path / "out"
    shutil.copytree(os.path.join(changed["output"], "run_id=A"), output / "run_id=A")
    manifest_path = output / "run_id=A" / "_MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["device"] = "gpu Some Other GPU cc9.0"
    manifest_path.write_text(json.dumps(manifest))
    argv = ["--input", str(changed["folder"] / "new" / "*.tfrecord"), "--output", str(output),
            "--model", changed["model"], "--run_id", "D", "--samples", "3", "--noise", "0.2", "--batch_size", "4",
            "--baseline", "latest"]
    config, _ = parse(argv)
    planned = smoothgrad_audit.plan(config)
    here = fingerprint(config, planned.info, planned.engine.chunk, current_device_kind())
    caplog.set_level(logging.INFO, logger="pipelines.baseline")
    assert resolve(config, here) is None
    [line] = [record.getMessage() for record in caplog.records if "not used" in record.getMessage()]
    assert f"device ('gpu Some Other GPU cc9.0' there, '{current_device_kind()}' here)" in line
    # workers elsewhere (device unknown on the launcher): the baseline goes on, with its device for the workers
    elsewhere = fingerprint(config, planned.info, planned.engine.chunk, None)
    assert resolve(config, elsewhere).device == "gpu Some Other GPU cc9.0"
