"""Reading a finished run's audit inputs: class saliency, the per-class samples, and the cell grid.

The files are those the manifest lists under ``outputs.audit`` (names relative
to the run folder), read through Beam's ``FileSystems``, so a run on ``gs://``
reads like a local one.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.audit import tables
from transforms.audit.pooling import AUDIT_DIR, GROUPS, ClassSaliency, Grid, SampledMap
from transforms.support.errors import one_line
from transforms.write.corpus import MANIFEST


class AuditReadError(ValueError):
    """A run whose audit inputs are missing or cannot be read; the message is one line."""


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_manifest(run_dir: str) -> dict:
    """The parsed ``_MANIFEST.json`` of a finished run.

    Args:
        run_dir: ``OUTPUT/run_id=<RUN_ID>``, local or ``gs://``.

    Returns:
        The manifest.

    Raises:
        AuditReadError: when there is no manifest (an incomplete run) or it cannot be read.
    """
    path = FileSystems.join(run_dir.rstrip("/"), MANIFEST)
    try:
        with _open(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise AuditReadError(f"cannot read {path}: {one_line(error)}") from None


def _audit_files(run_dir: str, manifest: dict | None, prefix: str) -> list[str]:
    """The run's audit files whose names start with ``prefix``, as paths."""
    manifest = read_manifest(run_dir) if manifest is None else manifest
    if not manifest.get("audit"):
        raise AuditReadError(f"{run_dir} has no audit inputs (the run had audit: false)")
    names = (manifest.get("outputs") or {}).get("audit") or []
    start = f"{AUDIT_DIR}/{prefix}-"
    return [FileSystems.join(run_dir.rstrip("/"), *name.split("/")) for name in names if name.startswith(start)]


def _read_tables(paths: list[str], columns=None) -> list[pa.Table]:
    read = []
    for path in paths:
        try:
            with _open(path) as handle:
                read.append(pq.ParquetFile(handle).read(columns=columns))
        except (OSError, pa.ArrowException) as error:
            raise AuditReadError(f"cannot read {path}: {one_line(error)}") from None
    return read


def _maps(column, dtype) -> np.ndarray:
    """A fixed-shape tensor column as numpy ``[N, rows, columns]``."""
    column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, *column.type.shape), dtype)
    return np.asarray(column.to_numpy_ndarray(), dtype)


def read_class_saliency(run_dir: str, manifest: dict | None = None) -> list[ClassSaliency]:
    """The class saliency of a finished run.

    Args:
        run_dir: the run folder, local or ``gs://``.
        manifest: its parsed manifest, when the caller has it (else read here).

    Returns:
        One :class:`ClassSaliency` per (target, group) that had a map, sorted by
        target, then in the order of :data:`GROUPS`; mean and std float64 ``[rows, columns]``.

    Raises:
        AuditReadError: when the run has no audit inputs or a file cannot be read.
    """
    found = []
    for table in _read_tables(_audit_files(run_dir, manifest, tables.CLASS_SALIENCY)):
        means, stds = _maps(table.column("mean"), np.float64), _maps(table.column("std"), np.float64)
        for position, (target, group, count) in enumerate(zip(*(table.column(name).to_pylist()
                                                                 for name in ("target", "group", "count")))):
            found.append(ClassSaliency(target=target, group=group, count=count, mean=means[position],
                                       std=stds[position]))
    return sorted(found, key=lambda item: (item.target, GROUPS.index(item.group)))


def read_samples(run_dir: str, manifest: dict | None = None) -> dict[int, list[SampledMap]]:
    """The per-class samples of a finished run.

    Args:
        run_dir: the run folder, local or ``gs://``.
        manifest: its parsed manifest, when the caller has it (else read here).

    Returns:
        ``{target: [SampledMap, ...]}``, targets ascending, each list in sample
        order (ascending key hash), at most ``audit.samples_per_class`` long.

    Raises:
        AuditReadError: when the run has no audit inputs or a file cannot be read.
    """
    found = collections.defaultdict(list)
    for table in _read_tables(_audit_files(run_dir, manifest, tables.CLASS_SAMPLE)):
        pooled = _maps(table.column("pooled"), np.float32)
        scalars = table.drop_columns(["pooled"]).to_pylist()
        for values, pooled_map in zip(scalars, pooled):
            key_hash = values.pop("key_hash")
            found[values["target"]].append((key_hash, values["key"], SampledMap(pooled=pooled_map, **values)))
    return {target: [sampled for *_, sampled in sorted(items, key=lambda item: item[:2])]
            for target, items in sorted(found.items())}


def read_grid(manifest: dict) -> Grid:
    """The audit's cell grid of a run, from its manifest.

    Args:
        manifest: a parsed ``_MANIFEST.json`` with an ``audit`` block.

    Returns:
        The :class:`Grid`: cells (rows, columns), input pixels per cell side, and the model input's (H, W).

    Raises:
        AuditReadError: when the run had ``audit: false``.
    """
    block = manifest.get("audit")
    if not block:
        raise AuditReadError(f"run {manifest.get('run_id')!r} has no audit block (the run had audit: false)")
    input_shape = block.get("input_shape") or (manifest.get("model") or {}).get("input_shape")
    return Grid(cells=tuple(int(size) for size in block["cells"]), cell=int(block["cell"]),
                input_shape=(int(input_shape[0]), int(input_shape[1])))
