"""The Parquet schema of the corpus and of the errors files: defined here only."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from transforms.engine.statistics import MAP_COLUMNS

STAGES = ("read", "decode", "explain")
METADATA_KEY = b"smoothgrad_audit"
# A writer buffers one row group; keep it under this many bytes.
ROW_GROUP_BYTES = 64 << 20


def saliency_schema(map_shape: tuple, dtype: str = "float16", mask_columns: bool = False,
                    metadata: dict | None = None) -> pa.Schema:
    """Schema of ``saliency-*.parquet``; ``map_shape`` is ``(H, W)`` or ``(H, W, C)``."""
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("record_sha256", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("target", pa.int32(), nullable=False),
        pa.field("target_rank", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("predicted", pa.int32(), nullable=False),
        pa.field("noise_sigma", pa.float32(), nullable=False),
        pa.field("samples_used", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("saliency", pa.fixed_shape_tensor(value_type, list(map_shape)), nullable=False),
    ]
    if mask_columns:
        fields += [pa.field("mass_in_mask", pa.float32(), nullable=True),
                   pa.field("pointing_hit", pa.bool_(), nullable=True)]
    fields += [pa.field(name, pa.float32(), nullable=True) for name in MAP_COLUMNS]
    schema = pa.schema(fields)
    if metadata:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)})
    return schema


ERRORS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("record_index", pa.int64(), nullable=True),
    pa.field("record_sha256", pa.string(), nullable=True),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
])


def rows_per_group(schema: pa.Schema) -> int:
    """Rows per row group so that one group stays under ``ROW_GROUP_BYTES``."""
    tensor_type = schema.field("saliency").type
    row_bytes = int(np.prod(tensor_type.shape)) * tensor_type.value_type.bit_width // 8 + 256
    return max(1, min(10_000, ROW_GROUP_BYTES // row_bytes))


def saliency_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A table of saliency rows (dicts with a numpy ``saliency`` map each)."""
    tensor_type = schema.field("saliency").type
    numpy_dtype = np.float16 if tensor_type.value_type == pa.float16() else np.float32
    size = int(np.prod(tensor_type.shape))
    flat = np.concatenate([np.asarray(row["saliency"], numpy_dtype).reshape(-1) for row in rows]) \
        if rows else np.zeros(0, numpy_dtype)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat), list_size=size)
    columns = {}
    for field in schema:
        if field.name == "saliency":
            columns[field.name] = pa.ExtensionArray.from_storage(tensor_type, storage)
        else:
            columns[field.name] = pa.array([row.get(field.name) for row in rows], type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def errors_table(rows: list[dict]) -> pa.Table:
    """A table of error rows (dicts with the ``ERRORS_SCHEMA`` fields)."""
    return pa.Table.from_pylist([{field.name: row.get(field.name) for field in ERRORS_SCHEMA} for row in rows],
                                schema=ERRORS_SCHEMA)
