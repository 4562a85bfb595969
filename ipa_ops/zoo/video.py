"""``guoyww/animatediff-motion-adapter-v1-5-2``: the AnimateDiff ``MotionAdapter`` for SD1.5.

The real repository is one ``MotionAdapter`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``): motion modules for every down/up block of the SD1.5 UNet
(two per down block, three per up block) and, new in v1-5-2, a motion mid block. The zoo writes
the same config with the zoo UNet's block widths, so ``UNetMotionModel.from_unet2d`` pairs the
tiny adapter with the tiny UNet exactly as the real one pairs with SD1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import save_pretrained, seed_for
from .controlnet import unzero
from .sizes import ZooSizes

MOTION_V152 = "guoyww/animatediff-motion-adapter-v1-5-2"


def motion_adapter_config(sizes: ZooSizes) -> dict[str, Any]:
    """``config.json`` arguments of the v1-5-2 motion adapter, widths from the SD1.5 UNet."""
    return {
        "block_out_channels": list(sizes.sd15_unet.block_out_channels),
        "motion_layers_per_block": 2,
        "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": sizes.motion_heads,
        "motion_norm_num_groups": sizes.motion_norm_groups,
        "motion_max_seq_length": sizes.motion_max_seq_length,
        "use_motion_mid_block": True,
        "conv_in_channels": None,
    }


def build_motion_adapter(path: Path, sizes: ZooSizes) -> None:
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed_for(MOTION_V152))
    adapter = MotionAdapter(**motion_adapter_config(sizes))
    unzero(adapter, MOTION_V152)  # a trained adapter moves frames; a zero-initialised one would not
    save_pretrained(adapter, path, sizes.dtype)
