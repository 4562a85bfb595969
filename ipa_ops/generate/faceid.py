"""Faces: FaceID adapters and CLIP face adapters, from planning a row to binding its tensors.

Three kinds of adapter read faces from the embedding store, which the extract stage fills with,
per image and InsightFace encoder, a row `<sha>/<faces id>` (status `ok` or `no_face`, the normed
embedding, the aligned 224 px crop and its `crop_sha256`) and, per CLIP encoder of the same
stage, the crop's CLIP row `<crop_sha256>/<clip id>`:

- FaceID (`ip-adapter-faceid*`): the normed embedding, as `ip_adapter_image_embeds` (no image
  encoder). Portrait: several faces of one row are its images, attended jointly (16 tokens each).
- FaceID-Plus (v1/v2): the same, plus the CLIP hidden states of the aligned crop, which diffusers
  reads from `unet.encoder_hid_proj.image_projection_layers[i].clip_embeds` (with `.shortcut` and
  `.shortcut_scale` for v2). diffusers sets these once for the whole pipeline; `bind` sets them for
  one pipeline call from the rows' own tensors (batch dim per row, CFG halves), so rows with
  different faces and shortcut scales share a batch.
- CLIP face adapters (plus-face, full-face): by default fed the crop's CLIP embedding instead of the
  whole image (`face_crop`, or `face: {crop: false}` per row).

The FaceID checkpoints carry the LoRA they were trained with; diffusers' `load_ip_adapter` loads it
as PEFT adapter `faceid_<i>` and leaves it on for every call. Here it is on exactly for the rows that
use that adapter (their documented diffusers call loads it; the other rows' calls do not), so rows
are grouped by the set of FaceID LoRAs they need (`lora_key`), and `bind` switches only the FaceID
adapters, leaving any LoRA the flow itself loaded as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ipa_ops.flow.face_encoders import crop_clip_alias, face_encoder_alias, shortcut
from ipa_ops.flow.spec import AdapterSpec, Flow
from ipa_ops.generate import conditioning
from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.store.dataset import EmbeddingStore, content_key


class FaceError(ValueError):
    """A row whose face references cannot be used; the message names row, field and what to do."""


class RowSkipped(FaceError):
    """A row skipped by its no-face fallback (`skip`): a `skipped` results row with this reason."""


def feeds_crops(spec: AdapterSpec, facts: AdapterFacts, options: Any) -> bool:
    """Whether a CLIP adapter reads face-crop embeddings for this row (row `face.crop`, else the flow)."""
    if facts.needs_face:
        return False
    crop = getattr(options, "crop", None) if options is not None else None
    return spec.crops_faces() if crop is None else bool(crop)


# -- planning ------------------------------------------------------------------------------------
class FaceLookup:
    """Face rows of the store by key (status, error, crop hash), read once each, on the driver."""

    def __init__(self, store: EmbeddingStore | None):
        self.store = store
        self._rows: dict[str, dict[str, Any]] = {}

    def row(self, key: str) -> dict[str, Any]:
        if key not in self._rows:
            if self.store is None:
                self._rows[key] = {"status": "missing", "error": "no embedding store configured"}
            else:
                self._rows[key] = self.store.rows([key]).iloc[0].to_dict()
        return self._rows[key]


@dataclass
class FaceRefs:
    """What a face-reading adapter of one row reads: main keys, and FaceID-Plus crop keys."""

    keys: list[str]
    plus: dict[str, Any] | None = None  # {"clip_keys", "clip_encoder", "shortcut_scale"} for FaceID-Plus
    dropped: str = ""  # non-empty: the adapter is dropped for this row (fallback drop_adapter), and why


@dataclass
class FaceContext:
    """What resolving face references needs from the plan: flow, encoder ids, store rows, usable keys."""

    flow: Flow
    encoder_ids: dict[str, str]
    lookup: FaceLookup
    usable: set[str]


def face_refs(
    where: str, ref: Any, alias: str, facts: AdapterFacts, face_keys: list[str], ctx: FaceContext
) -> FaceRefs | None:
    """Resolve one adapter entry of a row when it reads faces (None when it does not).

    `face_keys` are the references as store keys of the face encoder. A reference without a face
    follows the row's `face.fallback`, else the adapter's flow `fallback` (default: the row fails).
    """
    spec = ctx.flow.adapters[alias]
    crops = feeds_crops(spec, facts, ref.face)
    if not facts.needs_face and not crops:
        return None
    face_alias = spec.encoder if facts.needs_face else face_encoder_alias(ctx.flow, spec)
    if face_alias is None:
        raise FaceError(f"{where}.adapter: {alias!r} is fed face crops but no face encoder is known; set "
                        f"adapters.{alias}.face_encoder, or face: {{crop: false}} for whole images")  # fmt: skip
    rows = [ctx.lookup.row(k) for k in face_keys]
    for j, (uri, row) in enumerate(zip(ref.images, rows, strict=True)):
        if row["status"] == "no_face":
            dropped = _no_face(f"{where}.images[{j}]", uri, _reason(row), ref, alias, spec)
            return FaceRefs([], dropped=dropped)
        if row["status"] != "ok":
            raise FaceError(
                f"{where}.images[{j}]: {uri} has no usable {face_alias} face row in the store ({row['status']}: "
                f"{row.get('error') or 'not extracted'}); run `ipa run FLOW --stage extract` with encoder {face_alias}"
            )
    plus = None
    keys = face_keys
    if crops or facts.kind == "faceid_plus":
        clip_alias = spec.encoder if crops else crop_clip_alias(ctx.flow, spec)
        if clip_alias is None:
            raise FaceError(f"{where}.adapter: {alias!r} needs CLIP hidden states of the face crops; set "
                            f"adapters.{alias}.clip_encoder to a clip encoder with hidden_states: true")  # fmt: skip
        crop_keys = [content_key(str(r["crop_sha256"]), ctx.encoder_ids[clip_alias]) for r in rows]
        for j, (uri, key) in enumerate(zip(ref.images, crop_keys, strict=True)):
            if key not in ctx.usable:
                raise FaceError(
                    f"{where}.images[{j}]: the aligned face crop of {uri} has no {clip_alias} embedding in the store; "
                    f"run extract with encoders [{face_alias}, {clip_alias}] in one stage (crops are encoded there)"
                )
        if crops:
            keys = crop_keys
        else:
            scale = getattr(ref.face, "shortcut_scale", None) if ref.face is not None else None
            plus = {
                "clip_keys": crop_keys,
                "clip_encoder": ctx.encoder_ids[clip_alias],
                "shortcut_scale": float(spec.shortcut_scale if scale is None else scale),
            }
    return FaceRefs(keys, plus)


def _reason(row: dict[str, Any]) -> str:
    """The store's no-face reason without the URI it was first read under (the row names its own)."""
    error = str(row.get("error") or "no face found")
    prefix = f"{row.get('source_uri')}: "
    return error[len(prefix) :] if error.startswith(prefix) else error


def _no_face(field_path: str, uri: str, reason: str, ref: Any, alias: str, spec: AdapterSpec) -> str:
    """Apply the no-face fallback: raise (error, skip) or return the reason the adapter is dropped."""
    row_fallback = getattr(ref.face, "fallback", None) if ref.face is not None else None
    fallback = row_fallback or spec.fallback
    line = f"{field_path}: {uri}: {reason}"
    if fallback == "skip":
        raise RowSkipped(f"{line} ({'face.fallback' if row_fallback else f'adapters.{alias}.fallback'}: skip)")
    if fallback == "drop_adapter":
        return line
    raise FaceError(f"{line}; give a reference with a face, or set face.fallback to skip or drop_adapter")


def attach(x: AdapterInput, plus: dict[str, Any], combine_mode: str, store: EmbeddingStore) -> None:
    """Give a FaceID-Plus input its crops' CLIP hidden states (and negatives) and shortcut scale."""
    clip = conditioning.combine(torch.stack(store.get(plus["clip_keys"], field="hidden_states")), combine_mode)
    uncond = store.uncond(plus["clip_encoder"], "hidden_states")
    x.clip_embeds = clip
    x.clip_negative = conditioning.negatives(uncond, clip.shape[0], None, combine_mode)
    x.shortcut_scale = float(plus["shortcut_scale"])


# -- generating ----------------------------------------------------------------------------------
@dataclass
class FaceIDModel:
    """The FaceID parts of one loaded pipeline."""

    unet: Any
    loras: dict[str, str]  # flow alias -> PEFT adapter name diffusers gave its LoRA (`faceid_<i>`)
    plus: dict[int, Any]  # adapter index -> IPAdapterFaceIDPlusImageProjection
    shortcut_scales: dict[int, float]  # adapter index -> the flow's default shortcut scale
    hidden: dict[int, int]  # adapter index -> CLIP hidden size its resampler reads
    tuners: list[Any] = field(default_factory=list)  # the UNet's PEFT layers


def after_load(pipe: Any, aliases: list[str], facts: list[AdapterFacts], flow: Flow) -> FaceIDModel | None:
    """Record the FaceID LoRAs `load_ip_adapter` made and set each FaceID-Plus layer's `shortcut`."""
    loras = {alias: f"faceid_{i}" for i, (alias, f) in enumerate(zip(aliases, facts, strict=True)) if f.lora}
    has_plus = any(f.kind == "faceid_plus" for f in facts)  # only FaceID checkpoints have these (UNet families)
    layers = pipe.unet.encoder_hid_proj.image_projection_layers if has_plus else []
    plus = {i: layers[i] for i, f in enumerate(facts) if f.kind == "faceid_plus"}
    if not loras and not plus:
        return None
    scales = {}
    for i, layer in plus.items():
        layer.shortcut = shortcut(flow.adapters[aliases[i]])
        scales[i] = flow.adapters[aliases[i]].shortcut_scale
    model = FaceIDModel(pipe.unet, loras, plus, scales, {i: facts[i].image_dim for i in plus})
    if loras:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model.tuners = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
        for alias, name in loras.items():  # as `set_adapters([name], adapter_weights=[w])` scales it
            weight = flow.adapters[alias].lora_weight
            for layer in model.tuners:
                if name in getattr(layer, "lora_A", {}):
                    layer.set_scale(name, weight)
    return model


def lora_key(model: FaceIDModel | None, row: RowRequest) -> tuple[str, ...]:
    """The FaceID LoRAs a row needs (aliases); rows that need different ones cannot share a call."""
    if model is None or not model.loras:
        return ()
    return tuple(sorted(x.alias for x in row.adapters if x.alias in model.loras))


def bind(model: FaceIDModel | None, aliases: list[str], rows: list[RowRequest], do_cfg: bool, device: str) -> None:
    """Set this call's FaceID state: active FaceID LoRAs, per-row `clip_embeds` and `shortcut_scale`."""
    if model is None:
        return
    if model.loras:
        wanted = {model.loras[x.alias] for r in rows for x in r.adapters if x.alias in model.loras}
        names = set(model.loras.values())
        for layer in model.tuners:
            keep = [a for a in layer.active_adapters if a not in names]
            layer.set_adapter(keep + sorted(a for a in wanted if a in layer.lora_A), inference_mode=True)
    dtype = model.unet.dtype
    for index, layer in model.plus.items():
        inputs = [next((x for x in r.adapters if x.alias == aliases[index]), None) for r in rows]
        used = [x for x in inputs if x is not None and x.clip_embeds is not None]
        n_max = max([x.embeds.shape[0] for x in inputs if x is not None] or [1])
        tokens = tuple(used[0].clip_embeds.shape[1:]) if used else (1, model.hidden[index])  # zeros: rows without it
        pos = torch.zeros(len(rows), n_max, *tokens)
        neg = torch.zeros_like(pos)
        scales = torch.full((len(rows), n_max), float(model.shortcut_scales[index]))
        for b, x in enumerate(inputs):
            if x is None or x.clip_embeds is None:
                continue
            n = x.clip_embeds.shape[0]
            pos[b, :n], neg[b, :n] = x.clip_embeds, x.clip_negative
            if x.shortcut_scale is not None:
                scales[b] = x.shortcut_scale
        halves = 2 if do_cfg else 1
        layer.clip_embeds = (torch.cat([neg, pos]) if do_cfg else pos).to(device, dtype)
        # [CFG half, row, image] flattened, as MultiIPAdapterImageProjection flattens the id embeds
        layer.shortcut_scale = scales.reshape(-1).repeat(halves).view(-1, 1, 1).to(device, dtype)


def unbind(model: FaceIDModel | None) -> None:
    """Drop the per-call tensors so no later call can read another call's faces."""
    if model is None:
        return
    for index, layer in model.plus.items():
        layer.clip_embeds = None
        layer.shortcut_scale = model.shortcut_scales[index]
