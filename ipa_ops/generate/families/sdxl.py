"""Stable Diffusion XL: a UNet with three down blocks (and the text-time embedding of its two encoders).

Its presets are the InstantStyle paper's blocks, as in diffusers' IP-Adapter guide.
"""

from __future__ import annotations

from ipa_ops.generate.families.unet import UNetFamily

PRESETS = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "layout": {"down": {"block_2": [0.0, 1.0]}},
    "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}

FAMILY = UNetFamily(name="sdxl", presets=PRESETS, claims_config=lambda cfg: len(cfg["down_block_types"]) == 3)
