"""What an export writes: the format, which rows, how big its files are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMATS = ("imagefolder", "webdataset", "parquet")


class ExportOptions(BaseModel):
    """`ipa export` settings; the command line sets the first three, the rest have working defaults."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagefolder", "webdataset", "parquet"] = Field(description="Layout of DEST: " + ", ".join(FORMATS))
    where: str | None = Field(
        None,
        description="SQL boolean expression (DuckDB dialect) over the results view's columns; only ok rows are "
        "exported in any case, e.g. \"id like 'a%' and seed < 100\", 'dup_of is null'.",
    )
    limit: int | None = Field(
        None, ge=0, description="Export at most this many rows (the first matching, in written order)."
    )
    folder_files: int = Field(
        1000, ge=1, le=10_000, description="imagefolder: images per subfolder (tools and the Hub struggle past 10^4)."
    )
    shard_bytes: int = Field(1_000_000_000, ge=1, description="webdataset: target tar shard size in bytes (~1 GB).")
    shard_rows: int = Field(
        10_000, ge=1, description="webdataset and parquet: at most this many rows per file (img2dataset's default)."
    )
    file_bytes: int = Field(500_000_000, ge=1, description="parquet: target file size in bytes (~500 MB).")
    row_group_rows: int = Field(100, ge=1, description="parquet: rows per row group (images make rows large).")
    selection_rows: int = Field(
        10_000, ge=1, description="Rows per staged selection file (the unit of parallel reads)."
    )
    memory_limit: str = Field("1GB", description="DuckDB's memory limit while selecting rows; beyond it, it spills.")
