"""Turn an adapter's stored embeddings, negatives and masks into what the generator consumes.

- `combine` merges several reference images of one adapter: `concat` keeps them as separate
  images (diffusers' behaviour: one attention over all their tokens); the others merge them into
  one as ComfyUI_IPAdapter_plus does: `average`, `add`, `subtract` (the first minus the *mean* of
  the rest), `norm_average` (ComfyUI's "norm average", either spelling: each element divided by
  its norm across the images, then averaged), `max` and `min` (per element). ipa's formulas before
  ComfyUI's stay under their own names: `subtract_sum` (the first minus the sum of the rest) and
  `unit_average` (unit-length embeddings averaged, rescaled to their mean length).
- negatives replace the unconditional embedding (the zero / zero-image embedding diffusers uses).
- masks follow `IPAdapterMaskProcessor`: resized to the output, binarised unless soft.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageOps

COMBINE_MODES = ("concat", "average", "norm_average", "norm average", "add", "subtract", "max", "min")
COMBINE_MODES += ("subtract_sum", "unit_average")
# modes whose maths changed for ComfyUI's: row keys of several images carry the version (plan.py)
_CHANGED = {"subtract": 2, "norm_average": 2, "norm average": 2}


def combine(embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """[n, ...] embeddings of one adapter's images -> [n, ...] (concat) or [1, ...]."""
    if mode == "concat" or embeds.shape[0] == 1:
        return embeds
    if mode == "average":
        return embeds.mean(dim=0, keepdim=True)
    if mode == "add":
        return embeds.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return embeds[:1] - embeds[1:].mean(dim=0, keepdim=True)
    if mode in ("norm_average", "norm average"):
        return (embeds / embeds.norm(dim=0, keepdim=True).clamp_min(1e-12)).mean(dim=0, keepdim=True)
    if mode == "max":
        return embeds.max(dim=0, keepdim=True).values
    if mode == "min":
        return embeds.min(dim=0, keepdim=True).values
    if mode == "subtract_sum":
        return embeds[:1] - embeds[1:].sum(dim=0, keepdim=True)
    if mode == "unit_average":
        norms = embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (embeds / norms).mean(dim=0, keepdim=True) * norms.mean(dim=0, keepdim=True)
    raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {mode!r}")


def combine_identity(mode: str, images: int) -> dict[str, int]:
    """What a row key adds for a combine mode: its maths version where the maths of the name changed."""
    return {"combine_version": _CHANGED[mode]} if mode in _CHANGED and images > 1 else {}


def negatives(uncond: torch.Tensor, count: int, given: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The unconditional side for `count` combined images: user negatives, else the encoder's uncond."""
    if given is None:
        return uncond.unsqueeze(0).expand(count, *uncond.shape).clone()
    if given.shape[0] == 1:
        return given.expand(count, *given.shape[1:]).clone()
    return combine(given, mode)


def fit_mask(mask: Image.Image, width: int, height: int, fit: str | None) -> Image.Image:
    """Bring a mask to the output aspect ratio: `pad` (black borders) or `crop` (centre); else as is."""
    if fit == "pad":
        return ImageOps.pad(mask.convert("L"), (width, height), color=0)
    if fit == "crop":
        return ImageOps.fit(mask.convert("L"), (width, height))
    return mask


def aspect_mismatch(size: tuple[int, int], width: int, height: int, tolerance: float = 0.01) -> bool:
    """True when a (w, h) image differs from the output's aspect ratio by more than 1%."""
    return abs(size[0] / size[1] - width / height) > tolerance * (width / height)


def preprocess_masks(masks: list[Image.Image], width: int, height: int, soft: bool = False) -> torch.Tensor:
    """[n, H, W] masks exactly as diffusers' IPAdapterMaskProcessor.preprocess makes them."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    processor = IPAdapterMaskProcessor(do_binarize=not soft)
    return processor.preprocess(masks, height=height, width=width)[:, 0]


def as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
