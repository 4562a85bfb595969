"""The results view: each row key's latest attempt, every column, joinable, filterable by SQL.

    results_view(out, extra=[scores_table, ...]).select("status = 'ok' and dup_of is null", limit=100)

What `ipa export` (and anything else that asks "which rows, with which columns") reads. Columns
are whatever the parts hold: parts of different ages are unified (a column a part lacks is null
there), nested structs and lists stay nested. Extra per-row-key tables (scores, labels) join in
with one call: each has a `row_key` column and at most one row per key; its other columns appear
beside the results columns and can be filtered on like them.

It is computed in two streamed passes, so neither the rows nor an index of them is held whole:
1. two columns of every part (`row_key`, `finished_at`) are read and each key's latest attempt
   (by `finished_at`, then part and row order, as `folder.latest` does) is found out of core:
   hash buckets of (key digest, time, part, row) spilled to a temporary folder and resolved one
   at a time into a bitmap of one bit a row (latest_index.py);
2. the parts are read again batch by batch; each batch keeps its latest rows, gets the extra
   tables joined and `where` applied by DuckDB, and goes out as Arrow, in written order.

`where` is a SQL boolean expression (DuckDB's dialect), e.g. `status = 'ok' and id like 'a%'`,
`dup_of is null`, `seed between 1 and 9`. It runs with file and network access switched off, so a
filter can only read the view.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ipa_ops.errors import UserError
from ipa_ops.outputs import results_parts
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.latest_index import ENTRY, Winners, latest_attempts

PART, ROW = "_ipa_part", "_ipa_row"  # where a row was written: part index (name order), row in the part
READ_BATCH = 2048  # full rows (~2 kB each) a batch: a fourth of 8192 lowers the stream's steady memory by ~0.08 GB
INDEX_BATCH = 32768  # rows a batch in the index pass, which reads two narrow columns
STREAM_BUFFER = 1 << 20  # read column chunks in 1 MiB pieces: a big row group (a compacted part) never whole
_NO_TIME = -(2**62)  # a missing finished_at sorts before every time, as in `folder.latest`
Extra = pa.Table | pa.RecordBatchReader


class WhereError(UserError):
    """A --where expression DuckDB cannot parse or bind, said in one line."""


class ResultsView:
    """The latest attempt of every row key of an output, with extra per-key columns joined in."""

    def __init__(self, out: OutputDir, extra: Sequence[Extra] = (), memory_limit: str = "1GB", spill_dir: str = ""):
        import duckdb

        self.out = out
        self.parts, self.part_rows = _readable_parts(out)
        self.schema = _unified_schema([s for _, s in self.parts])
        self.spill_dir = spill_dir
        self.con = duckdb.connect(config={"memory_limit": memory_limit, "threads": 2})
        if spill_dir:
            self.con.execute(f"SET temp_directory = '{_sql_text(spill_dir)}'")
        joins = self._register_extra(extra)
        self.con.execute("SET enable_external_access = false; SET lock_configuration = true")
        self._select = "SELECT b.*" + "".join(c for c, _ in joins) + " FROM batch b" + "".join(j for _, j in joins)
        self._winners: Winners | None = None

    @property
    def columns(self) -> list[str]:
        """The view's columns (results columns, then joined ones)."""
        self.con.register("batch", self.schema.empty_table())
        return [c for c in self.con.sql(self._select).columns if c not in (PART, ROW)]

    def check(self, where: str | None) -> None:
        """Raise `WhereError` (one line) unless `where` parses and binds against the view's columns."""
        self._filter(self.schema.empty_table(), where, where)

    def select(
        self, where: str | None = None, limit: int | None = None, said: str | None = None
    ) -> pa.RecordBatchReader:
        """Matching rows as a stream of record batches, in written order (part, then row).

        `said` is the expression as the user wrote it, for errors (when `where` adds to it). An error
        that only the data reveals (a cast that fails on some row) is raised while reading, as a
        `WhereError` too.
        """
        said = where if said is None else said
        self.check(where)
        schema = self._filter(self.schema.empty_table(), where, said).schema
        return pa.RecordBatchReader.from_batches(schema, self._selected(where, limit, said))

    def count(self, where: str | None = None) -> int:
        return sum(b.num_rows for b in self.select(where))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> ResultsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _selected(self, where: str | None, limit: int | None, said: str | None) -> Iterator[pa.RecordBatch]:
        left = limit
        winners = self._latest()
        for batch in self._batches():
            part, first = int(batch.column(PART)[0].as_py()), int(batch.column(ROW)[0].as_py())
            keep = winners.rows_in(part, first, batch.num_rows)
            if not len(keep):
                continue
            for out in self._filter(pa.Table.from_batches([batch]).take(keep), where, said).to_batches():
                if left is not None:
                    out = out.slice(0, left)
                    left -= out.num_rows
                if out.num_rows:
                    yield out
                if left == 0:
                    return

    def _filter(self, table: pa.Table, where: str | None, said: str | None) -> pa.Table:
        """`where` over one batch of latest rows, extra tables joined in, in the batch's order."""
        import duckdb

        sql = self._select + (f" WHERE ({where})" if where and where.strip() else "") + f" ORDER BY b.{ROW}"
        try:
            statements = self.con.extract_statements(sql)
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                raise WhereError(f"--where {said!r}: must be one boolean expression, not statements")
            self.con.register("batch", table)
            found = self.con.sql(sql).to_arrow_table()
        except duckdb.Error as exc:
            raise WhereError(f"--where {said!r}: {_first_line(exc)}") from None
        return _source_times(found.drop_columns([PART, ROW]), self.schema)

    def _latest(self) -> Winners:
        """Which rows hold a key's latest attempt (by finished_at, part, row), found once, out of core.

        The key goes in as its 128-bit MD5 (DuckDB's, vectorised; a collision among 10^9 keys has odds
        ~10^-21, and row keys are not chosen by an adversary).
        """
        if self._winners is None:
            self._winners = latest_attempts(self._entries(), self.part_rows, self.spill_dir or None)
        return self._winners

    def _entries(self) -> Iterator[np.ndarray]:
        """One index entry (key digest, time, part, row) per row with a key, batch by batch."""
        narrow = pa.schema([self.schema.field(n) for n in ("row_key", "finished_at", PART, ROW)])
        for batch in self._batches(narrow, INDEX_BATCH):
            keys = batch.column("row_key")
            valid = pc.fill_null(pc.greater(pc.utf8_length(keys), 0), False).to_numpy(zero_copy_only=False)
            entries = np.empty(int(valid.sum()), ENTRY)
            self.con.register("_ipa_keys", pa.table({"k": keys}))
            words = self.con.sql("SELECT md5_number_upper(k) AS high, md5_number_lower(k) AS low FROM _ipa_keys")
            digests = words.to_arrow_table()
            self.con.unregister("_ipa_keys")
            for name in ("high", "low"):
                entries[name] = pc.fill_null(digests.column(name), 0).to_numpy()[valid]
            stamp = batch.column("finished_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            entries["time"] = pc.fill_null(stamp, _NO_TIME).to_numpy()[valid]
            entries["part"] = batch.column(PART).to_numpy()[valid]
            entries["row"] = batch.column(ROW).to_numpy()[valid]
            yield entries

    def _batches(self, schema: pa.Schema | None = None, rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """Every part's rows in `schema` (default: all columns), batch by batch, in part order."""
        schema = schema or self.schema
        columns = [n for n in schema.names if n not in (PART, ROW)]
        for index, (path, part_schema) in enumerate(self.parts):
            row = 0
            try:
                with self.out.fs.open(path, "rb") as f:
                    wanted = [c for c in columns if c in part_schema.names]
                    parquet = pq.ParquetFile(f, buffer_size=STREAM_BUFFER, pre_buffer=False)
                    for batch in parquet.iter_batches(batch_size=rows or READ_BATCH, columns=wanted):
                        yield _conform(batch, schema, index, row)
                        row += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: results part unreadable while reading the view ({_first_line(exc)})") from exc

    def _register_extra(self, extra: Sequence[Extra]) -> list[tuple[str, str]]:
        """Copy each extra table into DuckDB; returns (select columns, join clause) per table."""
        seen = set(self.schema.names)
        joins = []
        for i, table in enumerate(extra):
            name = f"extra_{i}"
            schema = table.schema
            if "row_key" not in schema.names:
                raise UserError(
                    f"extra table {i}: has no row_key column; tables joined into results are keyed by row_key"
                )
            clash = [c for c in schema.names if c != "row_key" and (c in seen or c in (PART, ROW))]
            if clash:
                raise UserError(f"extra table {i}: column(s) {clash} are already in the results view; rename them")
            seen.update(schema.names)
            self.con.register(f"{name}_src", table)
            self.con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_src")
            self.con.unregister(f"{name}_src")
            twice = self.con.sql(f"SELECT row_key FROM {name} GROUP BY row_key HAVING count(*) > 1 LIMIT 1").fetchall()
            if twice:
                raise UserError(f"extra table {i}: row_key {twice[0][0]!r} is there twice; join one row per key")
            cols = "".join(f", {name}.{_ident(c)}" for c in schema.names if c != "row_key")
            joins.append((cols, f" LEFT JOIN {name} USING (row_key)"))
        return joins


def results_view(out: OutputDir | str, extra: Sequence[Extra] = (), **options: Any) -> ResultsView:
    """The view of `out` (a folder or URI) with `extra` per-row-key tables joined in."""
    return ResultsView(out if isinstance(out, OutputDir) else OutputDir(out), extra, **options)


def _readable_parts(out: OutputDir) -> tuple[list[tuple[str, pa.Schema]], list[int]]:
    """(path, schema) of every part whose footer reads and whose schema this version accepts, and
    each one's row count."""
    found, rows = [], []
    for path in results_parts.list_parts(out.fs, out.results_dir()):
        try:
            footer = results_parts.read_part_footer(out.fs, path)
        except FileNotFoundError:  # compacted away since the listing: its rows are in the merged part
            continue
        if footer is not None:  # None: unreadable, now in the quarantine
            found.append((path, footer[0]))
            rows.append(footer[1])
    return found, rows


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema over parts of every age: the union of columns, types widened where parts differ."""
    from ipa_ops.outputs.folder import RESULTS_SCHEMA

    if not schemas:
        return RESULTS_SCHEMA.append(pa.field(PART, pa.int32())).append(pa.field(ROW, pa.int64()))
    try:
        unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"results parts disagree on a column's type ({_first_line(exc)}); run `ipa compact`") from exc
    return unified.append(pa.field(PART, pa.int32())).append(pa.field(ROW, pa.int64()))


def _conform(batch: pa.RecordBatch, schema: pa.Schema, part: int, first_row: int) -> pa.RecordBatch:
    """A part's batch in the unified schema: missing columns null, narrower types cast up."""
    n = batch.num_rows
    arrays = []
    for field in schema:
        if field.name == PART:
            arrays.append(pa.array([part] * n, pa.int32()))
        elif field.name == ROW:
            arrays.append(pa.array(range(first_row, first_row + n), pa.int64()))
        elif field.name in batch.schema.names:
            column = batch.column(field.name)
            arrays.append(column if column.type == field.type else column.cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _source_times(table: pa.Table, source: pa.Schema) -> pa.Table:
    """Timestamps in the parts' own time zone spelling (DuckDB hands UTC back as `Etc/UTC`)."""
    fields = []
    for field in table.schema:
        kind = source.field(field.name).type if field.name in source.names else field.type
        same_instant = pa.types.is_timestamp(field.type) and pa.types.is_timestamp(kind) and field.type != kind
        fields.append(field.with_type(kind) if same_instant and field.type.unit == kind.unit else field)
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return table if schema.equals(table.schema) else table.cast(schema)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
