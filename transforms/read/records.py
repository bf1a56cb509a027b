"""Reading TFRecord files record by record, keeping everything before any damage.

This module holds the reader (:func:`read_records`, plain Python), the index
pass that finds where records start (:func:`walk_frames`, :func:`index_chunks`)
and the Beam step built on them (:class:`ReadTFRecords`).

Beam's ``ReadFromTFRecord`` fails the whole job on one corrupt record (with a
hex dump of it). This reader checks the same framing and CRCs but turns damage
into error entries: a record whose data CRC fails is reported and skipped (its
length field is intact, so the records after it are still read); damaged
framing (bad length CRC, truncation) ends the file with one error entry for the
rest of it. A file with no valid record at all is one whole-file error.

Spreading work, not bytes: the Beam step first walks each file's length fields
(seeking over the data) and cuts it into :class:`Chunk` descriptors of at most
:data:`CHUNK_RECORDS` records and :data:`CHUNK_BYTES` bytes; only these small
descriptors cross the reshuffle that spreads the work over workers, and each
chunk is read and checked after it, by the same reader, starting at its first
record. Items, indexes and messages are the same as reading the whole file in
one go. Compressed files cannot be entered in the middle: each is one chunk,
read as a stream.
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

from transforms.support import storage
from transforms.support.errors import ERRORS, NAMESPACE, error_row

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# Largest record accepted: a length field above this is damage, not data.
MAX_RECORD_BYTES = 1 << 30
#: Most records in one chunk: the unit of work the read step spreads over workers. Small enough
#: that one large file becomes many independent pieces (64 images are seconds to minutes of
#: SmoothGrad), large enough that the descriptors stay few (one per 64 records).
CHUNK_RECORDS = 64
#: Most bytes in one chunk (its frames from the first record's header to the last one's footer);
#: a single larger record is a chunk of its own. Bounds what a reader fetches at once.
CHUNK_BYTES = 16 << 20


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


def read_records(handle, source_file: str, first_index: int = 0, offset: int = 0, count: int | None = None):
    """Yields :class:`Record` and :class:`ReadError` items from an open binary file.

    By default the whole file, from its start. To read one :class:`Chunk`, the
    handle is positioned at the chunk's ``offset`` and ``first_index``,
    ``offset`` and ``count`` are the chunk's: the items, indexes and messages
    are then exactly those the whole-file read yields for these records, and
    the reader stops after ``count`` items.
    """
    index, end = first_index, None if count is None else first_index + count
    while end is None or index < end:
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


def walk_frames(handle, size: int):
    """Where each item of :func:`read_records` starts, from the length fields alone.

    Yields one ``(offset, span)`` per item the reader will yield for a file of
    ``size`` bytes: ``span`` is how many bytes the reader reads for it (a whole
    frame for a record, the rest of the file for a cut record, the header for
    a length field failing its CRC, 0 for an empty file). Damaged framing is
    the last item, as in the reader. Seeks over each record's data: on a local
    disk it reads one small block per record; through an object store's
    buffered reader (Beam's ``gs://`` reader fetches 16 MiB at a time) a seek
    within the fetched block costs nothing, so the walk streams through the
    file once without keeping it, and only a record larger than a block is
    skipped by a new ranged read.
    """
    offset = 0
    if size == 0:
        yield 0, 0  # an empty file: one whole-file error
        return
    while offset < size:
        handle.seek(offset)
        header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size:  # cut inside a header
            yield offset, size - offset
            return
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc or length > MAX_RECORD_BYTES:
            yield offset, _HEADER.size  # damaged framing ends the file with one error row
            return
        end = offset + _HEADER.size + length + _FOOTER.size
        if end > size:
            yield offset, size - offset  # cut off inside the record
            return
        yield offset, end - offset
        offset = end


def count_records(path: str) -> int | None:
    """How many items :func:`read_records` will yield for a local, uncompressed file, from its headers alone.

    That is the file's share of the manifest's ``records_read``: every record
    (a record failing its data CRC included), plus one for damaged framing or
    an empty file, which become one error row each. Seeks over each record's
    data and reads only the length fields (:func:`walk_frames`). Returns None
    for a remote or compressed file (counting it would mean reading it) or one
    that cannot be opened.

    Example:
        >>> count_records("data/train-00000-of-00004.tfrecord")
        2000
    """
    if "://" in path or CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return None
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in walk_frames(handle, os.fstat(handle.fileno()).st_size))
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A run of consecutive records of one file: what the read step spreads instead of their bytes.

    Attributes:
        source_file: the file.
        first_index: index of the chunk's first record in its file.
        count: how many items (records, or a last damage entry) the chunk holds;
            None for a whole file read as a stream (a compressed file, or one
            whose index pass failed).
        offset: byte offset of the first record's header.
        length: bytes the reader reads for the chunk (its frames).
    """

    source_file: str
    first_index: int = 0
    count: int | None = None
    offset: int = 0
    length: int | None = None


def index_chunks(handle, source_file: str, size: int, max_records: int = CHUNK_RECORDS,
                 max_bytes: int = CHUNK_BYTES):
    """Cuts a file into :class:`Chunk` descriptors of at most ``max_records`` items and ``max_bytes`` bytes.

    Walks the length fields (:func:`walk_frames`) of an uncompressed file of
    ``size`` bytes open as ``handle``. Together the chunks hold every item
    :func:`read_records` yields for the file, in order; a record larger than
    ``max_bytes`` is a chunk of its own.

    Example:
        >>> with open("data/train-0.tfrecord", "rb") as handle:   # 150 records
        ...     [(c.first_index, c.count) for c in index_chunks(handle, "train-0.tfrecord", 1_900_000)]
        [(0, 64), (64, 64), (128, 22)]
    """
    first = count = start = length = 0
    for index, (offset, span) in enumerate(walk_frames(handle, size)):
        if count and (count >= max_records or length + span > max_bytes):
            yield Chunk(source_file, first, count, start, length)
            count = length = 0
        if not count:
            first, start = index, offset
        count += 1
        length += span
    if count:
        yield Chunk(source_file, first, count, start, length)


def _damage(source_file: str, index: int, message: str) -> ReadError:
    if index == 0:
        return ReadError(source_file, None, f"not a readable TFRecord file: {message}")
    return ReadError(source_file, index, f"{message}; the rest of the file is unreadable")


def record_key(source_file: str, record_index: int | None) -> str:
    """The default key: ``<file name>:<record index>`` (just the file name for whole-file errors)."""
    name = os.path.basename(source_file.rstrip("/"))
    return name if record_index is None else f"{name}:{record_index}"


# ------------------------------------------------------------------ Beam step
def _is_compressed(path: str) -> bool:
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


class _IndexFile(beam.DoFn):
    """A file → its :class:`Chunk` descriptors (one whole-file chunk when it cannot be indexed)."""

    def __init__(self, max_records: int, max_bytes: int):
        self.max_records, self.max_bytes = max_records, max_bytes
        self.chunks = Metrics.counter(NAMESPACE, "read_chunks")

    def process(self, metadata):
        path = metadata.path
        chunks = [Chunk(path)]  # compressed, or not indexable: the whole file, read as a stream
        if not _is_compressed(path):
            try:
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    size = handle.seek(0, os.SEEK_END)
                    chunks = list(index_chunks(handle, path, size, self.max_records, self.max_bytes))
            except Exception:  # noqa: BLE001 - the whole-file reader meets the fault and reports it
                chunks = [Chunk(path)]
        self.chunks.inc(len(chunks))
        yield from chunks


class _ReadChunk(beam.DoFn):
    """Reads one :class:`Chunk`; damage becomes error rows, never a failed job."""

    def __init__(self):
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.read_errors = Metrics.counter(NAMESPACE, "errors_read")

    def _error(self, path: str, index: int | None, message: str):
        self.read_errors.inc()
        return beam.pvalue.TaggedOutput(ERRORS, error_row(record_key(path, index), path, index, "read", message))

    def process(self, chunk: Chunk):
        path, whole = chunk.source_file, chunk.count is None
        next_index = None if whole else chunk.first_index  # where an I/O fault would leave the chunk
        unread = "" if whole else f" (records {chunk.first_index} to {chunk.first_index + chunk.count - 1} unread)"
        try:
            if whole:
                handle = FileSystems.open(path, compression_type=CompressionTypes.AUTO)
            else:
                handle = storage.open_range(path, chunk.offset, chunk.length)
        except Exception as error:  # noqa: BLE001 - an unreadable file is one error row
            yield self._error(path, next_index, f"cannot open file: {error}{unread}")
            return
        with handle:
            try:
                for item in read_records(handle, path, chunk.first_index, chunk.offset, chunk.count):
                    if isinstance(item, Record):
                        self.records_read.inc()
                        yield item
                    else:
                        yield self._error(item.source_file, item.record_index, item.error)
                    if not whole and item.record_index is not None:
                        next_index = item.record_index + 1
            except Exception as error:  # noqa: BLE001 - e.g. a bad gzip stream, a lost connection
                rest = "" if whole else (f" (records {next_index} to {chunk.first_index + chunk.count - 1} "
                                         "unread)")
                yield self._error(path, next_index, f"{type(error).__name__}: {error}{rest}")


class IndexFiles(beam.PTransform):
    """Matched files (``FileMetadata``) → :class:`Chunk` descriptors, by the index pass.

    An uncompressed file becomes chunks of at most ``chunk_records`` records and
    ``chunk_bytes`` bytes (:func:`index_chunks`); a compressed file, or one
    whose index pass fails (e.g. it cannot be opened), is one whole-file chunk
    read as a stream from its start, so that its reader reports the fault as
    for any whole file. Counts the chunks in the ``read_chunks`` metric.
    """

    def __init__(self, chunk_records: int | None = None, chunk_bytes: int | None = None):
        super().__init__()
        self.chunk_records = chunk_records or CHUNK_RECORDS
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES

    def expand(self, files):
        """Adds the index step; returns the PCollection of chunks."""
        return files | beam.ParDo(_IndexFile(self.chunk_records, self.chunk_bytes))


class ReadTFRecords(beam.PTransform):
    """File patterns → :class:`Record` items (main output) and read error rows (``errors``).

    Steps: ``MatchFiles``; ``SpreadFiles`` (reshuffle of file names);
    ``IndexFiles`` (each file's length fields walked into :class:`Chunk`
    descriptors); ``SpreadChunks`` (reshuffle of the descriptors: a few large
    files still spread over all workers, and no record's bytes cross the
    shuffle); ``ReadChunks`` (each chunk read and checked).

    Args:
        patterns: file patterns (local or ``gs://``, globs allowed).
        chunk_records: most records per chunk (default :data:`CHUNK_RECORDS`).
        chunk_bytes: most bytes per chunk (default :data:`CHUNK_BYTES`).

    Returns (from ``expand``):
        ``(records, errors)``: two PCollections.

    Example:
        >>> records, errors = pipeline | "ReadRecords" >> ReadTFRecords(["data/*.tfrecord"])
    """

    def __init__(self, patterns: list[str], chunk_records: int | None = None, chunk_bytes: int | None = None):
        super().__init__()
        self.patterns = list(patterns)
        self.chunk_records, self.chunk_bytes = chunk_records, chunk_bytes

    def expand(self, pipeline):
        """Adds the read steps; returns ``(records, errors)``."""
        chunks = (pipeline
                  | "Patterns" >> beam.Create(self.patterns)
                  | "MatchFiles" >> fileio.MatchAll()
                  | "SpreadFiles" >> beam.Reshuffle()
                  | "IndexFiles" >> IndexFiles(self.chunk_records, self.chunk_bytes)
                  | "SpreadChunks" >> beam.Reshuffle())
        read = chunks | "ReadChunks" >> beam.ParDo(_ReadChunk()).with_outputs(ERRORS, main="records")
        return read.records, read[ERRORS]
