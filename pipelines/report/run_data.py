"""Reading a finished run: its manifest, the corpus's scalar columns, chosen maps, its errors, and images again.

A corpus may hold far more maps than fit in memory, so a :class:`Run` holds
only the scalar columns (every column but ``saliency``), with where each row's
map lives: shard, row group and offset in the row group. :func:`load_maps`
then reads the ``saliency`` column of only the row groups that hold the rows
asked for. Images are not in the corpus: :func:`load_pictures` re-reads the
records by ``source_file`` and ``record_index``, each file scanned once.

Everything goes through Beam's ``FileSystems``, so a run on ``gs://`` reads
like a local one.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.support import storage
from transforms.write.corpus import MANIFEST
from transforms.support.errors import one_line
from transforms.write.schema import ERRORS_SCHEMA

SALIENCY = "saliency"
# Where each row's map lives: index into Run.shards, row group, offset in the row group.
LOCATION = ("_shard", "_group", "_offset")


class RunError(ValueError):
    """A run folder (or an option about it) that cannot be used; the message is one line."""


@dataclasses.dataclass
class Run:
    """A finished run, without its maps.

    Attributes:
        path: the run folder.
        manifest: the parsed ``_MANIFEST.json``.
        shards: the saliency shards' paths.
        error_files: the errors files' paths.
        table: the scalar columns, one row per map, plus the :data:`LOCATION` columns.
        map_shape: the stored maps' shape, ``(H, W)`` or ``(H, W, C)``; None without any shard.
    """

    path: str
    manifest: dict
    shards: list
    error_files: list
    table: pa.Table
    map_shape: tuple | None

    @property
    def run_id(self) -> str:
        """The run id from the manifest."""
        return str(self.manifest.get("run_id", ""))

    @property
    def num_rows(self) -> int:
        """The number of maps in the corpus."""
        return self.table.num_rows

    def has(self, name: str) -> bool:
        """Whether the corpus has column ``name`` with at least one non-null value."""
        return name in self.table.column_names and self.table.column(name).null_count < self.num_rows

    def values(self, name: str) -> np.ndarray:
        """Column ``name`` as numpy: numbers as float64 with NaN for null, strings as an object array."""
        column = self.table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return np.asarray(column.to_pylist(), dtype=object)
        if pa.types.is_boolean(column.type):
            column = column.cast(pa.float64())
        return np.asarray(column.to_numpy(), np.float64)

    def rows(self, indices) -> list[dict]:
        """The scalar values of the given rows, as dicts, in the given order."""
        return self.table.take(pa.array(list(indices), pa.int64())).to_pylist()


def caption(values: dict) -> dict:
    """The fields shown under a tile, from one row's scalar values (:meth:`Run.rows`)."""
    return {name: values.get(name) for name in ("key", "label", "predicted", "target", "target_rank", "score")}


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _read_json(path: str) -> dict:
    try:
        with _open(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path}: {one_line(error)}") from None


def _listed(run_dir: str, manifest: dict, kind: str) -> list[str]:
    names = (manifest.get("outputs") or {}).get(kind)
    if names is not None:
        return [FileSystems.join(run_dir, name) for name in names]
    pattern = FileSystems.join(run_dir, f"{kind}-*.parquet")
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)


def open_run(run_dir: str, columns=None) -> Run:
    """Reads a finished run's manifest and scalar columns (no map).

    Args:
        run_dir: ``OUTPUT/run_id=<RUN_ID>``, local or ``gs://``.
        columns: the scalar columns to read (those the corpus lacks are left out), e.g. a few numeric
            columns to skip the keys' and hashes' strings; None: every scalar column.

    Returns:
        The :class:`Run`.

    Raises:
        RunError: when the folder is missing, has no manifest (an incomplete run) or cannot be read.
    """
    run_dir = run_dir.rstrip("/") or "/"
    manifest_path = FileSystems.join(run_dir, MANIFEST)
    if not FileSystems.exists(manifest_path):
        if not storage.exists(run_dir):
            raise RunError(f"{run_dir} does not exist")
        raise RunError(f"{run_dir} has no {MANIFEST}: the run is not complete")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise RunError(f"{manifest_path} is not a run manifest (a JSON object)")
    shards = _listed(run_dir, manifest, "saliency")
    tables, map_shape = [], None
    for number, path in enumerate(shards):
        try:
            with _open(path) as handle:
                parquet = pq.ParquetFile(handle)
                tensor_type = parquet.schema_arrow.field(SALIENCY).type
                map_shape = tuple(int(size) for size in tensor_type.shape)
                scalars = [name for name in parquet.schema_arrow.names
                           if name != SALIENCY and (columns is None or name in columns)]
                for group in range(parquet.metadata.num_row_groups):
                    table = parquet.read_row_group(group, columns=scalars)
                    count = table.num_rows
                    for name, values in zip(LOCATION, (np.full(count, number), np.full(count, group),
                                                       np.arange(count))):
                        table = table.append_column(name, pa.array(values, pa.int32()))
                    tables.append(table)
        except (OSError, KeyError, pa.ArrowException) as error:
            raise RunError(f"cannot read {path}: {one_line(error)}") from None
    if tables:
        table = pa.concat_tables(tables, promote_options="default")
    else:
        table = pa.table({name: pa.array([], pa.string() if name in ("key", "source_file") else pa.float64())
                          for name in ("key", "source_file", "record_index", "label", "target", "predicted",
                                       "score", *LOCATION)})
    return Run(path=run_dir, manifest=manifest, shards=shards, error_files=_listed(run_dir, manifest, "errors"),
               table=table, map_shape=map_shape)


def _read_group_maps(parquet: pq.ParquetFile, group: int, offsets: list[int]) -> np.ndarray:
    """The maps at ``offsets`` of one row group, float32 ``[N, *map_shape]`` (reads that group's maps only)."""
    column = parquet.read_row_group(group, columns=[SALIENCY]).column(0)
    taken = column.take(pa.array(offsets, pa.int64())).combine_chunks()
    return np.asarray(taken.to_numpy_ndarray(), np.float32)


def load_maps(run: Run, rows) -> dict[int, np.ndarray]:
    """The stored maps of the given rows, reading only the row groups that hold them.

    Args:
        run: the run.
        rows: row indices into ``run.table``.

    Returns:
        ``{row: float32 map}``.
    """
    wanted = collections.defaultdict(list)  # (shard, group) -> [(offset, row)]
    rows = sorted({int(row) for row in rows})
    if not rows:
        return {}
    located = run.table.select(list(LOCATION)).take(pa.array(rows, pa.int64())).to_pydict()
    for row, shard, group, offset in zip(rows, *(located[name] for name in LOCATION)):
        wanted[(shard, group)].append((offset, row))
    maps = {}
    for shard in sorted({shard for shard, _ in wanted}):
        path = run.shards[shard]
        try:
            with _open(path) as handle:
                parquet = pq.ParquetFile(handle)
                for (_, group), items in sorted(item for item in wanted.items() if item[0][0] == shard):
                    read = _read_group_maps(parquet, group, [offset for offset, _ in items])
                    maps.update(zip((row for _, row in items), read))
        except (OSError, pa.ArrowException) as error:
            raise RunError(f"cannot read the maps of {path}: {one_line(error)}") from None
    return maps


def read_errors(run: Run, limit: int) -> tuple[list[dict], int]:
    """The first ``limit`` error rows and the number of error rows in all."""
    shown, total = [], 0
    columns = [field.name for field in ERRORS_SCHEMA]
    for path in run.error_files:
        try:
            with _open(path) as handle:
                parquet = pq.ParquetFile(handle)
                total += parquet.metadata.num_rows
                if len(shown) < limit and parquet.metadata.num_rows:
                    for batch in parquet.iter_batches(batch_size=max(1, limit), columns=columns):
                        shown.extend(batch.to_pylist()[:limit - len(shown)])
                        if len(shown) >= limit:
                            break
        except (OSError, pa.ArrowException) as error:
            raise RunError(f"cannot read {path}: {one_line(error)}") from None
    return shown, total


# ------------------------------------------------------------------ images, read again
@dataclasses.dataclass(frozen=True)
class Picture:
    """What a tile shows beside a map: the image as the model saw it, or why there is none.

    Attributes:
        image: float ``[H, W, 3]`` or ``[H, W]`` in [0, 1], at the model input size; None when unavailable.
        mask: bool ``[H, W]`` object mask at the same size, when the run had one.
        note: why the image is missing, one line; None when it is there.
    """

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    note: str | None = None


def input_size(run: Run) -> tuple[int, int]:
    """(H, W) of the model input: the size of the full-resolution maps and of the images shown."""
    shape = (run.manifest.get("model") or {}).get("input_shape") or [None, None]
    if shape[0] and shape[1]:
        return int(shape[0]), int(shape[1])
    config = run.manifest.get("config") or {}
    if config.get("image_size"):
        return tuple(int(size) for size in config["image_size"])
    factor = int((run.manifest.get("smoothgrad") or {}).get("downsample") or 1)
    return (run.map_shape[0] * factor, run.map_shape[1] * factor) if run.map_shape else (1, 1)


def _feature(features, name: str | None):
    if not name or name not in features.feature:
        return None
    feature = features.feature[name]
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    return values or None


def _picture(data: bytes, key: str, config: dict, size: tuple, channels: int) -> Picture:
    """Decodes one record for display; a problem becomes the picture's note."""
    import tensorflow as tf

    from transforms.decode.decode import DecodeError, _decode_pixels, _match_channels, _resize

    try:
        features = tf.train.Example.FromString(data).features
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return Picture(note="the record is no longer a tf.train.Example: the file changed since the run")
    ids = _feature(features, config.get("id_feature"))
    if ids and ids[0].decode("utf-8", errors="replace") != key:
        return Picture(note=f"the record now holds key {ids[0].decode('utf-8', 'replace')!r}: "
                            "the file changed since the run")
    max_pixels = int(config.get("max_image_pixels") or 40_000_000)
    try:
        if config.get("raw_feature"):
            values = _feature(features, config["raw_feature"]) or []
            shape = tuple(config.get("raw_shape") or (*size, channels))
            tensor = np.asarray(values, np.float32).reshape(shape)
            low, high = float(tensor.min()), float(tensor.max())
            image = (tensor - low) / (high - low) if high > low else np.zeros_like(tensor)
        else:
            encoded = _feature(features, config.get("image_feature") or "image/encoded")
            if not encoded:
                return Picture(note=f"the record has no feature {config.get('image_feature')!r}")
            pixels = _match_channels(_decode_pixels(encoded[0], "the image", max_pixels), channels)
            resized = _resize(pixels, size, config.get("resize_method") or "bilinear")
            image = np.clip(resized, 0.0, 255.0) / 255.0
        image = image[..., 0] if image.shape[-1] == 1 else image[..., :3]
        mask = None
        encoded_mask = _feature(features, config.get("mask_feature"))
        if encoded_mask:
            mask_pixels = _decode_pixels(encoded_mask[0], "the mask", max_pixels, channels=1)
            mask = _resize(mask_pixels, size, "nearest")[..., 0] > 0
    except (DecodeError, ValueError, tf.errors.OpError) as error:
        return Picture(note=f"cannot decode the record: {one_line(error)}")
    return Picture(image=image.astype(np.float32), mask=mask)


def load_pictures(run: Run, rows) -> dict[int, Picture]:
    """The images of the given rows, re-read from their TFRecord files (each file scanned once).

    A file that is gone, damaged or changed gives its rows a :class:`Picture`
    with a note instead of failing.

    Args:
        run: the run.
        rows: row indices into ``run.table``.

    Returns:
        ``{row: Picture}``.
    """
    from transforms.read.records import Record, read_records

    rows = sorted({int(row) for row in rows})
    needed = collections.defaultdict(lambda: collections.defaultdict(list))  # file -> index -> [(row, key)]
    for row, values in zip(rows, run.rows(rows)):
        needed[values["source_file"]][int(values["record_index"])].append((row, values["key"]))
    config = run.manifest.get("config") or {}
    size = input_size(run)
    shape = (run.manifest.get("model") or {}).get("input_shape") or []
    channels = int(shape[2]) if len(shape) > 2 and shape[2] else 3
    pictures = {}
    for path, indices in needed.items():
        last = max(indices)
        try:
            with FileSystems.open(path) as handle:
                for item in read_records(handle, path):
                    if isinstance(item, Record) and item.record_index in indices:
                        for row, key in indices[item.record_index]:
                            pictures[row] = _picture(item.data, key, config, size, channels)
                    if item.record_index is not None and item.record_index >= last:
                        break
        except Exception as error:  # noqa: BLE001 - a missing or unreadable file is a note, never fatal
            note = f"cannot read {path}: {one_line(error)}"
            for entries in indices.values():
                for row, _ in entries:
                    pictures.setdefault(row, Picture(note=note))
        for index, entries in indices.items():
            for row, _ in entries:
                pictures.setdefault(row, Picture(note=f"record {index} of {path} can no longer be read"))
    return pictures
