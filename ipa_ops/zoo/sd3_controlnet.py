"""``stabilityai/stable-diffusion-3.5-large-controlnet-canny``: an ``SD3ControlNetModel`` for the zoo's SD3.5 Large.

The real repository is one ``SD3ControlNetModel`` folder (``config.json`` + safetensors, as diffusers'
``convert_sd3_controlnet_to_diffusers.py`` writes it): 19 single (not joint) transformer blocks at
the transformer's width, no context embedder (``joint_attention_dim: null``), no position
embedding of its own (``use_pos_embed: false``: the pipeline lends it the transformer's), and the
prompt's pooled projection as is (``force_zeros_for_pooled_projection: false``). Its control image
is VAE-encoded like the latents. The zoo derives the config from its own SD3.5 transformer config,
with 2 blocks at the tiny size (the transformer spreads the residuals over its 38 joint blocks, so
any count works), and gives the zero-initialised output layers seeded random values
(`controlnet.unzero`) so the control image changes the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import save_pretrained, seed_for
from .controlnet import unzero
from .sd3 import SD3_FULL, SD3_SIZES, sd35_config
from .sizes import ZooSizes

SD35_CANNY = "stabilityai/stable-diffusion-3.5-large-controlnet-canny"


def sd35_controlnet_config(transformer: dict[str, Any], blocks: int) -> dict[str, Any]:
    """The ControlNet's `config.json`: the transformer's heads and pooled width, single blocks, shared pos_embed."""
    keep = ("attention_head_dim", "in_channels", "num_attention_heads", "out_channels", "patch_size",
            "pooled_projection_dim", "sample_size")  # fmt: skip
    config = {k: transformer[k] for k in keep}
    config.update(
        _class_name="SD3ControlNetModel", num_layers=blocks, joint_attention_dim=None,
        caption_projection_dim=transformer["pooled_projection_dim"], dual_attention_layers=[],
        extra_conditioning_channels=0, qk_norm=None, pos_embed_max_size=None, pos_embed_type=None,
        use_pos_embed=False, force_zeros_for_pooled_projection=False,
    )  # fmt: skip
    return config


def build_sd35_canny(path: Path, sizes: ZooSizes) -> None:
    """The ControlNet for the zoo's SD3.5 transformer at `sizes`."""
    import torch
    from diffusers import SD3ControlNetModel

    blocks = 19 if SD3_SIZES[sizes.name] is SD3_FULL else 2
    torch.manual_seed(seed_for(SD35_CANNY))
    config = {k: v for k, v in sd35_controlnet_config(sd35_config(sizes), blocks).items() if not k.startswith("_")}
    model = SD3ControlNetModel(**config)
    unzero(model, SD35_CANNY)
    save_pretrained(model, path, sizes.dtype)
