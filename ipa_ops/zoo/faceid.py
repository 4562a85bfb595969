"""The ``h94/IP-Adapter-FaceID`` repository: FaceID checkpoints at the repository root.

The real repository holds ``.bin`` files only (``torch.save`` of ``{"image_proj", "ip_adapter"}``)
and the zoo writes them with the same names and key layouts, read by diffusers'
``_convert_ip_adapter_image_proj_to_diffusers``:

* ``ip-adapter-faceid_sd15`` / ``_sdxl`` — ``MLPProjModel``: ``proj.0`` (512 -> 1024), ``proj.2``
  (1024 -> 4 x cross) and ``norm`` (``IPAdapterFaceIDImageProjection``);
* ``ip-adapter-faceid-portrait_sd15`` — the same with 16 tokens per face and no LoRA;
* ``ip-adapter-faceid-portrait_sdxl_unnorm`` — a Plus ``Resampler`` over the *raw* (unnormalised)
  face embedding as a one-token sequence, 16 tokens, no LoRA (ComfyUI's "portrait unnorm", SDXL only);
* ``ip-adapter-faceid-plus_sd15`` / ``-plusv2_sd15`` — ``ProjPlusModel``: the ID projection plus
  a ``perceiver_resampler`` over CLIP hidden states of the aligned face crop
  (``IPAdapterFaceIDPlusImageProjection``); v1 and v2 differ only in how they are used (``shortcut``).

Every checkpoint but the portrait one carries the LoRA it was trained with inside ``ip_adapter``:
``{id}.to_q_lora.down.weight`` ... ``{id}.to_out_lora.up.weight`` for *every* attention processor
(``id`` counts ``unet.attn_processors`` in order, self- and cross-attention), next to the usual
``{id}.to_k_ip`` / ``{id}.to_v_ip`` of the cross-attention ones — diffusers'
``_load_ip_adapter_loras`` turns them into a PEFT adapter named ``faceid_<i>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import save_torch, torch_dtype
from .ip_adapters import _Init, _unet_config, block_width, flat_shapes, image_proj_resampler
from .sd import unet_from_config
from .sizes import ZooSizes

REPO = "h94/IP-Adapter-FaceID"


@dataclass(frozen=True)
class AttnSlot:
    """One attention processor of a UNet: checkpoint key id, width, key/value input width."""

    key_id: int
    hidden_size: int
    kv_dim: int
    cross: bool


def attention_slots(unet_config: dict[str, Any]) -> list[AttnSlot]:
    """Every attention processor in ``unet.attn_processors`` order, numbered as diffusers does."""
    unet = unet_from_config(unet_config, meta=True)
    blocks = list(unet_config["block_out_channels"])
    slots: list[AttnSlot] = []
    for key_id, name in enumerate(unet.attn_processors):
        hidden = block_width(name, blocks)
        cross = not name.endswith("attn1.processor")
        slots.append(AttnSlot(key_id, hidden, unet_config["cross_attention_dim"] if cross else hidden, cross))
    return slots


@dataclass(frozen=True)
class FaceIDSpec:
    """One FaceID checkpoint: file stem, UNet family, projection kind, tokens per face, LoRA or not."""

    stem: str
    family: str  # "sd15" | "sdxl"
    kind: str  # "faceid" | "plus" | "unnorm"
    tokens: int = 4
    lora: bool = True


FACEID: tuple[FaceIDSpec, ...] = (
    FaceIDSpec("ip-adapter-faceid_sd15", "sd15", "faceid"),
    FaceIDSpec("ip-adapter-faceid_sdxl", "sdxl", "faceid"),
    FaceIDSpec("ip-adapter-faceid-plus_sd15", "sd15", "plus"),
    FaceIDSpec("ip-adapter-faceid-plusv2_sd15", "sd15", "plus"),
    FaceIDSpec("ip-adapter-faceid-portrait_sd15", "sd15", "faceid", tokens=16, lora=False),
    FaceIDSpec("ip-adapter-faceid-portrait_sdxl_unnorm", "sdxl", "unnorm", tokens=16, lora=False),
)


def _id_proj(init: _Init, id_dim: int, out: int) -> dict[str, torch.Tensor]:
    """The ID-embedding MLP shared by both kinds: 512 -> 2 x 512 -> ``out``."""
    return {
        "proj.0.weight": init.linear(2 * id_dim, id_dim),
        "proj.0.bias": init.bias(2 * id_dim),
        "proj.2.weight": init.linear(out, 2 * id_dim),
        "proj.2.bias": init.bias(out),
    }


def image_proj_faceid(init: _Init, id_dim: int, cross: int, tokens: int) -> dict[str, torch.Tensor]:
    """``MLPProjModel``: one normed face embedding -> ``tokens`` context tokens."""
    return {**_id_proj(init, id_dim, cross * tokens), "norm.weight": init.ones(cross), "norm.bias": init.zeros(cross)}


def image_proj_faceid_plus(init: _Init, sizes: ZooSizes, cross: int) -> dict[str, torch.Tensor]:
    """``ProjPlusModel``: ID tokens refined by a perceiver over the face crop's CLIP hidden states."""
    r, hidden = sizes.faceid_plus, sizes.vit_h.hidden_size
    dim, inner, ff = r.hidden_dims, r.heads * r.dim_head, r.hidden_dims * r.ff_mult
    p = "perceiver_resampler"
    out = {
        **_id_proj(init, sizes.face_id_dim, dim * r.num_queries),
        "norm.weight": init.ones(dim),
        "norm.bias": init.zeros(dim),
        f"{p}.proj_in.weight": init.linear(dim, hidden),
        f"{p}.proj_in.bias": init.bias(dim),
        f"{p}.proj_out.weight": init.linear(cross, dim),
        f"{p}.proj_out.bias": init.bias(cross),
        f"{p}.norm_out.weight": init.ones(cross),
        f"{p}.norm_out.bias": init.zeros(cross),
    }
    for i in range(r.depth):
        q = f"{p}.layers.{i}"
        out |= {
            f"{q}.0.norm1.weight": init.ones(dim),
            f"{q}.0.norm1.bias": init.zeros(dim),
            f"{q}.0.norm2.weight": init.ones(dim),
            f"{q}.0.norm2.bias": init.zeros(dim),
            f"{q}.0.to_q.weight": init.linear(inner, dim),
            f"{q}.0.to_kv.weight": init.linear(2 * inner, dim),
            f"{q}.0.to_out.weight": init.linear(dim, inner),
            f"{q}.1.0.weight": init.ones(dim),
            f"{q}.1.0.bias": init.zeros(dim),
            f"{q}.1.1.weight": init.linear(ff, dim),
            f"{q}.1.3.weight": init.linear(dim, ff),
        }
    return out


def ip_layers(init: _Init, slots: list[AttnSlot], rank: int | None) -> dict[str, torch.Tensor]:
    """``ip_adapter``: LoRA on every processor (when ``rank``), ``to_k_ip``/``to_v_ip`` on cross-attention.

    The up matrices are non-zero (a freshly initialised LoRA is a no-op, a trained one is not), so
    a test can tell whether the LoRA was applied.
    """
    out: dict[str, torch.Tensor] = {}
    for s in slots:
        if rank:
            fan_ins = {"to_q": s.hidden_size, "to_k": s.kv_dim, "to_v": s.kv_dim, "to_out": s.hidden_size}
            for proj, fan_in in fan_ins.items():
                out[f"{s.key_id}.{proj}_lora.down.weight"] = init.linear(rank, fan_in)
                out[f"{s.key_id}.{proj}_lora.up.weight"] = init.linear(s.hidden_size, rank)
        if s.cross:
            out[f"{s.key_id}.to_k_ip.weight"] = init.linear(s.hidden_size, s.kv_dim)
            out[f"{s.key_id}.to_v_ip.weight"] = init.linear(s.hidden_size, s.kv_dim)
    return out


def faceid_state_dict(
    spec: FaceIDSpec, sizes: ZooSizes, slots: list[AttnSlot], meta: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """The nested ``{"image_proj", "ip_adapter"}`` dict of one FaceID checkpoint."""
    init = _Init(f"{REPO}/{spec.stem}", torch_dtype(sizes.dtype), meta)
    cross = _unet_config(sizes, spec.family)["cross_attention_dim"]
    if spec.kind == "plus":
        proj = image_proj_faceid_plus(init, sizes, cross)
    elif spec.kind == "unnorm":
        proj = image_proj_resampler(init, sizes.plus_sdxl, sizes.face_id_dim, cross)
    else:
        proj = image_proj_faceid(init, sizes.face_id_dim, cross, spec.tokens)
    return {"image_proj": proj, "ip_adapter": ip_layers(init, slots, sizes.faceid_lora_rank if spec.lora else None)}


def shapes(sizes: ZooSizes) -> dict[str, dict[str, list[int]]]:
    """Tensor shapes of every FaceID checkpoint (flat keys), without writing anything."""
    slots = {f: attention_slots(_unet_config(sizes, f)) for f in ("sd15", "sdxl")}
    return flat_shapes(FACEID, lambda spec: faceid_state_dict(spec, sizes, slots[spec.family], meta=True))


def build_faceid_repo(path: Path, sizes: ZooSizes) -> None:
    """``h94/IP-Adapter-FaceID``: the ``.bin`` checkpoints at the root, as on the hub."""
    slots = {f: attention_slots(_unet_config(sizes, f)) for f in ("sd15", "sdxl")}
    for spec in FACEID:
        save_torch(path / f"{spec.stem}.bin", faceid_state_dict(spec, sizes, slots[spec.family]))
