"""Score parts on disk and the scores of an output as one table.

    <output>/scores/part-<ts>-<uuid12>.parquet        score records, one per (row key, scorer id, metric)
    <output>/scores/_quarantine/...(.reason.json)      unreadable parts, moved aside (storage/quarantine.py)

A record is long-form so any scorer fits one schema: `row_key`, `id` (the manifest id), `scorer`
(the scorer id, `name@<16 hex>`: a changed model or setting is a new id, never mixed with old
numbers), `name` (`clip_t`, ...), `metric` (`clip_t`, `clip_score`, `dup_of`, ...), `value`
(float, null when not applicable) or `text` (hashes, row keys), and `scored_at`. A metric named
`error` records why a row could not be scored; such a row counts as not scored, so a rerun tries
it again. Parts are only ever added; a record scored twice keeps its latest value.

`scores_table` is what the report, `ipa scores` and `ipa export --where` read.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.results_parts import timestamp
from ipa_ops.storage.quarantine import QUARANTINE, NewerSchema, Problem, one_line, read_checked, set_aside

SCHEMA_VERSION = 1
META_KEY = b"ipa.scores_schema"
ERROR = "error"  # the metric of a record that says why a row could not be scored
TEXT_METRICS = frozenset({"phash", "dup_of", ERROR})
SCORES_SCHEMA = pa.schema(
    [
        ("row_key", pa.string()),
        ("id", pa.string()),
        ("scorer", pa.string()),
        ("name", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("text", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


def scores_dir(out: OutputDir) -> str:
    return posixpath.join(out.root, "scores")


def write_score_part(out: OutputDir, records: Iterable[Mapping[str, Any]]) -> str:
    """Commit records as one new part, atomically; '' when there are none."""
    rows = list(records)
    if not rows:
        return ""
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCORES_SCHEMA.names} for r in rows], schema=SCORES_SCHEMA)
    table = table.replace_schema_metadata({META_KEY: str(SCHEMA_VERSION).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = f"part-{timestamp()}-{uuid.uuid4().hex[:12]}.parquet"
    return out.write_bytes_atomic(out.path("scores", name), buf.getvalue())


def _parse(path: str, source: Any) -> pa.Table:
    parquet = pq.ParquetFile(source)
    raw = (parquet.schema_arrow.metadata or {}).get(META_KEY)
    if raw is not None and raw.decode(errors="replace") != str(SCHEMA_VERSION):
        raise NewerSchema(f"{path}: scores schema {raw.decode(errors='replace')} is not one this ipa reads; "
                          "read it with a newer ipa, or move it out of scores/")  # fmt: skip
    missing = [c for c in ("row_key", "scorer", "metric") if c not in parquet.schema_arrow.names]
    if missing:
        raise pa.ArrowInvalid(f"not an ipa scores part (missing {', '.join(missing)})")
    return parquet.read()


def read_records(output: str | OutputDir) -> pd.DataFrame:
    """Every score record of an output, latest per (row key, scorer id, metric); unreadable parts quarantined."""
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    folder = scores_dir(out)
    tables = []
    if out.fs.isdir(folder):
        for path in sorted(p for p in out.fs.ls(folder, detail=False) if posixpath.basename(p).startswith("part-")):
            if not path.endswith(".parquet") or QUARANTINE in path:
                continue
            table = _read_part(out, folder, path)
            if table is not None:
                tables.append(table)
    if not tables:
        return SCORES_SCHEMA.empty_table().to_pandas()
    df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    df = df.sort_values("scored_at", kind="stable")
    return df.drop_duplicates(["row_key", "scorer", "metric"], keep="last").reset_index(drop=True)


def _read_part(out: OutputDir, folder: str, path: str) -> pa.Table | None:
    try:
        table, error = read_checked(out.fs, path, lambda source: _parse(path, source))
    except FileNotFoundError:
        return None
    if error is None:
        return table
    set_aside(out.fs, Problem(path, "unreadable", f"unreadable scores part ({one_line(error)}); its rows are "
                                                  "scored again on the next run", folder))  # fmt: skip
    return None


def scored_keys(records: pd.DataFrame, scorer_id: str, metric: str) -> set[str]:
    """Row keys that have `metric` (a scorer's first, written with its others) under `scorer_id`."""
    if records.empty:
        return set()
    mine = records[(records["scorer"] == scorer_id) & (records["metric"] == metric)]
    return set(mine["row_key"].astype(str))


def latest_ids(records: pd.DataFrame) -> dict[str, str]:
    """Scorer name -> its id whose records are newest (the one a changed model or setting replaced the others by)."""
    if records.empty:
        return {}
    newest = records.groupby(["name", "scorer"])["scored_at"].max().reset_index()
    newest = newest.sort_values(["scored_at", "scorer"], kind="stable")
    return dict(zip(newest["name"], newest["scorer"], strict=True))


def scores_table(output: str | OutputDir, names: Iterable[str] | None = None) -> pd.DataFrame:
    """The scores of an output, one row per row key: `row_key`, `id`, then one column per metric.

    Only each scorer's latest id counts (`latest_ids`); `names` limits the scorers. Numeric metrics
    are float columns (NaN where not applicable), `phash` and `dup_of` text (None: no duplicate).
    `df.attrs["scorers"]` maps each scorer name to the id its columns come from.
    """
    records = read_records(output)
    ids = latest_ids(records)
    if names is not None:
        ids = {n: i for n, i in ids.items() if n in set(names)}
    chosen = records[records["scorer"].isin(set(ids.values())) & (records["metric"] != ERROR)]
    if chosen.empty:
        table = pd.DataFrame({"row_key": pd.Series(dtype=object), "id": pd.Series(dtype=object)})
        table.attrs["scorers"] = ids
        return table
    keys = chosen.drop_duplicates("row_key", keep="last")[["row_key", "id"]]
    table = keys.set_index("row_key")
    for metric, group in chosen.groupby("metric", sort=False):
        column = "text" if metric in TEXT_METRICS else "value"
        table[metric] = group.set_index("row_key")[column]
    table = table.reset_index().sort_values("row_key", kind="stable").reset_index(drop=True)
    for metric in TEXT_METRICS & set(table.columns):
        table[metric] = table[metric].astype(object).where(table[metric].notna(), None)
    table.attrs["scorers"] = ids
    return table


# what `ipa scores` counts as low by default: a value below it is worth a look
THRESHOLDS: dict[str, float] = {
    "clip_t": 0.2,
    "clip_score": 20.0,
    "clip_i_mean": 0.6,
    "clip_i_min": 0.6,
    "face_sim": 0.5,
    "aesthetic": 5.0,
}
QUANTILES = (0.1, 0.5, 0.9)


def score_summary(table: pd.DataFrame, thresholds: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per metric: count, mean, quantiles, how many below its threshold; `dup_of` counts the duplicates."""
    limits = {**THRESHOLDS, **(thresholds or {})}
    rows = []
    for metric in (c for c in table.columns if c not in ("row_key", "id", "phash")):
        values = table[metric]
        if metric == "dup_of":  # null means "no earlier near-duplicate": count the rows hashed
            hashed = int(table["phash"].notna().sum()) if "phash" in table else len(table)
            rows.append({"metric": metric, "count": hashed, "duplicates": int(values.notna().sum())})
            continue
        numbers = pd.to_numeric(values, errors="coerce").dropna()
        some = len(numbers) > 0
        row: dict[str, Any] = {"metric": metric, "count": len(numbers), "mean": numbers.mean() if some else None}
        for q in QUANTILES:
            row[f"p{int(q * 100)}"] = numbers.quantile(q) if some else None
        if metric in limits:
            row["threshold"] = limits[metric]
            row["below"] = int((numbers < limits[metric]).sum())
        rows.append(row)
    return pd.DataFrame(rows)
