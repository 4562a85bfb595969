"""ComfyUI_IPAdapter_plus's per-frame controls, transcribed for tests' expected values only.

`ipadapter_weights` is `IPAdapterWeights.weights` without images (its `weights` and `weights_invert`
outputs), `tensor_to_size` is utils.py's; `FrameProcessor` is an unbatched IP attention that gives
each sample of a one-row AnimateDiff batch its frame's reference, weight and mask, the way
ComfyUI's `ipadapter_attention` does with `unfold_batch` (cond/uncond per latent, list weight per
latent), with the row's masks as diffusers' `IPAdapterMaskProcessor` downsamples them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor


def ipadapter_weights(weights: str = "", timing: str = "custom", frames: int = 0, start_frame: int = 0,
                      end_frame: int = 9999) -> tuple[list[float], list[float]]:  # fmt: skip
    weights = weights.replace("\n", ",")
    weights = [float(weight) for weight in weights.split(",") if weight.strip() != ""]
    if timing != "custom":
        frames = max(frames, 2)
        start = 0.0
        end = 1.0
        if len(weights) > 0:
            start = weights[0]
            end = weights[-1]
        weights = []
        end_frame = min(end_frame, frames)
        duration = end_frame - start_frame
        if start_frame > 0:
            weights.extend([start] * start_frame)
        for i in range(duration):
            n = duration - 1
            if timing == "linear":
                weights.append(start + (end - start) * i / n)
            elif timing == "ease_in_out":
                weights.append(start + (end - start) * (1 - math.cos(i / n * math.pi)) / 2)
            elif timing == "ease_in":
                weights.append(start + (end - start) * math.sin(i / n * math.pi / 2))
            elif timing == "ease_out":
                weights.append(start + (end - start) * (1 - math.cos(i / n * math.pi / 2)))
        weights[-1] = end
        if end_frame < frames:
            weights.extend([end] * (frames - end_frame))
    if len(weights) == 0:
        weights = [0.0]
    return weights, weights[::-1]


def tensor_to_size(source: torch.Tensor, dest_size: int) -> torch.Tensor:
    source_size = source.shape[0]
    if source_size < dest_size:
        shape = [dest_size - source_size] + [1] * (source.dim() - 1)
        source = torch.cat((source, source[-1:].repeat(shape)), dim=0)
    elif source_size > dest_size:
        source = source[:dest_size]
    return source


class FrameProcessor(torch.nn.Module):
    """Text attention plus, per sample, the IP attention of its frame's own reference (unfolded)."""

    def __init__(self, to_k_ip: torch.nn.Module, to_v_ip: torch.nn.Module, frames: int, scale: float,
                 unfold: bool, weights: torch.Tensor | None, masks: torch.Tensor | None):  # fmt: skip
        super().__init__()
        self.to_k_ip, self.to_v_ip, self.frames, self.scale = to_k_ip, to_v_ip, frames, scale
        self.unfold = unfold
        self.weights = tensor_to_size(weights, frames) if weights is not None else torch.ones(frames)
        self.masks = tensor_to_size(masks, frames) if masks is not None else None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **_: Any) -> torch.Tensor:  # fmt: skip
        text, (ip_tokens,) = encoder_hidden_states
        heads = attn.heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            split = [x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v)]
            return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1])

        query = attn.to_q(hidden_states)
        out = attend(query, attn.to_k(text), attn.to_v(text))
        samples = []
        for s in range(hidden_states.shape[0]):  # one sample at a time: frame s % frames of the row
            frame = s % self.frames
            images = ip_tokens[s]  # [n, T, C]
            tokens = tensor_to_size(images, self.frames)[frame] if self.unfold else images.reshape(-1, images.shape[-1])
            q = query[s : s + 1]
            ip = attend(q, self.to_k_ip(tokens)[None], self.to_v_ip(tokens)[None]) * self.scale * self.weights[frame]
            if self.masks is not None:
                ip = ip * IPAdapterMaskProcessor.downsample(self.masks[frame][None], 1, q.shape[1], 1)
            samples.append(ip)
        out = out + torch.cat(samples)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def run(pipe: Any, processor: dict[str, Any], **call: Any) -> Any:
    """`pipe(**call)` with its IP processors swapped for FrameProcessor(**processor), then restored."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    original = dict(pipe.unet.attn_processors)
    procs = {
        name: FrameProcessor(proc.to_k_ip[0], proc.to_v_ip[0], **processor)
        if isinstance(proc, IPAdapterAttnProcessor2_0) else proc
        for name, proc in original.items()
    }  # fmt: skip
    pipe.unet.set_attn_processor(procs)
    try:
        return pipe(**call)
    finally:
        pipe.unet.set_attn_processor(original)


def full_batch(weights: list[float], images: int, add_starting_frames: int = 0,
               add_ending_frames: int = 0) -> tuple[list[float], list[int]]:  # fmt: skip
    """IPAdapterWeights' image branch with `method: full batch`: (weights, image_1 as indices of the images)."""
    frames = len(weights)
    image = torch.arange(images, dtype=torch.float32)[:, None, None, None]
    weights = weights * image.shape[0]
    image_1 = image.repeat_interleave(frames, 0)
    if add_starting_frames > 0:
        weights = [weights[0]] * add_starting_frames + weights
        image_1 = torch.cat([image[:1].repeat(add_starting_frames, 1, 1, 1), image_1], dim=0)
    if add_ending_frames > 0:
        weights = weights + [weights[-1]] * add_ending_frames
        image_1 = torch.cat([image_1, image[-1:].repeat(add_ending_frames, 1, 1, 1)], dim=0)
    return weights, [int(i) for i in image_1.flatten().tolist()]
