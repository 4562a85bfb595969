"""The ``h94/IP-Adapter`` repository: image encoders and adapter checkpoints.

Checkpoints have the real key layout: the ``.bin`` files are ``torch.save`` of
``{"image_proj": {...}, "ip_adapter": {...}}`` (plain tensors, ``weights_only`` safe) and the
``.safetensors`` files hold the same tensors under flat ``image_proj.``/``ip_adapter.`` keys.
The ``ip_adapter`` numbering (``1.to_k_ip.weight``, ``3.to_k_ip.weight`` ...) is *derived* from a
UNet built on the meta device, walking ``unet.attn_processors`` the way diffusers'
``_convert_ip_adapter_attn_to_diffusers`` does, so it matches whatever UNet config the table uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .clip import build_vision_encoder
from .common import generator, save_safetensors, save_torch, torch_dtype
from .sd import sd15_unet_config, sdxl_unet_config, unet_from_config
from .sizes import ResamplerSizes, ZooSizes

REPO = "h94/IP-Adapter"


@dataclass(frozen=True)
class CrossAttnSlot:
    """One cross-attention processor: its diffusers name and the checkpoint key id."""

    name: str
    key_id: int
    hidden_size: int
    cross_attention_dim: int


def block_width(name: str, blocks: list[int]) -> int:
    """Channel width of the UNet block an attention processor (by diffusers name) sits in."""
    if name.startswith("mid_block"):
        return blocks[-1]
    if name.startswith("up_blocks"):
        return list(reversed(blocks))[int(name[len("up_blocks.")])]
    return blocks[int(name[len("down_blocks.")])]


def cross_attention_slots(unet_config: dict[str, Any]) -> list[CrossAttnSlot]:
    """Cross-attention processors in checkpoint order, as diffusers numbers them."""
    unet = unet_from_config(unet_config, meta=True)
    blocks = list(unet_config["block_out_channels"])
    slots: list[CrossAttnSlot] = []
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        hidden = block_width(name, blocks)
        slots.append(CrossAttnSlot(name, key_id, hidden, unet_config["cross_attention_dim"]))
        key_id += 2
    return slots


class _Init:
    """Seeded tensor factory: linear weights scaled by fan-in, norms at identity.

    With ``meta`` it returns shape-only tensors, for dry runs at full size.
    """

    def __init__(self, name: str, dtype: torch.dtype, meta: bool = False) -> None:
        self.g = generator(name)
        self.dtype = dtype
        self.meta = meta

    def randn(self, *shape: int) -> torch.Tensor:
        if self.meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=self.g)

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return (self.randn(out_f, in_f) / in_f**0.5).to(self.dtype)

    def bias(self, n: int) -> torch.Tensor:
        return (self.randn(n) * 0.02).to(self.dtype)

    def ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=self.dtype, device="meta" if self.meta else "cpu")

    def zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=self.dtype, device="meta" if self.meta else "cpu")


def _ip_layers(init: _Init, slots: list[CrossAttnSlot]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for s in slots:
        out[f"{s.key_id}.to_k_ip.weight"] = init.linear(s.hidden_size, s.cross_attention_dim)
        out[f"{s.key_id}.to_v_ip.weight"] = init.linear(s.hidden_size, s.cross_attention_dim)
    return out


def image_proj_base(init: _Init, embed_dim: int, cross: int, tokens: int = 4) -> dict[str, torch.Tensor]:
    """``ImageProjModel``: pooled CLIP projection -> 4 tokens."""
    return {
        "proj.weight": init.linear(tokens * cross, embed_dim),
        "proj.bias": init.bias(tokens * cross),
        "norm.weight": init.ones(cross),
        "norm.bias": init.zeros(cross),
    }


def image_proj_full(init: _Init, hidden: int, cross: int) -> dict[str, torch.Tensor]:
    """``MLPProjModel`` of full-face: every penultimate-layer token -> one token."""
    return {
        "proj.0.weight": init.linear(hidden, hidden),
        "proj.0.bias": init.bias(hidden),
        "proj.2.weight": init.linear(cross, hidden),
        "proj.2.bias": init.bias(cross),
        "proj.3.weight": init.ones(cross),
        "proj.3.bias": init.zeros(cross),
    }


def image_proj_resampler(init: _Init, r: ResamplerSizes, embed_dim: int, cross: int) -> dict[str, torch.Tensor]:
    """``Resampler`` of the Plus adapters (learned queries over penultimate hidden states)."""
    h, inner, ff = r.hidden_dims, r.heads * r.dim_head, r.hidden_dims * r.ff_mult
    out = {
        "latents": (init.randn(1, r.num_queries, h) / h**0.5).to(init.dtype),
        "proj_in.weight": init.linear(h, embed_dim),
        "proj_in.bias": init.bias(h),
        "proj_out.weight": init.linear(cross, h),
        "proj_out.bias": init.bias(cross),
        "norm_out.weight": init.ones(cross),
        "norm_out.bias": init.zeros(cross),
    }
    for i in range(r.depth):
        p = f"layers.{i}"
        out |= {
            f"{p}.0.norm1.weight": init.ones(h),
            f"{p}.0.norm1.bias": init.zeros(h),
            f"{p}.0.norm2.weight": init.ones(h),
            f"{p}.0.norm2.bias": init.zeros(h),
            f"{p}.0.to_q.weight": init.linear(inner, h),
            f"{p}.0.to_kv.weight": init.linear(2 * inner, h),
            f"{p}.0.to_out.weight": init.linear(h, inner),
            f"{p}.1.0.weight": init.ones(h),
            f"{p}.1.0.bias": init.zeros(h),
            f"{p}.1.1.weight": init.linear(ff, h),
            f"{p}.1.3.weight": init.linear(h, ff),
        }
    return out


@dataclass(frozen=True)
class AdapterSpec:
    """One checkpoint: file stem, UNet family, projection kind, encoder it was trained on."""

    stem: str
    subfolder: str
    family: str  # "sd15" | "sdxl"
    kind: str  # "base" | "plus" | "full"
    encoder: str  # "vit_h" | "bigg"
    formats: tuple[str, ...] = (".bin", ".safetensors")


ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("ip-adapter_sd15", "models", "sd15", "base", "vit_h"),
    AdapterSpec("ip-adapter_sd15_light", "models", "sd15", "base", "vit_h"),
    AdapterSpec("ip-adapter_sd15_vit-G", "models", "sd15", "base", "bigg"),
    AdapterSpec("ip-adapter-plus_sd15", "models", "sd15", "plus", "vit_h"),
    AdapterSpec("ip-adapter-plus-face_sd15", "models", "sd15", "plus", "vit_h"),
    AdapterSpec("ip-adapter-full-face_sd15", "models", "sd15", "full", "vit_h"),
    AdapterSpec("ip-adapter_sdxl", "sdxl_models", "sdxl", "base", "bigg"),
    AdapterSpec("ip-adapter_sdxl_vit-h", "sdxl_models", "sdxl", "base", "vit_h"),
    AdapterSpec("ip-adapter-plus_sdxl_vit-h", "sdxl_models", "sdxl", "plus", "vit_h"),
    AdapterSpec("ip-adapter-plus-face_sdxl_vit-h", "sdxl_models", "sdxl", "plus", "vit_h"),
)


def _unet_config(sizes: ZooSizes, family: str) -> dict[str, Any]:
    return sd15_unet_config(sizes.sd15_unet) if family == "sd15" else sdxl_unet_config(sizes.sdxl_unet)


def adapter_state_dict(
    spec: AdapterSpec, sizes: ZooSizes, slots: list[CrossAttnSlot], meta: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """The nested ``{"image_proj", "ip_adapter"}`` dict of one checkpoint."""
    init = _Init(f"{REPO}/{spec.subfolder}/{spec.stem}", torch_dtype(sizes.dtype), meta)
    enc = sizes.vit_h if spec.encoder == "vit_h" else sizes.bigg
    cross = _unet_config(sizes, spec.family)["cross_attention_dim"]
    proj: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "base": lambda: image_proj_base(init, enc.projection_dim, cross),
        "full": lambda: image_proj_full(init, enc.hidden_size, cross),
        "plus": lambda: image_proj_resampler(
            init, sizes.plus_sd15 if spec.family == "sd15" else sizes.plus_sdxl, enc.hidden_size, cross
        ),
    }
    image_proj = proj[spec.kind]()
    return {"image_proj": image_proj, "ip_adapter": _ip_layers(init, slots)}


def flat_shapes(specs: Iterable[Any], state_dict: Callable[[Any], dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """`{stem: {"image_proj.<name>": shape, ...}}` of each spec's nested state dict (built on meta)."""
    out: dict[str, dict[str, list[int]]] = {}
    for spec in specs:
        sd = state_dict(spec)
        out[spec.stem] = {f"{k}.{n}": list(t.shape) for k, part in sd.items() for n, t in part.items()}
    return out


def shapes(sizes: ZooSizes) -> dict[str, dict[str, list[int]]]:
    """Tensor shapes of every checkpoint (flat safetensors keys), without writing anything."""
    slots = {f: cross_attention_slots(_unet_config(sizes, f)) for f in ("sd15", "sdxl")}
    return flat_shapes(ADAPTERS, lambda spec: adapter_state_dict(spec, sizes, slots[spec.family], meta=True))


def build_ip_adapter_repo(path: Path, sizes: ZooSizes) -> None:
    """``h94/IP-Adapter``: ``models/`` (ViT-H encoder, SD1.5 adapters) and ``sdxl_models/``."""
    build_vision_encoder(path / "models" / "image_encoder", sizes.vit_h, sizes, f"{REPO}/models/image_encoder")
    build_vision_encoder(path / "sdxl_models" / "image_encoder", sizes.bigg, sizes, f"{REPO}/sdxl_models/image_encoder")
    slots = {f: cross_attention_slots(_unet_config(sizes, f)) for f in ("sd15", "sdxl")}
    for spec in ADAPTERS:
        sd = adapter_state_dict(spec, sizes, slots[spec.family])
        folder = path / spec.subfolder
        if ".bin" in spec.formats:
            save_torch(folder / f"{spec.stem}.bin", sd)
        if ".safetensors" in spec.formats:
            flat = {f"{k}.{n}": t for k, part in sd.items() for n, t in part.items()}
            save_safetensors(folder / f"{spec.stem}.safetensors", flat)
