"""The read step: files cut into chunks by an index pass, each chunk read after the reshuffle.

Reading chunk by chunk must give exactly the items (records, error entries,
indexes, messages) of reading each file in one go, whatever the chunk size, the
damage or the compression; and one large file must become several independent
chunks, so that a runner can spread it over workers.
"""

from __future__ import annotations

import gzip
import json
import math
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io import fileio
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from pipelines import smoothgrad_audit
from tests import helpers
from transforms.read import records as records_module
from transforms.support import storage
from transforms.support.errors import error_row
from transforms.read.records import (Chunk, IndexFiles, ReadError, Record, ReadTFRecords, count_records, encode_record,
                                index_chunks, read_records, record_key)


def _payloads(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes() for _ in range(count)]


def _damaged_files(folder) -> dict[str, str]:
    """One file per kind of damage the reader knows, and a healthy one."""
    payloads = _payloads(11)
    frames = [bytearray(encode_record(payload)) for payload in payloads]
    whole = b"".join(bytes(frame) for frame in frames)
    crc = [bytearray(frame) for frame in frames]
    crc[4][-5] ^= 0xFF  # data CRC of record 4 fails: skipped, the rest is read
    length = [bytearray(frame) for frame in frames]
    length[7][3] ^= 0xFF  # length field of record 7 fails its CRC: the file ends there
    contents = {
        "good.tfrecord": whole, "crc.tfrecord": b"".join(map(bytes, crc)),
        "length.tfrecord": b"".join(map(bytes, length)), "cut.tfrecord": whole[:-40],
        "cut-header.tfrecord": whole + b"\x07\x00\x00", "empty.tfrecord": b"",
        "text.tfrecord": b"this is a CSV file, not a TFRecord\n1,2,3\n" * 20, "short.tfrecord": b"abc",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = str(folder / name)
        with open(paths[name], "wb") as handle:
            handle.write(data)
    return paths


def _whole_file(path: str) -> list:
    with open(path, "rb") as handle:
        return list(read_records(handle, path))


def _chunked(path: str, max_records: int, max_bytes: int) -> tuple[list[Chunk], list]:
    with open(path, "rb") as handle:
        chunks = list(index_chunks(handle, path, os.path.getsize(path), max_records, max_bytes))
    items = []
    for chunk in chunks:
        with storage.open_range(path, chunk.offset, chunk.length) as handle:
            items += read_records(handle, path, chunk.first_index, chunk.offset, chunk.count)
    return chunks, items


@pytest.mark.parametrize("max_records, max_bytes", [(1, 1 << 30), (2, 1 << 30), (3, 1 << 30), (64, 1 << 30),
                                                    (64, 1), (64, 500), (4, 900)])
def test_chunks_read_the_same_items_as_the_whole_file(tmp_path, max_records, max_bytes):
    for name, path in _damaged_files(tmp_path).items():
        expected = _whole_file(path)
        chunks, items = _chunked(path, max_records, max_bytes)
        assert items == expected, name
        assert len(expected) == sum(chunk.count for chunk in chunks) == count_records(path), name
        assert all(chunk.count <= max_records for chunk in chunks)
        assert all(chunk.count == 1 or chunk.length <= max_bytes for chunk in chunks)
        assert [chunk.first_index for chunk in chunks] == \
            [sum(chunk.count for chunk in chunks[:position]) for position in range(len(chunks))]


def test_damage_messages_are_unchanged(tmp_path):
    paths = _damaged_files(tmp_path)
    _, items = _chunked(paths["crc.tfrecord"], 3, 1 << 30)
    assert [item.record_index for item in items if isinstance(item, ReadError)] == [4]
    assert items[4].error.startswith("data CRC mismatch in record 4 at byte ")
    assert len(items) == 11
    _, items = _chunked(paths["length.tfrecord"], 3, 1 << 30)
    assert len(items) == 8 and isinstance(items[-1], ReadError) and items[-1].record_index == 7
    assert "length field of record 7" in items[-1].error and "rest of the file is unreadable" in items[-1].error
    _, items = _chunked(paths["cut.tfrecord"], 3, 1 << 30)
    assert "cut off inside record 10" in items[-1].error
    for name, start in (("empty.tfrecord", "empty file"), ("text.tfrecord", "not a readable TFRecord file"),
                        ("short.tfrecord", "not a readable TFRecord file")):
        chunks, items = _chunked(paths[name], 3, 1 << 30)
        assert len(chunks) == 1 and len(items) == 1, name
        assert items[0].record_index is None and items[0].error.startswith(start), name


def _frames_of(sizes: list[int]) -> list[bytes]:
    return [encode_record(b"r" * size) for size in sizes]


def _assert_index(pattern: str, expected: list[Chunk], **kwargs) -> None:
    """Runs the index step on the files of ``pattern``; its chunks must be ``expected`` (in any order)."""
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        chunks = pipeline | beam.Create([pattern]) | fileio.MatchAll() | IndexFiles(**kwargs)
        assert_that(chunks, equal_to(expected))


def test_one_large_file_becomes_independent_chunks(tmp_path):
    count, per_chunk = 150, 16
    frames = _frames_of([100 + index for index in range(count)])
    path = tmp_path / "large.tfrecord"
    path.write_bytes(b"".join(frames))
    offsets = np.cumsum([0] + [len(frame) for frame in frames])
    expected = [Chunk(str(path), first, min(per_chunk, count - first), int(offsets[first]),
                      int(offsets[min(first + per_chunk, count)] - offsets[first]))
                for first in range(0, count, per_chunk)]
    assert len(expected) == math.ceil(count / per_chunk) == 10
    assert expected[-1].count == 6 and expected[-1].offset + expected[-1].length == len(b"".join(frames))
    _assert_index(str(path), expected, chunk_records=per_chunk)
    # the byte bound: a record larger than it is a chunk of its own
    big = tmp_path / "bytes.tfrecord"
    frames = _frames_of([100, 100, 5000, 100, 100, 100])
    big.write_bytes(b"".join(frames))
    sizes = [len(frame) for frame in frames]
    _assert_index(str(big), [Chunk(str(big), 0, 2, 0, sizes[0] + sizes[1]),
                             Chunk(str(big), 2, 1, sum(sizes[:2]), sizes[2]),
                             Chunk(str(big), 3, 3, sum(sizes[:3]), sum(sizes[3:]))],
                  chunk_records=64, chunk_bytes=400)


def test_a_compressed_file_is_one_chunk_read_as_a_stream(tmp_path):
    data = b"".join(_frames_of([10, 20, 30]))
    with gzip.open(tmp_path / "a.tfrecord.gz", "wb") as handle:
        handle.write(data)
    (tmp_path / "bad.tfrecord.gz").write_bytes(b"\x1f\x8b\x08\x00 this is no gzip stream")
    _assert_index(str(tmp_path / "*.gz"), [Chunk(str(tmp_path / "a.tfrecord.gz")),
                                           Chunk(str(tmp_path / "bad.tfrecord.gz"))], chunk_records=1)


def _read_in_a_pipeline(patterns: list[str], **kwargs):
    """Yields the read step's ``(records, errors)`` once; the pipeline runs when the caller's loop body is done."""
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        records, errors = pipeline | ReadTFRecords(patterns, **kwargs)
        yield records, errors


def _expected_outputs(paths: list[str]) -> tuple[list[Record], list[dict]]:
    records, errors = [], []
    for path in paths:
        for item in _whole_file(path):
            if isinstance(item, Record):
                records.append(item)
            else:
                errors.append(error_row(record_key(item.source_file, item.record_index), item.source_file,
                                        item.record_index, "read", item.error))
    return records, errors


def test_the_read_step_yields_the_items_of_the_whole_files(tmp_path):
    paths = sorted(_damaged_files(tmp_path).values())
    expected_records, expected_errors = _expected_outputs(paths)
    data = b"".join(_frames_of([10, 20, 30]))
    with gzip.open(tmp_path / "zipped.tfrecord.gz", "wb") as handle:
        handle.write(data)
    (tmp_path / "broken.tfrecord.gz").write_bytes(b"\x1f\x8b\x08\x00 this is no gzip stream")
    zipped = str(tmp_path / "zipped.tfrecord.gz")
    # offsets in the decompressed stream: each record is its data plus 16 bytes of framing
    expected_records += [Record(zipped, index, b"r" * size, offset)
                         for index, (size, offset) in enumerate(((10, 0), (20, 26), (30, 62)))]
    for chunk_records in (1, 4):
        for records, errors in _read_in_a_pipeline([str(tmp_path / "*.tfrecord"), str(tmp_path / "*.gz")],
                                                   chunk_records=chunk_records):
            assert_that(records, equal_to(expected_records), label="Records")
            broken = errors | beam.Filter(lambda row: row["source_file"].endswith("broken.tfrecord.gz"))
            assert_that(errors | beam.Filter(lambda row: not row["source_file"].endswith(".gz")),
                        equal_to(expected_errors), label="Errors")
            assert_that(broken | beam.Map(lambda row: (row["key"], row["record_index"], row["stage"])),
                        equal_to([("broken.tfrecord.gz", None, "read")]), label="Broken")


def test_a_chunk_that_cannot_be_read_is_one_error_row_naming_its_records(tmp_path, monkeypatch):
    path = tmp_path / "part.tfrecord"
    path.write_bytes(b"".join(_frames_of([50] * 10)))
    original = storage.open_range

    def failing(file, offset, length=None):
        if offset > 0:
            raise OSError("connection reset (simulated)")
        return original(file, offset, length)

    monkeypatch.setattr(storage, "open_range", failing)
    for records, errors in _read_in_a_pipeline([str(path)], chunk_records=4):
        assert_that(records | beam.Map(lambda record: record.record_index), equal_to([0, 1, 2, 3]),
                    label="Records")
        assert_that(errors | beam.Map(lambda row: (row["key"], row["record_index"], row["error"])), equal_to([
            ("part.tfrecord:4", 4, "cannot open file: connection reset (simulated) (records 4 to 7 unread)"),
            ("part.tfrecord:8", 8, "cannot open file: connection reset (simulated) (records 8 to 9 unread)"),
        ]), label="Errors")


def test_a_single_large_file_in_small_chunks_gives_the_same_corpus(tmp_path, monkeypatch):
    helpers.write_image_dataset(str(tmp_path / "data"), files=1, per_file=21, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)

    def run(run_id):
        result = smoothgrad_audit.run(["--input", str(tmp_path / "data" / "*.tfrecord"), "--output",
                                       str(tmp_path / "out"), "--model", model, "--run_id", run_id,
                                       "--samples", "2", "--batch_size", "4"])
        run_dir = tmp_path / "out" / f"run_id={run_id}"
        table = pq.read_table([str(path) for path in run_dir.glob("saliency-*.parquet")], partitioning=None)
        chunks = sum(item.committed for item in result.metrics().query()["counters"]
                     if item.key.metric.name == "read_chunks")
        return json.loads((run_dir / "_MANIFEST.json").read_text()), table.sort_by("key"), chunks

    whole_manifest, whole, whole_chunks = run("one-chunk")
    monkeypatch.setattr(records_module, "CHUNK_RECORDS", 4)
    manifest, chunked, chunks = run("chunks-of-4")
    assert whole_chunks == 1 and chunks == math.ceil(21 / 4)
    assert chunked.column("key").to_pylist() == whole.column("key").to_pylist() == \
        sorted(f"part-0.tfrecord:{index}" for index in range(21))
    np.testing.assert_array_equal(chunked.column("saliency").combine_chunks().to_numpy_ndarray(),
                                  whole.column("saliency").combine_chunks().to_numpy_ndarray())
    assert manifest["records_read"] == manifest["records_explained"] == 21 and manifest["invariant_holds"]
    assert manifest["files"] == whole_manifest["files"]
