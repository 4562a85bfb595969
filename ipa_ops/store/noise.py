"""Noise negatives as ComfyUI_IPAdapter_plus's IPAdapterNoise makes them, bit for bit, as images.

A noise image replaces the black / zero unconditional image: guidance then pushes away from noise
(or from a noised copy of the reference) rather than from nothing. ComfyUI's node squares the
reference (centre crop), resizes it to 224 (bicubic, antialiased), seeds torch's generator with
the pixel sum, and then mixes in uniform noise (`fade`, `dissolve`), adds Gaussian noise
(`gaussian`), or warps and flips the image before noising it (`shuffle`); it clamps to [0, 1] and
optionally blurs. The same reference and settings give the same image every time.

ComfyUI's CLIP preprocessing rounds every pixel to 8 bits, so an 8-bit PNG of the noise image,
encoded like any reference, gives the embedding ComfyUI computes. Torchvision's transforms are
re-implemented here (its elastic warp, flips and Gaussian blur, in the order they draw random numbers).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
SIZE = 224  # IPAdapterNoise's output size (CLIP's input)


def noise_image(image: np.ndarray | None, kind: str, strength: float = 1.0, blur: int = 0) -> np.ndarray:
    """[224, 224, 3] float32 in [0, 1]: the IPAdapterNoise output for an [H, W, 3] uint8 reference (None: black)."""
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise type must be one of {', '.join(NOISE_TYPES)}; got {kind!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"noise strength is between 0 and 1 (ComfyUI's range); got {strength}")
    if not 0 <= blur <= 32:
        raise ValueError(f"noise blur is a kernel size from 0 to 32 (ComfyUI's range); got {blur}")
    base = _square(image)  # [1, 224, 224, 3], laid out as ComfyUI's tensor is (random draws follow it)
    gen = torch.Generator().manual_seed(int(torch.sum(base).item()) % 1000000007)  # ComfyUI seeds on the pixel sum
    if kind == "fade":
        noise = base * (1 - strength) + _uniform(base, gen) * strength
    elif kind == "dissolve":
        mask = (_uniform(base, gen) < strength).float()
        noise = base * (1 - mask) + _uniform(base, gen) * mask
    elif kind == "gaussian":
        noise = base + _normal(base, gen) * strength
    else:
        warped = _shuffle(base.permute(0, 3, 1, 2), strength, gen).permute(0, 2, 3, 1)  # channels first in memory
        grain = _normal(warped, gen) * (strength * 0.75)
        noise = warped * (1 - grain) + grain
    noise = torch.clamp(noise, 0, 1)
    if blur > 0:
        size = blur + 1 if blur % 2 == 0 else blur
        noise = gaussian_blur(noise.permute(0, 3, 1, 2), size, size * 0.15 + 0.35).permute(0, 2, 3, 1)
    return noise[0].contiguous().numpy()


def _uniform(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`rand_like`: the same strides as `like`, so the draws land where ComfyUI's do (a non-contiguous
    tensor is filled element by element, which draws different numbers from a contiguous one)."""
    return torch.empty_like(like).uniform_(0, 1, generator=gen)


def _normal(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`randn_like`, with the same care for strides as `_uniform`."""
    return torch.empty_like(like).normal_(generator=gen)


def to_uint8(noise: np.ndarray) -> np.ndarray:
    """The 8-bit image ComfyUI's CLIP preprocessing sees: clip(255 x).round()."""
    return torch.clip(torch.from_numpy(noise) * 255.0, 0, 255).round().to(torch.uint8).numpy()


def _square(image: np.ndarray | None) -> torch.Tensor:
    """Centre crop to a square and bicubic (antialiased) resize to 224, as the node's torchvision transforms."""
    if image is None:
        return torch.zeros(1, SIZE, SIZE, 3)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]  # [1, H, W, 3]
    chw = pixels.permute(0, 3, 1, 2)
    height, width = chw.shape[-2:]
    side = min(height, width)
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    chw = chw[..., top : top + side, left : left + side]
    if side != SIZE:
        chw = F.interpolate(chw, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)
    return chw.permute(0, 2, 3, 1)


def gaussian_blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """[N, C, H, W] blurred with a normalised [size, size] Gaussian, reflect-padded (torchvision's gaussian_blur)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=image.dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    line = pdf / pdf.sum()
    kernel = torch.mm(line[:, None], line[None, :]).expand(image.shape[-3], 1, size, size)
    padded = F.pad(image, [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=image.shape[-3])


def _shuffle(image: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """ElasticTransform(alpha=75, sigma=(1 - strength) * 3.5), then a vertical and a horizontal flip (p=1)."""
    sigma, alpha = (1 - strength) * 3.5, 75.0
    height, width = image.shape[-2:]
    offsets = []
    for extent in (width, height):  # dx is normalised by the width, dy by the height
        d = torch.rand([1, 1, height, width], generator=gen) * 2 - 1
        if sigma > 0.0:
            k = int(8 * sigma + 1)
            d = gaussian_blur(d, k + 1 if k % 2 == 0 else k, sigma)
        offsets.append(d * alpha / extent)
    displacement = torch.concat(offsets, 1).permute([0, 2, 3, 1])
    ys, xs = (torch.linspace((-s + 1) / s, (s - 1) / s, s) for s in (height, width))
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1).unsqueeze(0) + displacement
    with_mask = torch.cat((image, torch.ones_like(image[:, :1])), dim=1)  # the fill mask rides as a channel
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = sampled[:, :-1] * sampled[:, -1:].expand_as(sampled[:, :-1])  # fill 0 outside the warped image
    for dim in (-2, -1):  # RandomVerticalFlip(p=1), RandomHorizontalFlip(p=1): each draws one number
        torch.rand(1, generator=gen)
        warped = warped.flip(dim)
    return warped
