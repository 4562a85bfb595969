"""`ipa export OUTPUT DEST --format imagefolder|webdataset|parquet [--where EXPR] [--limit N]`."""

from __future__ import annotations

import argparse

from ipa_ops.export.options import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write an output's ok rows as a dataset training tools load")
    export.add_argument("output", help="output directory (local path or fsspec URI)")
    export.add_argument("dest", help="folder to create (local; must not exist or be empty)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument(
        "--where", help="SQL condition on results and score columns, e.g. \"clip_i_min >= 0.6 and dup_of is null\""
    )
    export.add_argument("--limit", type=int, help="at most this many rows")
    export.add_argument("--shard-bytes", type=int, help="webdataset: target shard size in bytes (default ~1 GB)")
    export.add_argument("--file-bytes", type=int, help="parquet: target file size in bytes (default ~500 MB)")
    export.add_argument("--folder-files", type=int, help="imagefolder: images per subfolder (default 1000)")
    export.set_defaults(func=_export)


def score_columns(output: str) -> list:
    """The output's scores (one column per metric, each scorer's latest id) as a table to join, if any."""
    import pyarrow as pa

    from ipa_ops.outputs.scores import scores_table

    scores = scores_table(output)
    return [pa.Table.from_pandas(scores.drop(columns=["id"]), preserve_index=False)] if len(scores) else []


def _export(args: argparse.Namespace) -> int:
    from ipa_ops.export.options import ExportOptions
    from ipa_ops.stages.export import run_export

    given = {"shard_bytes": args.shard_bytes, "file_bytes": args.file_bytes, "folder_files": args.folder_files}
    options = ExportOptions(
        format=args.format, where=args.where, limit=args.limit, **{k: v for k, v in given.items() if v is not None}
    )
    found = run_export(args.output, args.dest, options, extra=score_columns(args.output))
    print(
        f"{args.dest}: {found['rows']} rows as {found['format']} in {len(found['files'])} "
        + ("folder(s)" if found["format"] == "imagefolder" else "file(s)")
        + (f"; {found['missing_images']} row(s) skipped, their image files are gone" if found["missing_images"] else "")
    )
    return 0
