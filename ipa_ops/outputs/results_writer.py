"""Results written in few, large parts: a buffering writer for the driver, and compaction.

One part per batch of 8 left 25,000 files a night at 200,000 rows, and every later reader pays per
file (a GET each on object storage). So the driver buffers finished rows and commits a part every
`commit_rows` rows or `commit_seconds` seconds, and on exit; a crash loses at most the rows not yet
committed, whose keys are then not done and are made again by the next run (their images are
rewritten with identical bytes). At the end of a run its parts are merged into one:

    1. write the merged part (atomic: readers see it whole or not at all);
    2. remove the small parts it replaces.

Between 1 and 2 a reader sees some rows twice; `results_parts.dedupe_attempts` drops the second
copy (same id, row key, status and finish time), so no reader ever sees a row twice or misses one.
`compact_output` does the same for a whole folder, one merged part per run; parts written before
run tags existed (one per batch, no run in their name) are grouped by their UTC day.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ipa_ops.outputs import results_parts
from ipa_ops.outputs.folder import RESULTS_SCHEMA, OutputDir


def new_run_tag() -> str:
    """`r` + 12 hex: names this run's parts so compaction can find them (and only them)."""
    return "r" + uuid.uuid4().hex[:12]


class ResultsWriter:
    """Buffers results rows on the driver; commits a part every `rows` rows or `seconds` seconds."""

    def __init__(self, out: OutputDir, rows: int = 5000, seconds: float = 60.0, run_tag: str | None = None):
        self.out, self.max_rows, self.max_seconds = out, max(1, int(rows)), float(seconds)
        self.run_tag = run_tag or new_run_tag()
        self.buffer: list[Mapping[str, Any]] = []
        self.parts: list[str] = []
        self.last_commit = time.monotonic()

    def add(self, rows: list[Mapping[str, Any]]) -> None:
        """Queue finished rows; commits when the window is full or old enough."""
        self.buffer.extend(rows)
        if len(self.buffer) >= self.max_rows or time.monotonic() - self.last_commit >= self.max_seconds:
            self.commit()

    def commit(self) -> str:
        """Write what is buffered as one part now ('' when nothing is)."""
        self.last_commit = time.monotonic()
        if not self.buffer:
            return ""
        rows, self.buffer = self.buffer, []
        name = results_parts.small_part_name(self.run_tag, len(self.parts))
        path = self.out.append_results(rows, name=name)
        self.parts.append(path)
        return path

    def close(self, compact: bool = True) -> str:
        """Commit the rest; then (by default) merge this run's parts into one. Returns the final part."""
        self.commit()
        if compact and len(self.parts) > 1:
            return compact_group(self.out, self.run_tag) or ""
        return self.parts[-1] if self.parts else ""


def compact_group(out: OutputDir, group: str) -> str | None:
    """Merge every part of one group (a run tag, or `l<YYYYMMDD>` for older parts) into one part.

    Returns the merged part, or None when the group has fewer than two parts. Unreadable parts are
    quarantined by the reader (not merged, not lost silently); refused ones stop it (never rewritten).
    """
    paths = group_parts(out).get(group, [])
    if len(paths) < 2:
        return None
    table, merged_from = read_group(out, paths)
    if table is None:
        return None
    first = results_parts.parse_name(paths[0])
    assert first is not None
    name = results_parts.compacted_name(first.ts, group, uuid.uuid4().hex)
    merged = out.write_results_table(table, name)  # 1. the merged part, whole
    for path in merged_from:  # 2. only then the parts it replaces
        out.fs.rm(path)
    return merged


def group_parts(out: OutputDir) -> dict[str, list[str]]:
    """Results parts by compaction group (run tag, or UTC day for untagged parts), oldest first."""
    groups: dict[str, list[str]] = {}
    for path in results_parts.list_parts(out.fs, out.results_dir()):
        groups.setdefault(_group(path), []).append(path)
    return groups


def read_group(out: OutputDir, paths: list[str]) -> tuple[pa.Table | None, list[str]]:
    """The rows of `paths` as one table of today's columns, each attempt once, and the parts read.

    (None, []) when a part vanished meanwhile (another compaction took the group) or none was readable.
    """
    tables, read = [], []
    for path in paths:
        try:
            table = results_parts.read_part(out.fs, path)
        except FileNotFoundError:
            return None, []
        if table is not None:
            tables.append(table)
            read.append(path)
    if not tables:
        return None, []
    table = pa.concat_tables([_normalise(t) for t in tables], promote_options="permissive")
    return _unique_attempts(table), read


def compact_output(out: OutputDir) -> dict[str, int]:
    """`ipa compact OUTPUT`: one part per run (or per day, for parts written before run tags)."""
    groups = group_parts(out)
    merged = sum(1 for group, paths in groups.items() if len(paths) > 1 and compact_group(out, group) is not None)
    after = len(results_parts.list_parts(out.fs, out.results_dir()))
    return {"parts_before": sum(len(p) for p in groups.values()), "parts_after": after, "groups_merged": merged}


def _group(path: str) -> str:
    name = results_parts.parse_name(path)
    assert name is not None
    return name.group


def _normalise(table: pa.Table) -> pa.Table:
    """Older parts lack columns added since; cast known columns to today's types so parts concatenate."""
    for field in RESULTS_SCHEMA:
        if field.name not in table.schema.names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
        elif table.schema.field(field.name).type != field.type:
            index = table.schema.get_field_index(field.name)
            table = table.set_column(index, field, table.column(field.name).cast(field.type))
    return table.replace_schema_metadata(None)


def _unique_attempts(table: pa.Table) -> pa.Table:
    """Drop attempts already present (a merged part plus small parts left by a killed compaction)."""
    df = table.select([c for c in results_parts.ATTEMPT if c in table.schema.names]).to_pandas()
    keep = ~df.duplicated(keep="first").to_numpy()
    return table.filter(pa.array(keep)) if not keep.all() else table

