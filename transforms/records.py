"""Reading TFRecord files record by record, keeping everything before any damage.

This module holds both the reader (:func:`read_records`, plain Python) and the
Beam step built on it (:class:`ReadTFRecords`).

Beam's ``ReadFromTFRecord`` fails the whole job on one corrupt record (with a
hex dump of it). This reader checks the same framing and CRCs but turns damage
into error entries: a record whose data CRC fails is reported and skipped (its
length field is intact, so the records after it are still read); damaged
framing (bad length CRC, truncation) ends the file with one error entry for the
rest of it. A file with no valid record at all is one whole-file error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct

import apache_beam as beam
import google_crc32c
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.errors import ERRORS, NAMESPACE, error_row

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# Largest record accepted: a length field above this is damage, not data.
MAX_RECORD_BYTES = 1 << 30


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
    """One TFRecord frame holding ``data`` (used by tests and the demo)."""
    header = struct.pack("<Q", len(data))
    return header + _FOOTER.pack(masked_crc32c(header)) + data + _FOOTER.pack(masked_crc32c(data))


@dataclasses.dataclass(frozen=True)
class Record:
    """One record read from a file."""

    source_file: str
    record_index: int
    data: bytes
    offset: int | None = None  # byte offset of the record's header in the (uncompressed) file

    def sha256(self) -> str:
        """Hex SHA-256 of the record's bytes (the serialized example, framing excluded)."""
        return hashlib.sha256(self.data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ReadError:
    """A part of a file that could not be read; ``record_index`` None means the whole file."""

    source_file: str
    record_index: int | None
    error: str


def read_records(handle, source_file: str):
    """Yields :class:`Record` and :class:`ReadError` items from an open binary file."""
    index, offset = 0, 0
    while True:
        header = handle.read(_HEADER.size)
        if not header:
            if index == 0:
                yield ReadError(source_file, None, "empty file: 0 bytes, no TFRecord records")
            return
        where = f"record {index} at byte {offset}"
        if len(header) < _HEADER.size:
            yield _damage(source_file, index, f"file ends inside the header of {where} "
                                              f"({len(header)} of {_HEADER.size} bytes)")
            return
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc or length > MAX_RECORD_BYTES:
            yield _damage(source_file, index, f"length field of {where} fails its CRC check")
            return
        data = handle.read(length)
        footer = handle.read(_FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            yield _damage(source_file, index, f"file is cut off inside {where} "
                                              f"(needs {length + 16} bytes, {_HEADER.size + len(data) + len(footer)} left)")
            return
        if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            yield ReadError(source_file, index, f"data CRC mismatch in {where} ({length} bytes); record skipped")
        else:
            yield Record(source_file, index, data, offset)
        index += 1
        offset += _HEADER.size + length + _FOOTER.size


def count_records(path: str) -> int | None:
    """How many items :func:`read_records` will yield for a local, uncompressed file, from its headers alone.

    That is the file's share of the manifest's ``records_read``: every record
    (a record failing its data CRC included), plus one for damaged framing or
    an empty file, which become one error row each. Seeks over each record's
    data and reads only the length fields. Returns None for a remote or
    compressed file (counting it would mean reading it) or one that cannot be opened.

    Example:
        >>> count_records("data/train-00000-of-00004.tfrecord")
        2000
    """
    if "://" in path or CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return None
    count = 0
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            offset = 0
            while offset < size:
                header = handle.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return count + 1  # cut inside a header
                length, length_crc = _HEADER.unpack(header)
                if masked_crc32c(header[:8]) != length_crc or offset + _HEADER.size + length + _FOOTER.size > size:
                    return count + 1  # damaged framing ends the file with one error row
                count += 1
                offset += _HEADER.size + length + _FOOTER.size
                handle.seek(offset)
    except OSError:
        return None
    return count or 1  # an empty file is one error row


def _damage(source_file: str, index: int, message: str) -> ReadError:
    if index == 0:
        return ReadError(source_file, None, f"not a readable TFRecord file: {message}")
    return ReadError(source_file, index, f"{message}; the rest of the file is unreadable")


def record_key(source_file: str, record_index: int | None) -> str:
    """The default key: ``<file name>:<record index>`` (just the file name for whole-file errors)."""
    name = os.path.basename(source_file.rstrip("/"))
    return name if record_index is None else f"{name}:{record_index}"


# ------------------------------------------------------------------ Beam step
class _ReadFile(beam.DoFn):
    """Reads one TFRecord file; damage becomes error rows, never a failed job."""

    def __init__(self):
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.read_errors = Metrics.counter(NAMESPACE, "errors_read")

    def process(self, metadata):
        path = metadata.path
        try:
            handle = FileSystems.open(path, compression_type=CompressionTypes.AUTO)
        except Exception as error:  # noqa: BLE001 - an unreadable file is one error row
            self.read_errors.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(record_key(path, None), path, None, "read",
                                                              f"cannot open file: {error}"))
            return
        with handle:
            try:
                for item in read_records(handle, path):
                    if isinstance(item, Record):
                        self.records_read.inc()
                        yield item
                    else:
                        self.read_errors.inc()
                        yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                            record_key(item.source_file, item.record_index), item.source_file,
                            item.record_index, "read", item.error))
            except Exception as error:  # noqa: BLE001 - e.g. a bad gzip stream
                self.read_errors.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(record_key(path, None), path, None, "read",
                                                                  f"{type(error).__name__}: {error}"))


class ReadTFRecords(beam.PTransform):
    """File patterns → :class:`Record` items (main output) and read error rows (``errors``).

    Files are reshuffled before reading and records after, so a few large files
    still spread over all workers.

    Args:
        patterns: file patterns (local or ``gs://``, globs allowed).

    Returns (from ``expand``):
        ``(records, errors)``: two PCollections.

    Example:
        >>> records, errors = pipeline | "ReadRecords" >> ReadTFRecords(["data/*.tfrecord"])
    """

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = list(patterns)

    def expand(self, pipeline):
        """Adds the read steps; returns ``(records, errors)``."""
        files = (pipeline
                 | "Patterns" >> beam.Create(self.patterns)
                 | "MatchFiles" >> fileio.MatchAll()
                 | "SpreadFiles" >> beam.Reshuffle())
        read = files | "ReadFiles" >> beam.ParDo(_ReadFile()).with_outputs(ERRORS, main="records")
        records = read.records | "SpreadRecords" >> beam.Reshuffle()
        return records, read[ERRORS]
