"""A row's record: the complete effective request, built while the row is planned.

`plan_row` gives each plan the per-row part (prompt, size, steps, adapters with their
references, masks and scale specs, task inputs with their content hashes); `finish` adds what
is the same for every row of a model in a run (the model sources from the flow, the model hash
A1111 readers match on, the scheduler's class and config hash, the store). The generator adds
the effective schedule hashes (`with_schedule_hashes`). The record never enters the row key.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ipa_ops.canonical import canonical_json
from ipa_ops.flow.models import SCHEDULERS
from ipa_ops.flow.sources import resolve
from ipa_ops.flow.spec import Flow
from ipa_ops.records.schema import RECORD_VERSION

_CHUNK = 1 << 22


def image_ref(uri: str | None, sha256: str | None) -> dict[str, str] | None:
    return None if uri is None else {"uri": uri, "sha256": sha256 or ""}


def reference(given: str, key: str, sha256: str, is_store_key: bool) -> dict[str, Any]:
    """One adapter reference: its URI (None when the manifest named a store key), content hash, store key."""
    return {"uri": None if is_store_key else given, "sha256": sha256, "key": key}


def row_record(
    request: dict[str, Any],
    row_key: str,
    adapters: list[dict[str, Any]],
    images: dict[str, dict[str, str] | None],
    fingerprints: dict[str, str],
    flow: Flow,
) -> dict[str, Any]:
    """The per-row part of a record; `adapters` already hold their references, masks and scale."""
    task, spec = request["task"], flow.models[request["model"]]
    components = []
    if task == "controlnet" and spec.controlnet:
        components.append(("controlnet", spec.controlnet))
    if task == "video" and spec.motion_adapter:
        components.append(("motion_adapter", spec.motion_adapter))
    return {
        "version": RECORD_VERSION,
        "id": request["id"],
        "row_key": row_key,
        "task": task,
        "model": request["model"],
        "model_fingerprint": fingerprints.get(request["model"]),
        "model_hash": None,
        "prompt": request["prompt"],
        "negative_prompt": request["negative_prompt"],
        "seed": int(request["seed"]),
        "width": int(request["width"]),
        "height": int(request["height"]),
        "steps": int(request["steps"]),
        "guidance_scale": float(request["guidance_scale"]),
        "scheduler": {"name": request.get("scheduler"), "class_name": None, "options": {}, "config_hash": None},
        "strength": float(request["strength"]) if task in ("img2img", "inpaint") else None,
        "controlnet_scale": request.get("controlnet_scale"),
        "true_cfg_scale": request.get("true_cfg_scale"),
        "num_frames": request.get("num_frames"),
        "init_image": images.get("init_image"),
        "mask_image": images.get("mask_image"),
        "control_image": images.get("control_image"),
        "components": [
            {"kind": kind, "alias": alias, "fingerprint": fingerprints.get(f"{kind}:{alias}")}
            for kind, alias in components
        ],
        "loras": [
            {"alias": alias, "fingerprint": fingerprints.get(f"lora:{alias}"), "weight": float(lora.weight)}
            for alias, lora in flow.loras.items()
        ],
        "adapters": adapters,
        "store": None,
        "sources": None,
    }


def run_parts(flow: Flow, store: str | None, models: set[str]) -> dict[str, dict[str, Any]]:
    """Per model alias in `models`, the record fields every row of that model shares in this run."""
    mirror = flow.mirror_root()
    parts = {}
    for alias in sorted(models):
        spec = flow.models[alias]
        folder = resolve(spec.source, spec.subfolder, None, mirror, f"model {alias!r}").folder
        base = _scheduler_config(folder)
        parts[alias] = {
            "model_hash": model_hash(folder, spec.variant),
            "sources": sources(flow, alias),
            "store": _absolute(store),
            "_scheduler_base": base,
            "_scheduler_options": dict(spec.scheduler_options),
        }
    return parts


def finish(record: dict[str, Any], parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fill a row record's shared fields (model hash, sources, scheduler, store) from `run_parts`."""
    shared = parts[record["model"]]
    name = record["scheduler"]["name"]
    base = shared["_scheduler_base"]
    class_name = SCHEDULERS[name] if name else base.get("_class_name")
    options = shared["_scheduler_options"]
    config = canonical_json({"class": class_name, "base": base, "options": options})
    record.update({k: v for k, v in shared.items() if not k.startswith("_")})
    record["scheduler"] = {
        "name": name,
        "class_name": class_name,
        "options": options,
        "config_hash": hashlib.sha256(config.encode()).hexdigest()[:16],
    }
    return record


def with_schedule_hashes(record: dict[str, Any], hashes: dict[str, str]) -> dict[str, Any]:
    """The record with each adapter's effective [layers x steps] schedule hash, as the generator computed it."""
    if not record:
        return record
    seen: dict[str, str] = {}
    adapters = []
    for a in record["adapters"]:
        key = application_key(a["alias"], seen)
        seen[key] = ""
        adapters.append({**a, "schedule_hash": hashes.get(key, a.get("schedule_hash"))})
    return {**record, "adapters": adapters}


def application_key(alias: str, taken: dict[str, str]) -> str:
    """The schedule-hash key of an adapter entry: its alias, then `alias#2`, `alias#3` for the entries that
    apply the same adapter again in one row (in the row's order)."""
    if alias not in taken:
        return alias
    return next(f"{alias}#{n}" for n in range(2, len(taken) + 3) if f"{alias}#{n}" not in taken)


def with_run(record: dict[str, Any], hashes: dict[str, str], batch: dict[str, Any] | None) -> dict[str, Any]:
    """The record as generated: its schedule hashes and the pipeline call it shared (`batch`)."""
    if not record:
        return record
    return {**with_schedule_hashes(record, hashes), "batch": batch or None}


def mate(record: dict[str, Any]) -> dict[str, Any]:
    """A batchmate's record as an image carries it (so the image alone remakes the call): no sources, no batch."""
    return {k: v for k, v in record.items() if k not in ("sources", "batch", "batch_records")}


def for_image(record: dict[str, Any], mates: list[dict[str, Any]]) -> dict[str, Any]:
    """What goes inside the image: the record and the records of the rows it shared its pipeline call with."""
    return {**record, "batch_records": [mate(m) for m in mates]} if mates else record


def sources(flow: Flow, model: str) -> dict[str, Any]:
    """The flow sections a row's generator loads: its model (and task models), every adapter and LoRA, the encoders.

    Every adapter, because the generator loads all of a flow's adapters that fit the model (a FaceID
    checkpoint's own LoRA then changes every row of the model, not only the rows using it).
    """
    spec = flow.models[model]
    mirror = _absolute(flow.mirror_root())

    def dump(section: dict[str, Any], only: list[str | None] | None = None) -> dict[str, Any]:
        return {a: s.model_dump(mode="json") for a, s in section.items() if only is None or a in only}

    return {
        "mirror": mirror,
        "models": {model: spec.model_dump(mode="json")},
        "controlnets": dump(flow.controlnets, [spec.controlnet]),
        "motion_adapters": dump(flow.motion_adapters, [spec.motion_adapter]),
        "adapters": dump(flow.adapters),
        "encoders": dump(flow.encoders),
        "loras": dump(flow.loras),
    }


def _absolute(uri: str | None) -> str | None:
    """A local path as an absolute one (a record is read from other folders); URIs as they are."""
    return os.path.abspath(os.path.expanduser(uri)) if uri and "://" not in uri else uri


def _scheduler_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    config.pop("_diffusers_version", None)  # the file's writer, not the schedule
    return config


def model_hash(folder: Path, variant: str | None = None) -> str | None:
    """First 10 hex of the sha256 of the denoiser's weights file (A1111's `Model hash`; None when absent).

    A diffusers folder has no single checkpoint; its UNet (or transformer) weights are what a
    checkpoint's hash tells apart. Hashed whole once per file version (size, mtime) and process.
    """
    for sub in ("unet", "transformer"):
        part = Path(folder) / sub
        names = [f"diffusion_pytorch_model.{variant}.safetensors", f"diffusion_pytorch_model.{variant}.bin"]
        names = (names if variant else []) + ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        for name in names:
            file = part / name
            if file.is_file():
                stat = file.stat()
                return _sha256(str(file), stat.st_size, stat.st_mtime_ns)[:10]
    return None


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
