"""Reusing a baseline run inside the pipeline: join this run's records with the baseline's by key.

A map is a pure function of the record's bytes, its key and the settings (the
noise depends only on seed, key and sample), so when the baseline run had the
same settings (the launcher checks its fingerprint) a record whose key and
``record_sha256`` are in the baseline's corpus gets the baseline's rows, and
only the others are decoded and explained.

Only small values cross the join: for this run's records a :class:`Seen`
(hash and location; the bytes only for a compressed file, which cannot be
re-read by offset), for the baseline a :class:`Stored` (hash and the rows'
position: shard, row group, rows). After the join:

* records to explain are re-read by offset (:class:`ReReadRecords`);
* rows to carry over are grouped by (shard, row group), and each row group is
  read once (:class:`CarryOverRows`), so no worker holds more than one row
  group of the baseline at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.support.errors import ERRORS, NAMESPACE, error_row
from transforms.read.records import Record, ReadError, read_records, record_key

logger = logging.getLogger(__name__)

#: The join's outcome per record of this run (and ``removed`` per baseline key absent here).
OUTCOMES = ("reused", "new", "changed", "retried", "removed")
CARRY = "carry"
OUTCOME = "outcome"


@dataclasses.dataclass(frozen=True)
class Seen:
    """A record of this run as the join sees it.

    Attributes:
        sha256: hex SHA-256 of its bytes.
        source_file, record_index: where it is.
        offset: byte offset of its header in the file, or None when the file is
            compressed (then ``data`` carries the bytes).
        data: the record's bytes for a compressed file, else None.
    """

    sha256: str
    source_file: str
    record_index: int
    offset: int | None
    data: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Stored:
    """The baseline's entry for a key: its content hash and where its rows are.

    Attributes:
        sha256: the ``record_sha256`` the baseline explained (None if it did not record one).
        shard: the saliency shard holding its rows; None for an error row.
        row_group: the row group in that shard.
        rows: the rows' positions in that row group.
    """

    sha256: str | None
    shard: str | None = None
    row_group: int = -1
    rows: tuple = ()

    @property
    def failed(self) -> bool:
        """Whether the baseline has only an error row for this key."""
        return self.shard is None


def record_key_of(record: Record, id_feature: str | None) -> str:
    """The key the decode step will give ``record``: its ``id_feature`` value when it has exactly one, else the default.

    A record whose id cannot be read gets the default key here; the decode step
    then fails it with the reason, as without a baseline.
    """
    if id_feature:
        import tensorflow as tf

        try:
            values = tf.train.Example.FromString(record.data).features.feature[id_feature].bytes_list.value
        except Exception:  # noqa: BLE001 - not an Example: the decode step reports it
            values = []
        if len(values) == 1 and values[0]:
            return values[0].decode("utf-8", errors="replace")
    return record_key(record.source_file, record.record_index)


class KeyRecords(beam.DoFn):
    """:class:`Record` → ``(key, Seen)``: the hash and location the join needs, not the bytes.

    Args:
        id_feature: the config's ``id_feature`` (None: default keys).
    """

    def __init__(self, id_feature: str | None):
        self.id_feature = id_feature

    def process(self, record: Record):
        """One keyed :class:`Seen` per record."""
        compressed = CompressionTypes.detect_compression_type(record.source_file) != CompressionTypes.UNCOMPRESSED
        seekable = record.offset is not None and not compressed
        yield record_key_of(record, self.id_feature), Seen(
            record.sha256(), record.source_file, record.record_index,
            record.offset if seekable else None, None if seekable else record.data)


class IndexBaseline(beam.DoFn):
    """A baseline file part → ``(key, Stored)`` items, reading only the key and hash columns.

    Elements are ``("saliency", shard, row_group)`` (one row group of a
    saliency shard) or ``("errors", file, -1)`` (a whole errors file).
    """

    def process(self, part):
        """The keys of one baseline part with their hash and row positions."""
        kind, path, row_group = part
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            if kind == "saliency":
                table = parquet.read_row_group(row_group, columns=["key", "record_sha256"])
            else:
                table = parquet.read(columns=["key", "record_sha256", "record_index"])
        keys = table.column("key").to_pylist()
        hashes = table.column("record_sha256").to_pylist()
        if kind == "saliency":
            rows = collections.defaultdict(list)
            for position, key in enumerate(keys):
                rows[key].append(position)
            for key, positions in rows.items():
                yield key, Stored(hashes[positions[0]], path, row_group, tuple(positions))
        else:
            indexes = table.column("record_index").to_pylist()
            for key, digest, index in zip(keys, hashes, indexes):
                if index is not None:  # a whole-file error names no record
                    yield key, Stored(digest)


class Decide(beam.DoFn):
    """``(key, {"now": [Seen], "then": [Stored]})`` → a record to explain, or rows to carry over.

    Main output: :class:`Seen` of the records to explain (new, changed, or
    failed in the baseline). ``carry``: ``((shard, row_group), (rows,
    first_row, source_file, record_index))`` for the rows to carry over.
    ``outcome``: one of :data:`OUTCOMES` per record (and per removed key).
    """

    def __init__(self, device: str | None = None):
        self.counters = {outcome: Metrics.counter(NAMESPACE, f"records_{outcome}") for outcome in OUTCOMES}
        self.device = device
        self.other_device = False

    def setup(self):
        # Set when the launcher could not tell the workers' device: each worker compares its own.
        if self.device is None:
            return
        from transforms.engine.device import current_device_kind

        here = current_device_kind()
        self.other_device = here != self.device
        if self.other_device:
            logger.warning("Baseline not reused on this worker: its maps were computed on %s, this worker computes "
                           "on %s. Explaining every record here.", self.device, here)

    def _outcome(self, outcome: str):
        self.counters[outcome].inc()
        return beam.pvalue.TaggedOutput(OUTCOME, outcome)

    def process(self, element):
        """The fate of each record of one key."""
        _, joined = element
        now, then = list(joined["now"]), list(joined["then"])
        if not now:
            yield self._outcome("removed")
            return
        if self.other_device:  # nothing of the baseline counts on another kind of device
            then = []
        stored_rows = [entry for entry in then if not entry.failed]
        for seen in now:
            matching = [entry for entry in stored_rows if entry.sha256 == seen.sha256]
            if matching:
                yield self._outcome("reused")
                for position, entry in enumerate(matching):
                    first_row = entry.rows[0] if position == 0 else None
                    yield beam.pvalue.TaggedOutput(CARRY, ((entry.shard, entry.row_group),
                                                           (entry.rows, first_row, seen.source_file,
                                                            seen.record_index)))
                continue
            yield self._outcome("changed" if stored_rows else "retried" if then else "new")
            yield seen


class ReReadRecords(beam.DoFn):
    """:class:`Seen` → :class:`Record` again (main output), or a read error row if it changed since.

    A record of an uncompressed file is read again at its offset (one seek);
    a compressed file's record travelled with its bytes.
    """

    def process(self, seen: Seen):
        """The record's bytes, checked again (length and data CRCs) and against the hash."""
        if seen.data is not None:
            yield Record(seen.source_file, seen.record_index, seen.data, seen.offset)
            return
        problem = None
        try:
            with FileSystems.open(seen.source_file, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                handle.seek(seen.offset)
                item = next(read_records(handle, seen.source_file, seen.record_index, seen.offset, 1), None)
        except Exception as error:  # noqa: BLE001 - the file went away between the two reads
            item, problem = None, f"cannot read it again: {type(error).__name__}: {error}"
        if isinstance(item, Record) and item.sha256() == seen.sha256:
            yield Record(seen.source_file, seen.record_index, item.data, seen.offset)
            return
        if problem is None:
            problem = item.error if isinstance(item, ReadError) else "its bytes changed"
        yield beam.pvalue.TaggedOutput(ERRORS, error_row(
            record_key(seen.source_file, seen.record_index), seen.source_file, seen.record_index, "read",
            f"record {seen.record_index} at byte {seen.offset} changed while the run read it ({problem})"))


class CarryOverRows(beam.DoFn):
    """``((shard, row_group), [requests])`` → the baseline's rows, read once per row group.

    Each row keeps every column of the baseline except where the record is
    now (``source_file``, ``record_index``, which a renamed or re-ordered file
    changes); ``_first`` marks one row per record and ``_reused`` all of them.
    """

    def process(self, element):
        """The carried-over rows of one row group."""
        (shard, row_group), requests = element
        requests = list(requests)
        with FileSystems.open(shard, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.ParquetFile(handle).read_row_group(row_group)
        wanted = sorted({row for rows, *_ in requests for row in rows})
        taken = table.take(wanted)
        maps = taken.column("saliency").combine_chunks().to_numpy_ndarray()
        plain = taken.drop_columns(["saliency"]).to_pylist()
        at = {row: position for position, row in enumerate(wanted)}
        for rows, first_row, source_file, record_index in requests:
            for row in rows:
                values = dict(plain[at[row]])
                values.update(source_file=source_file, record_index=record_index, saliency=np.array(maps[at[row]]),
                              _first=row == first_row, _reused=True)
                yield values


class UseBaseline(beam.PTransform):
    """This run's records joined with a baseline's corpus by key.

    Args:
        parts: the baseline's parts to index: ``("saliency", shard, row_group)``
            and ``("errors", file, -1)`` (listed by the launcher from the files' footers).
        id_feature: the config's ``id_feature``.
        device: the baseline's device kind, when the launcher could not compare
            it with the workers' (each worker then does, and reuses nothing if
            its own differs); None when the launcher checked it.

    Returns (from ``expand``):
        ``(records, errors, carried_rows, outcomes)``: the records to decode and
        explain (re-read), read error rows of records that changed between the
        two reads, the rows carried over from the baseline, and one outcome
        string (:data:`OUTCOMES`) per record and per removed key.
    """

    def __init__(self, parts: list, id_feature: str | None, device: str | None = None):
        super().__init__()
        self.parts = list(parts)
        self.id_feature = id_feature
        self.device = device

    def expand(self, records):
        """Adds the join's steps."""
        seen = records | "KeyRecords" >> beam.ParDo(KeyRecords(self.id_feature))
        stored = (records.pipeline
                  | "BaselineParts" >> beam.Create(self.parts)
                  | "SpreadParts" >> beam.Reshuffle()
                  | "IndexBaseline" >> beam.ParDo(IndexBaseline()))
        decided = ({"now": seen, "then": stored}
                   | "JoinByKey" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(Decide(self.device)).with_outputs(CARRY, OUTCOME, main="explain"))
        reread = decided.explain | "ReReadRecords" >> beam.ParDo(ReReadRecords()).with_outputs(ERRORS, main="records")
        carried = (decided[CARRY]
                   | "GroupByRowGroup" >> beam.GroupByKey()
                   | "CarryOverRows" >> beam.ParDo(CarryOverRows()))
        return reread.records, reread[ERRORS], carried, decided[OUTCOME]
