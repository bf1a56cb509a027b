"""``smoothgrad-audit history``: four real nightly runs of a tiny model (audited, re-ruled, unaudited, with an error)
→ one page with every check against every run, the trends, and the drift checks; checked in a real browser.

The runs are made by the pipeline itself (``audit`` on, except for one). Drift checks are not made by the audit
yet: the test adds ``drift_*`` entries to two runs' ``_FINDINGS.json`` in the file's documented format, through
:mod:`pipelines.audit.findings` (checked against its JSON Schema).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from html.parser import HTMLParser

import jsonschema
import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines import smoothgrad_audit
from pipelines.audit import findings
from pipelines.report import history, report, run_data
from tests import helpers
from tests.test_report import assert_self_contained, read_page

#: The nights in the order they ran; their ids sort otherwise, so the page must order them by the manifests' times.
NIGHTS = ("night-c", "night-a", "night-d", "night-b")
#: Drift measures added to the findings: {night: {class or None: measure}}, by check.
DRIFT = {"night-a": {"drift_class_mean": {0: 0.97, 1: 0.95, 2: 0.92}, "drift_prediction_flips": {None: 0.0}},
         "night-b": {"drift_class_mean": {0: 0.96, 1: 0.62, 2: 0.85}, "drift_prediction_flips": {None: 0.05}}}


class Matrix(HTMLParser):
    """The status matrix of a history page: run ids, overall statuses, and each row's cells by run."""

    def __init__(self, text: str):
        super().__init__()
        self.runs, self.overall, self.rows, self.changed = [], {}, {}, set()
        self._row = None
        self.feed(text.split('<table class="matrix">')[1].split("</table>")[0])

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "th" and "data-run" in attrs:
            self.runs.append(attrs["data-run"])
        elif tag == "tr" and "data-check" in attrs:
            self._row = (attrs["data-check"], int(attrs["data-class"]) if attrs["data-class"] else None)
            self.rows[self._row] = {}
            if attrs.get("data-changed"):
                self.changed.add(self._row)
        elif tag == "td" and "data-status" in attrs:
            (self.rows[self._row] if self._row else self.overall)[attrs["data-run"]] = attrs["data-status"]


def _drift_checks(night: str) -> list[findings.Check]:
    checks = []
    for name, measures in DRIFT[night].items():
        low = name == "drift_class_mean"  # agreement: worse when lower; flips: worse when higher
        warn, fail = (0.9, 0.7) if low else (0.02, 0.1)
        for target, value in measures.items():
            status = "fail" if (value < fail if low else value >= fail) else \
                "warn" if (value < warn if low else value >= warn) else "pass"
            checks.append(findings.Check(name, status, f"{name} of class {target}: {value}.", target=target,
                                         measure=value, threshold=warn))
    return checks


def _add_drift(run_dir: str, night: str) -> None:
    """Adds drift checks to a run's findings, as the audit writes checks (a schema-valid document)."""
    document = findings.read(run_dir)
    checks = [findings.Check(entry["check"], entry["status"], entry["summary"], target=entry["class"],
                             region=entry["region"], measure=entry["measure"], threshold=entry["threshold"],
                             confirmed=entry["confirmed"], keys=entry["keys"], keys_total=entry["keys_total"])
              for entry in document["checks"]] + _drift_checks(night)
    document = findings.findings(document["run_id"], checks)
    jsonschema.validate(json.loads(json.dumps(document)), findings.FINDINGS_SCHEMA)
    findings.write(run_dir, document)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("history")
    data = folder / "data"
    helpers.write_image_dataset(str(data), files=1, per_file=6, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    strict = folder / "strict.yaml"
    strict.write_text("border_attention: {warn: 0.1, fail: 0.2}\n")  # every class's border ratio (~1) fails
    output = str(folder / "out")
    arguments = {"night-c": ["--samples", "2"], "night-a": ["--samples", "4", "--audit_rules", str(strict)],
                 "night-d": ["--samples", "2", "--audit=false"], "night-b": ["--samples", "2"]}
    for night in NIGHTS:
        if night == "night-b":  # the data changed: one more file, whose record is no image (an error row)
            helpers.write_tfrecords(str(data / "part-9.tfrecord"), [helpers.example(b"not an image", 1)])
        smoothgrad_audit.run(["--input", str(data / "*.tfrecord"), "--output", output, "--model", model,
                              "--run_id", night, "--batch_size", "4", "--sanity_records", "0", *arguments[night]])
    for night in DRIFT:
        _add_drift(os.path.join(output, f"run_id={night}"), night)
    os.makedirs(os.path.join(output, "run_id=night-e"))  # a run still going: no manifest yet
    with open(os.path.join(output, "run_id=night-e", "saliency-00000-of-00001.parquet"), "wb") as handle:
        handle.write(b"partial")
    assert smoothgrad_audit.main(["history", output]) == 0
    index = os.path.join(output, history.DEFAULT_OUT, "index.html")
    text, page = read_page(os.path.dirname(index))
    return {"folder": folder, "output": output, "index": index, "text": text, "page": page,
            "matrix": Matrix(text)}


def test_the_matrix_shows_every_completed_run_in_time_order_with_its_statuses(nights):
    matrix, output = nights["matrix"], nights["output"]
    assert matrix.runs == list(NIGHTS)  # by finished_at, not by name; the unfinished night-e is left out
    assert nights["page"].counts["runs"] == "4" and nights["page"].counts["runs.not_audited"] == "1"
    assert matrix.overall["night-d"] == "none"
    for night in NIGHTS:
        document = findings.read(os.path.join(output, f"run_id={night}"))
        if document is None:
            assert night == "night-d"
            assert all(cells["night-d"] == "none" for cells in matrix.rows.values())
            continue
        assert matrix.overall[night] == document["status"]
        for check in document["checks"]:  # every entry of every run's findings is its cell
            assert matrix.rows[(check["check"], check["class"])][night] == check["status"], (night, check["check"])
    # the first night has no drift checks: its cells say so rather than pass
    assert matrix.rows[("drift_class_mean", 1)]["night-c"] == "absent"


def test_checks_that_warned_or_failed_come_first_and_a_changed_check_is_marked(nights):
    matrix = nights["matrix"]
    worst = [max((status for status in cells.values() if status in findings.STATUSES),
                 key=findings.STATUSES.index) for cells in matrix.rows.values()]
    assert worst == sorted(worst, key=lambda status: -findings.STATUSES.index(status))
    assert "pass" in worst and worst[0] == "fail"
    border = [key for key in matrix.rows if key[0] == "border_attention"]
    assert border
    for key in border:  # default rules, then strict ones, then none, then default again
        assert [matrix.rows[key][night] for night in NIGHTS] == ["pass", "fail", "none", "pass"]
        assert key in matrix.changed
    assert ("drift_class_mean", 1) in matrix.changed and ("drift_class_mean", 0) not in matrix.changed
    row = nights["text"].split('data-check="border_attention"')[1].split("</tr>")[0]
    assert re.search(r"border_attention</code> · class \d+<span class=\"changed\">changed</span>", row)
    assert re.search(r'data-status="fail"[^>]*>fail<small>', row)
    assert re.search(r'data-status="none"[^>]*>not audited</td>', row)


def test_the_trends_follow_the_runs(nights, tmp_path):
    output = nights["output"]
    points = [history.read_point(manifest, run_dir) for manifest, run_dir in history.completed_runs(output)[0]]
    assert [point.run_id for point in points] == list(NIGHTS)
    assert [point.metrics["samples"] for point in points] == [2.0, 4.0, 2.0, 2.0]
    assert [point.metrics["error_rate"] for point in points] == [0.0, 0.0, 0.0, pytest.approx(1 / 7)]
    corpus = run_data.open_run(os.path.join(output, "run_id=night-c"))  # every column, as the report reads it
    first = corpus.values("target_rank") == 0
    assert points[0].metrics["accuracy"] == pytest.approx(np.mean(corpus.values("predicted")[first]
                                                                  == corpus.values("label")[first]))
    assert points[0].metrics["accuracy_from"] == "labels"
    assert points[0].metrics["reliability"] == pytest.approx(np.nanmean(corpus.values("reliability")), rel=1e-6)
    assert points[0].metrics["border_mass"] == pytest.approx(np.nanmean(corpus.values("border_mass")), rel=1e-6)
    cheap = run_data.open_run(os.path.join(output, "run_id=night-c"), history.COLUMNS)
    assert "key" not in cheap.table.column_names and "record_sha256" not in cheap.table.column_names
    assert cheap.num_rows == corpus.num_rows
    section = nights["text"].split('<section id="trends">')[1].split("</section>")[0]
    assert re.findall(r'data-trend="(\w+)"', section) == [name for name, _, _ in history.TRENDS]
    for name, _, _ in history.TRENDS:
        with Image.open(os.path.join(os.path.dirname(nights["index"]), "img", f"trend-{name}.png")) as image:
            assert image.size[0] > 200
    assert_self_contained(nights["text"], nights["page"], os.path.dirname(nights["index"]))


def test_drift_checks_are_drawn_per_class_and_a_history_without_them_says_so(nights, tmp_path):
    section = nights["text"].split('<section id="drift">')[1].split("</section>")[0]
    assert re.findall(r'<figure data-drift="(\w+)"', section) == ["drift_class_mean", "drift_prediction_flips"]
    assert 'src="img/drift-drift_class_mean.png"' in section
    # the first night alone, copied to another output folder: no drift checks yet
    alone = tmp_path / "alone"
    shutil.copytree(os.path.join(nights["output"], "run_id=night-c"), alone / "run_id=night-c")
    index = history.build_history(str(alone), out=str(tmp_path / "page"))
    text, _ = read_page(os.path.dirname(index))
    assert "No drift checks yet" in text.split('<section id="drift">')[1] and Matrix(text).runs == ["night-c"]


def test_last_keeps_the_most_recent_runs_and_an_unreadable_manifest_is_listed(nights, tmp_path):
    output = tmp_path / "out"
    for night in NIGHTS:
        shutil.copytree(os.path.join(nights["output"], f"run_id={night}"), output / f"run_id={night}")
    (output / "run_id=broken").mkdir()
    (output / "run_id=broken" / "_MANIFEST.json").write_text("{not json")
    index = history.build_history(str(output), last=2)
    assert index == str(output / "_history" / "index.html")
    text, _ = read_page(os.path.dirname(index))
    assert Matrix(text).runs == ["night-d", "night-b"]
    assert "2 earlier run(s) are left out" in text and "run_id=broken/_MANIFEST.json" in text
    index = history.build_history(str(output))  # again over the previous page: replaced
    assert Matrix(read_page(os.path.dirname(index))[0]).runs == list(NIGHTS)


def test_runs_are_ordered_by_finished_else_started_time(tmp_path):
    times = {"x": {"started_at": "2026-01-02T00:00:00+00:00", "finished_at": "2026-01-02T01:00:00+00:00"},
             "y": {"started_at": "2026-01-01T23:00:00+00:00"},  # an older manifest without finished_at
             "z": {"started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-03T00:00:00+00:00"}}
    for run_id, manifest in times.items():
        (tmp_path / f"run_id={run_id}").mkdir()
        (tmp_path / f"run_id={run_id}" / "_MANIFEST.json").write_text(json.dumps({"run_id": run_id, **manifest}))
    runs, skipped = history.completed_runs(str(tmp_path))
    assert [manifest["run_id"] for manifest, _ in runs] == ["y", "x", "z"] and skipped == []


def _point(run_id: str, checks: list | None) -> history.Point:
    entries = {(check["check"], check["class"]): check for check in checks or []}
    return history.Point(run_id=run_id, path=f"out/run_id={run_id}", started=None, finished=None, records_read=None,
                         status=None if checks is None else findings.worst(c["status"] for c in checks),
                         note=None if checks is not None else "not audited", checks=entries, metrics={})


def test_the_matrix_puts_flagged_checks_first_and_bounds_the_always_passing_ones(monkeypatch):
    def check(name, status, target=None):
        return findings.Check(name, status, "s", target=target, measure=0.5).as_dict()

    monkeypatch.setattr(history, "PASSING_ROWS_SHOWN", 2)
    points = [_point("1", [check("a", "pass", 2), check("a", "pass", 1), check("b", "pass"), check("c", "pass")]),
              _point("2", None),
              _point("3", [check("a", "pass", 2), check("a", "warn", 1), check("b", "pass"), check("d", "fail")])]
    matrix = history.status_matrix(points)
    assert [row["label"] for row in matrix["rows"]] == ["d", "a · class 1", "a · class 2", "b"]
    assert [cell["status"] for cell in matrix["rows"][0]["cells"]] == ["absent", "none", "fail"]
    assert [row["changed"] for row in matrix["rows"]] == [False, True, False, False]
    assert (matrix["flagged"], matrix["total"], matrix["more"]) == (2, 5, 1)  # c passed everywhere: not shown


def test_no_completed_run_or_a_wrong_argument_is_one_line_and_status_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run_id=going").mkdir()  # a run without a manifest is not complete
    cases = {"holds no completed run": [str(empty)], "does not exist": [str(tmp_path / "missing")],
             "--last must be at least 1": [str(empty), "--last", "0"],
             "invalid int value": [str(empty), "--last", "two"],
             "required: OUTPUT": [],
             "is a run folder; give the folder that holds the runs": [str(tmp_path / "out" / "run_id=x")]}
    (tmp_path / "out" / "run_id=x").mkdir(parents=True)
    (tmp_path / "out" / "run_id=x" / "_MANIFEST.json").write_text(json.dumps({"run_id": "x"}))
    for message, arguments in cases.items():
        assert smoothgrad_audit.main(["history", *arguments]) == 2, message
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("smoothgrad-audit history: error: ") and message in lines[0]
    assert not os.path.exists(empty / history.DEFAULT_OUT)


def test_the_history_of_runs_on_gcs_is_written_to_gcs(nights, gcs_bucket):
    output = f"{gcs_bucket}/history/out"
    for night in ("night-c", "night-d"):
        local = os.path.join(nights["output"], f"run_id={night}")
        for relative in helpers.files_in_run(local):
            with open(os.path.join(local, relative), "rb") as source, \
                    FileSystems.create(f"{output}/run_id={night}/{relative}") as target:
                shutil.copyfileobj(source, target)
    index = history.build_history(output)
    assert index == f"{output}/{history.DEFAULT_OUT}/index.html"
    text, page = read_page(f"{output}/{history.DEFAULT_OUT}")
    matrix = Matrix(text)
    assert matrix.runs == ["night-c", "night-d"] and matrix.overall["night-d"] == "none"
    assert_self_contained(text, page, f"{output}/{history.DEFAULT_OUT}")


def test_the_page_opens_in_a_real_browser_with_every_run_status_and_figure(nights, tmp_path):
    from tests import browser

    if not browser.available():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and playwright for the history's browser test")
        pytest.skip("chromium or playwright is not installed here")
    shot = str(tmp_path / "history.png")
    seen = browser.open_page(nights["index"], shot, queries={
        "runs": "[...document.querySelectorAll('table.matrix thead th.run')].map(e => e.innerText.split('\\n')[0])",
        "overall": "[...document.querySelectorAll('table.matrix tr.overall td')].map(e => e.innerText.trim())",
        "cells": "Object.fromEntries([...document.querySelectorAll('table.matrix tbody tr')].map(r => "
                 "[r.querySelector('th').innerText.replace('changed', '').trim(), "
                 "[...r.querySelectorAll('td')].map(c => c.innerText.split('\\n')[0].trim())]))",
        "colours": "[...new Set([...document.querySelectorAll('table.matrix td.cell')].map("
                   "c => c.dataset.status + ' ' + getComputedStyle(c).backgroundColor))]",
    })
    assert seen["console"] == []
    assert seen["requests"] and all(url.startswith("file://") for url in seen["requests"])
    broken = [src for src, loaded, width in seen["images"] if not loaded or width == 0]
    assert not broken, broken
    assert len(seen["images"]) == len(history.TRENDS) + 2  # the trends and two drift checks
    answers = seen["queries"]
    assert answers["runs"] == list(NIGHTS)
    documents = {night: findings.read(os.path.join(nights["output"], f"run_id={night}")) for night in NIGHTS}
    assert answers["overall"] == [documents[night]["status"] if documents[night] else "not audited"
                                  for night in NIGHTS]
    cells = answers["cells"]
    for night_index, night in enumerate(NIGHTS):
        for check in (documents[night] or {"checks": []})["checks"]:
            label = history._label(check["check"], check["class"])
            assert cells[label][night_index] == check["status"], (label, night)
    assert all(row[2] == "not audited" for row in cells.values())
    assert cells["drift_class_mean · class 1"] == ["–", "pass", "not audited", "fail"]
    colours = dict(entry.split(" ", 1) for entry in answers["colours"])  # a background of its own per status
    assert len({colours[status] for status in ("pass", "fail", "none")}) == 3
    text = seen["text"]
    assert text.index("Checks") < text.index("Trends") < text.index("Drift") < text.index("Runs")
    with open(shot, "rb") as handle:
        Image.open(io.BytesIO(handle.read())).verify()
