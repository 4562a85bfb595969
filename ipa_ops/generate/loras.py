"""Flow-level LoRAs: loaded once per pipeline as named PEFT adapters, active for every row.

A flow's `loras:` section maps an alias (the diffusers adapter name) to a LoRA file and weight.
They are loaded the way the diffusers guide does it: after the IP-Adapters
(`load_ip_adapter` first, then `load_lora_weights`), each under `adapter_name=<alias>`, and then
activated together with `set_adapters(names, adapter_weights=weights)`. FaceID checkpoints carry
their own LoRA, which diffusers loads inside `load_ip_adapter` (adapters `faceid_<i>`) and
activates; `set_adapters` would switch those off unless they are named too, so whatever diffusers
left active stays active at weight 1.0 next to the flow's LoRAs.
"""

from __future__ import annotations

from typing import Any

from ipa_ops.flow.sources import Resolved, fingerprint, resolve
from ipa_ops.flow.spec import Flow, LoraSpec

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers looks for when none is given


def resolve_lora(alias: str, spec: LoraSpec, mirror: str | None) -> Resolved:
    """The LoRA file of a flow alias (mirror, local path or HF cache), or SourceNotFound naming it."""
    return resolve(spec.source, spec.subfolder, spec.weight_name or DEFAULT_WEIGHT_NAME, mirror, f"lora {alias!r}")


def fingerprints(flow: Flow) -> dict[str, str]:
    """`lora:<alias>` -> fingerprint of the LoRA file, for row keys and provenance."""
    mirror = flow.mirror_root()
    return {f"lora:{alias}": fingerprint(resolve_lora(alias, spec, mirror).file) for alias, spec in flow.loras.items()}


def identity(flow: Flow, found: dict[str, str]) -> dict[str, Any]:
    """What the flow's LoRAs contribute to a row key: each one's file fingerprint and weight."""
    return {
        alias: {"fingerprint": found.get(f"lora:{alias}"), "weight": spec.weight} for alias, spec in flow.loras.items()
    }


def load(pipe: Any, flow: Flow, text_encoder: bool = True) -> list[str]:
    """Load the flow's LoRAs into `pipe` and activate them with their weights; returns their aliases.

    `text_encoder=False` loads the UNet part only: a pipeline made with `from_pipe` over a base
    that already has these LoRAs shares its text encoder, which must not get them twice.
    """
    if not flow.loras:
        return []
    already = list(pipe.get_active_adapters())  # e.g. faceid_0, loaded inside load_ip_adapter
    mirror = flow.mirror_root()
    for alias, spec in flow.loras.items():
        found = resolve_lora(alias, spec, mirror)
        assert found.file is not None
        if text_encoder:
            pipe.load_lora_weights(str(found.folder), weight_name=found.file.name, adapter_name=alias)
        else:
            state, alphas = pipe.lora_state_dict(str(found.folder), weight_name=found.file.name)
            pipe.load_lora_into_unet(state, alphas, unet=pipe.unet, adapter_name=alias, _pipeline=pipe)
    names = already + list(flow.loras)
    pipe.set_adapters(names, adapter_weights=[1.0] * len(already) + [s.weight for s in flow.loras.values()])
    return list(flow.loras)
