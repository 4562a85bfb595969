"""Results parts on disk: their names, their schema stamp, and reading them safely.

    <output>/results/part-<ts>-<uuid12>.parquet         written by ipa before buffering (one per batch)
    <output>/results/part-<ts>-r<run>-<seq>.parquet      a run's buffered commits (every N rows / T s)
    <output>/results/part-<ts>-<tag>-c<hex8>.parquet     a compacted part: all the rows of one run
    <output>/results/_quarantine/<name>(.reason.json)    unreadable parts, moved aside with why

This module knows files, not rows: it sits below `folder.py` (which builds tables) and imports of
ipa only its error type and the quarantine every reader shares (storage/quarantine.py). Readers must
cope with compaction running beside them (it writes the merged part, then removes the small ones): a
part that vanishes between listing and reading is looked for again in a fresh listing, and rows seen
twice are dropped by `dedupe_attempts`. A part whose bytes are bad (a truncated upload, a cut
copy; a read cut short is re-read whole first) is quarantined so one bad file never stops every
rerun; its rows are then simply not done and are made again. A part stamped with a newer or foreign
schema is refused, never rewritten, because merging it could lose columns this version ignores.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.errors import UserError
from ipa_ops.storage.quarantine import Problem, one_line, read_checked, set_aside

SCHEMA_VERSION = 1  # bump when results columns change meaning; older parts (no stamp) are version 1
META_KEY = b"ipa.results_schema"
REQUIRED = ("id", "row_key", "status", "finished_at")
ATTEMPT = ("id", "row_key", "status", "finished_at")  # what makes one attempt (for de-duplication)
_NAME = re.compile(r"^part-(?P<ts>\d{8}T\d{6,12}Z)-(?P<tag>[0-9a-z]{1,40})(?:-(?P<seq>\d{6}|c[0-9a-f]{8}))?\.parquet$")


class ResultsPartRefused(UserError):
    """A results part this version must not read or rewrite (newer or foreign schema)."""


@dataclass(frozen=True)
class PartName:
    """What a part's file name says: when it was written, which run (or legacy part), what kind."""

    ts: str
    tag: str
    seq: str | None

    @property
    def compacted(self) -> bool:
        return bool(self.seq and self.seq.startswith("c"))

    @property
    def group(self) -> str:
        """The compaction group: the run tag, or for un-tagged parts of before, their UTC day."""
        return self.tag if self.tag.startswith(("r", "l")) else f"l{self.ts[:8]}"


def parse_name(path: str) -> PartName | None:
    """The parts of a results part's name; None for any other file (temp files, sidecars)."""
    found = _NAME.match(posixpath.basename(path))
    return PartName(found["ts"], found["tag"], found["seq"]) if found else None


def timestamp(when: datetime | None = None) -> str:
    """The time field of part names: sorts as it reads, microseconds so parts of one run keep order."""
    return f"{(when or datetime.now(UTC)):%Y%m%dT%H%M%S%fZ}"


def small_part_name(run_tag: str, seq: int) -> str:
    return f"part-{timestamp()}-{run_tag}-{seq:06d}.parquet"


def compacted_name(first_ts: str, group: str, token: str) -> str:
    return f"part-{first_ts}-{group}-c{token[:8]}.parquet"


def stamp(table: pa.Table) -> pa.Table:
    """The table with this version's schema stamp in its Parquet metadata."""
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = str(SCHEMA_VERSION).encode()
    return table.replace_schema_metadata(meta)


def list_parts(fs: Any, results_dir: str) -> list[str]:
    """Results parts under `results_dir`, oldest first (names sort by time); not the quarantine."""
    if not fs.isdir(results_dir):
        return []
    names = fs.ls(results_dir, detail=False)
    return sorted((n for n in names if parse_name(n) is not None), key=posixpath.basename)


def read_parts(fs: Any, results_dir: str, columns: list[str] | None = None) -> list[pa.Table]:
    """Every readable part (only `columns`, when given), in name order.

    A part removed by a compaction between listing and reading is replaced by a fresh listing (the
    compacted part is written before the small ones go). Unreadable parts are quarantined; refused
    ones raise `ResultsPartRefused`.
    """
    tables: dict[str, pa.Table] = {}
    for _ in range(5):
        vanished = False
        for path in list_parts(fs, results_dir):
            if path in tables:
                continue
            try:
                table = read_part(fs, path, columns)
            except FileNotFoundError:
                vanished = True
                continue
            if table is not None:
                tables[path] = table
        if not vanished:
            break
    return [tables[p] for p in sorted(tables, key=posixpath.basename)]


def read_part(fs: Any, path: str, columns: list[str] | None = None) -> pa.Table | None:
    """One part, checked; None when it was unreadable (and is now in the quarantine)."""

    def parse(source: Any) -> pa.Table:
        parquet = pq.ParquetFile(source)
        check_schema(path, parquet.schema_arrow)
        wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        return parquet.read(columns=wanted)

    return _read_or_set_aside(fs, path, parse)


def read_part_footer(fs: Any, path: str) -> tuple[pa.Schema, int] | None:
    """A part's checked schema and row count (its footer only); None when it was unreadable (and is now in
    the quarantine)."""

    def parse(source: Any) -> tuple[pa.Schema, int]:
        metadata = pq.read_metadata(source)
        schema = metadata.schema.to_arrow_schema()
        check_schema(path, schema)
        return schema, metadata.num_rows

    return _read_or_set_aside(fs, path, parse)


def _read_or_set_aside(fs: Any, path: str, parse: Any) -> Any:
    """`parse(part)`; a part whose bytes are bad goes to `results/_quarantine/` (one line) and gives None.

    A vanished part (compacted away) raises FileNotFoundError, a refused one `ResultsPartRefused`.
    """
    value, error = read_checked(fs, path, parse)
    if error is None:
        return value
    quarantine(fs, path, error)
    return None


def check_schema(path: str, schema: pa.Schema) -> None:
    """Refuse parts of a newer results schema, and files that are not results parts at all."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is not None:
        try:
            version = int(raw)
        except ValueError:
            version = -1
        if version > SCHEMA_VERSION or version < 1:
            raise ResultsPartRefused(
                f"{path}: results schema version {raw.decode(errors='replace')} is not one this ipa reads "
                f"(<= {SCHEMA_VERSION}); read it with a newer ipa, or move it out of results/"
            )
    bad = [c for c in REQUIRED if c not in schema.names]
    bad += [c for c in ("id", "row_key", "status") if c in schema.names and not _is_string(schema.field(c).type)]
    if "finished_at" in schema.names and not pa.types.is_timestamp(schema.field("finished_at").type):
        bad.append("finished_at")
    if bad:
        raise ResultsPartRefused(
            f"{path}: not an ipa results part (column(s) {', '.join(bad)} missing or of another type); "
            "move it out of results/ and rerun"
        )


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def quarantine(fs: Any, path: str, reason: BaseException | str) -> str:
    """Move an unreadable part to `results/_quarantine/` with its `.reason.json`; says so in one line."""
    text = one_line(reason) if isinstance(reason, BaseException) else reason
    why = f"unreadable results part ({text}); its rows are not done and will be made again"
    return set_aside(fs, Problem(path, "unreadable", why, posixpath.dirname(path)))


def dedupe_attempts(df: pd.DataFrame) -> pd.DataFrame:
    """Each attempt once: a row in both a compacted part and a small part not yet removed counts once."""
    cols = [c for c in ATTEMPT if c in df.columns]
    if df.empty or not cols:
        return df
    return df[~df.duplicated(cols, keep="first")].reset_index(drop=True)
