"""CLIP image encoding exactly as diffusers does it for IP-Adapters, batched.

diffusers' `encode_image` runs the encoder's image processor, then takes `image_embeds` (plain /
light adapters) or `hidden_states[-2]` (Plus, plus-face, full-face); its negatives are
`zeros_like(image_embeds)` and `encoder(zeros_like(pixel_values)).hidden_states[-2]`. This class
computes the same numbers for many images per forward pass, in fp16 on GPU and fp32 on CPU.
No Ray here: the extract stage wraps it in an actor, tests and benchmarks call it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipa_ops.flow.prep import ReferencePrep
from ipa_ops.store.encoders import prep as comfy_prep
from ipa_ops.store.encoders.ids import clip_processor

CROP_MODES = ("center", "pad", "none")


def pick_device(want_gpu: bool) -> tuple[str, torch.dtype]:
    """cuda + fp16 when asked for and present, else cpu + fp32 (CPU fp16 is slow and inexact)."""
    if want_gpu and torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class VisionEncoder:
    """What CLIP and SigLIP image encoders share: a batch of images in, numpy arrays per image out.

    Subclasses set `model`, `device`, `dtype`, `hidden_states`, `pixel_values` and which output is
    the pooled embedding (`pooled`)."""

    pooled = "image_embeds"
    model: Any
    device: str
    dtype: torch.dtype
    hidden_states: bool

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[dict[str, np.ndarray]]:
        """Per image: the pooled `image_embeds` [dim] float32 and, if configured, the penultimate
        layer's `hidden_states` [tokens, dim]."""
        if not images:
            return []
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        out = self.model(pixels, output_hidden_states=self.hidden_states)
        embeds = getattr(out, self.pooled).float().cpu().numpy()
        hidden = out.hidden_states[-2].cpu().numpy() if self.hidden_states else None
        return [
            {"image_embeds": embeds[i], **({"hidden_states": hidden[i]} if hidden is not None else {})}
            for i in range(len(images))
        ]


class ClipEncoder(VisionEncoder):
    """A CLIPVisionModelWithProjection plus its processor; `encode` returns numpy arrays per image."""

    def __init__(
        self, folder: str | Path, hidden_states: bool = False, crop: str = "center", gpu: bool = False,
        uncond_image: str = "zeros", prep: ReferencePrep | None = None,
    ):  # fmt: skip
        from transformers import CLIPVisionModelWithProjection

        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        self.device, self.dtype = pick_device(gpu)
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=self.dtype)
        self.model.to(self.device).eval()
        self.processor = clip_processor(Path(folder))
        self.hidden_states = hidden_states
        self.crop = crop
        self.uncond_image = uncond_image
        self.prep = prep

    def prepare(self, image: Image.Image) -> Image.Image:
        """Apply the crop mode before the processor: `pad` letterboxes to a square, `none` squashes; or
        ComfyUI's PrepImageForClipVision when the encoder has `prep`."""
        if self.prep is not None:
            return comfy_prep.to_pil(comfy_prep.prepare(image, self.prep))
        if self.crop == "center" or image.width == image.height:
            return image
        if self.crop == "pad":
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), (0, 0, 0))  # black, as ComfyUI's pad crop
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            return canvas
        crop = self.processor.crop_size
        return image.resize((crop["width"], crop["height"]), resample=Image.Resampling(self.processor.resample))

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        prepared = [self.prepare(img) for img in images]
        return self.processor(prepared, return_tensors="pt").pixel_values

    @torch.inference_mode()
    def uncond(self) -> dict[str, np.ndarray]:
        """The negative embedding diffusers pairs with every image of this encoder (zero pixel values), or
        ComfyUI's (`uncond_image="black"`: a black image through the processor); pooled: zeros either way."""
        crop = self.processor.crop_size
        if self.uncond_image == "black":
            pixels = self.pixel_values([Image.new("RGB", (crop["width"], crop["height"]), (0, 0, 0))])
        else:
            pixels = torch.zeros(1, 3, crop["height"], crop["width"])
        out = self.model(pixels.to(self.device, self.dtype), output_hidden_states=self.hidden_states)
        result: dict[str, Any] = {"image_embeds": np.zeros(out.image_embeds.shape[-1], dtype=np.float32)}
        if self.hidden_states:
            result["hidden_states"] = out.hidden_states[-2][0].cpu().numpy()
        return result

