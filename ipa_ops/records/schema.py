"""The record as results columns: Arrow types, and the conversions between a record and its columns.

The record (a dict, version `RECORD_VERSION`) holds nested objects; in the results its fields are
top-level columns of real Arrow types (structs and lists, which pandas, pyarrow and duckdb read),
except the polymorphic ones (a scale spec, scheduler options, the model sources), which are JSON
text. `to_columns` and `from_columns` convert both ways; a results row written before records
existed has none of these columns and `from_columns` says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

RECORD_VERSION = 1

_IMAGE = pa.struct([("uri", pa.string()), ("sha256", pa.string())])
_REFERENCE = pa.struct([("uri", pa.string()), ("sha256", pa.string()), ("key", pa.string())])
_FACE = pa.struct(
    [("clip_keys", pa.list_(pa.string())), ("clip_encoder", pa.string()), ("shortcut_scale", pa.float64())]
)
_ADAPTER = pa.struct(
    [
        ("alias", pa.string()),
        ("fingerprint", pa.string()),
        ("encoder", pa.string()),
        ("field", pa.string()),
        ("references", pa.list_(_REFERENCE)),
        ("negatives", pa.list_(_REFERENCE)),
        ("masks", pa.list_(_IMAGE)),
        ("combine", pa.string()),
        ("mask_fit", pa.string()),
        ("soft_masks", pa.bool_()),
        ("scale", pa.string()),
        ("schedule_hash", pa.string()),
        ("face", _FACE),
        ("image_weights", pa.list_(pa.float64())),
        ("embeds_scaling", pa.string()),
        ("frames", pa.struct([("unfold", pa.bool_()), ("weights", pa.list_(pa.float64())),
                              ("slots", pa.list_(pa.int64()))])),  # fmt: skip
        ("tiles", pa.struct([("frame", pa.list_(pa.int64())), ("boxes", pa.list_(pa.list_(pa.int64()))),
                             ("size", pa.list_(pa.int64()))])),  # fmt: skip
    ]
)
_SET_ONLY = ("image_weights", "embeds_scaling", "frames", "tiles")  # in a record only when set (plan.py)
_SCHEDULER = pa.struct(
    [("name", pa.string()), ("class_name", pa.string()), ("options", pa.string()), ("config_hash", pa.string())]
)
_COMPONENT = pa.struct([("kind", pa.string()), ("alias", pa.string()), ("fingerprint", pa.string())])
_LORA = pa.struct([("alias", pa.string()), ("fingerprint", pa.string()), ("weight", pa.float64())])

# column -> (type, doc); `prompt`, `seed` and the fingerprints are results columns already (outputs/folder.py)
RECORD_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "record_version": (pa.int32(), "Version of the record columns; null on rows written before records existed."),
    "task": (pa.string(), "text2img, img2img, inpaint, controlnet or video."),
    "model": (pa.string(), "Model alias in the flow (its fingerprint: model_fingerprint)."),
    "model_hash": (pa.string(), "First 10 hex of the sha256 of the model's UNet weights (A1111 `Model hash`)."),
    "negative_prompt": (pa.string(), "Negative prompt."),
    "width": (pa.int64(), "Image width in pixels."),
    "height": (pa.int64(), "Image height in pixels."),
    "steps": (pa.int64(), "Denoising steps."),
    "guidance_scale": (pa.float64(), "Classifier-free guidance scale."),
    "scheduler": (_SCHEDULER, "Scheduler: the row's choice (null: the model's own), class, options JSON, config hash."),
    "strength": (pa.float64(), "img2img / inpaint strength; null for other tasks."),
    "controlnet_scale": (pa.float64(), "controlnet_conditioning_scale; null unless task is controlnet."),
    "num_frames": (pa.int64(), "Video frames; null unless task is video."),
    "init_image": (_IMAGE, "img2img / inpaint input image: URI and content sha256."),
    "mask_image": (_IMAGE, "Inpaint mask: URI and content sha256."),
    "control_image": (_IMAGE, "ControlNet conditioning image: URI and content sha256."),
    "components": (pa.list_(_COMPONENT), "Task models (controlnet, motion_adapter): alias and fingerprint."),
    "loras": (pa.list_(_LORA), "The flow's LoRAs, active for the row: alias, file fingerprint, weight."),
    "adapters": (
        pa.list_(_ADAPTER),
        "Per adapter: alias, fingerprint, encoder, store field, references and negatives (URI, sha256, store key), "
        "masks (URI, sha256), combine, mask fit, scale spec (JSON), effective schedule hash, FaceID-Plus options, "
        "ComfyUI's image weights, embeds scaling, per-frame controls (video) and tile regions (tiled entries).",
    ),
    "batch": (
        pa.struct([("row_keys", pa.list_(pa.string())), ("torch_threads", pa.int64()), ("device", pa.string())]),
        "The pipeline call the row shared (row keys in call order), its torch threads and device: on CPU both "
        "decide the last bit of an image, so `ipa reproduce` remakes the same call.",
    ),
    "true_cfg_scale": (pa.float64(), "Flux true CFG scale (a second pass with the negative prompt); null when off."),
    "store": (pa.string(), "Embedding store URI the references were read from."),
    "sources": (pa.string(), "Model sources (the flow's model, adapter, LoRA, encoder sections) and mirror, as JSON."),
}
RECORD_SCHEMA = pa.schema([(k, t) for k, (t, _) in RECORD_COLUMNS.items()])


def to_columns(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as results column values (polymorphic parts as JSON text)."""
    out: dict[str, Any] = {name: record.get(name) for name in RECORD_COLUMNS if name != "record_version"}
    out["record_version"] = record.get("version")
    if out["scheduler"] is not None:
        out["scheduler"] = {**out["scheduler"], "options": _dump(out["scheduler"].get("options") or {})}
    out["sources"] = None if record.get("sources") is None else _dump(record["sources"])
    out["adapters"] = [{**a, "scale": _dump(a.get("scale"))} for a in record.get("adapters") or []]
    return out


def from_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """A results row (a pyarrow `to_pylist` dict) back to its record; ValueError when it has none."""
    if row.get("record_version") is None:
        raise ValueError(
            f"row {row.get('id')}: results row {row.get('row_key')} has no record (written before records existed, "
            f"or not ok); generate it again to record it"
        )
    record: dict[str, Any] = {"version": int(row["record_version"])}
    for name in ("id", "row_key", "prompt", "seed", "model_fingerprint"):
        record[name] = row.get(name)
    for name in RECORD_COLUMNS:
        if name != "record_version":
            record[name] = row.get(name)
    if record["scheduler"] is not None:
        record["scheduler"] = {**record["scheduler"], "options": json.loads(record["scheduler"]["options"] or "{}")}
    record["sources"] = json.loads(record["sources"]) if record.get("sources") else None
    record["adapters"] = [
        {**{k: v for k, v in a.items() if not (k in _SET_ONLY and v is None)}, "scale": json.loads(a["scale"])}
        for a in record.get("adapters") or []
    ]
    return record


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
