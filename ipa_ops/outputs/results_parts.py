"""Results parts on disk: their names, their schema stamp, and reading them safely.

    <output>/results/part-<ts>-<uuid12>.parquet         written by ipa before buffering (one per batch)
    <output>/results/part-<ts>-r<run>-<seq>.parquet      a run's buffered commits (every N rows / T s)
    <output>/results/part-<ts>-<tag>-c<hex8>.parquet     a compacted part: all the rows of one run
    <output>/results/_quarantine/<name>(.reason.txt)     unreadable parts, moved aside with why

This module knows files, not rows: it sits below `outputs.py` (which builds tables) and imports
nothing of ipa but its error type. Readers must cope with compaction running beside them (it writes the merged part,
then removes the small ones): a part that vanishes between listing and reading is looked for again
in a fresh listing, and rows seen twice are dropped by `dedupe_attempts`. A part that cannot be read
at all (a truncated upload, a disk error) is quarantined so one bad file never stops every rerun;
its rows are then simply not done and are made again. A part stamped with a newer or foreign
schema is refused, never rewritten, because merging it could lose columns this version ignores.
"""

from __future__ import annotations

import posixpath
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.errors import UserError

SCHEMA_VERSION = 1  # bump when results columns change meaning; older parts (no stamp) are version 1
META_KEY = b"ipa.results_schema"
QUARANTINE = "_quarantine"
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
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            check_schema(path, parquet.schema_arrow)
            wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
            return parquet.read(columns=wanted)
    except FileNotFoundError:
        raise
    except ResultsPartRefused:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        quarantine(fs, path, exc)
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
    """Move an unreadable part to `results/_quarantine/` with a `.reason.txt`; says so in one line."""
    text = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
    folder = posixpath.join(posixpath.dirname(path), QUARANTINE)
    dest = posixpath.join(folder, posixpath.basename(path))
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(dest + ".reason.txt", f"{datetime.now(UTC).isoformat()} {path}: {text}\n".encode())
    try:
        fs.mv(path, dest)
    except FileNotFoundError:  # another reader moved it first
        pass
    print(
        f"ipa: {path}: unreadable results part ({text}); moved to {dest}; its rows are not done and will be made again",
        file=sys.stderr,
    )
    return dest


def dedupe_attempts(df: pd.DataFrame) -> pd.DataFrame:
    """Each attempt once: a row in both a compacted part and a small part not yet removed counts once."""
    cols = [c for c in ATTEMPT if c in df.columns]
    if df.empty or not cols:
        return df
    return df[~df.duplicated(cols, keep="first")].reset_index(drop=True)
