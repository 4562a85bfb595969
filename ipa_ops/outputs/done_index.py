"""Done-detection from a narrow index: which planned keys are done, without a rescan of everything.

A key is done when its latest results row is `ok` and its output files exist. Before this module a
rerun read every column of every results part and listed every file under `images/`, so its cost
grew with the folder's history. Now:

- results are read as four columns only (`row_key`, `status`, `finished_at`, `outputs`; Parquet
  reads just those column chunks), from the few large parts the buffered writer and compaction
  leave (results_writer.py);
- only the keys the run plans (`candidates`) are looked at;
- files are checked per folder: a folder holding many wanted files is listed once (one LIST on
  object storage, one `scandir` locally), a folder holding a few is asked file by file (HEAD), so
  a rerun of a few rows never lists a million images.

Outputs of the flat layout (`images/<key>.png`) need nothing special: results rows name their
files, and the flat folder is simply one more folder to look in.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

COLUMNS = ["row_key", "status", "finished_at", "outputs"]
LIST_AT = 8  # wanted files in one folder from which listing it beats asking for each file


def latest_ok(df: pd.DataFrame, candidates: Iterable[str] | None = None) -> pd.DataFrame:
    """Rows (key, outputs) whose latest row by finished_at, then part/row order, is `ok`."""
    if df.empty:
        return df
    keys = df["row_key"]
    df = df[keys.notna() & (keys != "")]
    if candidates is not None:  # Arrow's hash look-up: pandas' isin on strings is ~20x slower at 10^6
        wanted = pa.array([str(k) for k in candidates], pa.string())
        df = df[pc.is_in(pa.array(df["row_key"], pa.string()), value_set=wanted).to_numpy(zero_copy_only=False)]
    if df.empty:
        return df
    if df["row_key"].duplicated().any():  # a key tried more than once: its latest attempt decides
        df = df.sort_values("finished_at", kind="stable", na_position="first")  # ties keep part/row order
        df = df.drop_duplicates("row_key", keep="last")
    return df[df["status"] == "ok"]


def present(fs: Any, files: Iterable[str], local: bool) -> set[str]:
    """Which of `files` (stripped paths on `fs`) exist, asking each folder the cheapest way."""
    by_folder: dict[str, list[str]] = {}
    for path in files:
        by_folder.setdefault(posixpath.dirname(path), []).append(path)
    found: set[str] = set()
    for folder, wanted in by_folder.items():
        if local:
            try:
                names = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            found.update(p for p in wanted if posixpath.basename(p) in names)
        elif len(wanted) >= LIST_AT:
            try:
                listed = {posixpath.basename(str(n).rstrip("/")) for n in fs.ls(folder, detail=False)}
            except FileNotFoundError:
                continue
            found.update(p for p in wanted if posixpath.basename(p) in listed)
        else:
            found.update(p for p in wanted if fs.exists(p))
    return found
