"""SigLIP image encoding as diffusers' SD3 pipeline does it for InstantX's IP-Adapter, batched.

`StableDiffusion3Pipeline.encode_image` runs the encoder's image processor (SigLIP resizes to
384x384, no crop) and takes `hidden_states[-2]` (729 tokens x 1152 at full size); its negative is
`zeros_like` of them, not the encoding of a blank image. `image_embeds` here is SigLIP's pooled
output (what a pooled adapter would read); the store keeps both, as for CLIP.
An encoder of type `clip` whose folder is a SigLIP model is read with this class (`vision_encoder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipa_ops.flow.prep import ReferencePrep
from ipa_ops.store.encoders.clip import ClipEncoder, VisionEncoder, pick_device


def is_siglip(folder: str | Path) -> bool:
    """Whether a vision-encoder folder holds a SigLIP model, from its config.json."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("model_type", "")).startswith("siglip")


class SiglipEncoder(VisionEncoder):
    """A SiglipVisionModel plus its processor; `encode` returns numpy arrays per image (pooled:
    SigLIP's `pooler_output`)."""

    pooled = "pooler_output"

    def __init__(self, folder: str | Path, hidden_states: bool = True, crop: str = "none", gpu: bool = False):
        from transformers import AutoImageProcessor, SiglipVisionModel

        self.device, self.dtype = pick_device(gpu)
        self.model = SiglipVisionModel.from_pretrained(str(folder), dtype=self.dtype).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(folder))
        self.hidden_states = hidden_states
        self.crop = crop  # SigLIP's processor squashes to its square size: no crop mode changes that

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor([img.convert("RGB") for img in images], return_tensors="pt").pixel_values

    def uncond(self) -> dict[str, np.ndarray]:
        """diffusers' SD3 negative: zeros of the hidden states' shape (and of the pooled embedding)."""
        config = self.model.config
        tokens = (config.image_size // config.patch_size) ** 2
        dtype = np.float16 if self.dtype == torch.float16 else np.float32
        result: dict[str, Any] = {"image_embeds": np.zeros(config.hidden_size, dtype=np.float32)}
        if self.hidden_states:
            result["hidden_states"] = np.zeros((tokens, config.hidden_size), dtype=dtype)
        return result


def vision_encoder(
    folder: str | Path, hidden_states: bool, crop: str, gpu: bool, uncond_image: str = "zeros",
    prep: ReferencePrep | None = None,
) -> ClipEncoder | SiglipEncoder:  # fmt: skip
    """The encoder for a `clip`-type folder: SigLIP when the folder is a SigLIP model, else CLIP.

    `uncond_image: black` (ComfyUI's negative for Plus adapters) applies to CLIP folders; SigLIP's
    negative is zeros, as diffusers' SD3 pipeline makes it."""
    if is_siglip(folder):
        if prep is not None:
            raise ValueError(f"encoder {folder}: `prep` is for CLIP encoders; SigLIP's processor squashes to a square")
        return SiglipEncoder(folder, hidden_states, crop, gpu)
    return ClipEncoder(folder, hidden_states, crop, gpu, uncond_image=uncond_image, prep=prep)
