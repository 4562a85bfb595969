"""Is a store part ours, whole, and of a schema this ipa reads? Used by the store reader and `ipa doctor`.

Every part carries `ipa.store_schema` in its Parquet key-value metadata (parts from before the
marker count as version 1). A part is
- `unreadable` when pyarrow cannot read it (truncated: no footer, bad pages),
- `foreign` when it lacks the store's common columns (or holds them with other types), or sits in
  the folder of another encoder,
- `newer` when its schema version is above `STORE_SCHEMA_VERSION`: written by a newer ipa. Such a
  part is refused with one line and never moved or overwritten.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.storage.quarantine import NewerSchema, Problem, one_line, read_checked, set_aside
from ipa_ops.store.schema import COMMON

T = TypeVar("T")
STORE_SCHEMA_VERSION = 1
VERSION_KEY = b"ipa.store_schema"


def stamp(table: pa.Table) -> pa.Table:
    """The table with this ipa's store schema version in its metadata (what `EmbeddingStore.append` writes)."""
    meta = dict(table.schema.metadata or {})
    meta[VERSION_KEY] = str(STORE_SCHEMA_VERSION).encode()
    return table.replace_schema_metadata(meta)


def schema_problem(schema: pa.Schema, path: str, root: str) -> Problem | None:
    """What is wrong with a part's schema (None when it is a store part this ipa reads)."""
    raw = (schema.metadata or {}).get(VERSION_KEY, b"1")
    try:
        version = int(raw)
    except ValueError:
        return Problem(path, "foreign", f"store schema marker {raw!r} is not a version number", root)
    if version > STORE_SCHEMA_VERSION:
        return Problem(
            path,
            "newer",
            f"written with store schema {version}; this ipa reads up to {STORE_SCHEMA_VERSION}: upgrade ipa "
            "(the part is left as it is)",
            root,
        )
    absent = [name for name, _ in COMMON if name not in schema.names]
    if absent:
        return Problem(path, "foreign", f"not a store part: no column {', '.join(absent[:4])}", root)
    differ = [f"{n} is {schema.field(n).type}, not {t}" for n, t in COMMON if schema.field(n).type != t]
    if differ:
        return Problem(path, "foreign", f"not a store part: {'; '.join(differ[:3])}", root)
    return None


def newer_error(problem: Problem) -> NewerSchema:
    return NewerSchema(f"{problem.path}: {problem.reason}")


def read_part(fs: Any, path: str, root: str, read: Callable[[pq.ParquetFile], T]) -> tuple[T | None, Problem | None]:
    """(read(part), None) for a good part, else (None, its problem). Transient read errors propagate.

    `read` runs while the file is open, so a reader takes only the columns it wants.
    """

    def checked(source: Any) -> tuple[T | None, Problem | None]:
        pf = pq.ParquetFile(source)
        problem = schema_problem(pf.schema_arrow, path, root)
        return (None, problem) if problem else (read(pf), None)

    result, error = read_checked(fs, path, checked)
    if error is not None:
        return None, Problem(path, "unreadable", f"not a readable Parquet part ({one_line(error)})", root)
    return result


def check_part(fs: Any, path: str, root: str) -> Problem | None:
    """Everything `ipa doctor` checks of one part: it opens, every column reads, its schema and folder fit."""
    table, problem = read_part(fs, path, root, lambda pf: pf.read())
    if problem is not None or table is None:
        return problem
    folder = unquote(posixpath.basename(posixpath.dirname(path)))
    encoders = set(table.column("encoder").to_pylist())
    if encoders and encoders != {folder}:
        return Problem(path, "foreign", f"rows of encoder {sorted(encoders)[0]} in the folder of {folder}", root)
    return None


def read_or_quarantine(fs: Any, path: str, root: str, read: Callable[[pq.ParquetFile], T]) -> T | None:
    """What the store reader uses: `read(part)`, or None after moving a bad part aside (one line logged).

    A part of a newer schema raises NewerSchema: the store is refused rather than read in part.
    A part that cannot be moved (read-only storage) is skipped with a line saying so.
    """
    value, problem = read_part(fs, path, root, read)
    if problem is None:
        return value
    if not problem.fixable:
        raise newer_error(problem)
    set_aside(fs, problem)
    return None
