"""ComfyUI_IPAdapter_plus's weight types on ipa's IP layers (SD1.5 and SDXL UNets).

ComfyUI numbers layers by *attention module in execution order*: its `transformer_index` counts
the UNet's spatial transformers as the forward pass meets them (input blocks, then the middle
block, then the output blocks), and every transformer block of one module shares its index. So
SD1.5 has 16 indices (6 input, 1 middle, 9 output) and SDXL 11 (4, 1, 6; each SDXL module holds
2 or 10 transformer blocks). ipa numbers IP layers in checkpoint order, which is diffusers'
`attn_processors` order: down blocks, *up* blocks, then the mid block, one per transformer block.
`comfy_layers` maps each IP layer name onto ComfyUI's (index, block type).

`layer_weights` then computes, per IP layer, the weight ComfyUI's `ipadapter_execute` and
`ipadapter_attention` give it, and whether the "precise" types put the image on the
unconditional side there (ComfyUI swaps `uncond = cond; cond = cond * 0` at those layers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ipa_ops.flow.schedules import ScheduleSpec

# ComfyUI's `layers`: 11 when the adapter is SDXL's, else 16; the index of ease in / out reads it
COMFY_LAYER_COUNT = {"sd15": 16, "sdxl": 11}
_MODULE = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)\.")
_BLOCK_TYPE = {"down": "input", "mid": "middle", "up": "output"}
# the types ComfyUI computes per index in the attention; the others are {index: weight} tables
_PROFILE_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output")
_PROFILE_TYPES += ("weak middle", "strong middle")
_ORDER = {"down": 0, "mid": 1, "up": 2}  # the forward pass: input blocks, middle, output blocks


def comfy_layers(layer_names: Sequence[str]) -> list[tuple[int, str]]:
    """(ComfyUI's transformer_index, block type `input` / `middle` / `output`) of each IP layer name."""
    modules = []
    for name in layer_names:
        found = _MODULE.match(name)
        if found is None:
            raise ValueError(f"weight_type needs a UNet's cross-attention layers; {name!r} is not one")
        part = found.group(1) or found.group(3)
        block = int(found.group(2) or 0)
        modules.append((_ORDER[part], block, int(found.group(4)), part))
    order = sorted(set(modules))
    index = {m: i for i, m in enumerate(order)}
    return [(index[m], _BLOCK_TYPE[m[3]]) for m in modules]


def _dict_weights(kind: str, sdxl: bool, w: float, comp: float, spec: ScheduleSpec) -> dict[int, float]:
    """The {index: weight} of ComfyUI's dictionary weight types; indices not in it get nothing."""
    if kind == "style transfer":
        return {6: w} if sdxl else dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), w)
    if kind == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if kind == "strong style transfer":
        keep = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if sdxl else (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        return dict.fromkeys(keep, w)
    if kind in ("style and composition", "style transfer precise"):
        if kind == "style transfer precise":
            comp = spec.style_boost if spec.style_boost is not None else w
        if sdxl:
            return {3: comp, 6: w}
        return {**dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), w), 4: comp * 0.25, 5: comp}
    if kind == "strong style and composition":
        if sdxl:
            return {**dict.fromkeys(range(11), w), 3: comp}
        return {**dict.fromkeys(range(16), w), 4: comp, 5: comp}
    if kind == "composition precise":
        comp, w = w, (spec.composition_boost if spec.composition_boost is not None else w)
        if sdxl:
            return {**dict.fromkeys(range(11), w * 0.1), 3: comp, 6: w}
        return {**dict.fromkeys(range(16), w), 4: comp * 0.25, 5: comp, 6: w * 0.1, 7: w * 0.1, 8: w * 0.1}
    raise KeyError(kind)


def _precise_swap(kind: str, sdxl: bool, index: int) -> bool:
    """Whether a precise type puts the image on the unconditional side (and zeros on the conditional) here."""
    composition_layer = index == 3 if sdxl else index in (4, 5)
    if kind == "style transfer precise":
        return composition_layer
    if kind == "composition precise":
        return not composition_layer
    return False


def _profile_weight(kind: str, w: float, index: int, block: str, layers: int) -> float:
    """ComfyUI's per-index profiles (ease in / out ..., weak / strong blocks); `linear` keeps the weight."""
    if kind == "ease in":
        return w * (0.05 + 0.95 * (1 - index / layers))
    if kind == "ease out":
        return w * (0.05 + 0.95 * (index / layers))
    if kind == "ease in-out":
        return w * (0.05 + 0.95 * (1 - abs(index - layers / 2) / (layers / 2)))
    if kind == "reverse in-out":
        return w * (0.05 + 0.95 * (abs(index - layers / 2) / (layers / 2)))
    weak = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",)}
    weak["strong middle"] = ("input", "output")
    if block in weak.get(kind, ()):
        return w * 0.2
    return w


def layer_weights(family: str, spec: ScheduleSpec, layer_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """([layers] weight, [layers] bool image-on-the-unconditional-side) of a spec's `weight_type`."""
    if family not in COMFY_LAYER_COUNT:
        raise ValueError(f"weight_type is ComfyUI's, for SD1.5 and SDXL UNets; this model is {family}")
    kind = spec.weight_type
    assert kind is not None
    layers, sdxl = COMFY_LAYER_COUNT[family], family == "sdxl"
    mapped = comfy_layers(layer_names)
    found = len({i for i, _ in mapped})
    if found != layers:
        raise ValueError(f"weight_type: a {family} UNet has {layers} attention modules for ComfyUI, this one {found}")
    weights = np.zeros(len(layer_names))
    swap = np.zeros(len(layer_names), dtype=bool)
    if spec.layer_weights is not None:  # IPAdapterMS: its own {index: weight * value}, nothing else
        table: dict[int, float] | None = {i: w * spec.value for i, w in spec.layer_weights}
    elif kind in _PROFILE_TYPES:
        table = None
    else:
        table = _dict_weights(kind, sdxl, spec.value, spec.composition, spec)
    for i, (index, block) in enumerate(mapped):
        if table is None:
            weights[i] = _profile_weight(kind, spec.value, index, block, layers)
        elif index in table:
            weights[i] = table[index]
            swap[i] = _precise_swap(kind, sdxl, index)
    return weights, swap
