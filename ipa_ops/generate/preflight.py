"""Pre-flight: check adapter checkpoints against base model and encoder, and every source of a flow.

Pairing an IP-Adapter with the wrong encoder or base model is the most common IP-Adapter
failure, and diffusers reports it deep inside a matmul. Here it is one line before any
model loads: only tensor shapes (checkpoints.py) and config files (the model's family) are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipa_ops.flow.face_encoders import crop_clip_alias, face_encoder_alias
from ipa_ops.flow.models import ModelSpec
from ipa_ops.flow.sources import SourceNotFound, resolve
from ipa_ops.flow.spec import AdapterSpec, EncoderSpec, Flow
from ipa_ops.generate.checkpoints import AdapterFacts, checkpoint_shapes, encoder_dims, encoder_kind
from ipa_ops.generate.families import adapter_facts, family_of
from ipa_ops.generate.loras import resolve_lora


def ip_dims(model_folder: Path) -> tuple[int, int]:
    """(cross-attention dim, IP layers) of a base-model folder, as its model family reads them."""
    return family_of(Path(model_folder)).ip_dims(Path(model_folder))


# what each family's models are called and which IP-Adapters fit them, for mismatch lines
FAMILY_WORDS = {"sd15": "an SD1.5", "sdxl": "an SDXL", "flux": "a Flux", "sd3": "an SD3.5"}
FITS = {
    "sd15": "an h94/IP-Adapter adapter from models/ (e.g. ip-adapter_sd15.bin)",
    "sdxl": "an h94/IP-Adapter adapter from sdxl_models/ (e.g. ip-adapter_sdxl.bin)",
    "flux": "XLabs-AI/flux-ip-adapter (ip_adapter.safetensors)",
    "sd3": "InstantX/SD3.5-Large-IP-Adapter (ip-adapter.safetensors)",
}
ADAPTER_WORDS = {
    "": "an SD1.5/SDXL IP-Adapter (h94 layout)",
    "flux": "a Flux IP-Adapter (XLabs layout)",
    "sd3": "an SD3.5 IP-Adapter (InstantX layout)",
}
RUNS_ON = {
    "": "an SD1.5 or SDXL model",
    "flux": "a Flux model (black-forest-labs/FLUX.1-dev)",
    "sd3": "an SD3.5 model (stabilityai/stable-diffusion-3.5-large)",
}
ENCODER_FITS = {
    "flux": "CLIP ViT-L/14's pooled image_embeds (openai/clip-vit-large-patch14)",
    "sd3": "SigLIP's penultimate hidden states (google/siglip-so400m-patch14-384)",
}


def _family_problem(path: str, weight_name: str, facts: AdapterFacts, file: Path, m_alias: str, folder: Path) -> str:
    """One line when an adapter is in another family's layout than the model (a Flux adapter on SDXL ...)."""
    family = family_of(folder)
    if family.adapter_facts(checkpoint_shapes(file)) is not None:
        return ""
    return (
        f"{path}: {weight_name} is {ADAPTER_WORDS.get(facts.family, facts.family)}, but model {m_alias!r} is "
        f"{FAMILY_WORDS.get(family.name, family.name)} pipeline; use {FITS.get(family.name, 'an adapter made for it')} "
        f"with it, or run this adapter on {RUNS_ON.get(facts.family, 'its own family')}"
    )


def _encoder_hint(facts: AdapterFacts, weight_name: str) -> str:
    """Which h94 encoder folder a checkpoint was trained with, from its name (vit-G/SDXL: bigG; vit-h/SD1.5: ViT-H)."""
    name = weight_name.rsplit(".", 1)[0]
    if facts.family in ENCODER_FITS:
        return f"{name} needs {ENCODER_FITS[facts.family]}"
    low = name.lower()
    big_g = "vit-g" in low or ("sdxl" in low and "vit-h" not in low and not facts.needs_face)
    if big_g:
        return f"{name} needs the ViT-bigG encoder from sdxl_models/image_encoder, not models/image_encoder"
    if "vit-h" in low or "sd15" in low or facts.needs_face:
        return f"{name} needs the ViT-H encoder from models/image_encoder, not sdxl_models/image_encoder"
    return f"pair {name} with the encoder it was trained with"


def check_adapter(
    alias: str,
    spec: AdapterSpec,
    flow: Flow,
    model: tuple[str, ModelSpec] | None = None,
    others: tuple[tuple[str, ModelSpec], ...] = (),
) -> tuple[AdapterFacts | None, list[str]]:
    """All pre-flight problems of one adapter, each one line naming it, the numbers and a fix.

    The adapter must fit `model` or one of `others` (a flow may hold SD1.5 and SDXL models, each
    with its own adapters); a mismatch is reported against `model`.
    """
    mirror = flow.mirror_root()
    path = f"adapters.{alias}"
    try:
        file = resolve(spec.source, spec.subfolder, spec.weight_name, mirror, what=f"adapter {alias!r}").file
        assert file is not None
        facts = adapter_facts(file)
    except (SourceNotFound, ValueError, OSError, RuntimeError) as exc:
        return None, [f"{path}: {exc}"]
    problems: list[str] = []
    if model is not None:
        m_alias, m_spec = model
        try:
            folder = resolve(m_spec.source, m_spec.subfolder, None, mirror, what=f"model {m_alias!r}").folder
            cross, layers = ip_dims(folder)
        except (SourceNotFound, OSError, KeyError, ValueError) as exc:
            return facts, [f"models.{m_alias}: {exc}"]
        fits_other = any(model_fits(facts, flow, other) for other in others)
        family_problem = "" if fits_other else _family_problem(path, spec.weight_name, facts, file, m_alias, folder)
        if family_problem:
            problems.append(family_problem)
        elif (cross != facts.cross_attention_dim or layers != facts.ip_layers) and not fits_other:
            base = "SDXL" if facts.cross_attention_dim > cross else "SD1.5"
            problems.append(
                f"{path}: {spec.weight_name} is built for cross-attention dim {facts.cross_attention_dim} with "
                f"{facts.ip_layers} IP layers, but model {m_alias!r} has {cross} with {layers}; "
                f"use an adapter made for that base model (this one looks like {base})"
            )
    problems += _check_encoder(alias, spec, facts, flow) + _check_faces(alias, spec, facts, flow)
    return facts, problems


def model_dims(flow: Flow, alias: str) -> tuple[int, int] | None:
    """(cross-attention dim, IP layers) of a flow model, or None when it does not resolve."""
    spec = flow.models[alias]
    try:
        found = resolve(spec.source, spec.subfolder, None, flow.mirror_root(), what=f"model {alias!r}")
        return ip_dims(found.folder)
    except (SourceNotFound, OSError, KeyError, ValueError):
        return None


def model_fits(facts: AdapterFacts, flow: Flow, model: tuple[str, ModelSpec]) -> bool:
    """Whether an adapter's checkpoint matches a model's UNet (cross-attention dim and IP layer count)."""
    return model_dims(flow, model[0]) == (facts.cross_attention_dim, facts.ip_layers)


def _check_faces(alias: str, spec: AdapterSpec, facts: AdapterFacts, flow: Flow) -> list[str]:
    """FaceID-Plus needs a clip encoder for its face crops; a CLIP adapter fed crops needs a face encoder."""
    path = f"adapters.{alias}"
    if facts.kind == "faceid_plus":
        clip = crop_clip_alias(flow, spec)
        if clip is None:
            return [
                f"{path}: {spec.weight_name} is FaceID-Plus; it also reads CLIP hidden states of the aligned face "
                f"crop: set clip_encoder to a clip encoder alias with hidden_states: true"
            ]
        return _clip_problems(path, spec.weight_name, clip, facts, flow)
    if not facts.needs_face and spec.crops_faces() and face_encoder_alias(flow, spec) is None:
        return [
            f"{path}: {spec.weight_name} is fed aligned face crops (face_crop) but the flow has no single "
            f"insightface encoder to find them; add one (or set face_encoder), or set face_crop: false for whole images"
        ]
    return []


def _check_encoder(alias: str, spec: AdapterSpec, facts: AdapterFacts, flow: Flow) -> list[str]:
    path = f"adapters.{alias}"
    enc: EncoderSpec | None = flow.encoders.get(spec.encoder) if spec.encoder else None
    if facts.needs_face and (enc is None or enc.type != "insightface"):
        plus = " (and clip_encoder to the clip one)" if facts.kind == "faceid_plus" else ""
        return [
            f"{path}: {spec.weight_name} is a FaceID checkpoint; it needs face embeddings: set encoder "
            f"to an insightface encoder alias{plus}"
        ]
    if enc is None:
        if not facts.needs_face:
            return [f"{path}: no encoder set; {spec.weight_name} needs a clip encoder (add `encoder: <alias>`)"]
        return []
    if enc.type == "insightface":
        if not facts.needs_face:
            return [
                f"{path}: {spec.weight_name} takes CLIP image embeddings, but encoder {spec.encoder!r} "
                f"is insightface; pair it with a clip encoder"
            ]
        return []
    return _clip_problems(path, spec.weight_name, spec.encoder or "", facts, flow)


def _clip_problems(path: str, weight_name: str, alias: str, facts: AdapterFacts, flow: Flow) -> list[str]:
    """A clip encoder's width (projection or hidden size) and hidden-states setting against a checkpoint."""
    enc = flow.encoders[alias]
    try:
        folder = resolve(enc.source or "", enc.subfolder, None, flow.mirror_root(), what=f"encoder {alias!r}")
        projection, hidden = encoder_dims(folder.folder)
        kind = encoder_kind(folder.folder)
    except (SourceNotFound, OSError, KeyError) as exc:
        return [f"encoders.{alias}: {exc}"]
    wanted = "siglip" if facts.family == "sd3" else "clip"
    if kind != wanted:
        return [
            f"{path}: {weight_name} takes {'SigLIP' if wanted == 'siglip' else 'CLIP'} image features, but encoder "
            f"{alias!r} is {kind} ({enc.source}); {_encoder_hint(facts, weight_name)}"
        ]
    got = hidden if facts.needs_hidden_states else projection
    what = "hidden size" if facts.needs_hidden_states else "projection dim"
    problems = []
    if got != facts.image_dim:
        problems.append(
            f"{path}: {weight_name} expects image features of dim {facts.image_dim}, but encoder "
            f"{alias!r} has {what} {got}; {_encoder_hint(facts, weight_name)}"
        )
    if facts.needs_hidden_states and not enc.hidden_states:
        problems.append(
            f"{path}: {weight_name} consumes penultimate hidden states; set "
            f"encoders.{alias}.hidden_states: true and re-run extract"
        )
    return problems


def flow_models(flow: Flow) -> tuple[tuple[str, ModelSpec] | None, tuple[tuple[str, ModelSpec], ...]]:
    """The generate stage's default model, and the flow's other models (an adapter may fit any of them)."""
    if flow.stages.generate is None:
        return None, ()
    default = flow.stages.generate.model
    others = tuple((a, m) for a, m in flow.models.items() if a != default)
    return (default, flow.models[default]), others


def check_flow(flow: Flow) -> tuple[dict[str, AdapterFacts], list[str]]:
    """Pre-flight every adapter against the flow's models (it must fit one) and its encoder."""
    model, others = flow_models(flow)
    facts: dict[str, AdapterFacts] = {}
    problems: list[str] = []
    for alias, spec in flow.adapters.items():
        found, issues = check_adapter(alias, spec, flow, model, others)
        if found is not None:
            facts[alias] = found
        problems += issues
    return facts, problems + _one_sd3_adapter(facts)


def _one_sd3_adapter(facts: dict[str, AdapterFacts]) -> list[str]:
    """An SD3.5 pipeline holds one InstantX adapter: diffusers' loader takes one file and the
    transformer one image projection and one IP attention per joint block (no list as for UNets)."""
    sd3 = [alias for alias, f in facts.items() if f.family == "sd3"]
    if len(sd3) < 2:
        return []
    return [
        f"adapters: {', '.join(sd3)} are all SD3.5 IP-Adapters, but an SD3.5 pipeline takes one (diffusers' "
        f"SD3 loader and InstantX's processor hold one image projection and one IP attention per block); "
        f"keep one of them in this flow and run the others in a flow of their own"
    ]


def check_models(flow: Flow) -> list[str]:
    """Every model and encoder source resolves (adapters are checked by check_flow)."""
    problems: list[str] = []
    mirror = flow.mirror_root()
    for alias, spec in flow.models.items():
        try:
            resolve(spec.source, spec.subfolder, None, mirror, what=f"model {alias!r}")
        except SourceNotFound as exc:
            problems.append(f"models.{alias}.source: {exc}")
    for alias, enc in flow.encoders.items():
        if enc.type == "clip":
            try:
                resolve(enc.source or "", enc.subfolder, None, mirror, what=f"encoder {alias!r}")
            except SourceNotFound as exc:
                problems.append(f"encoders.{alias}.source: {exc}")
    return problems + source_problems(flow) + controlnet_pairings(flow)


def controlnet_pairings(flow: Flow) -> list[str]:
    """`ipa validate`: each model's ControlNet is a class its family's pipeline takes (one line each)."""
    from ipa_ops.generate.tasks import controlnet_folder, controlnet_problem

    problems: list[str] = []
    for alias, spec in flow.models.items():
        if spec.controlnet is None or spec.controlnet not in flow.controlnets:
            continue
        try:
            model = resolve(spec.source, spec.subfolder, None, flow.mirror_root(), what=f"model {alias!r}").folder
            _, name = controlnet_folder(flow, spec.controlnet)
            family = family_of(model).name
        except (SourceNotFound, ValueError):
            continue  # (a missing source or an unknown family has its own line)
        problem = controlnet_problem(spec.controlnet, name, alias, family)
        if problem:
            problems.append(problem)
    return problems


def source_problems(flow: Flow) -> list[str]:
    """`ipa validate`: every ControlNet, motion adapter and LoRA of the flow resolves (one line each)."""
    mirror, problems = flow.mirror_root(), []
    for section, specs in (("controlnets", flow.controlnets), ("motion_adapters", flow.motion_adapters)):
        for alias, spec in specs.items():
            try:
                resolve(spec.source, spec.subfolder, None, mirror, f"{section} {alias!r}")
            except SourceNotFound as exc:
                problems.append(f"{section}.{alias}.source: {exc}")
    for alias, lora in flow.loras.items():
        try:
            resolve_lora(alias, lora, mirror)
        except SourceNotFound as exc:
            problems.append(f"loras.{alias}.source: {exc}")
    return problems


def describe(facts: dict[str, AdapterFacts]) -> dict[str, Any]:
    """Facts as plain data, for run.json."""
    return {alias: f.__dict__ for alias, f in facts.items()}
