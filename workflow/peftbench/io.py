"""Atomic writes and small table helpers shared by every stage.

Every output is written to a temporary file in the same directory and renamed into place, so a
killed job never leaves a readable half-written Parquet or safetensors file.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_table(table: pa.Table | pd.DataFrame, path: str | Path, metadata: dict | None = None) -> None:
    """Write a Parquet file atomically; ``metadata`` goes (JSON-encoded) into the schema metadata
    under the key ``peftbench``."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta[b"peftbench"] = json.dumps(metadata).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str | Path) -> dict:
    """The ``peftbench`` metadata a file was written with (``{}`` if none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"peftbench")
    return json.loads(raw) if raw else {}


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
