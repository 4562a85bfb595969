"""`ipa schedule`: what a scale spec does, per IP layer and step, before anything renders.

It reads only configs: the base model's `unet/config.json` (its UNet is built on the meta
device, without weights, to name the IP layers as diffusers does), its scheduler config (for the
step count and the noise levels of `start_at` / `end_at`), and the adapter's tensor shapes (to
pick the model it fits). The values are the ones the generator puts in its scale table, from
the same functions (`families.base.layer_scales`, `schedules.step_profile`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ipa_ops.flow.models import SCHEDULERS
from ipa_ops.flow.schedules import NoiseLevels, parse_schedule, step_profile
from ipa_ops.flow.sources import resolve
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.families import adapter_facts, family_of
from ipa_ops.generate.families.base import layer_scales
from ipa_ops.generate.families.unet import unet_config, unet_ip_dims
from ipa_ops.generate.weight_types import comfy_layers


def effective_scales(flow: Flow, adapter: str, steps: int, spec: Any, model: str | None = None) -> dict[str, Any]:
    """{adapter, model, family, steps, timesteps, layers: [{index, name, comfyui_index, scales}]} for a spec.

    `scales` has one value per step of the pipeline's loop (`timesteps`; PNDM runs one more than asked)."""
    if adapter not in flow.adapters:
        raise ValueError(f"--adapter: {adapter!r} is not in the flow's adapters ({', '.join(flow.adapters)})")
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    parsed = parse_schedule(spec)
    mirror = flow.mirror_root()
    a_spec = flow.adapters[adapter]
    file = resolve(a_spec.source, a_spec.subfolder, a_spec.weight_name, mirror, f"adapter {adapter!r}").file
    facts = adapter_facts(file)
    alias, folder = _model_for(flow, facts, model)
    family = family_of(folder)
    if family.name not in ("sd15", "sdxl"):
        raise ValueError(f"ipa schedule reads UNet models (sd15, sdxl); {alias!r} is {family.name}")
    unet = _meta_unet(folder)
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    values, swapped = layer_scales(family, parsed, unet, names)
    timesteps, alphas = _timesteps(flow, alias, folder, steps)
    noise = NoiseLevels.of(timesteps, alphas) if parsed.by_sigma else None
    per_step = step_profile(parsed, len(timesteps), noise)
    comfy = comfy_layers(names)
    layers = [
        {
            "index": i,
            "name": name.removesuffix(".processor"),
            "comfyui_index": comfy[i][0],
            **({"unconditional_side": True} if swapped[i] else {}),
            "scales": [round(float(v), 9) for v in values[i] * per_step],
        }
        for i, name in enumerate(names)
    ]
    found = {"adapter": adapter, "model": alias, "family": family.name, "steps": steps}
    return {**found, "timesteps": [round(float(t), 4) for t in timesteps], "layers": layers}


def _model_for(flow: Flow, facts: Any, model: str | None) -> tuple[str, Path]:
    """The named model, else the generate stage's model or the first model the adapter fits."""
    mirror = flow.mirror_root()
    stage = flow.stages.generate.model if flow.stages.generate is not None else None
    order = [model] if model else [m for m in (stage, *flow.models) if m]
    for alias in order:
        if alias not in flow.models:
            raise ValueError(f"--model: {alias!r} is not in the flow's models ({', '.join(flow.models)})")
        m = flow.models[alias]
        folder = Path(resolve(m.source, m.subfolder, None, mirror, what=f"model {alias!r}").folder)
        if unet_ip_dims(folder) == (facts.cross_attention_dim, facts.ip_layers) or model:
            return alias, folder
    raise ValueError("no model of the flow fits this adapter (cross-attention dim and IP layers); pass --model")


def _meta_unet(folder: Path) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config(folder))


def _timesteps(flow: Flow, alias: str, folder: Path, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The scheduler's timesteps for `steps` steps (the loop's length) and its alphas_cumprod."""
    import diffusers

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    spec = flow.models[alias]
    name = spec.scheduler
    cls = getattr(diffusers, SCHEDULERS[name] if name else config["_class_name"])
    scheduler = cls.from_config(config, **spec.scheduler_options)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.numpy(), scheduler.alphas_cumprod.numpy()
