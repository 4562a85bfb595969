"""From a checked manifest row to a keyed plan: what a row asks for, and its row key.

Planning is cheap and runs on the driver: it resolves every reference to a store key, computes
the row key (a hash of everything that decides the image) and so decides what is already done.
Preparing (`prepare.py`) reads the bytes (embeddings, masks, init images) and runs in Ray CPU tasks.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from ipa_ops.flow.face_encoders import face_encoder_alias
from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow
from ipa_ops.flow.stage_specs import GenerateStage
from ipa_ops.generate import conditioning, faceid, loras, records, tasks
from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.contract import RowRequest
from ipa_ops.manifest.frames import FrameOptions, frame_plan
from ipa_ops.outputs.folder import row_key
from ipa_ops.store.dataset import content_key
from ipa_ops.store.encoders import tiles as comfy_tiles
from ipa_ops.store.images import local_or_uri, read_image, sha256_of

_STORE_KEY = re.compile(r"^[0-9a-f]{64}/.+$")


class PlanError(ValueError):
    """A row that cannot be planned; the message names the row id and field."""


@dataclass
class AdapterPlan:
    alias: str
    field: str  # store column: image_embeds or hidden_states
    encoder: str  # encoder id
    keys: list[str]
    negative_keys: list[str]
    masks: list[str]
    combine: str
    scale: Any
    mask_fit: str | None = None
    soft_masks: bool = False
    face: dict[str, Any] | None = None  # FaceID-Plus: crop keys, their clip encoder, shortcut scale (faceid.py)
    image_weights: list[float] | None = None  # per image, before combining (ComfyUI's IPAdapterEncoder weight)
    embeds_scaling: str | None = None  # ComfyUI's embeds scaling; None: V only
    frames: dict[str, Any] | None = None  # video: {"unfold": bool, "weights": one per frame or None} (frames.py)
    tiles: dict[str, Any] | None = None  # IPAdapterTiled: {"frame": [w, h], "boxes": [[l, t, r, b], ...]} (tiles.py)


@dataclass
class RowPlan:
    """Everything needed to prepare one row, JSON-able so it can travel through Ray Data."""

    id: str
    row_key: str
    request: dict[str, Any]  # RowRequest fields other than adapters and images
    init_image: str | None
    mask_image: str | None
    adapters: list[AdapterPlan] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    control_image: str | None = None  # controlnet rows
    record: dict[str, Any] = field(default_factory=dict)  # the complete effective request (records.py); not keyed

    def group_key(self) -> tuple:
        return RowRequest(**self.request).group_key()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> RowPlan:
        data = json.loads(text)
        data["adapters"] = [AdapterPlan(**a) for a in data["adapters"]]
        return RowPlan(**data)


@lru_cache(maxsize=100_000)
def _sha(uri: str) -> str:
    return sha256_of(uri)


def reference_key(ref: str, encoder: str) -> str:
    """A manifest reference (a store key or an image URI) as the store key for this encoder."""
    return ref if _STORE_KEY.match(ref) else content_key(_sha(ref), encoder)


def face_key(ref: str, face_encoder: str) -> str:
    """The face row of a reference: a store key of any encoder names its image by its sha256 part."""
    sha = ref.split("/", 1)[0] if _STORE_KEY.match(ref) else _sha(ref)
    return content_key(sha, face_encoder)


def plan_row(
    row: Any,
    flow: Flow,
    stage: GenerateStage,
    facts: dict[str, AdapterFacts],
    encoder_ids: dict[str, str],
    fingerprints: dict[str, str],
    usable: set[str],
    models: dict[str, tuple[int, int] | None] | None = None,
    faces: faceid.FaceLookup | None = None,
) -> RowPlan:
    """Resolve one checked ManifestRow; raise PlanError naming the row and field.

    `models` gives each model's (cross-attention dim, IP layers), to check every adapter against the
    row's own model; `faces` reads face rows of the store for adapters fed faces (faceid.py), which
    may also raise `faceid.RowSkipped` (the row's no-face fallback is `skip`).
    """
    rid = row.id
    request = dict(
        id=rid,
        prompt=row.prompt,
        seed=int(row.seed),
        model=row.model or stage.model,
        negative_prompt=row.negative_prompt or "",
        task=row.task,
        width=int(row.width),
        height=int(row.height),
        steps=int(row.steps),
        guidance_scale=float(row.guidance_scale),
        strength=float(row.strength),
        scheduler=getattr(row, "scheduler", None) or flow.models[row.model or stage.model].scheduler,
    )
    if row.true_cfg_scale is not None:  # only then in the request (and the row key): other rows' keys stay
        request["true_cfg_scale"] = float(row.true_cfg_scale)
    request.update(tasks.request_fields(row, flow, request["model"]))  # controlnet_scale, num_frames: their tasks
    adapters: list[AdapterPlan] = []
    adapter_records: list[dict[str, Any]] = []
    dropped: dict[str, str] = {}
    face_ctx = faceid.FaceContext(flow, encoder_ids, faces or faceid.FaceLookup(None), usable)
    for i, ref in enumerate(row.adapters or []):
        where = f"row {rid}: adapters[{i}]"
        if ref.adapter not in facts:
            raise PlanError(f"{where}.adapter: adapter {ref.adapter!r} failed pre-flight or is not for this model")
        _check_model(where, ref.adapter, facts[ref.adapter], request["model"], models, flow)
        spec = flow.adapters[ref.adapter]
        encoder = encoder_ids.get(spec.encoder or "")
        if encoder is None:
            raise PlanError(f"{where}.adapter: adapter {ref.adapter!r} has no encoder to read embeddings from")
        images, negatives = _located(ref.images), _located(ref.negative_images or [])
        keys = [reference_key(u, encoder) for u in images]
        face_alias = spec.encoder if facts[ref.adapter].needs_face else face_encoder_alias(flow, spec)
        face_keys = [face_key(u, encoder_ids[face_alias]) for u in images] if face_alias else keys
        face = faceid.face_refs(where, ref, ref.adapter, facts[ref.adapter], face_keys, face_ctx)
        if face is not None and face.dropped:
            dropped[ref.adapter] = face.dropped
            continue
        keys = face.keys if face is not None else keys
        tiles = None
        if getattr(ref, "tiled", False):
            if face is not None:
                raise PlanError(f"{where}.tiled: adapter {ref.adapter!r} is fed faces; tiles are for whole images")
            keys, tiles = _tiles(where, ref, spec.encoder or "", flow, encoder)
            images = [f"{images[0]}#tile-{j}" for j in range(len(keys))]
        negs = [reference_key(u, encoder) for u in negatives]
        shown = images if tiles is not None else ref.images  # errors name what the row wrote (or the tile)
        for kind, refs, found in (("images", shown, keys), ("negative_images", ref.negative_images or [], negs)):
            for j, (uri, key) in enumerate(zip(refs, found, strict=True)):
                if key not in usable:
                    raise PlanError(
                        f"{where}.{kind}[{j}]: {uri} has no {spec.encoder} embedding in store {stage.store}; run "
                        f"`ipa run FLOW --stage extract` over it (or set stages.generate.encode_missing: true)"
                    )
        scale = ref.scale if ref.scale not in (None, "") else spec.scale
        try:
            parse_schedule(scale)
        except ValueError as exc:
            raise PlanError(f"{where}.scale: {exc}") from None
        needs_hidden = facts[ref.adapter].needs_hidden_states and not facts[ref.adapter].needs_face
        field_name = "hidden_states" if needs_hidden else "image_embeds"
        if facts[ref.adapter].raw_face:  # portrait-unnorm: ComfyUI feeds the unnormalised face embedding
            field_name = "face_embedding"
        adapters.append(
            AdapterPlan(
                alias=ref.adapter,
                field=field_name,
                encoder=encoder,
                keys=keys,
                negative_keys=negs,
                masks=_located(ref.masks or []),
                combine=ref.combine or "concat",
                scale=scale,
                mask_fit=getattr(ref, "mask_fit", None),
                soft_masks=bool(getattr(ref, "soft_masks", False)),
                face=face.plus if face is not None else None,
                image_weights=list(ref.image_weights) if getattr(ref, "image_weights", None) else None,
                embeds_scaling=_embeds_scaling(getattr(ref, "embeds_scaling", None)),
                frames=_frames(where, getattr(ref, "frames", None), request, len(ref.images)),
                tiles=tiles,
            )
        )
        adapter_records.append(_adapter_record(adapters[-1], images, negatives, fingerprints[f"adapter:{ref.adapter}"]))
    init = _located_one(getattr(row, "init_image", None))
    mask = _located_one(getattr(row, "mask_image", None))
    control = _located_one(getattr(row, "control_image", None)) if row.task == "controlnet" else None
    extra = tasks.identity(request, flow, fingerprints, _sha(control) if control else None)
    if flow.loras:
        extra["loras"] = loras.identity(flow, fingerprints)
    identity = {
        **{k: v for k, v in request.items() if k != "id"},
        "model_fingerprint": fingerprints[request["model"]],
        "adapters": [
            {
                **{k: v for k, v in asdict(a).items() if not (k in _NEW_FIELDS and v is None)},  # old keys stay
                **conditioning.combine_identity(a.combine, len(a.keys)),
                **_lora_weight(flow, a.alias, facts),
                "fingerprint": fingerprints[f"adapter:{a.alias}"],
                "masks": [_sha(m) for m in a.masks],
                "scale": json.dumps(a.scale, sort_keys=True),
            }
            for a in adapters
        ],
        "init_image": _sha(init) if init else None,
        "mask_image": _sha(mask) if mask else None,
        "loras": {},
        **extra,  # controlnet / motion adapter / scheduler options / LoRA fingerprints and weights
    }
    if request["task"] not in ("img2img", "inpaint"):
        identity.pop("strength")
    if dropped:
        identity["dropped_adapters"] = sorted(dropped)
    provenance = {
        "model_fingerprint": fingerprints[request["model"]],
        "adapter_fingerprints": {a.alias: fingerprints[f"adapter:{a.alias}"] for a in adapters},
        "embedding_keys": [k for a in adapters for k in a.keys + a.negative_keys + (a.face or {}).get("clip_keys", [])],
        **({"dropped_adapters": dropped} if dropped else {}),
        **extra,
    }
    report = row.result_fields()
    key = row_key(identity)
    images = {"init_image": init, "mask_image": mask, "control_image": control}
    refs = {name: records.image_ref(uri, _sha(uri) if uri else None) for name, uri in images.items()}
    record = records.row_record(request, key, adapter_records, refs, fingerprints, flow)
    return RowPlan(rid, key, request, init, mask, adapters, provenance, report, control, record)


def _content_sha(ref: str) -> str:
    """The sha256 of a reference's image: a store key's first part, else the file's bytes."""
    return ref.split("/", 1)[0] if _STORE_KEY.match(ref) else _sha(ref)


def _located(uris: list[str]) -> list[str]:
    """Input paths as the run resolves them: relative ones against this process's working folder, made
    absolute here on the driver, so Ray workers (whatever their folder) and `ipa reproduce` (run from
    anywhere) read the same files. Store keys and URIs with a protocol stay as given."""
    return [u if not u or _STORE_KEY.match(u) else local_or_uri(u) for u in uris]


def _located_one(uri: str | None) -> str | None:
    return _located([uri])[0] if uri else None


def _adapter_record(plan: AdapterPlan, images: list[str], negatives: list[str], fingerprint: str) -> dict[str, Any]:
    """One adapter's part of the row record: what the manifest named and what was read for it."""

    def refs(given: list[str], keys: list[str], tiled: bool = False) -> list[dict[str, Any]]:
        pairs = zip(given, keys, strict=True)  # a tile's content id is its derived sha, the first part of its key
        return [
            records.reference(u, k, k.split("/", 1)[0] if tiled else _content_sha(u), bool(_STORE_KEY.match(u)))
            for u, k in pairs
        ]

    return {
        "alias": plan.alias,
        "fingerprint": fingerprint,
        "encoder": plan.encoder,
        "field": plan.field,
        "references": refs(images, plan.keys, tiled=plan.tiles is not None),
        "negatives": refs(negatives, plan.negative_keys),
        "masks": [{"uri": m, "sha256": _sha(m)} for m in plan.masks],
        "combine": plan.combine,
        "mask_fit": plan.mask_fit,
        "soft_masks": plan.soft_masks,
        "scale": plan.scale,
        "schedule_hash": None,
        "face": plan.face,
        **{name: getattr(plan, name) for name in _COMFY_FIELDS if getattr(plan, name) is not None},  # old records stay
    }


# left out of row keys (and records) when unset: old keys stay
_COMFY_FIELDS = ("image_weights", "embeds_scaling", "frames", "tiles")
_NEW_FIELDS = ("face", *_COMFY_FIELDS)


def _lora_weight(flow: Flow, alias: str, facts: dict[str, AdapterFacts]) -> dict[str, float]:
    """A FaceID LoRA strength other than diffusers' 1.0 decides the image; the default adds nothing."""
    weight = flow.adapters[alias].lora_weight
    return {"lora_weight": weight} if facts[alias].lora and weight != 1.0 else {}


def _embeds_scaling(value: str | None) -> str | None:
    """ComfyUI's default (V only, diffusers' maths) is stored as unset, so old row keys stay."""
    return None if value in (None, "", "V only") else value


def _tiles(where: str, ref: Any, alias: str, flow: Flow, encoder: str) -> tuple[list[str], dict[str, Any]]:
    """The store keys and regions of a tiled entry's tiles (IPAdapterTiled), from its image's size."""
    spec = flow.encoders[alias]
    if spec.tiles is None:
        raise PlanError(f"{where}.tiled: encoder {alias!r} stores no tiles; set encoders.{alias}.tiles: {{}} "
                        "in the flow and run the extract stage")  # fmt: skip
    if len(ref.images) != 1 or len(ref.masks or []) > 1 or len(ref.negative_images or []) > 1:
        raise PlanError(f"{where}.tiled: a tiled entry takes one image (its tiles carry their own regions), at "
                        "most one mask and at most one negative image")  # fmt: skip
    uri = ref.images[0]
    if _STORE_KEY.match(uri):
        raise PlanError(f"{where}.images[0]: a tiled entry needs the image file, not a store key (its size decides "
                        "the tiles)")  # fmt: skip
    sha = _sha(uri)
    plan = comfy_tiles.layout(*_decoded_size(uri))  # the image as extract decodes it decides the tiles
    keys = [content_key(comfy_tiles.tile_sha(sha, j, spec.tiles.sharpening), encoder) for j in range(len(plan.boxes))]
    size = _decoded_size(uri)
    return keys, {"frame": list(plan.frame), "boxes": [list(b) for b in plan.boxes], "size": list(size)}


@lru_cache(maxsize=10_000)
def _decoded_size(uri: str) -> tuple[int, int]:
    """An image's size as the extract stage decodes it (EXIF orientation applied)."""
    return read_image(uri)[0].size


def _frames(where: str, options: FrameOptions | None, request: dict[str, Any], images: int) -> dict[str, Any] | None:
    """A video row's per-frame controls, resolved to one weight per frame; an error line otherwise."""
    if options is not None and request["task"] != "video":
        raise PlanError(f"{where}.frames: per-frame controls are for task video rows; this row is {request['task']}")
    try:
        return frame_plan(options, request.get("num_frames"), images)
    except ValueError as exc:
        raise PlanError(f"{where}.{exc}") from None


def _check_model(
    where: str, alias: str, facts: AdapterFacts, model: str, models: dict[str, Any] | None, flow: Flow
) -> None:
    """An adapter must be built for the row's own model (a flow may mix SD1.5 and SDXL models)."""
    dims = (models or {}).get(model)
    if dims is None or dims == (facts.cross_attention_dim, facts.ip_layers):
        return
    fits = [m for m, d in (models or {}).items() if d == (facts.cross_attention_dim, facts.ip_layers)]
    hint = f"set the row's model to {' or '.join(map(repr, fits))}" if fits else "pick an adapter made for it"
    raise PlanError(
        f"{where}.adapter: adapter {alias!r} ({flow.adapters[alias].weight_name}) is built for cross-attention dim "
        f"{facts.cross_attention_dim} with {facts.ip_layers} IP layers, but the row's model {model!r} has {dims[0]} "
        f"with {dims[1]}; {hint}"
    )
