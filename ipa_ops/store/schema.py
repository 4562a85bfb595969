"""The store's Arrow schema and how rows become a table: the column contract in one place.

Each encoder's folder is one Parquet dataset with these columns (vectors are Arrow fixed-size
lists, so pandas, pyarrow and duckdb read them without this package):

| column | type | meaning |
| --- | --- | --- |
| key | string | `<image_sha256>/<encoder_id>`; `uncond/<encoder_id>` for the negative embedding |
| image_sha256 | string | sha256 of the image file's bytes ("" for unreadable files and the uncond row) |
| source_uri | string | where the bytes were first read (`...#face-crop` for aligned face crops) |
| encoder | string | encoder id `alias@<16 hex>` |
| kind | string | `clip` or `face` |
| status | string | `ok`, `no_face`, `error` |
| error | string | one line naming the file and the reason; empty when ok |
| notes | string | what normalisation did (EXIF rotation, alpha over white, first frame, ...) |
| created_at | timestamp[us, UTC] | when the row was computed |
| image_embeds | fixed_size_list<float32, D> | pooled CLIP `image_embeds`, or the normed face embedding |
| hidden_states | fixed_size_list<float16 or float32, T*H> | CLIP `hidden_states[-2]`, flattened (when configured) |
| hidden_shape | fixed_size_list<int32, 2> | [T, H] of hidden_states |
| face_embedding | fixed_size_list<float32, D> | raw (unnormalised) face embedding (face only, as the rest below) |
| bbox / kps | fixed_size_list<float32, 4 / 10> | face box x1,y1,x2,y2 / five landmarks x,y flattened |
| det_score, num_faces, face_index, det_size | float32, int32, int32, int32 | detection facts of the chosen face |
| det_sizes_tried | list<int32> | detection sizes tried, in order |
| crop_png, crop_sha256 | binary, string | aligned face crop (`norm_crop`, `face_crop_size` px: 224 default), sha256 |

hidden_states keep the precision they were computed in (fp16 on GPU, fp32 on CPU); a folder
keeps the type of its first part. The CLIP embedding of a face crop is an ordinary `clip` row
keyed `<crop_sha256>/<clip encoder id>`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from ipa_ops.errors import UserError

UNCOND_PREFIX = "uncond/"
COMMON = [
    ("key", pa.string()),
    ("image_sha256", pa.string()),
    ("source_uri", pa.string()),
    ("encoder", pa.string()),
    ("kind", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("notes", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
]
FIXED = {"bbox": 4, "kps": 10, "hidden_shape": 2}  # vector columns whose width never varies
VECTOR_TYPES = {
    "image_embeds": pa.float32(),
    "hidden_states": None,  # float16 when computed in fp16 (GPU), float32 when in fp32 (CPU)
    "hidden_shape": pa.int32(),
    "face_embedding": pa.float32(),
    "bbox": pa.float32(),
    "kps": pa.float32(),
}
FACE_SCALARS = [
    ("det_score", pa.float32()),
    ("num_faces", pa.int32()),
    ("face_index", pa.int32()),
    ("det_size", pa.int32()),
    ("det_sizes_tried", pa.list_(pa.int32())),
    ("crop_png", pa.binary()),
    ("crop_sha256", pa.string()),
]


def content_key(image_sha256: str, encoder_id: str) -> str:
    """The store key of an image's embedding by one encoder."""
    return f"{image_sha256}/{encoder_id}"


def uncond_key(encoder_id: str) -> str:
    return f"{UNCOND_PREFIX}{encoder_id}"


def now() -> datetime:
    return datetime.now(UTC)


def vector_dims(row: dict[str, Any]) -> dict[str, int]:
    """Widths of the vector columns a row carries (its arrays flattened)."""
    return {c: int(np.asarray(row[c]).size) for c in VECTOR_TYPES if row.get(c) is not None}


def build_table(rows: list[dict[str, Any]], dims: dict[str, int], hidden_dtype: str = "float32") -> pa.Table:
    """Arrow table of store rows; `dims` gives every vector width (from an exemplar or the folder)."""
    kind = rows[0]["kind"]
    columns: dict[str, pa.Array] = {}
    for name, typ in COMMON:
        values = [r.get(name) if r.get(name) is not None else ("" if typ == pa.string() else None) for r in rows]
        columns[name] = pa.array(values, typ)
    vectors = [c for c in ("image_embeds", "hidden_states") if c in dims]
    vectors += (["hidden_shape"] if "hidden_states" in dims else []) + (
        ["face_embedding", "bbox", "kps"] if kind == "face" else []
    )
    for name in vectors:
        typ = VECTOR_TYPES[name] or pa.from_numpy_dtype(np.dtype(hidden_dtype))
        size = FIXED.get(name) or dims.get(name) or dims["image_embeds"]  # raw face embedding: as wide as the normed
        columns[name] = _fixed_list([r.get(name) for r in rows], size, typ)
    if kind == "face":
        for name, typ in FACE_SCALARS:
            columns[name] = pa.array([r.get(name) for r in rows], typ)
    return pa.table(columns)


def _fixed_list(values: list[Any], size: int, typ: pa.DataType) -> pa.FixedSizeListArray:
    flat = np.zeros((len(values), size), dtype=typ.to_pandas_dtype())
    mask = np.ones(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is not None:
            arr = np.asarray(v).reshape(-1)
            if arr.size != size:
                raise ValueError(f"vector of {arr.size} values where the store column holds {size}")
            flat[i], mask[i] = arr, False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), typ), size, mask=pa.array(mask))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast new rows to the folder's existing schema so every part of an encoder reads as one dataset."""
    missing = [n for n in table.column_names if n not in schema.names and table.column(n).null_count < len(table)]
    if missing:
        raise UserError(
            f"rows carry {', '.join(missing)} but encoder {table.column('encoder')[0]} stores none; "
            "use another encoder id for a different configuration"
        )
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if pa.types.is_fixed_size_list(f.type) and col.type.list_size != f.type.list_size:
                raise UserError(
                    f"{f.name} has width {col.type.list_size} but encoder {table.column('encoder')[0]} "
                    f"stores width {f.type.list_size}"
                )
            columns.append(col.cast(f.type))
        else:
            columns.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(columns, schema=schema)
