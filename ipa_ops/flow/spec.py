"""The flow file: pydantic models whose field descriptions are the format's reference doc.

A flow names models, encoders and adapters once (by alias) and composes stages over them.
Unknown keys are errors so a typo never passes silently; `load_flow` reports every problem
as one line naming its YAML path (`stages.generate.resources.batch_size: must be >= 1, got 0`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ipa_ops.errors import UserError
from ipa_ops.flow.models import ModelSpec, ModuleSpec, Strict
from ipa_ops.flow.prep import ReferencePrep, TileSpec
from ipa_ops.flow.score_spec import score_problems
from ipa_ops.flow.stage_specs import Stages


class EncoderSpec(Strict):
    type: Literal["clip", "insightface"] = Field(description="`clip` image encoder or `insightface` face analysis.")
    source: str | None = Field(None, description="Hub id or path of the CLIP vision encoder (type clip).")
    subfolder: str | None = Field(None, description="Subfolder of the encoder, e.g. `models/image_encoder`.")
    hidden_states: bool = Field(
        False, description="Also store the penultimate hidden states (needed by Plus, plus-face, full-face adapters)."
    )
    uncond_image: Literal["zeros", "black"] = Field(
        "zeros", description="Unconditional image of hidden-state (Plus) adapters: `zeros` (diffusers: zero pixel "
        "values) or `black` (ComfyUI: a black image through the processor). Enters the encoder id.",
    )
    crop: Literal["center", "pad", "none"] = Field(
        "center", description="How a non-square image is fitted: processor centre crop, pad to square, or resize."
    )
    prep: ReferencePrep | None = Field(
        None, description="ComfyUI's PrepImageForClipVision before the processor: crop position, interpolation, "
        "sharpening (type clip; replaces `crop`). Enters the encoder id.",
    )
    tiles: TileSpec | None = Field(
        None, description="ComfyUI's IPAdapterTiled (type clip): also store each image's tiles, for adapter entries "
        "with `tiled: true`. Enters the encoder id.",
    )
    pack: str = Field("buffalo_l", description="InsightFace model pack name (type insightface).")
    root: str | None = Field(
        None, description="Directory holding `models/<pack>/` (type insightface); default: the mirror's `insightface`."
    )
    det_size: int = Field(
        640, ge=64, description="Largest detection size tried; smaller sizes are retried down to 320."
    )
    face: str = Field("largest", description="Which face to keep: `largest`, `best_score`, or an index like `0`.")
    face_crop_size: int = Field(
        224, description="Side of the aligned face crop (insightface `norm_crop`) CLIP encodes for "
        "FaceID-Plus: 224 (diffusers; ComfyUI for SD1.5) or 256 (ComfyUI for SDXL). Enters the encoder id.",
    )

    @model_validator(mode="after")
    def _needs_source(self) -> EncoderSpec:
        if self.type == "clip" and not self.source:
            raise ValueError("a clip encoder needs `source` (hub id or path of a CLIP vision encoder)")
        if self.prep is not None and (self.type != "clip" or self.crop != "center"):
            raise ValueError("`prep` is for clip encoders and replaces `crop`: drop one of them")
        if self.tiles is not None and (self.type != "clip" or self.prep is not None):
            raise ValueError("`tiles` is for clip encoders and prepares its tiles itself: drop `prep` or `tiles`")
        if self.face_crop_size <= 0 or (self.face_crop_size % 112 and self.face_crop_size % 128):
            raise ValueError(f"face_crop_size must be a multiple of 112 or 128 (insightface's norm_crop), e.g. 224 or "
                             f"256; got {self.face_crop_size}")  # fmt: skip
        return self


class AdapterSpec(Strict):
    source: str = Field(description="Hub id or path of the adapter repository, e.g. `h94/IP-Adapter`.")
    subfolder: str | None = Field(None, description="Subfolder of the weight file, e.g. `models` or `sdxl_models`.")
    weight_name: str = Field(description="Checkpoint file name, e.g. `ip-adapter_sd15.bin`.")
    encoder: str | None = Field(None, description="Alias of the encoder whose embeddings feed this adapter.")
    scale: Any = Field(1.0, description="Default scale schedule for rows that give none (any schedule form).")
    face_crop: bool | None = Field(
        None,
        description="CLIP adapters: feed the CLIP embedding of each reference's aligned face crop (found by "
        "`face_encoder`) instead of the whole image; rows may override with `face: {crop: ...}`. "
        "Default: true for face adapters (plus-face, full-face), false otherwise.",
    )
    face_encoder: str | None = Field(
        None,
        description="Alias of the insightface encoder whose aligned crops feed this adapter (face_crop); "
        "default: the flow's only insightface encoder.",
    )
    clip_encoder: str | None = Field(
        None,
        description="FaceID-Plus: alias of the clip encoder (hidden_states: true) whose embedding of the aligned "
        "face crop becomes the adapter's `clip_embeds`.",
    )
    shortcut: bool | None = Field(
        None, description="FaceID-Plus: add the ID tokens to the output (Plus v2). Default: true for `plusv2` weights."
    )
    shortcut_scale: float = Field(
        1.0, description="FaceID-Plus v2: weight of the face structure (`shortcut_scale`); rows may override it."
    )
    lora_weight: float = Field(
        1.0, allow_inf_nan=False,
        description="FaceID: strength of the LoRA its checkpoint carries (diffusers loads it at 1.0, ComfyUI at 0.6).",
    )
    fallback: Literal["error", "skip", "drop_adapter"] = Field(
        "error",
        description="When a reference of this adapter has no face in the store (FaceID, face crops): `error` fails "
        "the row, `skip` records it as skipped, `drop_adapter` renders it without this adapter; rows may override.",
    )

    def crops_faces(self) -> bool:
        """Whether this CLIP adapter is fed aligned face crops: `face_crop`, else by its name (plus-face, full-face)."""
        if self.face_crop is not None:
            return self.face_crop
        name = self.weight_name.lower()
        return "face" in name and "faceid" not in name


class LoraSpec(Strict):
    source: str = Field(description="Hub id or path of the LoRA repository, e.g. `latent-consistency/lcm-lora-sdv1-5`.")
    subfolder: str | None = Field(None, description="Subfolder of the LoRA file inside the source.")
    weight_name: str | None = Field(
        None, description="LoRA file name; default: diffusers' `pytorch_lora_weights.safetensors`."
    )
    weight: float = Field(1.0, description="LoRA strength.")


class RaySpec(Strict):
    address: str | None = Field(None, description="Ray cluster address; null runs an embedded local Ray.")


class Flow(Strict):
    name: str = Field(description="Flow name, used in run records and job ids.")
    mirror: str | None = Field(None, description="Mirror root mapping hub id `org/name` to `<mirror>/org/name/`.")
    ray: RaySpec = Field(default_factory=RaySpec)
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Base pipelines by alias.")
    encoders: dict[str, EncoderSpec] = Field(default_factory=dict, description="Image and face encoders by alias.")
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict, description="IP-Adapters by alias.")
    loras: dict[str, LoraSpec] = Field(
        default_factory=dict,
        description="LoRAs applied to every row of the flow; the alias is the diffusers adapter name.",
    )
    controlnets: dict[str, ModuleSpec] = Field(
        default_factory=dict, description="ControlNets by alias; a model names one with `controlnet:`."
    )
    motion_adapters: dict[str, ModuleSpec] = Field(
        default_factory=dict,
        description="AnimateDiff MotionAdapters by alias; a model names one with `motion_adapter:`.",
    )
    stages: Stages = Field(default_factory=Stages)
    schedule: str | None = Field(None, description="Cron expression for scheduled cluster runs.")
    metadata: bool = Field(True, description="Write each row's record inside its images (A1111 text, JSON, XMP).")

    @model_validator(mode="after")
    def _aliases_exist(self) -> Flow:
        problems: list[str] = []
        for name, adapter in self.adapters.items():
            if adapter.encoder is not None and adapter.encoder not in self.encoders:
                problems.append(_unknown_alias(f"adapters.{name}.encoder", adapter.encoder, self.encoders))
            for key, kind in (("face_encoder", "insightface"), ("clip_encoder", "clip")):
                alias = getattr(adapter, key)
                if alias is not None and alias not in self.encoders:
                    problems.append(_unknown_alias(f"adapters.{name}.{key}", alias, self.encoders))
                elif alias is not None and self.encoders[alias].type != kind:
                    problems.append(f"adapters.{name}.{key}: {alias!r} is a {self.encoders[alias].type} encoder; "
                                    f"name a {kind} encoder")  # fmt: skip
        for name, model in self.models.items():
            if model.controlnet is not None and model.controlnet not in self.controlnets:
                problems.append(_unknown_alias(f"models.{name}.controlnet", model.controlnet, self.controlnets))
            if model.motion_adapter is not None and model.motion_adapter not in self.motion_adapters:
                problems.append(
                    _unknown_alias(f"models.{name}.motion_adapter", model.motion_adapter, self.motion_adapters)
                )
        for name in self.loras:
            if name.startswith("faceid_"):
                problems.append(f"loras.{name}: aliases starting with faceid_ are diffusers' FaceID LoRAs; rename it")
        if self.stages.extract is not None:
            for i, enc in enumerate(self.stages.extract.encoders):
                if enc not in self.encoders:
                    problems.append(_unknown_alias(f"stages.extract.encoders.{i}", enc, self.encoders))
        if self.stages.generate is not None and self.stages.generate.model not in self.models:
            problems.append(_unknown_alias("stages.generate.model", self.stages.generate.model, self.models))
        if self.stages.score is not None:
            kinds = {alias: enc.type for alias, enc in self.encoders.items()}
            problems += score_problems(self.stages.score, kinds, self.stages.generate is not None)
        if problems:
            raise FlowReferenceError(problems)
        return self

    def mirror_root(self) -> str | None:
        """The mirror in force: env `IPA_MIRROR` overrides the flow's `mirror:`."""
        return os.environ.get("IPA_MIRROR") or self.mirror


class FlowReferenceError(ValueError):
    """Aliases that point nowhere; carries one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class FlowError(UserError):
    """A flow that cannot be used; `problems` holds one line per problem, each naming a YAML path."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def _unknown_alias(path: str, value: str, known: dict[str, Any]) -> str:
    return f"{path}: unknown alias {value!r}; defined: {', '.join(sorted(known)) or 'none'}"


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc`, to list its valid keys."""
    model: Any = Flow
    alias_next = False
    for part in loc:
        if alias_next:  # this part is a user alias inside a dict of models
            alias_next = False
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict:
            ann, alias_next = ann.__args__[-1], True
        ann = next((a for a in getattr(ann, "__args__", (ann,)) if a is not type(None)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as `path: what is expected, got what`."""
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    kind, ctx, got = err["type"], err.get("ctx", {}), _Shown(err.get("input"))
    if kind == "extra_forbidden":
        owner = _owner_model(loc[:-1])
        keys = sorted(owner.model_fields) if owner else []
        return f"{path}: unknown key{_did_you_mean(str(loc[-1]), keys)}; allowed: {', '.join(keys)}"
    if kind == "missing":
        return f"{path}: required, missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"{path}: must be {op} {bound}, got {got!r}"
    if kind == "multiple_of":
        return f"{path}: must be a multiple of {ctx['multiple_of']}, got {got!r}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx['expected']}, got {got!r}"
    if kind == "value_error":
        return f"{path}: {str(ctx.get('error', err['msg']))}"
    return f"{path}: {err['msg'].lower()}, got {got!r}"


def _owner_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    return Flow if not loc else _model_at(loc)


class _Shown:
    """A bad value as an error shows it: its repr, cut at 200 characters (a pasted 20 kB prompt or a
    deeply nested list must not make one problem line pages long)."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        try:
            text = repr(self.value)
        except RecursionError:
            return "<a value nested too deeply to show>"
        return text if len(text) <= 200 else f"{text[:180]}... ({len(text)} chars)"


def parse_flow(data: dict[str, Any], source: str = "<flow>") -> Flow:
    """Validate a flow mapping; raise FlowError with one line per problem."""
    try:
        return Flow.model_validate(data)
    except RecursionError:
        raise FlowError(source, ["<root>: nested too deeply to check; a flow needs a few levels"]) from None
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            inner = err.get("ctx", {}).get("error")
            if isinstance(inner, FlowReferenceError):
                problems.extend(inner.problems)
            else:
                problems.append(_describe(err))
        raise FlowError(source, [_one_line(p) for p in problems]) from None


def _one_line(problem: str) -> str:
    """A key with a newline in it (YAML allows one) must not split a problem over two lines."""
    text = problem.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= 1000 else f"{text[:980]}... ({len(text)} chars)"


def set_path(data: dict[str, Any], dotted: str, value: str) -> None:
    """Apply one `--set path=value` override; the value is parsed as YAML (`8`, `true`, `[a, b]`)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FlowError("--set", [f"{dotted}: {part} is not a mapping"])
    node[parts[-1]] = yaml.safe_load(value)


def load_flow(path: str | Path, overrides: list[str] | None = None) -> Flow:
    """Read, override and validate a flow file. Relative paths in stages stay relative to the CWD."""
    path = Path(path)
    if not path.is_file():
        raise FlowError(str(path), ["file not found; pass the path of a flow YAML such as flows/quickstart.yaml"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FlowError(str(path), [f"not valid YAML: {str(exc).splitlines()[0]}"]) from None
    except RecursionError:  # the YAML parser recurses per level: thousands of `[` overflow it
        raise FlowError(str(path), ["<root>: nested too deeply to read; a flow needs a few levels"]) from None
    if not isinstance(data, dict):
        raise FlowError(str(path), ["<root>: must be a mapping of flow keys"])
    for item in overrides or []:
        if "=" not in item:
            raise FlowError("--set", [f"{item!r}: expected path=value"])
        key, value = item.split("=", 1)
        set_path(data, key, value)
    return parse_flow(data, str(path))
