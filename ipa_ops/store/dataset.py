"""The embedding store: a Parquet dataset of embeddings keyed by image content and encoder.

Layout: `<store>/<encoder_id>/part-<uuid>.parquet`, one folder per encoder id, because vector
widths differ between encoders and Arrow fixed-size lists need one width per file set. Every
folder is a plain Parquet dataset: `pandas.read_parquet(f"{store}/{encoder_id}")`, pyarrow and
duckdb read it without this package. The columns are documented in `store_schema.py`.

Appends are atomic: a part is written under a dot-prefixed temp name and renamed (local), or put
whole (object stores); readers only see `part-*.parquet`. Nothing is ever rewritten. A key can
appear more than once only as retried `error` rows; readers take an ok/no_face row over errors,
then the newest.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.errors import UserError
from ipa_ops.storage.full import disk_full, is_full
from ipa_ops.store.health import read_or_quarantine, stamp
from ipa_ops.store.schema import (
    COMMON,
    UNCOND_PREFIX,
    build_table,
    conform,
    content_key,
    now,
    uncond_key,
    vector_dims,
)

if TYPE_CHECKING:  # torch is imported where tensors are made, so CPU decode tasks never load it
    import torch

__all__ = ["EmbeddingStore", "StoreError", "build_table", "content_key", "now", "uncond_key", "vector_dims"]
HEAVY = {"image_embeds", "hidden_states", "face_embedding", "crop_png"}  # read on demand, not cached whole
_SHAPES = {"kps": (5, 2)}
_GROUP_BYTES = 16 << 20  # target row-group size: a lookup reads one group, not the whole part


class StoreError(UserError, KeyError):
    """A key that is missing, or whose row holds no usable value (no_face, error, no such column)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class _Part:
    """One committed part file: its row-group boundaries and its metadata columns (as pandas)."""

    def __init__(self, path: str, meta: pa.Table, groups: list[int]):
        self.rows = meta.num_rows
        self.frame = meta.to_pandas()
        if "hidden_shape" in self.frame:  # pandas turns nullable int lists into floats
            shapes = self.frame["hidden_shape"]
            self.frame["hidden_shape"] = [None if v is None else [int(x) for x in v] for v in shapes]
        self.frame["_part"], self.frame["_row"] = path, np.arange(self.rows)
        self.starts = np.cumsum([0] + groups)


class EmbeddingStore:
    """Reader and appender of one store URI; caches metadata and picks up parts written since."""

    def __init__(self, uri: str, cache_bytes: int = 512 << 20):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self._local = "file" in _protocols(self.fs)
        self._parts: dict[str, _Part] = {}
        self._meta: pd.DataFrame | None = None
        self._index: dict[str, int] = {}
        self._listed_at = 0.0
        self._seen: tuple[tuple[str, int], ...] | None = None
        self._keys: frozenset[str] = frozenset()
        self._cache: OrderedDict[tuple[str, int, str], tuple[Any, np.ndarray, int]] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._skipped: set[str] = set()  # bad parts this reader could not move aside

    # -- reading -------------------------------------------------------------------------------
    def refresh(self, force: bool = True) -> None:
        """Load parts committed since the last look.

        Unforced, a local store is listed only when a folder's mtime changed (a commit renames a file
        into it), a remote one at most every 5 s: reads stay cheap however many parts there are.
        """
        if not force:
            if self._local:
                signature = self._signature()
                if signature == self._seen:
                    return
                self._seen = signature
            elif time.monotonic() - self._listed_at < 5.0:
                return
        self._listed_at = time.monotonic()
        try:
            paths = sorted(self.fs.glob(f"{self.root}/*/part-*.parquet"))
        except FileNotFoundError:
            paths = []
        paths = [p for p in paths if not p[len(self.root) :].lstrip("/").startswith("_")]  # _quarantine/
        new = [p for p in paths if p not in self._parts and p not in self._skipped]
        for path in new:
            part = self._read_part(path)  # None: a bad part, moved aside (store_health)
            if part is None:
                self._skipped.add(path)
            else:
                self._parts[path] = part
        if new or self._meta is None:
            self._rebuild()

    def _signature(self) -> tuple[tuple[str, int], ...]:
        try:
            with os.scandir(self.root) as entries:
                folders = [(e.path, e.stat().st_mtime_ns) for e in entries if e.is_dir()]
            return (("", os.stat(self.root).st_mtime_ns), *sorted(folders))
        except FileNotFoundError:
            return ()

    def _read_part(self, path: str) -> _Part | None:
        def read(pf: pq.ParquetFile) -> tuple[pa.Table, list[int]]:
            names = [n for n in pf.schema_arrow.names if n not in HEAVY]
            return pf.read(columns=names), [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]

        got = read_or_quarantine(self.fs, path, self.root, read)
        return None if got is None else _Part(path, *got)

    def _rebuild(self) -> None:
        frames = [part.frame for part in self._parts.values()]
        meta = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[n for n, _ in COMMON])
        if len(meta):
            # ok/no_face beat retried errors; then the newest row wins
            rank = (meta["status"] != "error").astype(int)
            order = pd.DataFrame({"rank": rank, "t": meta["created_at"]}).sort_values(["rank", "t"], kind="stable")
            meta = meta.loc[order.index].drop_duplicates("key", keep="last").reset_index(drop=True)
        self._meta = meta
        self._index = {k: i for i, k in enumerate(meta["key"])}
        self._keys = frozenset(k for k in self._index if not k.startswith(UNCOND_PREFIX))

    def _frame(self) -> pd.DataFrame:
        self.refresh(force=False)
        if self._meta is None:
            self._rebuild()
        assert self._meta is not None
        return self._meta

    def table(self) -> pd.DataFrame:
        """The metadata of every current row (one per key), without vectors: what `ipa store ls` lists."""
        return self._frame().drop(columns=["_part", "_row"], errors="ignore")

    def statuses(self) -> dict[str, tuple[str, str]]:
        """key -> (status, error) of every current row, unconditional rows included."""
        meta = self._frame()
        return dict(zip(meta["key"], zip(meta["status"], meta["error"], strict=True), strict=True))

    def keys(self) -> frozenset[str]:
        """Every image key in the store (any status; unconditional rows excluded); cached between commits."""
        self._frame()
        return self._keys

    def rows(self, keys: list[str]) -> pd.DataFrame:
        """Metadata of `keys` in order (status, error, face fields...); missing keys get status `missing`."""
        meta = self._frame()
        out = []
        for key in keys:
            i = self._index.get(key)
            if i is None:
                out.append({"key": key, "status": "missing", "error": f"{key}: not in store {self.uri}"})
            else:
                out.append(meta.iloc[i].drop(["_part", "_row"]).to_dict())
        return pd.DataFrame(out)

    def get(self, keys: list[str], field: str = "image_embeds") -> list[torch.Tensor]:
        """float32 tensors as `ip_adapter_image_embeds` parts need them: [dim] pooled, [tokens, dim] hidden."""
        import torch

        meta = self._frame()
        missing = [k for k in keys if k not in self._index]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise StoreError(f"store {self.uri} has no row for {', '.join(missing[:3])}{more}; run the extract stage")
        out = []
        for key in keys:
            row = meta.iloc[self._index[key]]
            if row["status"] != "ok":
                raise StoreError(f"{key}: {row['status']}: {row['error'] or 'no embedding'}")
            value = self._value(row["_part"], int(row["_row"]), field, key)
            shape = tuple(map(int, row["hidden_shape"])) if field == "hidden_states" else _SHAPES.get(field, (-1,))
            out.append(torch.from_numpy(np.asarray(value, dtype=np.float32).reshape(shape).copy()))
        return out

    def blob(self, key: str, field: str = "crop_png") -> bytes:
        """A binary column of one row, e.g. the aligned face crop PNG."""
        meta = self._frame()
        if key not in self._index:
            raise StoreError(f"store {self.uri} has no row for {key}")
        row = meta.iloc[self._index[key]]
        return bytes(self._value(row["_part"], int(row["_row"]), field, key))

    def uncond(self, encoder_id: str, field: str = "image_embeds") -> torch.Tensor:
        """The unconditional embedding of an encoder, stored once (zeros for pooled/face when absent)."""
        key = uncond_key(encoder_id)
        self._frame()
        if key in self._index:
            return self.get([key], field)[0]
        dims = self.dims(encoder_id)
        if field in ("image_embeds", "face_embedding") and field in dims:
            import torch

            return torch.zeros(dims[field])  # diffusers: zeros_like(image_embeds)
        raise StoreError(f"store {self.uri} has no unconditional {field} for encoder {encoder_id}")

    def _value(self, path: str, row: int, field: str, key: str) -> Any:
        part = self._parts[path]
        group = int(np.searchsorted(part.starts, row, side="right") - 1)
        cache_key = (path, group, field)
        cached = self._cache.get(cache_key)
        if cached is None:
            with self.fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if field not in pf.schema_arrow.names:
                    raise StoreError(f"{key}: encoder stores no {field} (for hidden states set hidden_states: true)")
                column = pf.read_row_group(group, columns=[field]).column(0).combine_chunks()
            cached = _column_values(column)
            self._remember(cache_key, cached)
        self._cache.move_to_end(cache_key)
        values, nulls, _ = cached
        i = row - int(part.starts[group])
        if nulls[i]:
            raise StoreError(f"{key}: row has no {field}")
        return values[i]

    def _remember(self, cache_key: tuple[str, int, str], cached: tuple[Any, np.ndarray, int]) -> None:
        self._cache[cache_key] = cached
        self._cache_bytes += cached[2]
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old[2]

    def dims(self, encoder_id: str) -> dict[str, int]:
        """Vector widths of an encoder's folder, from a part's schema (empty if it has none)."""
        schema = self.schema(encoder_id)
        if schema is None:
            return {}
        return {f.name: f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)}

    def schema(self, encoder_id: str) -> pa.Schema | None:
        try:
            parts = sorted(self.fs.glob(f"{self._folder(encoder_id)}/part-*.parquet"))
        except FileNotFoundError:
            return None
        for path in parts:  # the first part that reads; bad ones are moved aside
            if path not in self._skipped:
                schema = read_or_quarantine(self.fs, path, self.root, lambda pf: pf.schema_arrow)
                if schema is not None:
                    return schema.remove_metadata()
                self._skipped.add(path)
        return None

    def stats(self) -> dict[str, Any]:
        """Rows by encoder and status, vector widths, parts and bytes: what `ipa store stats` prints."""
        meta = self._frame()
        encoders: dict[str, Any] = {}
        for enc, group in meta.groupby("encoder", sort=True) if len(meta) else []:
            images = group[~group["key"].str.startswith(UNCOND_PREFIX)]
            paths = {p for p in self._parts if p.startswith(self._folder(enc) + "/")}
            encoders[enc] = {
                "kind": str(group["kind"].iloc[0]),
                "rows": len(images),
                "status": {str(k): int(v) for k, v in images["status"].value_counts().sort_index().items()},
                "uncond": bool((group["key"] == uncond_key(enc)).any()),
                "dims": self.dims(enc),
                "parts": len(paths),
                "bytes": int(sum(self.fs.size(p) for p in paths)),
            }
        temps = self._temp_files()
        return {"uri": self.uri, "parts": len(self._parts), "temp_files": len(temps), "encoders": encoders}

    # -- writing -------------------------------------------------------------------------------
    def append(self, table: pa.Table) -> str:
        """Commit rows of one encoder as a new part, atomically; returns the part's path."""
        encoders = set(table.column("encoder").to_pylist())
        if len(encoders) != 1:
            raise ValueError(f"a part holds one encoder's rows, got {sorted(encoders)}")
        folder = self._folder(encoders.pop())
        if not {"image_embeds", "hidden_states"} & set(table.column_names):
            raise ValueError("a part needs its encoder's vector columns (build_table with the encoder's dims)")
        self.refresh(force=False)  # a part of a newer schema refuses the append (NewerSchema), never mixed with
        existing = self.schema(table.column("encoder")[0].as_py())
        if existing is not None:
            table = conform(table, existing)
        table = stamp(table)  # the schema version readers check (a newer one is refused, never overwritten)
        group_rows = max(1, min(4096, _GROUP_BYTES * max(1, table.num_rows) // max(1, table.nbytes)))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=group_rows)
        name = f"part-{uuid.uuid4().hex}.parquet"
        path = f"{folder}/{name}"
        self.fs.makedirs(folder, exist_ok=True)
        if self._local:
            tmp = f"{folder}/.{name}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(buf.getvalue())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)  # a full disk leaves no temp part either
                if is_full(exc):
                    raise disk_full(path, exc) from exc
                raise
        else:  # object stores: a single PUT is all-or-nothing
            self.fs.pipe_file(path, buf.getvalue())
        light = table.drop_columns([c for c in table.column_names if c in HEAVY])
        self._parts[path] = _Part(path, light, _row_groups(table.num_rows, group_rows))
        self._meta = None  # re-indexed on the next read, not on every append
        return self.uri + path[len(self.root) :] if path.startswith(self.root) else path

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temp parts left by killed writers (older than `older_than_s`); returns how many."""
        removed = 0
        for path in self._temp_files():
            try:
                modified = self.fs.modified(path).timestamp()
            except (NotImplementedError, FileNotFoundError, AttributeError):
                continue
            if time.time() - modified > older_than_s:
                self.fs.rm_file(path)
                removed += 1
        return removed

    def _temp_files(self) -> list[str]:
        try:
            return list(self.fs.glob(f"{self.root}/*/.part-*.tmp"))
        except FileNotFoundError:
            return []

    def _folder(self, encoder_id: str) -> str:
        return f"{self.root}/{quote(encoder_id, safe='@.-_+=')}"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return tuple(proto) if isinstance(proto, (list, tuple)) else (proto,)


def _row_groups(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)] or [0]


def _column_values(column: pa.Array) -> tuple[Any, np.ndarray, int]:
    """(values, null mask, bytes): a fixed-size-list column as a [rows, width] array, others as a list."""
    nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        start = column.offset * size
        flat = column.values.to_numpy(zero_copy_only=False)
        arr = flat[start : start + len(column) * size].reshape(len(column), size)
        return arr, nulls, arr.nbytes
    return column.to_pylist(), nulls, column.nbytes
