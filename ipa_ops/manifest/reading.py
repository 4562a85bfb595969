"""The manifest's on-disk format: the Arrow schema, its column docs, and reading/writing any fsspec URI.

Parquet, CSV and JSONL read into the same DataFrame (values normalised the same way), so a manifest
can move between formats without changing what runs. Values are coerced leniently: a cell that does
not fit its column is kept as written and reported by `manifest_checks.check_rows`, row by row.
"""

from __future__ import annotations

import difflib
import glob as globlib
import io
import json
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.errors import UserError

_ADAPTER_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "adapter": (pa.string(), "Adapter alias defined in the flow's `adapters:`."),
    "images": (pa.list_(pa.string()), "Reference images: URIs or embedding-store keys `<sha256>/<encoder>`."),
    "masks": (pa.list_(pa.string()), "Optional attention masks, one URI per image (white: where it applies)."),
    "negative_images": (pa.list_(pa.string()), "Optional negative references: one shared, or one per image."),
    "combine": (
        pa.string(),
        "How several images merge: concat (default), average, norm_average (ComfyUI's norm average), add, "
        "subtract (first minus the mean of the rest), max, min; ipa's earlier formulas: subtract_sum, unit_average.",
    ),
    "image_weights": (pa.list_(pa.float64()), "Optional weight per image, multiplying its embedding before combining."),
    "embeds_scaling": (
        pa.string(),
        "ComfyUI's embeds scaling: V only (default, diffusers' maths), K+V, K+V w/ C penalty, K+mean(V) w/ C penalty.",
    ),
    "scale": (pa.string(), "Scale schedule as JSON (a number or any schedule form); empty: the adapter's default."),
    "mask_fit": (pa.string(), "Fitting a mask of another aspect ratio: pad or crop; empty: must match within 1%."),
    "soft_masks": (pa.bool_(), "Use mask grey levels as weights instead of thresholding them."),
    "face": (pa.string(), 'FaceID options as JSON: {"fallback": "skip"} or {"fallback": "drop_adapter"} (no face).'),
    "tiled": (pa.bool_(), "ComfyUI's IPAdapterTiled: the image's 256 px tiles, each on its own region (needs an "
              "encoder with `tiles`)."),  # fmt: skip
    "frames": (pa.string(), 'Video rows, as JSON: {"unfold": true} (image i conditions frame i), per-frame "weights".'),
}
ADAPTER_FIELD_DOCS: dict[str, str] = {k: doc for k, (_, doc) in _ADAPTER_FIELDS.items()}
ADAPTER_TYPE = pa.struct([(k, t) for k, (t, _) in _ADAPTER_FIELDS.items()])

_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "Row id, unique in the manifest; shown in errors and results, never used as a file name."),
    "prompt": (pa.string(), "Text prompt."),
    "negative_prompt": (pa.string(), "Negative prompt; empty: the flow default."),
    "seed": (pa.int64(), "Random seed; empty: derived from the id, so reruns reproduce."),
    "task": (pa.string(), "text2img (default), img2img, inpaint, controlnet or video."),
    "model": (pa.string(), "Model alias from the flow; empty: the generate stage's model."),
    "width": (pa.int32(), "Output width in pixels, a multiple of 8."),
    "height": (pa.int32(), "Output height in pixels, a multiple of 8."),
    "steps": (pa.int32(), "Denoising steps, >= 1."),
    "guidance_scale": (pa.float64(), "Classifier-free guidance scale (Flux: its distilled guidance input)."),
    "true_cfg_scale": (pa.float64(), "Flux: true CFG scale (> 1), a second pass with the negative prompt; empty: off."),
    "init_image": (pa.string(), "Start image URI (img2img, inpaint)."),
    "mask_image": (pa.string(), "Inpainting mask URI (inpaint)."),
    "control_image": (pa.string(), "ControlNet conditioning image URI (controlnet)."),
    "strength": (pa.float64(), "How much of the init image is re-noised (img2img, inpaint), in (0, 1]."),
    "controlnet_scale": (pa.float64(), "ControlNet conditioning scale (controlnet)."),
    "num_frames": (pa.int32(), "Number of frames (video)."),
    "scheduler": (pa.string(), "Scheduler overriding the model's (ddim, euler, euler_a, dpmpp_2m, lcm, pndm)."),
    "adapters": (pa.list_(ADAPTER_TYPE), "IP-Adapter entries; in CSV a JSON list of objects (fields below)."),
}
COLUMN_DOCS: dict[str, str] = {k: doc for k, (_, doc) in _COLUMNS.items()}
MANIFEST_SCHEMA = pa.schema([(k, t) for k, (t, _) in _COLUMNS.items()])
COLUMN_NAMES: tuple[str, ...] = tuple(_COLUMNS)
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_PARTITION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_columns(columns: Iterable[str], partition_columns: Iterable[str] = (), source: str = "manifest") -> None:
    """Raise one line naming every unknown column, so a typo never passes silently.

    User metadata columns start with `x_`; partition values (`date=…/` folders) are allowed too.
    """
    known, partitions = COLUMN_NAMES, set(partition_columns)
    bad = [c for c in columns if c not in known and not c.startswith("x_") and c not in partitions]
    if bad:
        names = ", ".join(f"{c!r}{did_you_mean(c, known)}" for c in bad)
        raise UserError(f"{source}: unknown column(s) {names}; allowed: {', '.join(known)}; prefix user columns x_")


_SCALARS = (str, int, bool)


def plain(value: Any) -> Any:
    """A cell as a plain Python value: missing markers (None, NaN, NA) become None, arrays lists."""
    if type(value) in _SCALARS:
        return value
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    value = _py(value)
    return None if isinstance(value, float) and math.isnan(value) else value


def _py(value: Any) -> Any:
    """numpy/pandas containers and scalars as Python ones; NaN inside a container is kept (a bad scale)."""
    if value is None or type(value) in _SCALARS or type(value) is float:
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple):
        return [_py(v) for v in value]
    if isinstance(value, dict):
        return {k: _py(v) for k, v in value.items()}
    return None if value is pd.NA else value


def normalize_adapters(value: Any) -> tuple[list[Any], str | None]:
    """`adapters` in any accepted spelling as a list of entries with the schema's keys; or the problem.

    Accepts a list of objects, one object, or their JSON text (CSV). Scale and face become canonical
    JSON text (the schema stores them as strings because schedule forms differ in shape); unknown keys
    are kept so the row check can name them.
    """
    value = plain(value)
    if value is None or value == "":
        return [], None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            return (
                [],
                f"not valid JSON ({getattr(exc, 'msg', 'nested too deeply')}); write a JSON list of adapter objects",
            )
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [], f"must be a list of adapter objects, got {value!r}"
    return [_normalize_entry(e) if isinstance(e, dict) else e for e in value], None


def _normalize_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: entry.get(k) for k in _ADAPTER_FIELDS}
    out.update({k: v for k, v in entry.items() if k not in _ADAPTER_FIELDS})
    for key in ("images", "masks", "negative_images"):
        out[key] = [] if out[key] is None else [out[key]] if isinstance(out[key], str) else out[key]
    for key in ("scale", "face", "frames"):
        out[key] = _json_text(out[key])
    return out


def _json_text(value: Any) -> Any:
    """JSON text in one canonical spelling (so every format reads the same); unparsable text as written."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return json.dumps(value)


def readable_adapters(entries: list[Any]) -> list[Any]:
    """Entries for CSV/JSONL: JSON text decoded and empty keys dropped, the way people write them."""
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if v is not None and v != []}
            for key in ("scale", "face", "frames"):
                if isinstance(entry.get(key), str):
                    try:
                        entry[key] = json.loads(entry[key])
                    except (json.JSONDecodeError, RecursionError):
                        pass
        out.append(entry)
    return out


def coerce_cell(column: str, value: Any) -> Any:
    """A cell in its column's type where it fits; as written otherwise (the row check reports it)."""
    value = plain(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if column == "adapters":
        entries, error = normalize_adapters(value)
        return value if error else (entries or None)  # no adapters reads the same from every format
    kind = _COLUMNS[column][0] if column in _COLUMNS else None
    if kind is None or isinstance(value, bool):
        return value
    if pa.types.is_integer(kind):
        number = _number(value)
        whole = isinstance(number, int) or (isinstance(number, float) and number.is_integer())
        return int(number) if whole and _INT64[0] <= number <= _INT64[1] else value  # else: reported by the check
    if pa.types.is_floating(kind):
        number = _number(value)
        if number is None:
            return value
        return None if math.isnan(number) else float(number)
    if column == "id" and isinstance(value, int):
        return str(value)
    return value


_INT64 = (-(2**63), 2**63 - 1)


def _number(value: Any) -> int | float | None:
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                continue
    return None


def read_manifest(uri_or_glob: str) -> pd.DataFrame:
    """Read a manifest file, a glob, or a (partitioned) folder into one DataFrame.

    All schema columns are present (None where empty), then partition and `x_` columns; the
    partition columns are listed in `df.attrs["partition_columns"]`. Unknown columns are an error.
    """
    return manifest_frame(read_records(uri_or_glob))


@dataclass
class ManifestRecords:
    """A manifest's rows as read (partition values filled in), before any cell is coerced.

    Planning hashes these to recognise rows it planned before, and coerces only the others.
    """

    source: str
    records: list[dict[str, Any]]
    partitions: list[str]
    extras: list[str]


def read_records(uri_or_glob: str) -> ManifestRecords:
    """The rows of a manifest as plain dicts; unknown columns are an error (as in `read_manifest`)."""
    fs, files = _discover(uri_or_glob)
    records: list[dict[str, Any]] = []
    partitions: dict[str, None] = {}
    for path, parts in files:
        for record in _read_file(fs, path):
            for key, value in parts.items():
                if record.get(key) in (None, ""):
                    record[key] = value
                partitions.setdefault(key)
            records.append(record)
    extras = {k: None for r in records for k in r if k not in _COLUMNS}
    check_columns(extras, partitions, source=uri_or_glob)
    return ManifestRecords(uri_or_glob, records, list(partitions), list(extras))


def manifest_frame(raw: ManifestRecords, positions: list[int] | None = None) -> pd.DataFrame:
    """The rows at `positions` (default: all) as the coerced DataFrame, indexed by their position."""
    picked = raw.records if positions is None else [raw.records[i] for i in positions]
    columns = [*COLUMN_NAMES, *raw.extras]
    data = {c: _series([coerce_cell(c, r.get(c)) for r in picked], c) for c in columns}
    df = pd.DataFrame(data, columns=columns)
    if positions is not None:
        df.index = pd.Index(positions)
    df.attrs["partition_columns"] = [p for p in raw.partitions if p not in _COLUMNS]
    return df


def _series(values: list[Any], column: str) -> pd.Series:
    """Nullable numeric dtype where every cell fits; object (values as written) otherwise."""
    kind = _COLUMNS[column][0] if column in _COLUMNS else None
    present = [v for v in values if v is not None]
    fits = all(type(v) is int and _INT64[0] <= v <= _INT64[1] for v in present)  # past int64: as written
    if kind is not None and pa.types.is_integer(kind) and fits:
        return pd.Series(pd.array(values, dtype="Int64"))
    if kind is not None and pa.types.is_floating(kind) and all(type(v) is float for v in present):
        return pd.Series(pd.array(values, dtype="Float64"))
    return pd.Series(values, dtype=object)


def _discover(uri: str) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, dict[str, str]]]]:
    """The manifest files under a URI, each with the `key=value` folders between the base and it."""
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/") or path
    if globlib.has_magic(path):
        matches = sorted(fs.glob(path))
        base = re.split(r"[*?\[]", path, maxsplit=1)[0].rpartition("/")[0]
    elif fs.isdir(path):
        matches, base = [path], path
    elif fs.exists(path):
        if _format(path) is None:
            raise UserError(f"{uri}: unsupported manifest format; use .parquet, .csv or .jsonl")
        return fs, [(path, {})]
    else:
        raise UserError(f"{uri}: not found; pass a manifest file (.parquet, .csv, .jsonl), a glob or a folder")
    files: list[str] = []
    for match in matches:
        files.extend(sorted(fs.find(match)) if fs.isdir(match) else [match])
    files = [f for f in files if _format(f) and not posixpath.basename(f).startswith((".", "_"))]
    if not files:
        raise UserError(f"{uri}: no manifest files found (.parquet, .csv, .jsonl)")
    return fs, [(f, _partitions(f, base)) for f in files]


def _partitions(path: str, base: str) -> dict[str, str]:
    rel = path[len(base) :] if base and path.startswith(base) else path
    folders = rel.strip("/").split("/")[:-1]
    return {m.group(1): m.group(2) for m in map(_PARTITION.match, folders) if m}


def _format(path: str) -> str | None:
    return _FORMATS.get(posixpath.splitext(path)[1].lower())


def _read_file(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    kind = _format(path)
    with fs.open(path, "rb") as f:
        if kind == "parquet":
            return pq.read_table(f).to_pylist()
        if kind == "csv":
            return pd.read_csv(f, dtype=str, keep_default_na=False).to_dict("records")
        records = []
        for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {n}: not valid JSON ({exc.msg}); write one object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
        return records


def write_manifest(df: pd.DataFrame, uri: str) -> str:
    """Write a manifest as Parquet (schema types), CSV (adapters as JSON) or JSONL, chosen by extension."""
    kind = _format(uri)
    if kind is None:
        raise UserError(f"{uri}: unsupported manifest format; use .parquet, .csv or .jsonl")
    records = [{c: coerce_cell(c, v) for c, v in r.items()} for r in df.to_dict("records")]
    if kind == "parquet":
        buf = io.BytesIO()
        pq.write_table(_table(records, list(df.columns), uri), buf)
        data = buf.getvalue()
    else:
        for r in records:
            r["adapters"] = readable_adapters(r.get("adapters") or [])
        if kind == "csv":
            frame = pd.DataFrame(records, columns=list(df.columns), dtype=object)
            frame["adapters"] = [json.dumps(a) if a else None for a in frame["adapters"]]
            data = frame.to_csv(index=False).encode()
        else:
            lines = [json.dumps({k: v for k, v in r.items() if v is not None and v != []}) for r in records]
            data = "".join(line + "\n" for line in lines).encode()
    fs, path = fsspec.core.url_to_fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return uri


def _table(records: list[dict[str, Any]], columns: list[str], uri: str) -> pa.Table:
    arrays, fields = [], []
    for column in columns:
        kind = _COLUMNS[column][0] if column in _COLUMNS else None
        try:
            array = pa.array([r.get(column) for r in records], type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise UserError(f"{uri}: column {column!r}: {str(exc).splitlines()[0]}; fix the values") from None
        arrays.append(array)
        fields.append(pa.field(column, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def uri_exists(uri: str) -> bool:
    """Whether a file is at a URI (any fsspec filesystem); the default `exists` for `check_rows`."""
    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.exists(path))


def image_size(uri: str) -> tuple[int, int]:
    """(width, height) of an image at a URI, reading only its header."""
    from PIL import Image

    with fsspec.open(uri, "rb") as f, Image.open(f) as img:
        return img.size
