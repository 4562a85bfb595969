"""Exports of an output's ok rows for training tools: imagefolder, WebDataset, Hugging Face Parquet.

    options.py   `ExportOptions`: format, --where, --limit, shard sizes (pydantic, documented fields)
    records.py   a results row as a record: JSON for WebDataset, the image file it names, its bytes
    formats.py   one shard of each format from a batch of records (plain Python; no Ray)
    staging.py   the staging folder beside DEST, its commit (names shards, one rename) and clean-up

The Ray Data pipeline that drives them is `stages/export.py`. No Ray here: a shard writer is a
function of (records, source output, staging folder), so it runs and is tested alone.
"""
