"""The audit's Parquet files under ``_audit/``: their Arrow schemas and tables (defined here only).

``class_saliency-*.parquet`` holds one row per (class, group) with the mean and
standard deviation of the class's unit-mass audit maps; ``class_sample-*.parquet``
one row per sampled map. The pipeline writes them (:mod:`transforms.audit.aggregates`)
and the findings engine reads them (:mod:`transforms.audit.read`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from transforms.audit.pooling import ClassSaliency, SampledMap

#: File name prefixes under the audit folder.
CLASS_SALIENCY = "class_saliency"
CLASS_SAMPLE = "class_sample"


def _tensor(value_type, cells) -> pa.DataType:
    return pa.fixed_shape_tensor(value_type, [int(cells[0]), int(cells[1])])


def class_saliency_schema(cells) -> pa.Schema:
    """Schema of ``class_saliency-*.parquet`` for audit maps of ``cells`` = (rows, columns)."""
    return pa.schema([
        pa.field("target", pa.int32(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("mean", _tensor(pa.float64(), cells), nullable=False),
        pa.field("std", _tensor(pa.float64(), cells), nullable=False),
    ])


def class_sample_schema(cells) -> pa.Schema:
    """Schema of ``class_sample-*.parquet``; ``key_hash`` orders a class's sample (ascending)."""
    return pa.schema([
        pa.field("target", pa.int32(), nullable=False),
        pa.field("key_hash", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("predicted", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("target_rank", pa.int32(), nullable=False),
        pa.field("pooled", _tensor(pa.float32(), cells), nullable=False),
    ])


def _tensor_column(maps, tensor_type, dtype) -> pa.ExtensionArray:
    size = int(np.prod(tensor_type.shape))
    flat = np.concatenate([np.asarray(item, dtype).reshape(-1) for item in maps]) if maps else np.zeros(0, dtype)
    return pa.ExtensionArray.from_storage(tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(flat), size))


def class_saliency_table(items: list[ClassSaliency], schema: pa.Schema) -> pa.Table:
    """A table of :class:`ClassSaliency` records.

    Args:
        items: the records (any order).
        schema: :func:`class_saliency_schema` of their cells.

    Returns:
        One row per record.
    """
    mean_type = schema.field("mean").type
    return pa.Table.from_pydict({
        "target": pa.array([item.target for item in items], pa.int32()),
        "group": pa.array([item.group for item in items], pa.string()),
        "count": pa.array([item.count for item in items], pa.int64()),
        "mean": _tensor_column([item.mean for item in items], mean_type, np.float64),
        "std": _tensor_column([item.std for item in items], mean_type, np.float64),
    }, schema=schema)


def class_sample_table(items: list[tuple[int, SampledMap]], schema: pa.Schema) -> pa.Table:
    """A table of sampled maps.

    Args:
        items: ``(key hash, SampledMap)`` pairs, written in the given order.
        schema: :func:`class_sample_schema` of their cells.

    Returns:
        One row per sampled map.
    """
    maps = [sampled for _, sampled in items]
    columns = {"key_hash": pa.array([key_hash for key_hash, _ in items], pa.int64())}
    for field in schema:
        if field.name == "pooled":
            columns["pooled"] = _tensor_column([item.pooled for item in maps], field.type, np.float32)
        elif field.name != "key_hash":
            columns[field.name] = pa.array([getattr(item, field.name) for item in maps], field.type)
    return pa.Table.from_pydict(columns, schema=schema)
