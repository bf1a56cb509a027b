"""Drift against a previous run: real tiny runs of the pipeline, the same model again and another model."""

from __future__ import annotations

import json
import os
import re
import shutil

import jsonschema
import numpy as np
import pyarrow as pa
import pytest

from pipelines import smoothgrad_audit
from pipelines.audit import findings
from pipelines.audit import rules as audit_rules
from pipelines.audit.audit import audit_run
from pipelines.audit.drift import cliffs_delta, drift_checks, iou, new_shortcuts, prediction_flips, previous_run
from pipelines.audit.findings import Check
from pipelines.report import report, run_data
from tests import helpers
from tests.test_report import read_page

CLASSES = 3
DRIFT = ("drift_class_mean", "drift_map_agreement", "drift_prediction_flips", "drift_statistics",
         "drift_new_shortcut")
NO_PREVIOUS = "Not measured: no previous run to compare with (set compare_with)."


def _run(folder, model, run_id, *extra, output="out"):
    smoothgrad_audit.run(["--input", str(folder / "data" / "*.tfrecord"), "--output", str(folder / output),
                          "--model", model, "--run_id", run_id, "--samples", "3", "--batch_size", "8",
                          "--sanity_records", "0", "--target", f"topk:{CLASSES}",  # every class has every record
                          "--audit_samples", "10", *extra])
    run_dir = str(folder / output / f"run_id={run_id}")
    return run_dir, findings.read(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs on the same 16 records: a model, the same model again, a model with other initial weights."""
    folder = tmp_path_factory.mktemp("drift")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=8, size=16, classes=CLASSES)
    first_model = helpers.save_tiny_cnn(str(folder), size=16, classes=CLASSES, seed=0)
    other_model = str(folder / "other.keras")
    helpers.tiny_cnn(size=16, classes=CLASSES, seed=1).save(other_model)
    first = _run(folder, first_model, "first")
    again = _run(folder, first_model, "again", "--compare_with", "latest")  # the run's own audit compares
    other = _run(folder, other_model, "other", "--compare_with", first[0])
    return {"folder": folder, "first": first, "again": again, "other": other}


def _drift(document) -> list[dict]:
    return [check for check in document["checks"] if check["check"].startswith("drift_")]


def _evidence(run_dir) -> dict:
    with open(os.path.join(run_dir, "_audit", "evidence.json")) as handle:
        return json.load(handle)


def _first_predictions(run_dir) -> dict:
    run = run_data.open_run(run_dir)
    first = run.values("target_rank") == 0
    return dict(zip(run.values("key")[first], run.values("predicted")[first].astype(int)))


def test_without_a_previous_run_one_passing_entry_says_so(runs):
    _, document = runs["first"]
    assert [(check["check"], check["status"], check["summary"]) for check in _drift(document)] == [
        ("drift_class_mean", "pass", NO_PREVIOUS)]
    assert "drift" not in _evidence(runs["first"][0])


def test_the_same_model_on_the_same_records_has_no_drift(runs):
    run_dir, document = runs["again"]
    jsonschema.validate(document, findings.FINDINGS_SCHEMA)
    entries = _drift(document)
    assert all(check["status"] == "pass" for check in entries), entries
    by_check = {name: [check for check in entries if check["check"] == name] for name in DRIFT}
    assert sorted(check["class"] for check in by_check["drift_class_mean"]) == list(range(CLASSES))
    assert sorted(check["class"] for check in by_check["drift_statistics"]) == list(range(CLASSES))
    assert [len(by_check[name]) for name in DRIFT[1:3] + DRIFT[4:]] == [1, 1, 1]
    for check in by_check["drift_class_mean"] + by_check["drift_map_agreement"]:
        assert check["measure"] == pytest.approx(1.0) and check["keys"] == []  # identical maps
    assert by_check["drift_map_agreement"][0]["summary"].startswith(f"Over {CLASSES * 10} maps sampled")
    assert by_check["drift_prediction_flips"][0]["measure"] == 0.0
    assert "0 of 16 records" in by_check["drift_prediction_flips"][0]["summary"]
    assert all(check["measure"] == 0.0 for check in by_check["drift_statistics"])
    # compare_with: latest found the run made before this one; the evidence names it
    evidence = _evidence(run_dir)
    assert evidence["drift"]["previous"]["run_id"] == "first"
    assert evidence["drift"]["agreement"]["pairs"] == CLASSES * 10
    with np.load(os.path.join(run_dir, "_audit", "evidence.npz")) as arrays:
        for target in range(CLASSES):
            assert np.abs(arrays[f"drift_class_{target}_difference"]).max() == 0.0
            assert np.allclose(arrays[f"drift_class_{target}_previous"], arrays[f"class_{target}_mean"], atol=1e-7)


def test_another_model_on_the_same_records_drifts(runs):
    run_dir, document = runs["other"]
    entries = {(check["check"], check["class"]): check for check in _drift(document)}
    assert {name for name, _ in entries} == set(DRIFT)
    moved = [check for (name, _), check in entries.items() if name in ("drift_class_mean", "drift_map_agreement")
             and check["status"] != "pass"]
    assert moved, entries
    agreement = entries[("drift_map_agreement", None)]
    assert agreement["measure"] < 0.9 and agreement["keys"]
    # the flips are exactly the records whose first prediction differs between the corpora
    before, after = _first_predictions(runs["first"][0]), _first_predictions(run_dir)
    flipped = sorted(key for key in before if before[key] != after[key])
    flips = entries[("drift_prediction_flips", None)]
    assert flips["measure"] == pytest.approx(len(flipped) / len(before))
    assert flips["keys"] == flipped and flips["keys_total"] == len(flipped)
    if flipped:
        assert flips["status"] != "pass"
    assert any(entries[("drift_statistics", target)]["measure"] > 0 for target in range(CLASSES))
    assert _evidence(run_dir)["drift"]["previous"]["run_id"] == "first"


def test_latest_is_the_last_run_finished_before_this_one(runs):
    other = run_data.open_run(runs["other"][0])
    found, why = previous_run(other, "latest")
    assert why is None and found.run_id == "again"
    found, why = previous_run(run_data.open_run(runs["first"][0]), "latest")  # nothing finished before it
    assert found is None and why.status == "pass" and "no other completed run finished before" in why.summary
    # without compare_with: the run config's, else the run's baseline
    assert previous_run(other)[0].run_id == "first"
    other.manifest["config"]["compare_with"] = None
    assert previous_run(other)[1].summary == NO_PREVIOUS
    other.manifest["baseline"] = {"run_id": "again", "path": runs["again"][0], "device": None}
    assert previous_run(other)[0].run_id == "again"


def test_a_previous_run_that_cannot_be_used_gives_one_clear_entry(runs, tmp_path):
    run_dir = runs["first"][0]
    incomplete = tmp_path / "run_id=cut"
    incomplete.mkdir()
    cases = {str(tmp_path / "run_id=gone"): "does not exist", str(incomplete): "the run is not complete",
             run_dir: "this run's own folder"}
    damaged = tmp_path / "run_id=damaged"
    shutil.copytree(runs["again"][0], damaged)
    for path in damaged.glob("_audit/class_saliency-*"):
        path.write_bytes(b"not parquet")
    cases[str(damaged)] = "cannot read"
    for previous, reason in cases.items():
        entries = _drift(audit_run(run_dir, compare_with=previous, write=False))
        assert len(entries) == 1 and entries[0]["check"] == "drift_class_mean", entries
        assert entries[0]["status"] == "warn" and reason in entries[0]["summary"], entries[0]["summary"]
        assert "\n" not in entries[0]["summary"]


def test_a_coarser_grid_is_compared_on_its_cells(runs):
    """Maps stored at half resolution (downsample: 2) nest in the full-resolution grid: pooled, they agree."""
    folder = runs["folder"]
    run_dir, _ = _run(folder, str(folder / "tiny.keras"), "half", "--downsample", "2", output="out-half")
    checks, evidence, arrays = drift_checks(run_data.open_run(run_dir), run_data.open_run(runs["first"][0]),
                                            audit_rules.parse(None), [])
    named = {(check.check, check.target): check for check in checks}
    for target in range(CLASSES):
        assert named[("drift_class_mean", target)].measure == pytest.approx(1.0, abs=1e-6)
        assert arrays[f"drift_class_{target}_difference"].shape == (8, 8)
    assert named[("drift_map_agreement", None)].measure == pytest.approx(1.0, abs=1e-6)
    assert named[("drift_prediction_flips", None)].measure == 0.0 and evidence["agreement"]["pairs"] == 30


def test_cliffs_delta_counts_pairs():
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 5, 40).astype(float), rng.integers(1, 6, 30).astype(float)
    pairs = np.sign(first[:, None] - second[None, :])
    assert cliffs_delta(first, second) == pytest.approx(pairs.mean())
    assert cliffs_delta(second, first) == pytest.approx(-pairs.mean())
    assert cliffs_delta(first, first) == 0.0


def _fake_run(tmp_path, name, keys, predicted, labels=None):
    table = pa.table({"key": keys, "target": predicted, "target_rank": [0] * len(keys), "predicted": predicted,
                      "label": labels if labels is not None else [None] * len(keys)},
                     schema=pa.schema([("key", pa.string()), ("target", pa.int32()), ("target_rank", pa.int32()),
                                       ("predicted", pa.int32()), ("label", pa.int64())]))
    return run_data.Run(path=str(tmp_path / f"run_id={name}"), manifest={"run_id": name}, shards=[],
                        error_files=[], table=table, map_shape=None)


def test_flips_count_records_in_both_runs_and_name_the_new_and_gone(tmp_path):
    before = _fake_run(tmp_path, "before", ["a", "b", "c", "gone"], [0, 1, 2, 0], [0, 1, 1, 0])
    now = _fake_run(tmp_path, "now", ["a", "b", "c", "new"], [0, 2, 1, 1], [0, 1, 1, 1])
    [check], evidence = prediction_flips(now, before, audit_rules.parse(None))
    assert check.measure == pytest.approx(2 / 3) and check.keys == ["b", "c"] and check.status == "fail"
    assert evidence["only_here"] == 1 and evidence["only_previous"] == 1
    assert evidence["now_right"] == 1 and evidence["now_wrong"] == 1
    assert "1 records are new here, 1 are gone" in check.summary


def test_a_shortcut_is_new_unless_the_previous_run_failed_it_nearby(tmp_path):
    rules = audit_rules.parse(None)
    assert iou([0, 0, 10, 10], [0, 5, 10, 15]) == pytest.approx(1 / 3) and iou([0, 0, 2, 2], [4, 4, 6, 6]) == 0
    previous = _fake_run(tmp_path, "before", [], [])
    os.makedirs(previous.path)
    findings.write(previous.path, findings.findings("before", [
        Check("shortcut_region", "fail", "Shortcut.", target=1, region=[0, 0, 10, 10], measure=0.5)]))
    now = [Check("shortcut_region", "fail", "Shortcut.", target=1, region=[0, 2, 10, 12], keys=["a"]),  # IoU 0.67
           Check("shortcut_region", "fail", "Shortcut.", target=2, region=[0, 0, 10, 10], keys=["b", "c"]),
           Check("shortcut_region", "pass", "Fine.", target=0, region=[0, 0, 4, 4])]
    [check], evidence = new_shortcuts(now, previous, rules)
    assert check.status == "fail" and check.measure == 1.0 and check.keys == ["b", "c"]
    assert evidence["new"] == [{"class": 2, "region": [0, 0, 10, 10]}]
    ignored = audit_rules.parse({"drift_new_shortcut": {"ignore_classes": [2]}})
    assert new_shortcuts(now, previous, ignored)[0][0].measure == 0.0
    unaudited = _fake_run(tmp_path, "unaudited", [], [])
    [check], _ = new_shortcuts(now, unaudited, rules)
    assert check.status == "pass" and "it has no _FINDINGS.json" in check.summary


def test_the_report_shows_the_drift_since_the_previous_run(runs, tmp_path):
    index = report.build_report(runs["other"][0], out=str(tmp_path / "page"), top=2)
    out = os.path.dirname(index)
    text, page = read_page(out)
    assert re.findall(r'<section id="([^"]+)"', text)[:3] == ["findings", "drift", "summary"]
    assert '<a href="#drift">Drift</a>' in text
    section = text.split('<section id="drift"')[1].split("</section>")[0]
    assert "Drift since first" in section
    assert sorted(re.findall(r'data-drift-check="(\w+)"', section)) == sorted(
        [name for name in DRIFT for _ in range(CLASSES if name in ("drift_class_mean", "drift_statistics") else 1)])
    shown = [int(value) for value in re.findall(r'class="class-map drift-class" data-class="(\d+)"', section)]
    assert sorted(shown) == list(range(CLASSES))
    for target in shown:
        assert os.path.getsize(os.path.join(out, "img", f"drift-class-{target}.png")) > 0
    assert "img/drift-agreement.png" in section
    # a run without drift measured has no such section
    bare = report.build_report(runs["first"][0], out=str(tmp_path / "bare"), top=2)
    assert 'id="drift"' not in read_page(os.path.dirname(bare))[0]


def test_the_drift_section_opens_in_a_real_browser(runs, tmp_path):
    from tests import browser

    if not browser.available():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and playwright for the report's browser test")
        pytest.skip("chromium or playwright is not installed here")
    index = report.build_report(runs["other"][0], out=str(tmp_path / "page"), top=2)
    seen = browser.open_page(index, str(tmp_path / "drift.png"))
    assert seen["requests"] and all(url.startswith("file://") for url in seen["requests"])
    broken = [src for src, loaded, width in seen["images"] if not loaded or width == 0]
    assert not broken, broken
    assert any("drift-class-" in src for src, _, _ in seen["images"])
    text = seen["text"]
    assert text.index("Overall:") < text.index("Drift since first") < text.index("Run summary")
    assert seen["counts"]["drift.records"] == "16"
