"""ComfyUI's IPAdapterTiled references: a non-square image cut into 256 px tiles, each with its region.

Read from ComfyUI_IPAdapter_plus (`IPAdapterTiled.apply_tiled`): an almost square image (aspect
between 0.75 and 1.33) is centre-cropped to a square and resized to 512 x 512; any other is resized
(LANCZOS) so its shorter side is 256, and an aspect beyond 4:1 is centre-cropped to 4 tiles; the
result is optionally sharpened (contrast-adaptive), then cut into `ceil(side / 256)` tiles per
axis that overlap evenly to cover it. Each tile is applied as its own IP-Adapter with a mask that
is 1 on the tile's area of the prepared image and 0 elsewhere, and the outputs add up: ipa stores
each tile's embedding as a derived image (`tile_sha`) and attends the tiles as masked images.

Pure layout and pixels here, no model: the extract stage encodes the tiles, planning derives
their store keys and regions from the image size alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ipa_ops.store.encoders.prep import sharpen, to_pil

TILE = 256  # ComfyUI's: divides latent sizes more often than 224; the encoder's processor resizes it
ALGORITHM = "comfy-tiles-1"  # enters every tile's derived sha: a change of the maths is a change of keys


@dataclass(frozen=True)
class Layout:
    """Where the tiles of one image lie: the prepared image's size and each tile's box in it."""

    resize: tuple[int, int]  # (width, height) the image is resized to
    square_crop: bool  # centre-cropped to a square first (almost square images)
    frame: tuple[int, int]  # (width, height) of the prepared image the boxes refer to
    boxes: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom) per tile, row by row


def _centre(size: int, keep: int) -> int:
    """torchvision's CenterCrop offset: round((size - keep) / 2), half to even as Python rounds."""
    return int(round((size - keep) / 2.0))


def layout(width: int, height: int) -> Layout:
    """The tiles of a `width` x `height` image, from its size alone."""
    ratio = height / width
    square_crop = 0.75 < ratio < 1.33
    if square_crop:
        resize = (TILE * 2, TILE * 2)
    elif height < width:
        resize = (int(TILE * width / height), TILE)
    else:
        resize = (TILE, int(TILE * height / width))
    frame = resize
    if ratio > 4 or ratio < 0.25:  # at most 4 tiles along the long side
        frame = (TILE * 4, TILE) if height < width else (TILE, TILE * 4)
    w, h = frame
    tiles_x, tiles_y = math.ceil(w / TILE), math.ceil(h / TILE)
    overlap_x = max(0, (tiles_x * TILE - w) / (tiles_x - 1 if tiles_x > 1 else 1))
    overlap_y = max(0, (tiles_y * TILE - h) / (tiles_y - 1 if tiles_y > 1 else 1))
    boxes = []
    for y in range(tiles_y):
        for x in range(tiles_x):
            left, top = int(x * (TILE - overlap_x)), int(y * (TILE - overlap_y))
            boxes.append((left, top, min(left + TILE, w), min(top + TILE, h)))
    return Layout(resize, square_crop, frame, tuple(boxes))


def prepared(image: Image.Image, sharpening: float) -> tuple[np.ndarray, Layout]:
    """The prepared image ([H, W, 3] float32 in [0, 1]) the tiles are cut from, and its layout."""
    image = image.convert("RGB")
    plan = layout(image.width, image.height)
    if plan.square_crop:
        side = min(image.size)
        left, top = _centre(image.width, side), _centre(image.height, side)
        image = image.crop((left, top, left + side, top + side))
    pixels = np.asarray(image.resize(plan.resize, resample=Image.Resampling.LANCZOS), dtype=np.float32) / 255
    if plan.frame != plan.resize:
        (w, h), (fw, fh) = plan.resize, plan.frame
        left, top = _centre(w, fw), _centre(h, fh)
        pixels = pixels[top : top + fh, left : left + fw]
    if sharpening > 0:
        pixels = sharpen(pixels, sharpening)
    return pixels, plan


def tile_images(image: Image.Image, sharpening: float) -> tuple[list[Image.Image], Layout]:
    """The tiles as 8-bit images (rounded as ComfyUI's clip_preprocess rounds), in layout order."""
    pixels, plan = prepared(image, sharpening)
    return [to_pil(pixels[top:bottom, left:right]) for left, top, right, bottom in plan.boxes], plan


def tile_sha(image_sha256: str, index: int, sharpening: float) -> str:
    """The derived content id of tile `index` of an image: its store key is `<tile_sha>/<encoder id>`."""
    return hashlib.sha256(f"{image_sha256}#{ALGORITHM}:{sharpening!r}:{index}".encode()).hexdigest()


def mask_frame(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """A tiled entry's attention mask in the prepared image's frame ([H', W'] float32), as ComfyUI carries it:
    resized to the image's size, then cropped and resized with it (torchvision's tensor resize: bicubic
    with antialiasing, no clamping), so each tile's region keeps the mask's values."""
    import torch
    import torch.nn.functional as F

    plan = layout(width, height)

    def resize(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)

    values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    values = resize(values, width, height)
    if plan.square_crop:
        side = min(width, height)
        top, left = _centre(height, side), _centre(width, side)
        values = values[..., top : top + side, left : left + side]
    values = resize(values, *plan.resize)
    (w, h), (fw, fh) = plan.resize, plan.frame
    top, left = _centre(h, fh), _centre(w, fw)
    return values[0, 0, top : top + fh, left : left + fw].numpy()


def region_masks(
    frame: tuple[int, int], boxes: list[tuple[int, int, int, int]], inside: np.ndarray | None = None
) -> list[Image.Image]:
    """Per tile, a mask of the prepared image's size: the tile's box white, or holding the entry's own mask
    there (`inside`, from `mask_frame`), black elsewhere (ComfyUI's tile mask)."""
    masks = []
    for left, top, right, bottom in boxes:
        mask = np.zeros((frame[1], frame[0]), dtype=np.float32)
        mask[top:bottom, left:right] = 1.0 if inside is None else inside[top:bottom, left:right]
        masks.append(Image.fromarray(np.clip(np.round(mask * 255), 0, 255).astype(np.uint8)))
    return masks
