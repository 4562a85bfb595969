"""ComfyUI's PrepImageForClipVision on PIL images: crop position or pad, resize, sharpening.

Read from ComfyUI_IPAdapter_plus (`PrepImageForClipVision.prep_image`, `utils.contrast_adaptive_sharpening`):

- `pad` adds `(long - short) // 2` black columns (rows) on both sides, so an odd difference leaves
  the image one pixel short of square (the resize then squashes it, as ComfyUI does);
- any other position keeps the `min(h, w)` square at the centre, or against that edge;
- the square is resized with a PIL filter to `size` x `size`, then optionally sharpened with
  contrast-adaptive sharpening (AMD's CAS, as in Jamy-L's PyTorch port ComfyUI uses).

The result is ComfyUI's float image in [0, 1]; `to_pil` rounds it to 8 bits exactly as ComfyUI's
`clip_preprocess` does before normalising, so the encoder's processor sees the same levels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ipa_ops.flow.prep import ReferencePrep


def crop_box(width: int, height: int, position: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the kept square: the shorter side, centred unless at an edge."""
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    if position == "top":
        y = 0
    elif position == "bottom":
        y = height - side
    elif position == "left":
        x = 0
    elif position == "right":
        x = width - side
    return x, y, x + side, y + side


def padded(image: Image.Image) -> Image.Image:
    """Black borders of `(long - short) // 2` on both sides of the shorter axis (ComfyUI's `pad`)."""
    w, h = image.size
    pad_x, pad_y = ((h - w) // 2, 0) if h > w else (0, (w - h) // 2)
    canvas = Image.new("RGB", (w + 2 * pad_x, h + 2 * pad_y), (0, 0, 0))
    canvas.paste(image, (pad_x, pad_y))
    return canvas


def sharpen(pixels: np.ndarray, amount: float) -> np.ndarray:
    """Contrast-adaptive sharpening of an [H, W, C] float image in [0, 1] (zero-padded borders).

    Each pixel's cross (4 neighbours and itself) and diagonal neighbours give a local contrast
    range; the sharpening weight shrinks where contrast is high, so edges do not ring. Computed with
    torch on the CPU, where ComfyUI computes it, so the result matches it to the last bit (numpy's
    square root rounds differently, and one ulp can flip an 8-bit level)."""
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1)
    x = torch.nn.functional.pad(image, (1, 1, 1, 1))
    h, w = pixels.shape[:2]
    at = {(r, c): x[:, r : r + h, c : c + w] for r in range(3) for c in range(3)}
    cross = torch.stack([at[0, 1], at[1, 0], at[1, 1], at[1, 2], at[2, 1]])
    diagonal = torch.stack([at[0, 0], at[0, 2], at[2, 0], at[2, 2]])
    low = cross.min(0).values.clamp(min=0) + diagonal.min(0).values.clamp(min=0)
    high = cross.max(0).values.clamp(max=1) + diagonal.max(0).values.clamp(max=1)
    amp = torch.sqrt(torch.reciprocal(high) * torch.minimum(low, 2 - high))
    weight = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    out = ((at[0, 1] + at[1, 0] + at[1, 2] + at[2, 1]) * weight + at[1, 1]) * torch.reciprocal(1 + 4 * weight)
    return torch.nan_to_num(out).clamp(0, 1).permute(1, 2, 0).numpy().copy()


def prepare(image: Image.Image, prep: ReferencePrep) -> np.ndarray:
    """ComfyUI's prepared image: [size, size, 3] float32 in [0, 1]."""
    image = image.convert("RGB")
    if prep.crop_position == "pad":
        square = padded(image) if image.width != image.height else image
    else:
        square = image.crop(crop_box(image.width, image.height, prep.crop_position))
    resized = square.resize((prep.size, prep.size), resample=Image.Resampling[prep.interpolation])
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255)
    return sharpen(pixels, prep.sharpening) if prep.sharpening > 0 else pixels


def to_pil(pixels: np.ndarray) -> Image.Image:
    """8-bit levels as ComfyUI's `clip_preprocess` takes them: `round(255 x)`, clipped."""
    return Image.fromarray(np.clip(np.round(pixels * np.float32(255)), 0, 255).astype(np.uint8))
