"""The output directory contract: row keys, atomic commits, results parts and run.json.

    <output>/images/<k[:2]>/<row_key>.png  an image exists only once complete (temp name + rename);
                                         fanned out by the key's first two hex chars, so no folder
                                         holds more than ~1/256 of the images (older outputs in the
                                         flat `images/<row_key>.png` stay valid: results rows name
                                         their files, and done-detection checks those)
    <output>/results/part-*.parquet      one row per finished attempt; parts are never rewritten
    <output>/run.json                    flow snapshot, counts, timings, versions
    <output>/report.html                 contact sheet (report.py)

Any fsspec URI works; local disk is the main case. File names come only from row keys (hex), so
nothing a manifest says (an id like `../../etc/passwd`) can make the program write elsewhere.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from typing import IO, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ipa_ops.canonical import canonical_json
from ipa_ops.outputs import done_index, results_parts
from ipa_ops.records.schema import RECORD_COLUMNS
from ipa_ops.storage.full import disk_full, is_full

KEY = re.compile(r"^[0-9a-f]{8,64}$")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
_EXTRA_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STATUSES = ("ok", "error", "skipped")
ROW_GROUP_ROWS = 10_000
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())

_RESULT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "Manifest row id."),
    "row_key": (pa.string(), "Hash of the row's effective parameters and fingerprints; names its files."),
    "status": (pa.string(), "ok, error or skipped."),
    "error": (pa.string(), "One line naming the row and field; empty when ok."),
    "outputs": (_STRINGS, "Files written (URIs, or paths relative to the output root)."),
    "seed": (pa.int64(), "Seed used."),
    "started_at": (_TIMESTAMP, "When work on the row started (UTC)."),
    "finished_at": (_TIMESTAMP, "When the row finished (UTC); the latest row per key wins."),
    "seconds": (pa.float64(), "Generation time of the row."),
    "worker": (pa.string(), "Which worker made it (host, actor, device)."),
    "prompt": (pa.string(), "Prompt, for the report."),
    "references": (_STRINGS, "Reference images of all adapters, for the report."),
    "masks": (_STRINGS, "Adapter masks, for the report."),
    "scale": (pa.string(), "Scale schedule(s) as written, for the report."),
    "provenance": (pa.string(), "Everything that decided the image, as JSON."),
    "model_fingerprint": (pa.string(), "Fingerprint of the base model's weights."),
    "adapter_fingerprints": (pa.string(), "Adapter weight fingerprints as JSON (alias -> fingerprint)."),
    "embedding_keys": (_STRINGS, "Embedding-store keys the row used."),
    "schedule_hash": (pa.string(), "Hash(es) of the effective [layers, steps] schedules (JSON when several)."),
    "versions": (pa.string(), "Package versions as JSON (ipa, torch, diffusers, transformers, ray, insightface)."),
    **RECORD_COLUMNS,  # the complete effective request (records/schema.py): what `ipa reproduce` remakes it from
}
RESULTS_SCHEMA = pa.schema([(k, t) for k, (t, _) in _RESULT_COLUMNS.items()])
RESULTS_DOCS: dict[str, str] = {k: doc for k, (_, doc) in _RESULT_COLUMNS.items()}
_FLAT = ("model_fingerprint", "adapter_fingerprints", "embedding_keys", "schedule_hash", "versions")


def row_key(params: Mapping[str, Any]) -> str:
    """First 20 hex of the sha256 of the canonical JSON of a row's effective parameters."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:20]


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide an image, for run.json and provenance."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    dists = {"ipa": "ipa-ops", "torch": "torch", "diffusers": "diffusers", "transformers": "transformers"}
    dists.update({"ray": "ray", "insightface": "insightface"})
    found: dict[str, str | None] = {}
    for name, dist in dists.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["ipa"] is None:  # running from a checkout that is not installed
        from ipa_ops import __version__

        found["ipa"] = __version__
    found["python"] = platform.python_version()
    return tuple(found.items())


def latest(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """The latest results row per `by` value: by finished_at, then by part and row order."""
    if df.empty:
        return df
    ordered = df.assign(_pos=range(len(df))).sort_values(["finished_at", "_pos"], kind="stable", na_position="first")
    return ordered.drop_duplicates(by, keep="last").sort_values("_pos").drop(columns="_pos")


class OutputDir:
    """One output directory on any fsspec filesystem."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") or uri
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.root = self.fs._strip_protocol(self.root).rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        self._prefix = self.root.rstrip("/") + "/"

    def path(self, *parts: str) -> str:
        """A URI under the output root, in the same spelling as the root (relative, absolute or s3://)."""
        return posixpath.join(self.uri, *parts)

    def image_path(self, row_key: str, ext: str = "png") -> str:
        """`<output>/images/<key[:2]>/<row_key>.<ext>`; only hex keys, so a path can never leave `images/`.

        The fan-out keeps folders small (tools and the Hugging Face Hub struggle past ~10^4 files).
        """
        key = check_key(row_key)
        return self.path("images", key[:2], f"{key}.{_check_ext(ext)}")

    def frame_path(self, row_key: str, index: int, ext: str = "png") -> str:
        """`<output>/images/<key[:2]>/<row_key>/<index>.png`: the frames of a video row, fanned out too."""
        key = check_key(row_key)
        return self.path("images", key[:2], key, f"{int(index):05d}.{_check_ext(ext)}")

    def resolve(self, entry: str) -> str:
        """An `outputs` entry as a URI: absolute ones as they are, others relative to the output root."""
        if "://" in entry or entry.startswith("/") or entry.startswith(self.uri + "/"):
            return entry
        return self.path(entry)

    def relative(self, entry: str) -> str | None:
        """An `outputs` entry relative to the output root (for links in report.html); None if outside."""
        full = self._strip(self.resolve(entry))
        return full[len(self.root) + 1 :] if full.startswith(self.root + "/") else None

    def _file(self, entry: str) -> str:
        """An `outputs` entry as a path on `fs`; entries already spelled as clean local paths as they are
        (the common case, and done-detection meets one per row)."""
        if self.local and entry.startswith(self._prefix) and "/." not in entry and "//" not in entry:
            return entry
        return self._strip(self.resolve(entry))

    def _strip(self, uri: str) -> str:
        return posixpath.normpath(self.fs._strip_protocol(uri))

    def _inside(self, path: str) -> str:
        target = self._strip(path)
        if not target.startswith(self.root.rstrip("/") + "/"):
            raise ValueError(f"{path}: outside the output directory {self.uri}; refusing to write there")
        return target

    def write_bytes_atomic(self, path: str, data: bytes | Callable[[IO[bytes]], None]) -> str:
        """Write a file that readers see whole or not at all.

        Local: a hidden temp file in the same folder, fsync, rename. Object stores: one put (atomic
        there). `data` is bytes or a function that writes to a binary file (e.g. `image.save`).
        """
        target = self._inside(path)
        if not self.local:
            if callable(data):
                buf = io.BytesIO()
                data(buf)
                data = buf.getvalue()
            self.fs.pipe_file(target, data)
            return path
        folder, name = posixpath.split(target)
        os.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                data(f) if callable(data) else f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            if is_full(exc):  # one line naming the final name; nothing is left under it or the temp
                raise disk_full(path, exc) from exc  # type: ignore[arg-type]
            raise
        return path

    def remove_orphan_temps(self, row_keys: Iterable[str]) -> int:
        """Remove the hidden temp files (`write_bytes_atomic`) that writers killed mid-write left for these
        rows' images and thumbnails; returns how many. Only for rows no live writer works on (the run
        holds the output's lease and has finished them). Object stores write whole: nothing to remove.
        """
        if not self.local:
            return 0
        keys = set(row_keys)
        removed = 0
        for folder, prefix in {(f, k[:2]) for f in ("images", "thumbs") for k in keys}:  # one listing per folder
            for tmp in glob.glob(self._inside(self.path(folder, prefix, ".*.tmp"))):
                if posixpath.basename(tmp)[1:].split(".", 1)[0] in keys:  # `.<row key>.<ext>.<uuid>.tmp`
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
                        removed += 1
        return removed

    def append_results(self, rows: list[Mapping[str, Any]], name: str | None = None) -> str:
        """Write `rows` as a new part (default `results/part-<timestamp>-<uuid>.parquet`); '' when none.

        `name` is set by the buffered writer (results_writer.py), whose names carry the run.
        """
        if not rows:
            return ""
        return self.write_results_table(results_table(rows), name)

    def write_results_table(self, table: pa.Table, name: str | None = None) -> str:
        """Commit a table as one results part, stamped with the schema version, atomically.

        Row groups of `ROW_GROUP_ROWS`: a streaming reader (the results view, export) holds one row
        group at a time, so a compacted part of a million rows never has to be decoded whole.
        """
        buf = io.BytesIO()
        pq.write_table(results_parts.stamp(table), buf, row_group_size=ROW_GROUP_ROWS)
        name = name or f"part-{results_parts.timestamp()}-{uuid.uuid4().hex[:12]}.parquet"
        return self.write_bytes_atomic(self.path("results", name), buf.getvalue())

    def results_dir(self) -> str:
        return posixpath.join(self.root, "results")

    def read_results(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All results rows (only `columns`, when given), parts in name (time) order, each attempt once.

        An empty frame with the schema when there are none. Unreadable parts are quarantined
        (results_parts.py), so their rows count as not done.
        """
        tables = results_parts.read_parts(self.fs, self.results_dir(), columns)
        if not tables:
            empty = RESULTS_SCHEMA.empty_table()
            wanted = RESULTS_SCHEMA.names if columns is None else [c for c in columns if c in RESULTS_SCHEMA.names]
            return empty.select(wanted).to_pandas()
        table = pa.concat_tables(tables, promote_options="permissive")
        return results_parts.dedupe_attempts(table.to_pandas())

    def done_keys(self, candidates: Iterable[str] | None = None) -> set[str]:
        """Keys whose latest results row is `ok` and whose output files all exist.

        `candidates` (the keys a run plans) limits the look-up to those keys. Only four results
        columns are read and only the folders of wanted files are asked (done_index.py), so a
        rerun does not pay for the folder's whole history.
        """
        ok = done_index.latest_ok(self.read_results(columns=done_index.COLUMNS), candidates)
        if ok.empty:
            return set()
        wanted: dict[str, list[str]] = {}
        for key, outputs in zip(ok["row_key"], ok["outputs"], strict=True):
            files = [self._file(str(o)) for o in (outputs if outputs is not None else [])]
            if files:
                wanted[str(key)] = files
        found = done_index.present(self.fs, (f for files in wanted.values() for f in files), self.local)
        return {key for key, files in wanted.items() if all(f in found for f in files)}

    def exists(self, path: str) -> bool:
        """Whether a file under the output exists (one HEAD on object storage)."""
        return bool(self.fs.exists(self._strip(path)))

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(self._strip(path), "rb") as f:
            return f.read()

    def write_run_json(self, data: Mapping[str, Any]) -> str:
        """`run.json`: flow snapshot, counts, timings, versions (whatever the run records), atomically."""
        text = json.dumps(dict(data), indent=2, default=str) + "\n"
        return self.write_bytes_atomic(self.path("run.json"), text.encode())

    def read_run_json(self) -> dict[str, Any] | None:
        path = self.path("run.json")
        if not self.fs.exists(self._strip(path)):
            return None
        with self.fs.open(self._strip(path), "rb") as f:
            return json.loads(f.read())


def results_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Results rows as a table of `RESULTS_SCHEMA` plus their user columns (`x_…`, partition values)."""
    rows = [_result_row(r) for r in rows]
    extras = list(dict.fromkeys(k for r in rows for k in r if k not in _RESULT_COLUMNS))
    bad = [k for k in extras if not _EXTRA_COLUMN.match(k)]
    if bad:
        raise ValueError(f"results: column name(s) {bad} are not identifiers; user columns look like x_name")
    arrays = [pa.array([r.get(k) for r in rows], type=t) for k, (t, _) in _RESULT_COLUMNS.items()]
    fields = list(RESULTS_SCHEMA)
    for name in extras:
        values = [r.get(name) for r in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a user column: keep them as text
            array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _result_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    status = out.get("status")
    if status not in STATUSES:
        raise ValueError(f"results: status must be one of {', '.join(STATUSES)}, got {status!r}")
    provenance = out.get("provenance") or {}
    if isinstance(provenance, str):
        provenance = json.loads(provenance) if provenance.strip() else {}
    provenance = dict(provenance)
    if "schedule_hash" not in provenance and "schedule_hashes" in provenance:
        provenance["schedule_hash"] = provenance["schedule_hashes"]
    provenance.setdefault("versions", versions())
    for name in _FLAT:
        value = out.get(name, provenance.get(name))
        if name == "embedding_keys":
            out[name] = [str(v) for v in value] if value is not None else []
        elif value is not None and not isinstance(value, str):
            out[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[name] = value
    out["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
    out["error"] = str(out.get("error") or "")
    for name in ("outputs", "references", "masks"):
        out[name] = [str(v) for v in out.get(name) or []]
    for name in ("started_at", "finished_at"):
        out[name] = _timestamp(out.get(name))
    for name, cast in (("seed", int), ("seconds", float)):
        out[name] = None if out.get(name) is None else cast(out[name])
    for name in ("id", "row_key", "worker", "prompt", "scale"):
        out[name] = None if out.get(name) is None else str(out[name])
    return out


def _timestamp(value: Any) -> datetime | None:
    """A time as aware UTC: datetimes, ISO strings and epoch seconds are all accepted."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif isinstance(value, int | float | np.number):
        value = datetime.fromtimestamp(float(value), UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY.match(key):
        raise ValueError(f"row key {key!r} is not a hex digest; output files are named by row_key only")
    return key


def _check_ext(ext: str) -> str:
    if not _EXT.match(ext):
        raise ValueError(f"file extension {ext!r} must be 1-8 lowercase letters or digits")
    return ext
