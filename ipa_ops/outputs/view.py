"""The results view: each row key's latest attempt, every column, joinable, filterable by SQL.

    results_view(out, extra=[scores_table, ...]).select("status = 'ok' and dup_of is null", limit=100)

What `ipa export` (and anything else that asks "which rows, with which columns") reads. The view is
DuckDB SQL over the results parts, streamed: parts are read batch by batch into DuckDB (never
concatenated on the driver), the latest attempt per `row_key` is kept (by `finished_at`, then part
and row order, as `folder.latest` does), and rows come out as Arrow record batches, in the order
they were written. DuckDB keeps its own memory under `memory_limit` and spills to a temp folder.

Columns are whatever the parts hold: parts of different ages are unified (a column a part lacks is
null there), nested structs and lists stay nested. Extra per-row-key tables (scores, labels) join
in with one call: each table has a `row_key` column and at most one row per key; its other columns
appear beside the results columns and can be filtered on like them.

`where` is a SQL boolean expression (DuckDB's dialect), e.g. `status = 'ok' and id like 'a%'`,
`dup_of is null`, `seed between 1 and 9`. It runs with file and network access switched off, so a
filter can only read the view.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.errors import UserError
from ipa_ops.outputs import results_parts
from ipa_ops.outputs.folder import OutputDir

PART, ROW = "_ipa_part", "_ipa_row"  # where a row was written: part index (name order), row in the part
READ_BATCH = 8192
Extra = pa.Table | pa.RecordBatchReader


class WhereError(UserError):
    """A --where expression DuckDB cannot parse or bind, said in one line."""


class ResultsView:
    """The latest attempt of every row key of an output, with extra per-key columns joined in."""

    def __init__(self, out: OutputDir, extra: Sequence[Extra] = (), memory_limit: str = "1GB", spill_dir: str = ""):
        import duckdb

        self.out = out
        self.parts = _readable_parts(out)
        self.schema = _unified_schema([s for _, s in self.parts])
        self.con = duckdb.connect(config={"memory_limit": memory_limit, "threads": 2})
        if spill_dir:
            self.con.execute(f"SET temp_directory = '{_sql_text(spill_dir)}'")
        joins = self._register_extra(extra)
        self.con.execute("SET enable_external_access = false; SET lock_configuration = true")
        names = ", ".join("latest." + _ident(n) for n in self.schema.names if n not in (PART, ROW))
        self._source(empty=True)
        self.con.execute(
            f"CREATE VIEW results AS SELECT {names}{''.join(c for c, _ in joins)}, latest.{PART}, latest.{ROW} FROM ("
            f"SELECT *, row_number() OVER (PARTITION BY row_key ORDER BY finished_at DESC NULLS LAST, "
            f"{PART} DESC, {ROW} DESC) AS _ipa_rank FROM parts WHERE row_key IS NOT NULL AND row_key <> '') latest"
            f"{''.join(j for _, j in joins)} WHERE _ipa_rank = 1"
        )

    @property
    def columns(self) -> list[str]:
        """The view's columns (results columns, then joined ones)."""
        self._source(empty=True)
        return [c for c in self.con.sql("SELECT * FROM results LIMIT 0").columns if c not in (PART, ROW)]

    def check(self, where: str | None) -> None:
        """Raise `WhereError` (one line) unless `where` parses and binds against the view's columns."""
        self._source(empty=True)
        self._execute(self._query(where, None, ordered=False), where)

    def select(
        self, where: str | None = None, limit: int | None = None, batch_rows: int = READ_BATCH, said: str | None = None
    ) -> pa.RecordBatchReader:
        """Matching rows as a stream of record batches, in written order (part, then row).

        `said` is the expression as the user wrote it, for errors (when `where` adds to it). An error
        that only the data reveals (a cast that fails on some row) is raised while reading, as a
        `WhereError` too.
        """
        said = where if said is None else said
        self.check(where)
        self._source(empty=False)
        import duckdb

        relation = self._execute(self._query(where, limit, ordered=True), said)
        try:
            reader = relation.to_arrow_reader(batch_rows)
        except duckdb.Error as exc:
            raise WhereError(f"--where {said!r}: {_first_line(exc)}") from None
        return pa.RecordBatchReader.from_batches(reader.schema, self._guarded(reader, said))

    def _guarded(self, reader: pa.RecordBatchReader, said: str | None) -> Iterator[pa.RecordBatch]:
        import duckdb

        try:
            yield from reader
        except duckdb.Error as exc:
            raise WhereError(f"--where {said!r}: {_first_line(exc)}") from None

    def count(self, where: str | None = None) -> int:
        self.check(where)
        self._source(empty=False)
        return int(
            self._execute(f"SELECT count(*) FROM ({self._query(where, None, ordered=False)})", where).fetchall()[0][0]
        )

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> ResultsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, where: str | None, limit: int | None, ordered: bool) -> str:
        sql = f"SELECT * EXCLUDE ({PART}, {ROW}) FROM results"
        if where and where.strip():
            sql += f" WHERE ({where})"
        if ordered:
            sql += f" ORDER BY {PART}, {ROW}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql

    def _execute(self, sql: str, where: str | None) -> Any:
        import duckdb

        try:
            statements = self.con.extract_statements(sql)
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                raise WhereError(f"--where {where!r}: must be one boolean expression, not statements")
            return self.con.sql(sql)
        except duckdb.Error as exc:
            raise WhereError(f"--where {where!r}: {_first_line(exc)}") from None

    def _source(self, empty: bool) -> None:
        """(Re)bind `parts`: an empty table to check a query, or a fresh stream of every part to run it."""
        source = self.schema.empty_table() if empty else pa.RecordBatchReader.from_batches(self.schema, self._batches())
        self.con.register("parts", source)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        for index, (path, _) in enumerate(self.parts):
            row = 0
            try:
                with self.out.fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH):
                        yield _conform(batch, self.schema, index, row)
                        row += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{path}: results part unreadable while exporting ({_first_line(exc)}); rerun") from exc

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
            joins.append((cols, f" LEFT JOIN {name} ON {name}.row_key = latest.row_key"))
        return joins


def results_view(out: OutputDir | str, extra: Sequence[Extra] = (), **options: Any) -> ResultsView:
    """The view of `out` (a folder or URI) with `extra` per-row-key tables joined in."""
    return ResultsView(out if isinstance(out, OutputDir) else OutputDir(out), extra, **options)


def _readable_parts(out: OutputDir) -> list[tuple[str, pa.Schema]]:
    """(path, schema) of every part whose footer reads and whose schema this version accepts."""
    found = []
    for path in results_parts.list_parts(out.fs, out.results_dir()):
        try:
            with out.fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        except FileNotFoundError:  # compacted away since the listing: its rows are in the merged part
            continue
        except (OSError, pa.ArrowException, ValueError) as exc:
            results_parts.quarantine(out.fs, path, exc)
            continue
        results_parts.check_schema(path, schema)
        found.append((path, schema))
    return found


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


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
