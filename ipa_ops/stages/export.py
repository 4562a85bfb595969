"""`ipa export` on Ray Data: select rows on the driver (streamed), write shards in parallel tasks.

    results parts ─► results view (streamed: latest per key, extra tables, --where via DuckDB, --limit)
        ─► staged selection files (records only, no images; `selection_rows` rows each)
        ─► ray.data.read_parquet (parallel reads) ─► map_batches(write_shard) (parallel writes:
           each task reads its rows' images one by one and streams them into its shard)
        ─► shard entries (a few per shard) ─► commit: numbered names, manifest, one rename to DEST

The driver never holds images, and records only one batch at a time (the view streams them into
the staged files); the view's index of each key's latest attempt is resolved out of core, one
hash bucket at a time (outputs/latest_index.py), leaving one bit a row.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ipa_ops.errors import UserError
from ipa_ops.export.formats import write_shard
from ipa_ops.export.options import ExportOptions
from ipa_ops.export.records import SEQ, image_entry
from ipa_ops.export.staging import SELECTION, SPILL, Staging
from ipa_ops.outputs.folder import OutputDir, versions
from ipa_ops.outputs.view import Extra, results_view
from ipa_ops.stages.ray_address import ensure_ray

ENTRY_SCHEMA = pa.schema(
    [("file", pa.string()), ("stats", pa.string()), ("first", pa.int64()), ("part", pa.int64())]
    + [("rows", pa.int64()), ("missing", pa.int64()), ("bytes", pa.int64())]
)
SIZE_SAMPLE = 32  # images whose sizes set how many rows make a shard of the target bytes


def run_export(
    source: str, dest: str, options: ExportOptions, extra: Sequence[Extra] = (), ray_address: str | None = None
) -> dict[str, Any]:
    """Export `source`'s ok rows (matching `options.where`) to `dest`; returns the export's manifest."""
    out = OutputDir(source)
    if not out.fs.isdir(out.results_dir()):
        raise UserError(f"{source}: no results/ folder; is it an ipa output folder?")
    staging = Staging(dest).begin()
    started = False
    try:
        with results_view(out, extra, memory_limit=options.memory_limit, spill_dir=staging.sub(SPILL)) as view:
            view.check(options.where)  # the user's expression alone, so its error names only it
            where = "status = 'ok'" + (f" AND ({options.where})" if options.where and options.where.strip() else "")
            selected, sizes = _stage_selection(
                view.select(where, options.limit, said=options.where), staging.sub(SELECTION), out, options
            )
        entries: list[dict[str, Any]] = []
        if selected:
            started = ensure_ray(ray_address)
            ds = ray.data.read_parquet(staging.sub(SELECTION))
            written = ds.map_batches(
                _write_batch,
                batch_size=_rows_per_call(options, sizes),
                batch_format="pyarrow",
                fn_kwargs={"source": out.uri, "staging": staging.path, "options": options.model_dump()},
            )
            for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
                entries.extend(batch.to_pylist())
        manifest = {"source": out.uri, "where": options.where, "limit": options.limit, "selected": selected}
        manifest["ipa"] = versions().get("ipa")
        return staging.commit(options.format, entries, manifest)
    except BaseException:
        staging.abort()
        raise
    finally:
        if started:
            ray.shutdown()


def _stage_selection(
    reader: pa.RecordBatchReader, folder: str, out: OutputDir, options: ExportOptions
) -> tuple[int, list[int]]:
    """Stream the selected records into parquet files of `selection_rows` rows; (rows, sample sizes)."""
    os.makedirs(folder)
    seq, sizes = 0, []
    writer: pq.ParquetWriter | None = None
    in_file = 0
    schema = reader.schema.append(pa.field(SEQ, pa.int64()))
    for batch in reader:
        while batch.num_rows:
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(folder, f"sel-{seq:012d}.parquet"), schema)
                in_file = 0
            take = batch.slice(0, options.selection_rows - in_file)
            batch = batch.slice(take.num_rows)
            seqs = pa.array(range(seq, seq + take.num_rows), pa.int64())
            writer.write_batch(pa.RecordBatch.from_arrays([*take.columns, seqs], schema=schema))
            if len(sizes) < SIZE_SAMPLE:
                sizes += _image_sizes(out, take.slice(0, SIZE_SAMPLE - len(sizes)))
            seq += take.num_rows
            in_file += take.num_rows
            if in_file >= options.selection_rows:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    return seq, sizes


def _image_sizes(out: OutputDir, batch: pa.RecordBatch) -> list[int]:
    sizes = []
    for row in batch.select(["outputs"]).to_pylist():
        entry = image_entry(row)
        if not entry:
            continue
        try:
            sizes.append(int(out.fs.size(out._strip(out.resolve(entry)))))
        except OSError:  # gone: the shard writer counts it as missing
            pass
    return sizes


def _rows_per_call(options: ExportOptions, sizes: list[int]) -> int:
    """Rows one task writes: a folder of images, or about one shard of the target size."""
    if options.format == "imagefolder":
        return options.folder_files
    target = options.shard_bytes if options.format == "webdataset" else options.file_bytes
    per_row = max(1, int(statistics.fmean(sizes))) if sizes else 1
    return max(1, min(options.shard_rows, target // per_row))


def _write_batch(batch: pa.Table, source: str, staging: str, options: dict[str, Any]) -> pa.Table:
    entries = write_shard(batch, source, staging, ExportOptions.model_validate(options))
    return pa.Table.from_pylist(entries, schema=ENTRY_SCHEMA)
