"""The Beam pipeline end to end: TFRecords made here → run([...]) → Parquet read back."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipelines import smoothgrad_audit
from transforms.engine.device import cpu_kernels_in_effect
from pipelines.run.config import ConfigError
from tests import helpers
from transforms.engine.smoothgrad import SmoothGrad


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    paths = helpers.write_image_dataset(str(folder / "data"), files=2, per_file=5, size=16, classes=3)
    model_path = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    return {"folder": folder, "paths": paths, "pattern": str(folder / "data" / "*.tfrecord"), "model": model_path}


def _run(dataset, run_id, *extra):
    """A run; its worker processes (if any) use the kernel library this process loaded, as in-process runs do."""
    output = str(dataset["folder"] / "out")
    kernels = [] if "--cpu_kernels" in extra else ["--cpu_kernels", cpu_kernels_in_effect()]
    result = smoothgrad_audit.run(["--input", dataset["pattern"], "--output", output, "--model", dataset["model"],
                                   "--run_id", run_id, "--samples", "4", "--noise", "0.2", "--batch_size", "4",
                                   *kernels, *extra])
    run_dir = os.path.join(output, f"run_id={run_id}")
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        manifest = json.load(handle)
    table = pq.read_table(sorted(glob.glob(os.path.join(run_dir, "saliency-*.parquet"))), partitioning=None)
    return result, manifest, table, run_dir


def _metric(result, name):
    counters = result.metrics().query()["counters"]
    return sum(item.committed for item in counters if item.key.metric.name == name)


def _model_loads(result):
    """Model loads, from RunInference's standard metric: one load-latency sample per load."""
    distributions = result.metrics().query()["distributions"]
    return sum(item.committed.count for item in distributions
               if item.key.metric.name == "load_model_latency_milli_secs"
               and item.key.metric.namespace == "smoothgrad_audit")


def _engine_maps(dataset, keys, **engine_args):
    """The engine's maps for the given keys, on images decoded here independently."""
    import keras

    images = {}
    for path in dataset["paths"]:
        for index, data in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            parsed = tf.io.parse_single_example(data, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
            pixels = tf.io.decode_png(parsed["image/encoded"], channels=3).numpy().astype(np.float32)
            images[f"{os.path.basename(path)}:{index}"] = pixels / 127.5 - 1.0
    model = keras.saving.load_model(dataset["model"])
    engine = SmoothGrad(model, **engine_args)
    return engine(np.stack([images[key] for key in keys]), keys)


def test_corpus_matches_engine_and_manifest(dataset):
    result, manifest, table, run_dir = _run(dataset, "basic")
    assert table.num_rows == 10
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(f"part-{f}.tfrecord:{i}" for f in range(2) for i in range(5))
    maps = table.column("saliency").combine_chunks().to_numpy_ndarray()
    assert maps.shape == (10, 16, 16)
    expected = _engine_maps(dataset, keys, samples=4, noise=0.2, batch_size=4)
    np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(table.column("target").to_numpy(), expected.targets)
    np.testing.assert_allclose(table.column("score").to_numpy(), expected.scores, rtol=1e-5)
    assert table.column("height").to_pylist() == [16] * 10
    from transforms.engine.statistics import STATISTICS, map_statistics

    for row, saliency in enumerate(maps):  # the statistics columns describe the stored (full-resolution) map
        expected_figures = map_statistics(saliency)
        for name in STATISTICS:
            assert table.column(name)[row].as_py() == pytest.approx(expected_figures[name], rel=1e-5, abs=1e-6)
    # the engine's split-half reliability of each map, through RunInference to the corpus
    np.testing.assert_allclose(table.column("reliability").to_numpy(), expected.reliability, rtol=1e-5)
    assert -1.0 <= min(expected.reliability) and max(expected.reliability) < 1.0
    assert table.schema.field("saliency").type == pa.fixed_shape_tensor(pa.float32(), [16, 16])
    assert set(table.column("label").to_pylist()) <= {0, 1, 2}
    # manifest: counts, invariant, provenance
    assert manifest["records_read"] == 10 and manifest["records_explained"] == 10
    assert manifest["rows_written"] == 10 and manifest["errors_total"] == 0
    assert manifest["invariant_holds"] is True
    assert set(manifest["files"]) == set(dataset["paths"])
    assert all(entry["records_read"] == 5 for entry in manifest["files"].values())
    assert manifest["smoothgrad"]["samples"] == 4 and manifest["model"]["classes"] == 3
    assert len(manifest["model"]["sha256"]) == 64
    assert manifest["jit_used"] == (["xla"] if tf.config.list_logical_devices("GPU") else ["graph"])
    assert set(manifest["versions"]) >= {"python", "tensorflow", "keras", "apache_beam"}
    assert manifest["outputs"]["errors"] == ["errors-00000-of-00001.parquet"]
    assert manifest["outputs"]["audit"] == ["_audit/class_saliency-00000-of-00001.parquet",
                                            "_audit/class_sample-00000-of-00001.parquet"]
    assert helpers.files_in_run(run_dir) == helpers.files_listed(manifest)
    assert pq.read_table(os.path.join(run_dir, "errors-00000-of-00001.parquet")).num_rows == 0
    metadata = json.loads(pq.read_schema(glob.glob(os.path.join(run_dir, "saliency-*"))[0])
                          .metadata[b"smoothgrad_audit"])
    assert metadata["run_id"] == "basic" and metadata["noise"] == 0.2
    # the model is loaded and compiled once in this single worker process
    assert _model_loads(result) == 1
    assert _metric(result, "engine_compiles") == 1
    assert _metric(result, "num_inferences") == 10  # RunInference's own count, in the project's namespace
    assert _metric(result, "records_explained") == 10


def test_topk_float16_downsample(dataset):
    _, manifest, table, _ = _run(dataset, "topk", "--target", "topk:2", "--dtype", "float16", "--downsample", "2")
    assert table.num_rows == 20 and manifest["rows_written"] == 20 and manifest["records_explained"] == 10
    assert manifest["invariant_holds"] is True
    assert table.schema.field("saliency").type == pa.fixed_shape_tensor(pa.float16(), [8, 8])
    ranks = {}
    for key, rank, score in zip(table.column("key").to_pylist(), table.column("target_rank").to_pylist(),
                                table.column("score").to_pylist()):
        ranks.setdefault(key, {})[rank] = score
    assert all(set(by_rank) == {0, 1} and by_rank[0] >= by_rank[1] for by_rank in ranks.values())
    keys = table.column("key").to_pylist()
    maps = table.column("saliency").combine_chunks().to_numpy_ndarray().astype(np.float32)
    expected = _engine_maps(dataset, sorted(set(keys)), samples=4, noise=0.2, batch_size=4, target="topk:2")
    position = {key: index for index, key in enumerate(sorted(set(keys)))}
    for row, (key, rank) in enumerate(zip(keys, table.column("target_rank").to_pylist())):
        full = expected.maps[position[key], rank]
        pooled = full.reshape(8, 2, 8, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(maps[row], pooled, rtol=2e-3, atol=1e-6)  # float16 rounding


def test_two_worker_processes_give_the_same_corpus(dataset):
    _, one_manifest, one, _ = _run(dataset, "one-worker")
    result, manifest, two, _ = _run(dataset, "two-workers", "--direct_num_workers", "2",
                                    "--direct_running_mode", "multi_processing")
    assert manifest["invariant_holds"] and manifest["rows_written"] == one_manifest["rows_written"]
    one_sorted = one.sort_by("key")
    two_sorted = two.sort_by("key")
    assert one_sorted.column("key").to_pylist() == two_sorted.column("key").to_pylist()
    np.testing.assert_allclose(one_sorted.column("saliency").combine_chunks().to_numpy_ndarray(),
                               two_sorted.column("saliency").combine_chunks().to_numpy_ndarray(), rtol=1e-6)
    assert 1 <= _model_loads(result) <= 2  # at most once per worker process


def test_model_copies_share_one_model_across_worker_processes(dataset):
    _, _, single, _ = _run(dataset, "single-process")
    result, manifest, shared, _ = _run(dataset, "shared-model", "--model_copies", "1", "--direct_num_workers", "2",
                                       "--direct_running_mode", "multi_processing")
    assert manifest["invariant_holds"] and manifest["records_explained"] == 10
    assert manifest["config"]["model_copies"] == 1
    single, shared = single.sort_by("key"), shared.sort_by("key")
    assert single.column("key").to_pylist() == shared.column("key").to_pylist()
    np.testing.assert_array_equal(single.column("saliency").combine_chunks().to_numpy_ndarray(),
                                  shared.column("saliency").combine_chunks().to_numpy_ndarray())
    assert _model_loads(result) == 1  # one model for the machine, not one per worker process


def test_samples_auto_loads_one_model_for_every_stage_and_model_copies_give_the_same_corpus(dataset, caplog):
    auto = ("--samples", "auto", "--min_samples", "2", "--max_samples", "8", "--target_reliability", "0.97")
    with caplog.at_level(logging.INFO, logger="transforms.explain.explain"):
        _, manifest, single, _ = _run(dataset, "auto-single", *auto)
    assert sum("Loaded" in record.getMessage() for record in caplog.records) == 1  # one engine, every stage
    assert manifest["invariant_holds"] and manifest["samples_used"]["records"] == 10
    assert manifest["samples_used"]["max"] > 2  # later stages ran
    _, shared_manifest, shared, _ = _run(dataset, "auto-shared", *auto, "--model_copies", "1",
                                         "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")
    assert shared_manifest["invariant_holds"] and shared_manifest["samples_used"] == manifest["samples_used"]
    single, shared = single.sort_by("key"), shared.sort_by("key")
    assert single.column("samples_used").to_pylist() == shared.column("samples_used").to_pylist()
    np.testing.assert_array_equal(single.column("saliency").combine_chunks().to_numpy_ndarray(),
                                  shared.column("saliency").combine_chunks().to_numpy_ndarray())


def test_flags_override_config_file(dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {dataset['pattern']}\noutput: {tmp_path / 'out'}\nmodel: {dataset['model']}\n"
                      "samples: 3\nnoise: 0.5\nrun_id: from-file\n")
    smoothgrad_audit.run(["--config", str(config), "--noise", "0.25", "--run_id", "from-flag"])
    manifest = json.loads((tmp_path / "out" / "run_id=from-flag" / "_MANIFEST.json").read_text())
    assert manifest["smoothgrad"]["samples"] == 3 and manifest["smoothgrad"]["noise"] == 0.25
    assert not (tmp_path / "out" / "run_id=from-file").exists()


def test_help_lists_every_option_with_default(capsys):
    from pipelines.run.config import Config

    with pytest.raises(SystemExit) as exit_info:
        smoothgrad_audit.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in Config.keys():
        assert f"--{key}" in text
    assert "(default: 20)" in text and "(default: 'mean_abs')" in text


def test_completed_run_is_not_overwritten_without_flag(dataset):
    _run(dataset, "again")
    with pytest.raises(ConfigError, match="already holds a completed run"):
        _run(dataset, "again")
    _, manifest, _, _ = _run(dataset, "again", "--overwrite")
    assert manifest["invariant_holds"]


def test_precision_is_recorded_in_the_manifest_and_parquet_metadata(dataset):
    _, manifest, table, _ = _run(dataset, "bf16", "--precision", "bfloat16")
    _, reference_manifest, reference, _ = _run(dataset, "f32-reference")
    assert manifest["smoothgrad"]["precision"] == "bfloat16" and manifest["config"]["precision"] == "bfloat16"
    assert reference_manifest["smoothgrad"]["precision"] == "float32"
    metadata = json.loads(table.schema.metadata[b"smoothgrad_audit"])
    assert metadata["precision"] == "bfloat16"
    bf16 = table.sort_by("key").column("saliency").combine_chunks().to_numpy_ndarray()
    f32 = reference.sort_by("key").column("saliency").combine_chunks().to_numpy_ndarray()
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, f32)
    assert np.corrcoef(bf16.ravel(), f32.ravel())[0, 1] > 0.9


def test_worker_processes_compute_with_the_runs_cpu_kernels(dataset, monkeypatch):
    """The local runner's worker processes inherit the kernel library the run asks for, whatever this process has."""
    from transforms.engine.device import ENVIRONMENT_VARIABLE, cpu_kernels_in_effect

    here = cpu_kernels_in_effect()
    other = "eigen" if here == "onednn" else "onednn"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1" if here == "onednn" else "0")  # restored after the test
    _, manifest, _, _ = _run(dataset, "other-kernels", "--cpu_kernels", other, "--direct_num_workers", "2",
                             "--direct_running_mode", "multi_processing")
    assert manifest["devices_used"] and all(kind.endswith(f"] {other}") for kind in manifest["devices_used"])
    assert manifest["fingerprint"]["device"].endswith(f"] {other}") and manifest["config"]["cpu_kernels"] == other
