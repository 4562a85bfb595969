"""Checking a manifest row by row against the flow, before anything runs.

`check_rows` never raises for a bad row: each problem becomes one line
`row <id>: <field>: <reason; what to do>`, so a 200 000-row manifest reports all its typos at
once and the good rows still run. The row models it validates against live in `manifest`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pydantic import ValidationError

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow
from ipa_ops.flow.stage_specs import GenerateStage
from ipa_ops.manifest.cells import cell_problem
from ipa_ops.manifest.frames import FrameOptions, frame_checks
from ipa_ops.manifest.reading import COLUMN_NAMES, check_columns, coerce_cell, did_you_mean, normalize_adapters
from ipa_ops.manifest.rows import CHOICES, STORE_KEY, TASK_COLUMNS, AdapterRef, FaceOptions, ManifestRow


@dataclass(frozen=True)
class RowProblem:
    """One problem of one row; `str()` is the line users see."""

    row_id: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {_clip(self.row_id, 80)}: {_clip(self.field, 120)}: {_clip(self.reason, 400)}"


def _clip(text: str, limit: int) -> str:
    """One line of bounded length: a 200 kB prompt or a value with newlines echoed in a reason
    must not turn one problem into pages (or into several lines a log parser would split)."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} chars)"


@dataclass
class _Context:
    flow: Flow
    stage: GenerateStage
    exists: Callable[[str], bool]
    store_has: Callable[[str], bool] | None
    image_size: Callable[[str], tuple[int, int]] | None
    meta_columns: list[str]


def check_rows(
    df: pd.DataFrame,
    flow: Flow,
    stage: GenerateStage,
    *,
    exists: Callable[[str], bool],
    store_has: Callable[[str], bool] | None = None,
    image_size: Callable[[str], tuple[int, int]] | None = None,
    earlier_ids: Mapping[str, int] | None = None,
) -> tuple[list[ManifestRow], list[RowProblem]]:
    """Validate every row on its own: the good rows (defaults filled in) and one problem per bad field.

    `exists(uri)` says whether a file is there, `store_has(value)` whether the embedding store holds it
    (a store key, or a URI already extracted), `image_size(uri)` gives (width, height) for the mask
    aspect check. Each is called once per distinct value. Rows are numbered by the frame's index
    (their position in the manifest); `earlier_ids` (id -> row number) names ids of rows left out
    of `df` because they were checked before, so a duplicate of one is still found.
    """
    partitions = df.attrs.get("partition_columns", ())
    check_columns(df.columns, partitions)
    ctx = _Context(
        flow,
        stage,
        _memo(exists),
        _memo(store_has) if store_has else None,
        _memo(image_size) if image_size else None,
        [c for c in df.columns if c not in COLUMN_NAMES],
    )
    rows: list[ManifestRow] = []
    problems: list[RowProblem] = []
    first_at: dict[str, int] = dict(earlier_ids or {})  # ids of rows planned before, by position
    for pos, record in zip((int(i) + 1 for i in df.index), df.to_dict("records"), strict=True):
        deep = [(k, why) for k, why in ((k, cell_problem(v)) for k, v in record.items()) if why]
        raw = {k: v if k == "adapters" or deep else coerce_cell(k, v) for k, v in record.items()}  # adapters: below
        rid = raw.get("id")
        label = _label(rid) if isinstance(rid, str) and rid else f"#{pos}"
        row, issues = (None, deep) if deep else _check_row(raw, ctx)  # too deep for any parser: said, not parsed
        if isinstance(rid, str) and rid:
            if rid in first_at:
                issues.insert(0, ("id", f"duplicate id (first at row #{first_at[rid]}); ids must be unique"))
            first_at.setdefault(rid, pos)
        if issues:
            problems.extend(RowProblem(label, f, r) for f, r in issues)
        elif row is not None:
            rows.append(row)
    return rows, problems


def _check_row(raw: dict[str, Any], ctx: _Context) -> tuple[ManifestRow | None, list[tuple[str, str]]]:
    issues: list[tuple[str, str]] = []
    data = {k: raw[k] for k in COLUMN_NAMES if raw.get(k) is not None}
    for name, value in ctx.stage.defaults.model_dump().items():
        data.setdefault(name, value)
    data.setdefault("model", ctx.stage.model)
    if "seed" not in data:  # without an id the row fails on that alone
        data["seed"] = seed_from_id(data["id"]) if isinstance(data.get("id"), str) else 0
    data["metadata"] = {c: raw[c] for c in ctx.meta_columns if raw.get(c) is not None}
    data["adapters"] = _decode_adapters(raw.get("adapters"), ctx, issues)
    row = None
    try:
        row = ManifestRow.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        typo_at = {err["loc"][:-1] for err in errors if err["type"] == "extra_forbidden"}
        # a misspelt key explains the "required" error of the key it was meant to be: report the typo only
        issues.extend(_describe(e) for e in errors if not (e["type"] in _CONSEQUENT and e["loc"][:-1] in typo_at))
    issues.extend(_cross_checks(data, ctx))
    seen: set[str] = set()
    unique = [(f, r) for f, r in issues if not (f in seen or seen.add(f))]
    return (row if not unique else None), unique


def _decode_adapters(value: Any, ctx: _Context, issues: list[tuple[str, str]]) -> list[Any]:
    """JSON-decode the entries and fill the flow's per-adapter defaults (scale, FaceID options)."""
    entries, error = normalize_adapters(value)
    if error:
        issues.append(("adapters", error))
        return []
    out: list[Any] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            out.append(entry)
            continue
        entry = {k: v for k, v in entry.items() if v is not None}
        spec = ctx.flow.adapters.get(entry.get("adapter")) if isinstance(entry.get("adapter"), str) else None
        if "scale" in entry:
            entry["scale"], problem = decode_scale(entry["scale"])
            if problem:
                issues.append((f"adapters[{i}].scale", problem))
        elif spec is not None:
            entry["scale"] = spec.scale
        if isinstance(entry.get("face"), str):
            try:
                entry["face"] = json.loads(entry["face"])
            except (json.JSONDecodeError, RecursionError) as exc:
                issues.append(
                    (
                        f"adapters[{i}].face",
                        f'not valid JSON ({_msg(exc)}); write e.g. {{"fallback": "skip"}}',
                    )
                )
        elif "face" not in entry and spec is not None and _is_faceid(ctx.flow, entry["adapter"]):
            entry["face"] = {}
        if isinstance(entry.get("frames"), str):
            try:
                entry["frames"] = json.loads(entry["frames"])
            except (json.JSONDecodeError, RecursionError) as exc:
                issues.append((f"adapters[{i}].frames", f'not valid JSON ({_msg(exc)}); write e.g. {{"unfold": true}}'))
        out.append(entry)
    return out


def decode_scale(value: Any) -> tuple[Any, str | None]:
    """Decode a schedule written as JSON text (or already decoded); the problem, if any, as a reason."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            return (
                value,
                f'not valid JSON ({_msg(exc)}); write a number or a schedule object like {{"preset": "style"}}',
            )
    bad = _non_finite(value)
    if bad is not None:
        return value, f"{bad} is not a valid scale"
    try:
        parse_schedule(value)
    except (ValueError, TypeError) as exc:
        return value, str(exc).splitlines()[0] if str(exc) else "not a valid scale schedule"
    return value, None


def _msg(exc: Exception) -> str:
    return str(getattr(exc, "msg", "") or "nested too deeply")


def _non_finite(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf"
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for bad in map(_non_finite, children) if bad), None)


def _cross_checks(data: Mapping[str, Any], ctx: _Context) -> Iterable[tuple[str, str]]:
    """What needs the flow or the files: aliases, task columns, counts, references, mask shapes."""
    flow = ctx.flow
    model = data.get("model")
    if isinstance(model, str) and model not in flow.models:
        yield "model", _unknown("model", model, flow.models)
    for column in TASK_COLUMNS.get(data.get("task"), ()):
        if data.get(column) is None:
            yield column, f"required for task {data['task']}"
    for column in ("init_image", "mask_image", "control_image"):
        if isinstance(data.get(column), str) and not ctx.exists(data[column]):
            yield column, f"{data[column]!r} not found; check the path"
    used: dict[str, int] = {}
    for i, entry in enumerate(data.get("adapters") or []):
        if not isinstance(entry, dict):
            continue
        yield from _adapter_checks(i, entry, data, ctx, used)


def _adapter_checks(
    i: int, entry: dict[str, Any], data: Mapping[str, Any], ctx: _Context, used: dict[str, int]
) -> Iterable[tuple[str, str]]:
    at = f"adapters[{i}]"
    alias = entry.get("adapter")
    if isinstance(alias, str):
        if alias not in ctx.flow.adapters:
            yield f"{at}.adapter", _unknown("adapter", alias, ctx.flow.adapters)
        elif alias in used and _is_faceid(ctx.flow, alias):
            once = "a FaceID adapter is applied once per row: list all its images there"
            yield f"{at}.adapter", f"{alias!r} is already used by adapters[{used[alias]}]; {once}"
        else:
            used.setdefault(alias, i)  # other adapters may repeat: each entry is one application (regional)
            if entry.get("face") and not _uses_faces(ctx.flow, alias, entry.get("face")):
                yield (
                    f"{at}.face",
                    f"face options apply only to FaceID adapters (insightface encoder) and adapters fed face crops "
                    f"(face_crop, or face.crop: true); not {alias!r}",
                )
    images, masks, negatives = (_str_list(entry.get(k)) for k in ("images", "masks", "negative_images"))
    frames = entry.get("frames") if isinstance(entry.get("frames"), dict) else {}
    unfold = frames.get("unfold") is True or frames.get("method") is not None
    counts_ok = images is not None and masks is not None and (not masks or unfold or len(masks) == len(images))
    if isinstance(entry.get("frames"), dict):
        yield from frame_checks(at, entry, data)
    if entry.get("tiled") is True:
        yield from _tiled_checks(at, entry, ctx.flow)
    if images is not None and masks and not counts_ok:
        yield f"{at}.masks", f"{_n(len(masks), 'mask')} for {_n(len(images), 'image')}; give one mask per image or none"
    weights = entry.get("image_weights")
    if images is not None and isinstance(weights, list) and weights and len(weights) != len(images):
        yield f"{at}.image_weights", f"{_n(len(weights), 'weight')} for {_n(len(images), 'image')}; give one per image"
    if images is not None and negatives and len(negatives) not in (1, len(images)):
        yield (
            f"{at}.negative_images",
            f"{_n(len(negatives), 'negative image')} for {_n(len(images), 'image')}; give one (shared) or one each",
        )
    for key in ("images", "negative_images"):
        for j, uri in enumerate(_str_list(entry.get(key)) or []):
            problem = _reference_problem(uri, ctx)
            if problem:
                yield f"{at}.{key}[{j}]", problem
    for j, uri in enumerate(masks or []):
        if not ctx.exists(uri):
            yield f"{at}.masks[{j}]", f"{uri!r} not found; check the path"
        elif counts_ok and entry.get("mask_fit") not in CHOICES["mask_fit"]:
            problem = _aspect_problem(uri, data, ctx)
            if problem:
                yield f"{at}.masks[{j}]", problem


def _tiled_checks(at: str, entry: Mapping[str, Any], flow: Flow) -> Iterable[tuple[str, str]]:
    """A tiled entry (IPAdapterTiled) needs an encoder that stores tiles, one image and no masks."""
    spec = flow.adapters.get(entry.get("adapter")) if isinstance(entry.get("adapter"), str) else None
    encoder = flow.encoders.get(spec.encoder) if spec is not None and spec.encoder else None
    if spec is not None and (encoder is None or encoder.tiles is None):
        name = spec.encoder
        yield f"{at}.tiled", f"encoder {name!r} stores no tiles; set encoders.{name}.tiles: {{}} in the flow"
    if len(_str_list(entry.get("images")) or []) != 1 or len(_str_list(entry.get("masks")) or []) > 1:
        yield f"{at}.tiled", "a tiled entry takes one image (its tiles carry their own regions) and at most one mask"


def _reference_problem(uri: str, ctx: _Context) -> str | None:
    """A reference is fine when the file exists or the embedding store already holds it."""
    if STORE_KEY.match(uri):
        if ctx.store_has is None:
            return f"{uri!r} looks like a store key but no store is configured; set stages.generate.store"
        if ctx.store_has(uri) or ctx.exists(uri):
            return None
        return f"store key {uri!r} is not in the embedding store; run the extract stage or fix the key"
    if ctx.exists(uri) or (ctx.store_has is not None and ctx.store_has(uri)):
        return None
    where = " (no such file, and not in the embedding store)" if ctx.store_has else ""
    return f"{uri!r} not found{where}; check the path"


def _aspect_problem(uri: str, data: Mapping[str, Any], ctx: _Context) -> str | None:
    width, height = data.get("width"), data.get("height")
    if ctx.image_size is None or not all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in (width, height)):
        return None
    try:
        mw, mh = ctx.image_size(uri)
    except Exception as exc:  # an unreadable user file is that row's problem, not a crash
        return f"cannot read the mask's size ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if mh <= 0 or abs((mw / mh) / (width / height) - 1) <= 0.01:
        return None
    return (
        f"aspect ratio of {mw}x{mh} differs from the output's {width}x{height} by more than 1%; "
        "set mask_fit to pad or crop, or give a mask of the output's shape"
    )


_CONSEQUENT = ("missing", "too_short")


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as (field, reason), in the words of the manifest, not of pydantic."""
    loc = err["loc"]
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if n else str(p)) for n, p in enumerate(loc))
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    last = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "extra_forbidden":
        nested = {("face",): FaceOptions, ("frames",): FrameOptions}.get(tuple(loc[-2:-1]))
        owner = nested or (AdapterRef if loc[:1] == ("adapters",) else ManifestRow)
        keys = [k for k in owner.model_fields if k != "metadata"]
        return field, f"unknown key{did_you_mean(str(loc[-1]), keys)}; allowed: {', '.join(keys)}"
    if kind == "missing":
        return field, "required; give every row a unique id" if field == "id" else "required, missing"
    if kind == "literal_error" and last in CHOICES:
        return field, f"must be one of {', '.join(CHOICES[last])}; got {got!r}{did_you_mean(str(got), CHOICES[last])}"
    if kind == "too_short" and last == "images":
        return field, "at least one image (URI or store key) is required"
    ops = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in ops:
        return field, f"must be {ops[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind == "multiple_of":
        return field, f"must be a multiple of {ctx['multiple_of']}, got {got!r}"
    if kind.startswith("int_"):
        return field, f"must be an integer, got {got!r}"
    if kind.startswith("float_") or kind == "finite_number":
        return field, f"must be a finite number, got {got!r}"
    return field, f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"


def _unknown(kind: str, alias: str, defined: Mapping[str, Any]) -> str:
    return f"unknown {kind} alias {alias!r}{did_you_mean(alias, defined)}; defined: {', '.join(defined) or 'none'}"


def _uses_faces(flow: Flow, alias: str, options: Any) -> bool:
    """Face options apply to FaceID adapters and to CLIP adapters fed face crops (by the flow, or `crop: true`)."""
    spec = flow.adapters.get(alias)
    crops = spec is not None and (spec.crops_faces() or spec.face_encoder is not None)
    return _is_faceid(flow, alias) or crops or (isinstance(options, dict) and options.get("crop") is True)


def _is_faceid(flow: Flow, alias: str) -> bool:
    spec = flow.adapters.get(alias)
    encoder = flow.encoders.get(spec.encoder) if spec and spec.encoder else None
    return encoder is not None and encoder.type == "insightface"


def _str_list(value: Any) -> list[str] | None:
    if value is None:
        return []
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _label(row_id: str) -> str:
    """A row id as it can appear inside one line of output."""
    return row_id if row_id.isprintable() and " " not in row_id else repr(row_id)


def seed_from_id(row_id: str) -> int:
    """The seed of a row that gives none: stable across runs and machines."""
    return int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16)


def _memo(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def call(value: str) -> Any:
        if value not in cache:
            cache[value] = fn(value)
        return cache[value]

    return call
