"""Item tables (id, path, label[, target]) on disk and as Ray Datasets, and the schema of skipped inputs."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage

# Every input that a stage skipped, with its reason (the run's errors.parquet adds the dataset).
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("stage", pa.string()), ("error", pa.string())])


def read_items(uri: str) -> pa.Table:
    fs, p = storage.resolve(uri)
    return pq.read_table(p, filesystem=fs)


def write_items(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())  # whole or not at all


def items_dataset(items: pa.Table, block_rows: int):
    """A Ray Dataset of ``items``, one block per ``block_rows`` rows (decode and inference parallelise over blocks)."""
    import ray

    chunks = [items.slice(i, block_rows) for i in range(0, items.num_rows, block_rows)] or [items]
    return ray.data.from_arrow(chunks)
