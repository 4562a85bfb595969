"""Sweeps: a small YAML spec expanded as a cartesian product into a manifest.

    name: style-sweep
    adapter: style                  # the entry that `reference`, `scale` and `preset` change
    base: {width: 512, height: 512, adapters: [{adapter: style, images: [data/refs/ref-0.png]}]}
    vary: {prompt: [a cat, a dog], seed: [1, 2], scale: [0.4, 0.8]}

Each row's id is `<name>-<hash of its varied values>`: re-expanding gives the same ids, and adding
a value to a list keeps the ids of the rows that were already there, so a grown sweep reruns only
its new rows (together with the output directory's done keys).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipa_ops.canonical import canonical_json
from ipa_ops.errors import UserError
from ipa_ops.manifest.reading import COLUMN_NAMES, check_columns, write_manifest

AXES = {
    "reference": "images of the target adapter: a URI (or store key), or a list of them",
    "scale": "the target adapter's scale schedule (any form)",
    "preset": "a layer preset name for the target adapter; combines with its scale as the value",
}
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=NAME, description="Id prefix; default: the spec file's name.")
    adapter: str | None = Field(
        None, description="Alias whose entry `reference`, `scale` and `preset` change; default: the first in base."
    )
    base: dict[str, Any] = Field(default_factory=dict, description="Columns every row shares.")
    vary: dict[str, list[Any]] = Field(
        description="Column (or reference, scale, preset) -> values; one row per combination."
    )


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; one-line errors name the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass a sweep spec such as manifests/sweep-example.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = SweepSpec.model_validate(data)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"{path}: {where}: {err['msg'][0].lower()}{err['msg'][1:]}") from None
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    return spec


def expand_sweep(spec: SweepSpec, source: str = "sweep") -> pd.DataFrame:
    """Every combination of the `vary` values as a manifest row with a stable id."""
    name = spec.name or "sweep"
    _check(spec, source)
    axes = list(spec.vary)
    rows = []
    for combo in itertools.product(*(spec.vary[a] for a in axes)):
        varied = dict(zip(axes, combo, strict=True))
        row = copy.deepcopy(spec.base)
        for column, value in varied.items():
            if column not in AXES:
                row[column] = copy.deepcopy(value)
        if any(a in varied for a in AXES):
            _apply_axes(row, varied, spec.adapter, source)
        row["id"] = f"{name}-{sweep_hash(varied)}"
        rows.append(row)
    known = [c for c in COLUMN_NAMES if any(c in r for r in rows)]
    extras = list(dict.fromkeys(c for r in rows for c in r if c not in COLUMN_NAMES))
    return pd.DataFrame(rows, columns=known + extras, dtype=object)


def sweep_hash(varied: dict[str, Any]) -> str:
    """12 hex of the varied values alone, so other rows' values never change a row's id."""
    return hashlib.sha256(canonical_json(varied).encode()).hexdigest()[:12]


def _check(spec: SweepSpec, source: str) -> None:
    for section, columns in (("base", list(spec.base)), ("vary", [c for c in spec.vary if c not in AXES])):
        check_columns(columns, source=f"{source}: {section}")
        if "id" in columns:
            raise UserError(f"{source}: {section}.id: ids are made by the sweep (<name>-<hash>); remove it")
    for axis, values in spec.vary.items():
        if not values:
            raise UserError(f"{source}: vary.{axis}: give at least one value")
        seen: set[str] = set()
        for value in values:
            text = canonical_json(value)
            if text in seen:
                raise UserError(f"{source}: vary.{axis}: value {value!r} appears twice; list each value once")
            seen.add(text)
    if "adapters" in spec.vary and any(a in spec.vary for a in AXES):
        raise UserError(f"{source}: vary: `adapters` and {', '.join(a for a in AXES if a in spec.vary)} both vary")


def _apply_axes(row: dict[str, Any], varied: dict[str, Any], alias: str | None, source: str) -> None:
    """Put the reference/scale/preset values into the target adapter entry of this row."""
    entries = row.setdefault("adapters", [])
    if not isinstance(entries, list):
        raise UserError(f"{source}: base.adapters: must be a list of adapter entries")
    entry = next((e for e in entries if isinstance(e, dict) and (alias is None or e.get("adapter") == alias)), None)
    if entry is None:
        if alias is None:
            axes = ", ".join(a for a in AXES if a in varied)
            raise UserError(f"{source}: vary: {axes} need an adapter entry; set `adapter:` or base.adapters")
        entry = {"adapter": alias}
        entries.append(entry)
    if "reference" in varied:
        ref = varied["reference"]
        entry["images"] = [ref] if isinstance(ref, str) else list(ref)
    if "scale" in varied:
        entry["scale"] = copy.deepcopy(varied["scale"])
    if "preset" in varied:
        current = entry.get("scale")
        if isinstance(current, int | float) and not isinstance(current, bool):
            entry["scale"] = {"preset": varied["preset"], "value": current}
        elif isinstance(current, dict):
            entry["scale"] = {**current, "preset": varied["preset"]}
        else:
            entry["scale"] = {"preset": varied["preset"]}


def sweep_to_manifest(spec_path: str | Path, out: str) -> int:
    """`ipa manifest sweep SPEC -o OUT`: expand and write; returns the row count."""
    spec = load_sweep(spec_path)
    df = expand_sweep(spec, str(spec_path))
    write_manifest(df, out)
    return len(df)
