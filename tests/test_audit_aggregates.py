"""The audit's aggregates: class saliency by a combiner, per-class key-hash samples, their files and readers."""

from __future__ import annotations

import collections
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import smoothgrad_audit
from tests import helpers
from transforms.audit import aggregates
from transforms.audit.aggregates import AuditAggregates, AuditSettings, ClassSaliencyFn
from transforms.audit.pooling import AUDIT_DIR, GROUPS, Grid, pooling_factor, unit_mass_pooled
from transforms.audit.read import AuditReadError, read_class_saliency, read_grid, read_samples
from transforms.engine.noise import key_seed

SAMPLES = 10  # audit_samples in these runs: fewer than the rows of every class


def _unlabelled_file(path, count, seed):
    images = helpers.random_images(count, size=16, seed=seed)
    helpers.write_tfrecords(path, [helpers.example(helpers.png(image)) for image in images])


def _run(pattern, output, model, run_id, *extra):
    smoothgrad_audit.run(["--input", pattern, "--output", output, "--model", model, "--run_id", run_id,
                          "--samples", "3", "--noise", "0.2", "--batch_size", "4", "--target", "topk:3",
                          "--audit_samples", str(SAMPLES), *extra])
    run_dir = os.path.join(output, f"run_id={run_id}")
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        return run_dir, json.load(handle)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on 16 labelled and 4 unlabelled records, three maps each (topk:3): every class has 20 rows."""
    folder = tmp_path_factory.mktemp("audit")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=8, size=16, classes=3)
    _unlabelled_file(str(folder / "data" / "unlabelled.tfrecord"), 4, seed=7)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    pattern, output = str(folder / "data" / "*.tfrecord"), str(folder / "out")
    return {"model": model, "pattern": pattern, "output": output,
            "first": _run(pattern, output, model, "first"),
            "again": _run(pattern, output, model, "again"),
            "other_seed": _run(pattern, output, model, "other-seed", "--seed", "1", "--downsample", "2",
                               "--dtype", "float16"),
            "off": _run(pattern, output, model, "off", "--no-audit")}


def _corpus(run_dir, manifest):
    """Every saliency row of a run (its shards as the manifest lists them), with its stored map as numpy."""
    table = pq.read_table([os.path.join(run_dir, name) for name in manifest["outputs"]["saliency"]])
    maps = table.column("saliency").combine_chunks().to_numpy_ndarray()
    rows = table.drop_columns(["saliency"]).to_pylist()
    return [dict(row, saliency=stored) for row, stored in zip(rows, maps)]


def _expected_class_saliency(rows, factor):
    """(target, group) → (count, mean, std) by numpy over the stored maps."""
    grouped = collections.defaultdict(list)
    for row in rows:
        pooled = unit_mass_pooled(np.asarray(row["saliency"]), factor)
        grouped[(row["target"], "all")].append(pooled)
        if row["label"] is not None:
            grouped[(row["target"], "correct" if row["predicted"] == row["label"] else "wrong")].append(pooled)
    return {key: (len(maps), np.mean(np.asarray(maps, np.float64), axis=0),
                  np.std(np.asarray(maps, np.float64), axis=0)) for key, maps in grouped.items()}


def _assert_class_saliency_matches(found, expected, rtol=1e-6, atol=1e-9):
    assert [(item.target, item.group) for item in found] == sorted(expected, key=lambda key: (key[0],
                                                                                               GROUPS.index(key[1])))
    for item in found:
        count, mean, std = expected[(item.target, item.group)]
        assert item.count == count, (item.target, item.group)
        np.testing.assert_allclose(item.mean, mean, rtol=rtol, atol=atol)
        np.testing.assert_allclose(item.std, std, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["first", "other_seed"])
def test_class_saliency_equals_numpy_over_the_stored_maps(runs, name):
    run_dir, manifest = runs[name]
    rows = _corpus(run_dir, manifest)
    factor = pooling_factor(np.asarray(rows[0]["saliency"]).shape)
    found = read_class_saliency(run_dir)
    _assert_class_saliency_matches(found, _expected_class_saliency(rows, factor))
    counts = {(item.target, item.group): item.count for item in found}
    for target in range(3):  # rows with and without labels: the unlabelled ones are only in "all"
        assert counts[(target, "all")] == 20
        assert counts.get((target, "correct"), 0) + counts.get((target, "wrong"), 0) == 16
    assert all(abs(item.mean.sum() - 1.0) < 1e-6 for item in found)  # a mean of unit-mass maps has unit mass
    assert found[0].mean.dtype == np.float64 and found[0].mean.shape == tuple(manifest["audit"]["cells"])


def test_the_manifest_lists_the_audit_files_and_grid(runs):
    run_dir, manifest = runs["first"]
    assert manifest["audit"] == {"cells": [16, 16], "factor": 1, "cell": 1, "input_shape": [16, 16],
                                 "samples_per_class": SAMPLES}
    assert manifest["outputs"]["audit"] == [f"{AUDIT_DIR}/class_saliency-00000-of-00001.parquet",
                                            f"{AUDIT_DIR}/class_sample-00000-of-00001.parquet"]
    written = sorted(os.path.relpath(path, run_dir) for path in glob.glob(os.path.join(run_dir, "**"), recursive=True)
                     if os.path.isfile(path))
    assert written == helpers.files_listed(manifest)  # the listed files, and what the audit wrote after them
    assert set(manifest["outputs"]["audit"]) < set(written)
    assert read_grid(manifest) == Grid(cells=(16, 16), cell=1, input_shape=(16, 16))
    # downsample 2: 8 x 8 stored maps, factor 1, a cell is 2 input pixels
    assert read_grid(runs["other_seed"][1]) == Grid(cells=(8, 8), cell=2, input_shape=(16, 16))
    schema = pq.read_schema(os.path.join(run_dir, manifest["outputs"]["audit"][1]))
    assert schema.field("pooled").type.shape == [16, 16] and schema.field("label").nullable


def test_the_sample_is_the_smallest_key_hashes_of_each_class(runs):
    run_dir, manifest = runs["first"]
    rows = {(row["key"], row["target"]): row for row in _corpus(run_dir, manifest)}
    samples = read_samples(run_dir)
    assert sorted(samples) == [0, 1, 2]
    for target, sample in samples.items():
        keys = sorted((key for key, row_target in rows if row_target == target), key=lambda key: key_seed(0, key))
        assert len(keys) == 20 and len(sample) == SAMPLES  # bounded by audit_samples, not by the rows
        assert [item.key for item in sample] == keys[:SAMPLES]  # in sample order: ascending key hash
        for item in sample:
            row = rows[(item.key, target)]
            assert (item.target, item.source_file, item.record_index, item.label, item.predicted, item.target_rank) \
                == (row["target"], row["source_file"], row["record_index"], row["label"], row["predicted"],
                    row["target_rank"])
            assert item.score == pytest.approx(row["score"], rel=1e-7)
            np.testing.assert_array_equal(item.pooled, unit_mass_pooled(np.asarray(row["saliency"]), 1))
            assert item.pooled.dtype == np.float32


def test_the_sample_is_deterministic_with_the_seed(runs):
    keys = {name: {target: [item.key for item in sample] for target, sample in read_samples(runs[name][0]).items()}
            for name in ("first", "again", "other_seed")}
    assert keys["first"] == keys["again"]
    assert keys["first"] != keys["other_seed"]  # 10 of 20 rows per class: another seed picks another sample
    assert all(len(sample) == SAMPLES for sample in keys["other_seed"].values())


def test_audit_false_writes_no_audit_folder(runs):
    run_dir, manifest = runs["off"]
    assert manifest["audit"] is None and manifest["outputs"]["audit"] == []
    assert not os.path.exists(os.path.join(run_dir, AUDIT_DIR))
    assert sorted(os.listdir(run_dir)) == sorted(["_MANIFEST.json", *manifest["outputs"]["saliency"],
                                                  *manifest["outputs"]["errors"]])
    with pytest.raises(AuditReadError, match="audit: false"):
        read_class_saliency(run_dir)
    with pytest.raises(AuditReadError, match="audit: false"):
        read_grid(manifest)


def test_a_run_with_a_baseline_has_the_aggregates_of_a_fresh_run(runs, tmp_path):
    """Run B reuses the rows of A for unchanged records; its aggregates equal those of C, which explains all."""
    helpers.write_image_dataset(str(tmp_path / "old"), files=2, per_file=8, size=16, classes=3)
    helpers.write_image_dataset(str(tmp_path / "new"), files=2, per_file=8, size=16, classes=3)
    helpers.write_image_dataset(str(tmp_path / "added"), files=1, per_file=6, size=16, classes=3, seed=5)
    os.rename(str(tmp_path / "added" / "part-0.tfrecord"), str(tmp_path / "new" / "added.tfrecord"))
    output = str(tmp_path / "out")
    _run(str(tmp_path / "old" / "*.tfrecord"), output, runs["model"], "A")
    run_b, manifest_b = _run(str(tmp_path / "new" / "*.tfrecord"), output, runs["model"], "B",
                             "--baseline", os.path.join(output, "run_id=A"))
    run_c, manifest_c = _run(str(tmp_path / "new" / "*.tfrecord"), output, runs["model"], "C")
    assert manifest_b["records_reused"] == 16 and manifest_b["records_explained"] == 6
    found_b, found_c = read_class_saliency(run_b), read_class_saliency(run_c)
    assert [(item.target, item.group, item.count) for item in found_b] \
        == [(item.target, item.group, item.count) for item in found_c]
    assert all(item.count == 22 for item in found_b if item.group == "all")
    for item_b, item_c in zip(found_b, found_c):  # maps within a few float32 ulp of each other (batch positions)
        np.testing.assert_allclose(item_b.mean, item_c.mean, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(item_b.std, item_c.std, rtol=1e-4, atol=1e-8)
    assert any(name.startswith("saliency-reused-") for name in manifest_b["outputs"]["saliency"])
    _assert_class_saliency_matches(found_b, _expected_class_saliency(_corpus(run_b, manifest_b), 1))
    samples_b, samples_c = read_samples(run_b), read_samples(run_c)
    assert {target: [item.key for item in sample] for target, sample in samples_b.items()} \
        == {target: [item.key for item in sample] for target, sample in samples_c.items()}
    assert any(item.key.startswith("added") for sample in samples_b.values() for item in sample)  # both branches
    assert any(item.key.startswith("part") for sample in samples_b.values() for item in sample)


# ----------------------------------------------------------------- the combiners, driven directly
def test_the_accumulator_does_not_grow_with_the_records():
    combine, rng = ClassSaliencyFn((16, 16)), np.random.default_rng(0)
    accumulators = {target: combine.create_accumulator() for target in range(4)}
    sizes, sums, squares = {}, np.zeros((4, 16, 16)), np.zeros((4, 16, 16))
    for step in range(100_000):
        target = step % 4
        pooled = unit_mass_pooled(rng.random((16, 16), np.float32), 1) if step < 1_000 \
            else rng.random((16, 16)).astype(np.float32)  # cheaper past the first thousand: values need no unit mass
        accumulators[target] = combine.add_input(accumulators[target], pooled)
        sums[target] += pooled
        squares[target] += np.asarray(pooled, np.float64) ** 2
        if step + 1 in (1_000, 100_000):
            sizes[step + 1] = [(array.shape, array.nbytes) for accumulator in accumulators.values()
                               for array in accumulator[1:]]
    assert sizes[1_000] == sizes[100_000] == [((16, 16), 16 * 16 * 8)] * 8
    merged = combine.merge_accumulators([accumulators[0], accumulators[1]])
    count, mean, std = combine.extract_output(merged)
    assert count == 50_000
    total = sums[0] + sums[1]
    np.testing.assert_allclose(mean, total / count, rtol=1e-12)
    np.testing.assert_allclose(std, np.sqrt(np.maximum(0, (squares[0] + squares[1]) / count - (total / count) ** 2)),
                               rtol=1e-12)
    assert combine.extract_output(combine.create_accumulator())[0] == 0


def _synthetic_row(index, classes=3, shape=(66, 90, 3), seed=1):
    """One saliency row made from its index (so that a pipeline can make its rows rather than carry them)."""
    rng = np.random.default_rng([seed, index])
    label = None if index % 7 == 0 else int(rng.integers(0, classes))
    return {"key": f"s{seed}:{index}", "source_file": f"file-{seed}", "record_index": index, "label": label,
            "target": index % classes, "target_rank": 0, "score": float(rng.normal()),
            "predicted": int(rng.integers(0, classes)), "saliency": rng.normal(size=shape).astype(np.float32)}


@pytest.mark.parametrize("branches", [1, 2])
def test_the_aggregates_on_many_rows_one_stage_or_two(tmp_path, branches):
    """1,500 rows of 3 classes, 66 x 90 x 3 maps (pooled by 2): exact sums, and a sample of 10 per class."""
    count, classes, shape = 1_500, 3, (66, 90, 3)
    settings = AuditSettings.for_maps(shape, SAMPLES, seed=4)
    assert (settings.factor, settings.cells) == (2, (33, 45))
    run_dir = str(tmp_path / "run")
    with beam.Pipeline() as pipeline:
        made = [pipeline | f"Indices{part}" >> beam.Create(range(part, count, branches))
                | f"Rows{part}" >> beam.Map(_synthetic_row) for part in range(branches)]
        inputs = made[0] if branches == 1 else {"": made[0], "Reused": made[1]}
        _ = inputs | "AuditAggregates" >> AuditAggregates(run_dir, settings)
    names = sorted(os.path.relpath(path, run_dir) for path in glob.glob(os.path.join(run_dir, AUDIT_DIR, "*")))
    manifest = {"audit": settings.manifest_block(1, shape[:2]), "outputs": {"audit": names}}
    rows = [_synthetic_row(index) for index in range(count)]
    _assert_class_saliency_matches(read_class_saliency(run_dir, manifest), _expected_class_saliency(rows, 2))
    samples = read_samples(run_dir, manifest)
    for target in range(classes):
        keys = sorted((row["key"] for row in rows if row["target"] == target), key=lambda key: key_seed(4, key))
        assert [item.key for item in samples[target]] == keys[:SAMPLES]  # bounded by n: 10 of 500
        assert samples[target][0].pooled.shape == (33, 45)


def test_pool_row_keys_and_groups():
    row = _synthetic_row(1, shape=(6, 6), seed=2)
    row.update(label=1, predicted=1, target=2)
    key_hash, sampled = aggregates.pool_row(row, 2, seed=9)
    assert key_hash == key_seed(9, row["key"]) and sampled.pooled.shape == (3, 3)
    assert [key for key, _ in aggregates.saliency_keys((key_hash, sampled))] == [(2, "all"), (2, "correct")]
    row.update(label=0)
    assert [key for key, _ in aggregates.saliency_keys(aggregates.pool_row(row, 2, 9))] == [(2, "all"), (2, "wrong")]
    row.update(label=None)
    assert [key for key, _ in aggregates.saliency_keys(aggregates.pool_row(row, 2, 9))] == [(2, "all")]
