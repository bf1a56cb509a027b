"""Progress while a run goes: the log line's figures, the record count behind the ETA, and the lines of a real run."""

from __future__ import annotations

import gzip
import logging
import os
import re

import pytest

from pipelines import smoothgrad_audit
from tests import helpers
from transforms.support.progress import Progress, ProgressSettings
from transforms.read.records import count_records


def test_line_gives_done_rate_and_eta():
    progress = Progress(ProgressSettings("unit", interval=0, expected=1000))
    progress.add("explained", 240)
    progress.add("error", 10)
    assert progress.line(elapsed=50.0) == \
        "Progress: 250 of 1,000 records done (240 explained, 10 errors), 5.0 records/s, ETA 2 min 30 s"
    progress.add("explained", 750)
    assert progress.line(elapsed=100.0).startswith("Progress: all 1,000 records done (990 explained, 10 errors)")
    unknown = Progress(ProgressSettings("unit-2", interval=0, expected=None))
    unknown.add("explained", 3)
    assert unknown.line(elapsed=2.0) == "Progress: 3 records done (3 explained, 0 errors), 1.5 records/s"


def test_count_records_walks_headers(tmp_path):
    path = helpers.write_tfrecords(str(tmp_path / "a.tfrecord"), [b"x" * size for size in (10, 0, 3000, 7)])
    assert count_records(path) == 4
    data = open(path, "rb").read()
    # as many items as the reader yields: three whole records, then one error row for the cut one
    (tmp_path / "cut.tfrecord").write_bytes(data[:-5])
    assert count_records(str(tmp_path / "cut.tfrecord")) == 4
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    (tmp_path / "junk.tfrecord").write_bytes(b"not a tfrecord file at all")
    assert count_records(str(tmp_path / "empty.tfrecord")) == count_records(str(tmp_path / "junk.tfrecord")) == 1
    with gzip.open(tmp_path / "a.tfrecord.gz", "wb") as handle:
        handle.write(data)
    assert count_records(str(tmp_path / "a.tfrecord.gz")) is None  # counting would mean decompressing
    assert count_records("gs://bucket/a.tfrecord") is None
    assert count_records(str(tmp_path / "missing.tfrecord")) is None


def test_a_run_logs_progress_lines_with_counts_and_eta(tmp_path, caplog):
    paths = helpers.write_image_dataset(str(tmp_path / "data"), files=2, per_file=6, size=16, classes=3)
    (tmp_path / "data" / "junk.tfrecord").write_bytes(b"not a tfrecord file at all")  # one read error
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)
    caplog.set_level(logging.INFO, logger="transforms.support.progress")
    caplog.set_level(logging.INFO, logger="pipelines.smoothgrad_audit")
    result = smoothgrad_audit.run(["--input", str(tmp_path / "data" / "*.tfrecord"), "--output", str(tmp_path / "out"),
                          "--model", model, "--run_id", "progress", "--samples", "2", "--batch_size", "4",
                          "--progress_seconds", "0.05"])
    assert len(paths) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.endswith("(13 input records)") for message in messages)  # the junk file is one error row
    lines = [message for message in messages if message.startswith("Progress: ")]
    assert lines, messages
    pattern = re.compile(r"Progress: (all )?([\d,]+) (of 13 )?records done \((\d+) explained, (\d+) errors\)")
    figures = [pattern.match(line) for line in lines]
    assert all(figures), lines
    done = [int(match.group(2).replace(",", "")) for match in figures]
    assert done == sorted(done) and done[-1] <= 13
    assert all(int(match.group(4)) + int(match.group(5)) == count for match, count in zip(figures, done))
    assert messages[-1].startswith("Done: 13 records read, 12 explained")
    gauges = result.metrics().query()["gauges"]
    assert [item.committed.value for item in gauges if item.key.metric.name == "records_expected"] == [13]
    assert Progress._runs.get(os.path.join(str(tmp_path / "out"), "run_id=progress")) is None  # finished


@pytest.mark.parametrize("interval", [0.0])
def test_no_lines_when_turned_off(interval):
    progress = Progress(ProgressSettings("off", interval=interval))
    progress.start()
    assert progress._thread is None
    progress.stop()
