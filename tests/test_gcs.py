"""The whole product on gs://, against a local GCS emulator: input, output, model, re-runs, manifest last."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import smoothgrad_audit
from pipelines.run.config import ConfigError
from tests import helpers
from transforms.support import storage


def _upload(local: str, remote: str) -> str:
    with open(local, "rb") as source, FileSystems.create(remote) as target:
        target.write(source.read())
    return remote


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def _corpus(run_dir: str):
    """(manifest, saliency table sorted by key, names of the files in the run folder)."""
    manifest = json.loads(_read(FileSystems.join(run_dir, "_MANIFEST.json")))
    tables = [pq.read_table(io.BytesIO(_read(FileSystems.join(run_dir, name))))
              for name in manifest["outputs"]["saliency"]]
    table = pa.concat_tables(tables).sort_by("key")
    names = [path[len(run_dir.rstrip("/")) + 1:] for path in storage.files_under(run_dir)]
    return manifest, table, names


@pytest.fixture(scope="module")
def remote(tmp_path_factory, gcs_bucket):
    folder = tmp_path_factory.mktemp("gcs")
    paths = helpers.write_image_dataset(str(folder / "data"), files=3, per_file=4, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    prefix = f"{gcs_bucket}/datasets/tiny"
    for path in paths:
        _upload(path, f"{prefix}/{os.path.basename(path)}")
    return {"folder": folder, "local_pattern": str(folder / "data" / "*.tfrecord"), "local_model": model,
            "pattern": f"{prefix}/*.tfrecord", "model": _upload(model, f"{gcs_bucket}/models/tiny.keras"),
            "output": f"{gcs_bucket}/audits"}


def _args(remote, run_id, *extra, pattern=None, output=None, model=None):
    return ["--input", pattern or remote["pattern"], "--output", output or remote["output"],
            "--model", model or remote["model"], "--run_id", run_id, "--samples", "3", "--batch_size", "4",
            "--seed", "5", *extra]


def test_a_run_on_gcs_equals_a_local_run(remote):
    smoothgrad_audit.run(_args(remote, "on-gcs"))
    local_output = str(remote["folder"] / "out")
    smoothgrad_audit.run(_args(remote, "local", pattern=remote["local_pattern"], output=local_output,
                               model=remote["local_model"]))
    manifest, table, names = _corpus(f"{remote['output']}/run_id=on-gcs")
    local_manifest, local_table, _ = _corpus(os.path.join(local_output, "run_id=local"))
    assert manifest["invariant_holds"] and manifest["records_explained"] == 12
    assert sorted(names) == helpers.files_listed(manifest) and manifest["outputs"]["audit"]
    assert manifest["model"]["sha256"] == local_manifest["model"]["sha256"]  # the same bytes, read from gs://
    # the audit's files, written to and read back from gs:// like the corpus
    helpers.assert_same_audit(f"{remote['output']}/run_id=on-gcs", os.path.join(local_output, "run_id=local"))
    assert table.column("key").to_pylist() == local_table.column("key").to_pylist()
    np.testing.assert_array_equal(table.column("saliency").combine_chunks().to_numpy_ndarray(),
                                  local_table.column("saliency").combine_chunks().to_numpy_ndarray())
    assert set(manifest["files"]) == {f"{remote['pattern'][:-len('*.tfrecord')]}part-{index}.tfrecord"
                                      for index in range(3)}


def test_overwrite_from_three_shards_to_one_leaves_only_the_new_shards(remote):
    run_dir = f"{remote['output']}/run_id=rerun"
    smoothgrad_audit.run(_args(remote, "rerun", "--num_shards", "3"))
    _, _, before = _corpus(run_dir)
    assert len([name for name in before if name.startswith("saliency-")]) == 3
    with pytest.raises(ConfigError, match="already holds a completed run"):
        smoothgrad_audit.run(_args(remote, "rerun", "--num_shards", "1"))
    smoothgrad_audit.run(_args(remote, "rerun", "--num_shards", "1", "--overwrite"))
    manifest, table, names = _corpus(run_dir)
    assert [name for name in names if name.startswith("saliency-")] == ["saliency-00000-of-00001.parquet"]
    assert sorted(names) == helpers.files_listed(manifest) and manifest["outputs"]["audit"]
    assert table.num_rows == 12 and manifest["rows_written"] == 12


def test_an_interrupted_run_is_cleaned_up(remote):
    run_dir = f"{remote['output']}/run_id=interrupted"
    for stray in ("saliency-00000-of-00007.parquet", "beam-temp-saliency-1/part", ".tmp-manifest"):
        with FileSystems.create(f"{run_dir}/{stray}") as handle:
            handle.write(b"left over by a run that died")
    smoothgrad_audit.run(_args(remote, "interrupted"))  # no manifest: not a completed run
    manifest, _, names = _corpus(run_dir)
    assert sorted(names) == helpers.files_listed(manifest) and manifest["outputs"]["audit"]


def test_the_manifest_is_written_after_every_shard(remote):
    run_dir = f"{remote['output']}/run_id=order"
    smoothgrad_audit.run(_args(remote, "order", "--num_shards", "2"))
    updated = {metadata.path.rsplit("/", 1)[1]: metadata.last_updated_in_seconds
               for metadata in FileSystems.match([f"{run_dir}/*"])[0].metadata_list}
    manifest_time = updated.pop("_MANIFEST.json")
    findings_time = updated.pop("_FINDINGS.json")
    assert len(updated) == 3 and all(findings_time >= shard_time for shard_time in updated.values())
    # the audit comes after the complete corpus; the manifest is written then, and again with the audit's gate
    assert manifest_time >= findings_time
    manifest = json.loads(_read(f"{run_dir}/_MANIFEST.json"))
    assert manifest["gate"]["fail_on"] == "never" and manifest["rows_written"] == 12


def test_storage_helpers_on_an_object_store(gcs_bucket):
    folder = f"{gcs_bucket}/helpers/run_id=x"
    assert not storage.exists(folder) and storage.files_under(folder) == []
    for name in ("a.parquet", "sub/b.bin"):
        with FileSystems.create(f"{folder}/{name}") as handle:
            handle.write(name.encode())
    assert not FileSystems.exists(folder)  # a prefix is not an object ...
    assert storage.exists(folder)  # ... but it holds files
    assert storage.files_under(folder) == [f"{folder}/a.parquet", f"{folder}/sub/b.bin"]
    local = storage.copy_to_local(folder)
    assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"sub/b.bin"
    assert storage.sha256(folder) == storage.sha256(local)  # the same names and bytes
    assert storage.clear_folder(folder) == 2 and storage.files_under(folder) == []


def test_a_scheduled_run_on_gcs_reuses_its_baseline_on_gcs(remote, gcs_bucket):
    output = f"{gcs_bucket}/scheduled"
    smoothgrad_audit.run(_args(remote, "monday", output=output))
    # one file changes: its records are re-read by offset from gs:// and explained, the others are carried over
    changed = helpers.write_image_dataset(str(remote["folder"] / "changed"), files=1, per_file=4, size=16,
                                          classes=3, seed=11)[0]
    prefix = f"{gcs_bucket}/datasets/scheduled"
    for index in range(3):
        source = changed if index == 1 else str(remote["folder"] / "data" / f"part-{index}.tfrecord")
        _upload(source, f"{prefix}/part-{index}.tfrecord")
    smoothgrad_audit.run(_args(remote, "tuesday", "--baseline", "latest", output=output,
                               pattern=f"{prefix}/*.tfrecord"))
    smoothgrad_audit.run(_args(remote, "fresh", output=f"{gcs_bucket}/fresh", pattern=f"{prefix}/*.tfrecord"))
    manifest, table, _ = _corpus(f"{output}/run_id=tuesday")
    _, fresh, _ = _corpus(f"{gcs_bucket}/fresh/run_id=fresh")
    assert manifest["baseline"]["run_id"] == "monday" and manifest["invariant_holds"]
    assert manifest["records_reused"] == 8 and manifest["records_changed"] == 4 and manifest["records_explained"] == 4
    for name in table.schema.names:
        assert table.column(name).equals(fresh.column(name)), name


def test_compare_of_two_runs_on_gcs_writes_its_page_to_gcs(remote, gcs_bucket):
    from pipelines.report import compare

    output = f"{gcs_bucket}/scheduled"
    if not storage.exists(f"{output}/run_id=tuesday/_MANIFEST.json"):
        pytest.skip("needs the scheduled runs of the test above")
    out = f"{gcs_bucket}/pages/compare"
    assert compare.main([f"{output}/run_id=monday", f"{output}/run_id=tuesday", "--out", out, "--top", "3"]) == 0
    page = _read(f"{out}/index.html").decode("utf-8")
    images = [name[len(out) + 1:] for name in storage.files_under(out) if name.endswith(".png")]
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and set(sources) <= set(images)  # every image the page shows is there, on gs://

def test_records_on_gcs_are_read_in_chunks_of_one_ranged_request_each(remote, gcs_bucket, monkeypatch):
    """The index pass streams through the file once; each chunk is then one request for its own bytes."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to
    from google.cloud.storage import Blob

    from transforms.read.records import Record, ReadTFRecords, read_records

    local = str(remote["folder"] / "chunked.tfrecord")
    helpers.write_tfrecords(local, [bytes([index]) * (1000 + 37 * index) for index in range(40)])
    path = _upload(local, f"{gcs_bucket}/datasets/chunked/part.tfrecord")
    with open(local, "rb") as handle:
        expected = [Record(path, item.record_index, item.data, item.offset) for item in read_records(handle, local)]
    fetched = []
    original = Blob.download_as_bytes

    def recording(self, *args, **kwargs):
        data = original(self, *args, **kwargs)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(Blob, "download_as_bytes", recording)
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        records, errors = pipeline | ReadTFRecords([path], chunk_records=8)
        assert_that(records, equal_to(expected), label="Records")
        assert_that(errors, equal_to([]), label="Errors")
    size = os.path.getsize(local)
    # one request for the index pass (the file is smaller than Beam's 16 MiB read-ahead), one per chunk;
    # Beam's default read-ahead would fetch the rest of the file for every chunk (about 3 x the file here)
    assert len(fetched) == 1 + 5
    assert sum(fetched) <= 2 * size + 5


def test_a_gated_run_and_audit_on_gcs(remote, gcs_bucket, capsys):
    """The gate, JUnit XML, rules and `audit RUN_DIR --out` with every path on gs://."""
    from pipelines.audit import command as audit_command
    from pipelines.audit import findings

    rules = _upload_text(f"{gcs_bucket}/config/rules.yaml", "unconverged_maps: {warn: 0.0, fail: 0.0}\n")
    junit = f"{gcs_bucket}/junit/gated.xml"
    output = f"{gcs_bucket}/gated"
    assert smoothgrad_audit.main(_args(remote, "gated", "--audit_rules", rules, "--fail_on", "fail",
                                       "--junit", junit, output=output)) == 3
    manifest = json.loads(_read(f"{output}/run_id=gated/_MANIFEST.json"))
    assert manifest["gate"]["tripped"] and manifest["gate"]["failing"] == ["unconverged_maps"]
    assert b"<failure" in _read(junit) and manifest["rows_written"] == 12
    # what a shortcut candidate's counterfactuals do: sampled records re-read from gs:// and decoded as the run did
    from pipelines.audit.audit import _Model
    from pipelines.audit.counterfactual import read_images
    from transforms.audit.read import read_samples

    sampled = [entry for entries in read_samples(f"{output}/run_id=gated").values() for entry in entries][:5]
    images = read_images(sampled, _Model(manifest).decode_settings)
    assert sorted(images) == sorted(entry.key for entry in sampled)
    assert all(image.shape == (16, 16, 3) and image.dtype == np.float32 for image in images.values())
    # audited again: with the run's own rules the gate trips again; with the defaults (a rules file on gs://
    # that changes nothing) it does not; the findings are written elsewhere on gs://
    out = f"{gcs_bucket}/regated"
    assert audit_command.main([f"{output}/run_id=gated", "--out", out]) == 3
    defaults = _upload_text(f"{gcs_bucket}/config/defaults.yaml", "{}\n")
    assert audit_command.main([f"{output}/run_id=gated", "--rules", defaults, "--out", out, "--fail_on", "fail",
                               "--junit", f"{out}/junit.xml"]) == 0
    again = findings.read(out)
    assert [check for check in again["checks"] if check["check"] == "unconverged_maps"][0]["status"] == "pass"
    assert capsys.readouterr().out.strip().endswith(f"{again['status']} {out}/_FINDINGS.json")


def _upload_text(remote_path: str, text: str) -> str:
    with FileSystems.create(remote_path) as target:
        target.write(text.encode("utf-8"))
    return remote_path
