"""What SD1.5 and SDXL share: a diffusers UNet pipeline with h94-style IP-Adapter processors.

Both read h94's checkpoint layout (nested `.bin` with `image_proj` / `ip_adapter`, or flat
`.safetensors` with the same prefixes), load with `AutoPipelineForText2Image`, carry the IP
layers as `IPAdapterAttnProcessor2_0` on the UNet's cross-attention modules, count them from
`unet/config.json`, expand per-block scale dicts with diffusers' own helper, and take
`ip_adapter_image_embeds` as `[negative; positive]` per adapter when guidance is on. The two
family modules differ only in what they claim and their presets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ipa_ops.generate import attention
from ipa_ops.generate.checkpoints import UNNORM_MARKER, AdapterFacts
from ipa_ops.generate.families.base import ClassifierFreeGuidance
from ipa_ops.generate.ip_state import IPBatchState


def unet_config(folder: Path) -> dict[str, Any]:
    """A pipeline folder's `unet/config.json`."""
    return json.loads((folder / "unet" / "config.json").read_text())


def unet_ip_dims(folder: Path) -> tuple[int, int]:
    """(cross_attention_dim, number of cross-attention layers) from a pipeline's unet/config.json."""
    cfg = unet_config(folder)
    blocks = len(cfg["down_block_types"])
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = [depth] * blocks if isinstance(depth, int) else list(depth)
    per_block = cfg.get("layers_per_block", 2)
    layers = sum(per_block * d for t, d in zip(cfg["down_block_types"], depth, strict=True) if "CrossAttn" in t)
    up = zip(cfg["up_block_types"], depth[::-1], strict=True)
    layers += sum((per_block + 1) * d for t, d in up if "CrossAttn" in t)
    if "CrossAttn" in (cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        layers += depth[-1]
    cross = cfg["cross_attention_dim"]
    return (cross if isinstance(cross, int) else cross[0]), layers


def h94_adapter_facts(shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
    """Classify an h94-layout checkpoint the way diffusers' loader does, from key names and shapes."""
    proj = {k[len("image_proj.") :]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter.") :]: v for k, v in shapes.items() if k.startswith("ip_adapter.")}
    ks = [v for k, v in ip.items() if k.endswith("to_k_ip.weight")]
    if not ks or not proj or "0.norm_ip.linear.weight" in ip:  # norm_ip: InstantX's SD3.5 layout, not h94's
        return None
    cross = ks[0][1]
    if UNNORM_MARKER in shapes and "latents" in proj:  # a Resampler over the raw face embedding
        return AdapterFacts("portrait_unnorm", cross, len(ks), 0, proj["proj_in.weight"][1], proj["latents"][1])
    if any(k.endswith("to_q_lora.down.weight") for k in ip):
        return replace(_classify(proj, cross, len(ks)), lora=True)
    return _classify(proj, cross, len(ks))


def _classify(proj: dict[str, tuple[int, ...]], cross: int, layers: int) -> AdapterFacts:
    if "proj.weight" in proj:
        return AdapterFacts("pooled", cross, layers, proj["proj.weight"][1], 0, proj["proj.weight"][0] // cross)
    if "proj.3.weight" in proj:
        return AdapterFacts("full_face", cross, layers, proj["proj.0.weight"][0], 0, 0)
    if "perceiver_resampler.proj_in.weight" in proj:
        hidden = proj["perceiver_resampler.proj_in.weight"][1]
        return AdapterFacts("faceid_plus", cross, layers, hidden, proj["proj.0.weight"][1], 0)
    if "norm.weight" in proj:
        tokens = proj["proj.2.weight"][0] // proj["norm.weight"][0]
        return AdapterFacts("faceid", cross, layers, 0, proj["proj.0.weight"][1], tokens)
    return AdapterFacts("plus", cross, layers, proj["proj_in.weight"][1], 0, proj["latents"][1])


_EXPANDED: dict[tuple[int, str, tuple[str, ...]], list[float]] = {}


@dataclass(frozen=True)
class UNetFamily(ClassifierFreeGuidance):
    """A UNet family; `claims_config` tells its `unet/config.json` from the other UNet families'."""

    guidance_note = "UNet models use guidance_scale"

    name: str
    presets: Mapping[str, Mapping[str, Any]]
    claims_config: Callable[[dict[str, Any]], bool]

    def claims(self, folder: Path) -> bool:
        return (folder / "unet" / "config.json").is_file() and self.claims_config(unet_config(folder))

    def ip_dims(self, folder: Path) -> tuple[int, int]:
        return unet_ip_dims(folder)

    def adapter_facts(self, shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
        return h94_adapter_facts(shapes)

    def load(self, folder: Path, dtype: torch.dtype, variant: str | None) -> Any:
        from diffusers import AutoPipelineForText2Image

        pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=dtype, variant=variant)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_adapters(self, pipe: Any, files: Sequence[Path]) -> None:
        pipe.load_ip_adapter(
            [str(f.parent) for f in files],
            subfolder=[""] * len(files),
            weight_name=[f.name for f in files],
            image_encoder_folder=None,
        )

    def cross_attention_dim(self, pipe: Any) -> int:
        return pipe.unet.config.cross_attention_dim

    def install_attention(self, pipe: Any) -> list[str]:
        return attention.install(pipe.unet)

    def bind_attention(self, pipe: Any, state: IPBatchState | None) -> None:
        attention.bind(pipe.unet, state)

    def compile(self, pipe: Any, how: str, mode: str, **options: Any) -> None:
        options = {"fullgraph": True, "dynamic": False, "mode": None if mode == "default" else mode, **options}
        if how == "whole":
            # the forward, not the module: the UNet's pre-hook that settles the IP state stays eager
            pipe.unet.forward = torch.compile(pipe.unet.forward, **options)
        else:
            pipe.unet.compile_repeated_blocks(**options)

    def dtype(self, pipe: Any) -> torch.dtype:
        return pipe.unet.dtype

    def uses_cfg(self, pipe: Any, guidance_scale: float) -> bool:
        # guidance-distilled UNets (LCM: time_cond_proj_dim) take the scale as an input, not as CFG
        return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def ip_call(
        self, pipe: Any, positives: list[torch.Tensor], negatives: list[torch.Tensor], do_cfg: bool
    ) -> dict[str, Any]:
        # `ip_adapter_image_embeds` is [negative; positive] per adapter under CFG, as diffusers builds it
        embeds = [torch.cat([n, p]) if do_cfg else p for p, n in zip(positives, negatives, strict=True)]
        pipe.prepare_ip_adapter_image_embeds = _PassThrough(embeds)
        return {"ip_adapter_image_embeds": embeds}

    def end_call(self, pipe: Any) -> None:
        pipe.__dict__.pop("prepare_ip_adapter_image_embeds", None)

    def expand_layers(self, pipe: Any, blocks: Mapping[str, Any], layer_names: Sequence[str]) -> list[float]:
        """diffusers' expansion of a per-block dict, matched to layer names as set_ip_adapter_scale does."""
        unet = pipe.unet if hasattr(pipe, "unet") else pipe
        blocks_json = json.dumps(blocks, sort_keys=True)
        key = (id(unet), blocks_json, tuple(layer_names))
        if key not in _EXPANDED:
            from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

            try:
                (expanded,) = _maybe_expand_lora_scales(unet, [json.loads(blocks_json)], default_scale=0.0)
            except ValueError as exc:
                raise ValueError(f"layers: {exc}") from None
            values = []
            for name in layer_names:
                scale = 0.0
                for prefix, value in expanded.items():
                    if name.startswith(prefix):
                        scale = float(value)
                values.append(scale)
            _EXPANDED[key] = values
        return _EXPANDED[key]


class _PassThrough:
    """Stands in for `prepare_ip_adapter_image_embeds`: per-row embeddings, already [neg; pos]."""

    def __init__(self, embeds: list[torch.Tensor]):
        self.embeds = embeds

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return self.embeds
