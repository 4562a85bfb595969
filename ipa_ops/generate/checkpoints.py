"""What a checkpoint expects, read from tensor shapes and config files without loading weights.

`AdapterFacts` is what every family's checkpoint layout is read into (each family classifies its
own layout from `checkpoint_shapes`; `families.adapter_facts` asks them in turn); CLIP vision
encoder folders are read from their config.json. Pre-flight, planning and the generator all read
these facts; none of them loads a model to learn them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass(frozen=True)
class AdapterFacts:
    """What an IP-Adapter checkpoint expects, read from its tensor shapes."""

    kind: str  # "pooled", "plus", "full_face", "faceid", "faceid_plus", "portrait_unnorm", "sd3" (InstantX)
    cross_attention_dim: int
    ip_layers: int
    image_dim: int  # pooled projection dim or hidden size it consumes (0 for faceid)
    face_dim: int  # 512 for FaceID checkpoints, else 0
    tokens: int
    lora: bool = False  # FaceID: the checkpoint carries the LoRA it was trained with (`to_q_lora` ... keys)
    family: str = ""  # the model family whose layout it is in ("flux", "sd3"); "" for h94's UNet layout

    @property
    def needs_face(self) -> bool:
        return self.face_dim > 0

    @property
    def raw_face(self) -> bool:
        """Portrait-unnorm reads the unnormalised face embedding, as a one-token sequence, into a Resampler."""
        return self.kind == "portrait_unnorm"

    @property
    def needs_hidden_states(self) -> bool:
        return self.kind in ("plus", "full_face", "faceid_plus", "sd3")


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by flat key (h94's nested groups joined: `image_proj.*`), without loading weights."""
    # ComfyUI tells the portrait-unnorm checkpoint by its file name ("unnorm"): its keys are a Plus adapter's
    marker = {UNNORM_MARKER: ()} if "unnorm" in path.name.lower() else {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            return {**{k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}, **marker}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {**{f"{group}.{k}": tuple(v.shape) for group, sub in state.items() for k, v in sub.items()}, **marker}


UNNORM_MARKER = "portraitunnorm"  # the flag ComfyUI's loader sets on such a checkpoint


def encoder_dims(folder: Path) -> tuple[int, int]:
    """(projection_dim, hidden_size) of a CLIP vision encoder folder."""
    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg.get("vision_config", cfg)
    return int(cfg.get("projection_dim", vision.get("projection_dim", 0))), int(vision["hidden_size"])


def encoder_kind(folder: Path) -> str:
    """`clip`, or the vision family another image encoder folder is of (`siglip`), from its config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    model_type = str(cfg.get("model_type", "clip"))
    return "siglip" if model_type.startswith("siglip") else "clip" if model_type.startswith("clip") else model_type
