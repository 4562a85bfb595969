"""A results row as an exported record: its image file, its bytes, its JSON.

The record is the row as the results view gives it: every column, nested ones as they are. Only
the staging bookkeeping column (`SEQ`, the row's place in the selection) is left out.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import posixpath
from typing import Any

import pyarrow as pa

from ipa_ops.outputs.folder import OutputDir

SEQ = "_ipa_seq"  # the row's index in the export's selection: orders shards, names nothing


def record_table(batch: pa.Table) -> pa.Table:
    """The batch without the staging columns: what metadata files and parquet rows hold."""
    return batch.drop_columns([SEQ]) if SEQ in batch.column_names else batch


def image_entry(row: dict[str, Any]) -> str | None:
    """The row's image (or GIF, for a video): the first file its results row names."""
    outputs = row.get("outputs") or []
    return str(outputs[0]) if outputs else None


def image_ext(entry: str) -> str:
    ext = posixpath.splitext(entry)[1].lstrip(".").lower()
    return ext or "png"


def read_image(out: OutputDir, entry: str | None) -> bytes | None:
    """The file's bytes; None when the row names none or it is gone (a user may delete images)."""
    if not entry:
        return None
    path = out._strip(out.resolve(entry))
    try:
        with out.fs.open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def record_json(row: dict[str, Any]) -> bytes:
    """The row as JSON: times as ISO 8601, bytes as base64, nested columns as nested JSON."""
    return json.dumps(row, default=_json_value, ensure_ascii=False).encode()


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, decimal.Decimal | dt.timedelta):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
