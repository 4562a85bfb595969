"""A transcription of ComfyUI_IPAdapter_plus's reference preparation, for tests' expected values only.

`prep_image` follows `PrepImageForClipVision.prep_image` and `contrast_adaptive_sharpening` (utils.py)
step by step on [B, H, W, C] float tensors, with torchvision's `ToPILImage` / `ToTensor` / `pad`
written out in torch (torchvision is not installed): ToPILImage of a float image is `mul(255).byte()`,
ToTensor of an 8-bit image is `/ 255`, `pad(x, (l, t, r, b))` pads with zeros. `clip_preprocess` is
ComfyUI's `comfy.clip_vision.clip_preprocess` for an image already at the encoder's size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor_image(image: Image.Image) -> torch.Tensor:
    """ComfyUI's LoadImage: [1, H, W, 3] float32 = uint8 / 255."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.float32) / 255.0)[None]


def _min(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.clamp(torch.stack(tensors).min(axis=0)[0], min=0)


def _max(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.clamp(torch.stack(tensors).max(axis=0)[0], max=1)


def contrast_adaptive_sharpening(image: torch.Tensor, amount: float) -> torch.Tensor:
    img = F.pad(image, (1, 1, 1, 1))
    a, b, c = img[..., :-2, :-2], img[..., :-2, 1:-1], img[..., :-2, 2:]
    d, e, f = img[..., 1:-1, :-2], img[..., 1:-1, 1:-1], img[..., 1:-1, 2:]
    g, h, i = img[..., 2:, :-2], img[..., 2:, 1:-1], img[..., 2:, 2:]
    cross = (b, d, e, f, h)
    mn, mx = _min(cross), _max(cross)
    diag = (a, c, g, i)
    mx = mx + _max(diag)
    mn = mn + _min(diag)
    amp = torch.sqrt(torch.reciprocal(mx) * torch.minimum(mn, (2 - mx)))
    w = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    div = torch.reciprocal(1 + 4 * w)
    output = ((b + d + f + h) * w + e) * div
    return torch.nan_to_num(output).clamp(0, 1)


def prep_image(image: torch.Tensor, interpolation: str, crop_position: str, sharpening: float, size: int = 224):
    _, oh, ow, _ = image.shape
    output = image.permute([0, 3, 1, 2])
    if crop_position == "pad":
        if oh != ow:
            if oh > ow:
                pad = (oh - ow) // 2
                pad = (pad, 0, pad, 0)
            else:
                pad = (ow - oh) // 2
                pad = (0, pad, 0, pad)
            output = F.pad(output, (pad[0], pad[2], pad[1], pad[3]), value=0)  # torchvision's (l, t, r, b)
    else:
        crop_size = min(oh, ow)
        x = (ow - crop_size) // 2
        y = (oh - crop_size) // 2
        if "top" in crop_position:
            y = 0
        elif "bottom" in crop_position:
            y = oh - crop_size
        elif "left" in crop_position:
            x = 0
        elif "right" in crop_position:
            x = ow - crop_size
        output = output[:, :, y : y + crop_size, x : x + crop_size]
    imgs = []
    for img in output:
        pil = Image.fromarray(img.mul(255).byte().permute(1, 2, 0).numpy())  # ToPILImage
        pil = pil.resize((size, size), resample=Image.Resampling[interpolation])
        imgs.append(torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0).permute(2, 0, 1))  # ToTensor
    output = torch.stack(imgs, dim=0)
    if sharpening > 0:
        output = contrast_adaptive_sharpening(output, sharpening)
    return output.permute([0, 2, 3, 1])


def clip_preprocess(image: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] at the encoder's size -> normalised pixel values [B, 3, H, W] (8-bit rounding first)."""
    image = image.movedim(-1, 1)
    image = torch.clip((255.0 * image).round(), 0, 255) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CenterCrop on [..., H, W] (no padding needed here): offsets round((size - crop) / 2)."""
    top = int(round((x.shape[-2] - height) / 2.0))
    left = int(round((x.shape[-1] - width) / 2.0))
    return x[..., top : top + height, left : left + width]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's T.Resize(size, BICUBIC, antialias=True) on a float tensor."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def tiled_tiles(
    image: torch.Tensor, sharpening: float, attn_mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """IPAdapterTiled.apply_tiled's step 2 on [1, H, W, 3]: the tiles [1, 256, 256, 3] and their masks [1, H', W'].

    Without `attn_mask` ([1, h, w]) the default all-ones mask is kept as ones: the bicubic resizes
    ComfyUI runs on it leave a constant image at one (to float rounding)."""
    tile_size = 256
    _, oh, ow, _ = image.shape
    given = attn_mask is not None
    if attn_mask is None:
        attn_mask = torch.ones([1, oh, ow], dtype=image.dtype)
    image = image.permute([0, 3, 1, 2])
    attn_mask = attn_mask.unsqueeze(1)
    if given:
        attn_mask = _resize(attn_mask, (oh, ow))
    if oh / ow > 0.75 and oh / ow < 1.33:
        image = _center_crop(image, min(oh, ow), min(oh, ow))
        resize = (tile_size * 2, tile_size * 2)
        attn_mask = _center_crop(attn_mask, min(oh, ow), min(oh, ow))
    else:
        resize = (int(tile_size * ow / oh), tile_size) if oh < ow else (tile_size, int(tile_size * oh / ow))
    imgs = []
    for img in image:
        pil = Image.fromarray(img.mul(255).byte().permute(1, 2, 0).numpy())  # ToPILImage
        pil = pil.resize(resize, resample=Image.Resampling["LANCZOS"])
        imgs.append(torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0).permute(2, 0, 1))  # ToTensor
    image = torch.stack(imgs)
    if given:
        attn_mask = _resize(attn_mask, resize[::-1])
    else:
        attn_mask = torch.ones([1, 1, resize[1], resize[0]], dtype=image.dtype)  # T.Resize of ones (see above)
    if oh / ow > 4 or oh / ow < 0.25:
        crop = (tile_size, tile_size * 4) if oh < ow else (tile_size * 4, tile_size)
        image = _center_crop(image, *crop)
        attn_mask = _center_crop(attn_mask, *crop)
    attn_mask = attn_mask.squeeze(1)
    if sharpening > 0:
        image = contrast_adaptive_sharpening(image, sharpening)
    image = image.permute([0, 2, 3, 1])
    _, oh, ow, _ = image.shape
    tiles_x = math.ceil(ow / tile_size)
    tiles_y = math.ceil(oh / tile_size)
    overlap_x = max(0, (tiles_x * tile_size - ow) / (tiles_x - 1 if tiles_x > 1 else 1))
    overlap_y = max(0, (tiles_y * tile_size - oh) / (tiles_y - 1 if tiles_y > 1 else 1))
    base_mask = torch.zeros([attn_mask.shape[0], oh, ow], dtype=image.dtype)
    tiles, masks = [], []
    for y in range(tiles_y):
        for x in range(tiles_x):
            start_x = int(x * (tile_size - overlap_x))
            start_y = int(y * (tile_size - overlap_y))
            tiles.append(image[:, start_y : start_y + tile_size, start_x : start_x + tile_size, :])
            mask = base_mask.clone()
            mask[:, start_y : start_y + tile_size, start_x : start_x + tile_size] = attn_mask[
                :, start_y : start_y + tile_size, start_x : start_x + tile_size
            ]
            masks.append(mask)
    return tiles, masks
