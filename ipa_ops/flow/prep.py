"""How a reference image is prepared before a CLIP encoder sees it: ComfyUI's PrepImageForClipVision.

An encoder option (`encoders.<alias>.prep`), so embeddings of a differently prepared image live
under another encoder id and so another store key. The pixel maths is `store/encoders/prep.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ipa_ops.flow.models import Strict

CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")  # PIL's names, as ComfyUI


class ReferencePrep(Strict):
    """ComfyUI's PrepImageForClipVision: square crop at a position (or pad), resize, sharpen."""

    crop_position: Literal["top", "bottom", "left", "right", "center", "pad"] = Field(
        "center", description="Which square of a non-square image is kept (`top`, `bottom`, `left`, `right`, "
        "`center`), or `pad`: black borders to a square. The crop's side is the shorter side, as in ComfyUI.",
    )
    interpolation: Literal["LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST"] = Field(
        "LANCZOS", description="PIL filter that resizes the square to `size` (ComfyUI's default LANCZOS)."
    )
    sharpening: float = Field(
        0.0, ge=0.0, le=1.0, description="Contrast-adaptive sharpening amount, 0 (off) to 1, ComfyUI's formula."
    )
    size: int = Field(
        224, ge=8, le=4096, description="Side of the prepared square (ComfyUI: 224); the encoder's own processor "
        "then runs on it as on any image (at 224 px it changes nothing but the normalisation).",
    )

    def facts(self) -> dict[str, object]:
        """What enters the encoder id."""
        return {"comfy_prep": self.model_dump()}


class TileSpec(Strict):
    """ComfyUI's IPAdapterTiled: besides each whole image, store its 256 px tiles (entries opt in with `tiled`)."""

    sharpening: float = Field(
        0.0, ge=0.0, le=1.0, description="Contrast-adaptive sharpening of the resized image before it is cut "
        "(IPAdapterTiled's `sharpening`).",
    )

    def facts(self) -> dict[str, object]:
        """What enters the encoder id."""
        return {"comfy_tiles": self.model_dump()}
