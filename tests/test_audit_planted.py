"""The audit end to end: a planted shortcut is found, placed, its members listed and confirmed; its clean twin raises nothing.

A generated dataset (``pipelines.demo.planted``) puts a small mark at a fixed
corner on most images of one class, in training and test data, and a model
trained on it learns the mark; the clean twin has the same images without it.
Both test splits go through the real pipeline with ``audit: true``.
"""

from __future__ import annotations

import glob
import json
import os

import jsonschema
import pyarrow.parquet as pq
import pytest

from pipelines import smoothgrad_audit
from pipelines.audit.findings import FINDINGS_SCHEMA
from pipelines.demo import planted

SPEC = planted.PlantedSpec(task="shapes", classes=3, image_size=32, train=1800, test=150, mark="patch",
                           place="bottom-left", shortcut_class=2, share=0.8, architecture="cnn_max", epochs=6,
                           seed=11)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    truths = planted.make_planted(SPEC, str(folder))
    runs = {}
    for twin in ("planted", "clean"):
        output = str(folder / f"out-{twin}")
        smoothgrad_audit.run(["--input", str(folder / twin / "test-*.tfrecord"), "--output", output,
                              "--model", str(folder / twin / "model.keras"), "--run_id", twin,
                              "--id_feature", "image/id", "--samples", "10", "--batch_size", "16",
                              "--progress_seconds", "0"])
        run_dir = os.path.join(output, f"run_id={twin}")
        with open(os.path.join(run_dir, "_FINDINGS.json")) as handle:
            runs[twin] = {"findings": json.load(handle), "run_dir": run_dir, "truth": truths[twin]}
    return runs


def _regions(document, *statuses):
    return [check for check in document["checks"] if check["check"] == "shortcut_region"
            and check["status"] in statuses]


def test_the_planted_shortcut_is_found_placed_and_confirmed(audited):
    run, truth = audited["planted"], audited["planted"]["truth"]
    assert truth["reliance"]["flipped_share"] >= 0.5  # the model did learn the mark (the premise of the test)
    jsonschema.validate(run["findings"], FINDINGS_SCHEMA)
    [finding] = _regions(run["findings"], "warn", "fail")
    assert finding["class"] == truth["shortcut_class"] and finding["status"] == "fail"
    assert finding["confirmed"] is True and run["findings"]["status"] == "fail"
    y0, x0, y1, x1 = finding["region"]
    by0, bx0, by1, bx1 = truth["box"]
    overlap = max(0, min(y1, by1) - max(y0, by0)) * max(0, min(x1, bx1) - max(x0, bx0))
    assert overlap >= 0.5 * (by1 - by0) * (bx1 - bx0)  # the region covers most of the mark
    members, planted_keys = set(finding["keys"]), set(truth["planted_keys"])
    # members are sampled maps of the class (the sample holds every map here: fewer than audit_samples)
    precision = len(members & planted_keys) / len(members)
    recall = len(members & planted_keys) / len(planted_keys & _keys_of_class(run["run_dir"], finding["class"]))
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    assert finding["keys_total"] == len(members)


def _keys_of_class(run_dir, target):
    paths = glob.glob(os.path.join(run_dir, "saliency-*.parquet"))
    table = pq.read_table(paths, columns=["key", "target"], partitioning=None)
    return {key for key, of in zip(table.column("key").to_pylist(), table.column("target").to_pylist())
            if of == target}


def test_the_clean_twin_raises_no_region(audited):
    run = audited["clean"]
    jsonschema.validate(run["findings"], FINDINGS_SCHEMA)
    assert _regions(run["findings"], "warn", "fail") == []
    checks = {check["check"] for check in run["findings"]["checks"]}
    assert checks >= {"shortcut_region", "strategy_clusters", "border_attention", "class_accuracy",
                      "unconverged_maps", "confident_mistakes", "error_rate"}  # every check appears
