"""One shard of each export format from a batch of records, written into the staging folder.

Each writer takes a batch (records plus `SEQ`), reads every row's image from the source output
one at a time and streams it into its shard, so memory holds one image (parquet: one row group)
however big the shard. A row whose image is gone is counted as `missing` and left out. Writers
name their files with a random token; the commit gives them their final, numbered names.

- imagefolder: `<token>/` holding the images and a `metadata.parquet` whose `file_name` is
  relative to it (the layout `datasets.load_dataset("imagefolder")` reads, one folder per batch);
- webdataset: `<token>-<i>.tar` of `<key>.<ext>`, `<key>.json` (the record), `<key>.txt` (the
  prompt), rolled at `shard_bytes`, each with `<token>-<i>_stats.json` as img2dataset writes;
- parquet: `<token>-<i>.parquet` with an `image` column of the Hugging Face Image feature
  (`{bytes, path}` and the `huggingface` schema metadata), rolled at `file_bytes`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.export.options import ExportOptions
from ipa_ops.export.records import SEQ, image_entry, image_ext, read_image, record_json, record_table
from ipa_ops.outputs.folder import OutputDir

IMAGE_FEATURE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_META = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
RESERVED = ("image", "file_name")  # columns the formats add; a results column of that name would be shadowed


def write_shard(batch: pa.Table, source: str, staging: str, options: ExportOptions) -> list[dict[str, Any]]:
    """Write `batch` as shard file(s) of `options.format` under `staging`; one entry per file written."""
    clash = [c for c in RESERVED if c in batch.column_names]
    if clash:
        raise ValueError(f"results column(s) {clash} collide with what the export adds; rename them")
    writer = {"imagefolder": _imagefolder, "webdataset": _webdataset, "parquet": _parquet}[options.format]
    return writer(batch, OutputDir(source), staging, options, uuid.uuid4().hex[:12])


def _rows(batch: pa.Table, out: OutputDir) -> Iterator[tuple[int, dict[str, Any], str, bytes | None]]:
    """(row index, record, image entry, image bytes or None) per row, one image read at a time."""
    for i, row in enumerate(record_table(batch).to_pylist()):
        entry = image_entry(row)
        yield i, row, entry or "", read_image(out, entry)


def _entry(name: str, first: int, part: int, rows: int, missing: int, size: int, stats: str = "") -> dict[str, Any]:
    return {"file": name, "stats": stats, "first": first, "part": part, "rows": rows, "missing": missing, "bytes": size}


def _imagefolder(batch: pa.Table, out: OutputDir, staging: str, options: ExportOptions, token: str) -> list[dict]:
    folder = os.path.join(staging, token)
    os.makedirs(folder)
    kept, names, size = [], [], 0
    for i, row, entry, data in _rows(batch, out):
        if data is None:
            continue
        name = f"{row['row_key']}.{image_ext(entry)}"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        kept.append(i)
        names.append(name)
        size += len(data)
    records = record_table(batch).take(pa.array(kept, pa.int64()))
    pq.write_table(
        records.add_column(0, "file_name", pa.array(names, pa.string())), os.path.join(folder, "metadata.parquet")
    )
    return [_entry(token, _first(batch), 0, len(kept), batch.num_rows - len(kept), size)]


def _webdataset(batch: pa.Table, out: OutputDir, staging: str, options: ExportOptions, token: str) -> list[dict]:
    entries: list[dict] = []
    shard: _TarShard | None = None
    for i, row, entry, data in _rows(batch, out):
        if shard is None:
            shard = _TarShard(staging, token, len(entries), _first(batch, i))
        if data is None:
            shard.missing += 1
            continue
        key = str(row["row_key"])
        shard.add(f"{key}.{image_ext(entry)}", data)
        shard.add(f"{key}.json", record_json(row))
        shard.add(f"{key}.txt", str(row.get("prompt") or "").encode())
        shard.rows += 1
        if shard.size >= options.shard_bytes:
            entries.append(shard.close())
            shard = None
    if shard is not None:
        entries.append(shard.close())
    return entries


class _TarShard:
    """One tar being written; members in key order, times zeroed so equal exports are equal bytes."""

    def __init__(self, staging: str, token: str, part: int, first: int):
        self.name = f"{token}-{part}"
        self.path = os.path.join(staging, f"{self.name}.tar")
        self.staging, self.part, self.first = staging, part, first
        self.rows = self.missing = 0
        self.started = time.time()
        self.tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)

    @property
    def size(self) -> int:
        return self.tar.fileobj.tell()

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> dict[str, Any]:
        self.tar.close()
        ended = time.time()
        stats = {  # img2dataset's per-shard stats fields; a missing image counts as failed_to_download
            "count": self.rows + self.missing,
            "successes": self.rows,
            "failed_to_download": self.missing,
            "failed_to_resize": 0,
            "duration": ended - self.started,
            "start_time": self.started,
            "end_time": ended,
            "status_dict": {k: v for k, v in (("success", self.rows), ("image file missing", self.missing)) if v},
        }
        stats_name = f"{self.name}_stats.json"
        with open(os.path.join(self.staging, stats_name), "w") as f:
            json.dump(stats, f, indent=4)
        size = os.path.getsize(self.path)
        return _entry(f"{self.name}.tar", self.first, self.part, self.rows, self.missing, size, stats_name)


def _parquet(batch: pa.Table, out: OutputDir, staging: str, options: ExportOptions, token: str) -> list[dict]:
    records = record_table(batch)
    schema = pa.schema([pa.field("image", IMAGE_FEATURE), *records.schema]).with_metadata(HF_META)
    entries: list[dict] = []
    state: dict[str, Any] = {}

    def close() -> None:
        state["writer"].close()
        state["file"].close()
        name = state["name"]
        size = os.path.getsize(os.path.join(staging, name))
        entries.append(_entry(name, state["first"], len(entries), state["rows"], state["missing"], size))
        state.clear()

    for start in range(0, batch.num_rows, options.row_group_rows):
        group = batch.slice(start, options.row_group_rows)
        if not state:
            name = f"{token}-{len(entries)}.parquet"
            handle = open(os.path.join(staging, name), "wb")
            state.update(name=name, file=handle, writer=pq.ParquetWriter(handle, schema), first=_first(group), rows=0)
            state["missing"] = 0
        kept, images = [], []
        for i, row, entry, data in _rows(group, out):
            if data is None:
                state["missing"] += 1
                continue
            kept.append(i)
            images.append({"bytes": data, "path": f"{row['row_key']}.{image_ext(entry)}"})
        if kept:
            rows = record_table(group).take(pa.array(kept, pa.int64()))
            table = rows.add_column(0, pa.field("image", IMAGE_FEATURE), pa.array(images, IMAGE_FEATURE))
            state["writer"].write_table(table.cast(schema), row_group_size=options.row_group_rows)
            state["rows"] += len(kept)
        if state["file"].tell() >= options.file_bytes:
            close()
    if state:
        close()
    return entries


def _first(batch: pa.Table, row: int = 0) -> int:
    return int(batch.column(SEQ)[row].as_py()) if SEQ in batch.column_names and batch.num_rows else 0
