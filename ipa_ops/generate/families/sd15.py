"""Stable Diffusion 1.x / 2.x: a UNet with four down blocks and no added text-time embedding.

Its presets sit at the same resolution and depth as SDXL's InstantStyle blocks; its up block 0
has no attention, so style sits in up block 1 (ComfyUI's weight types address layers otherwise).
"""

from __future__ import annotations

from ipa_ops.generate.families.unet import UNetFamily

PRESETS = {
    "style": {"up": {"block_1": [0.0, 1.0, 0.0]}},
    "layout": {"down": {"block_2": [0.0, 1.0]}},
    "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}},
}

FAMILY = UNetFamily(name="sd15", presets=PRESETS, claims_config=lambda cfg: len(cfg["down_block_types"]) != 3)
