"""ControlNet repositories: ``lllyasviel/control_v11f1p_sd15_depth`` and ``diffusers/controlnet-depth-sdxl-1.0``.

Both real repositories are a single ``ControlNetModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) whose config is the base UNet's down/mid half plus the
conditioning embedding. The zoo derives that config from the zoo's own UNet config (so a tiny
ControlNet fits the tiny UNet exactly as the real one fits the real UNet) and writes it with
``save_pretrained``, which is how both repositories were written.

A freshly constructed ControlNet has zero-initialised output convolutions (it starts as a no-op,
by design); a trained one does not. The zoo fills those with seeded random weights so a control
image really changes the output: an equivalence test that ignored the control image would fail.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .common import save_pretrained, seed_for
from .sd import sd15_unet_config, sdxl_unet_config
from .sizes import ZooSizes

SD15_DEPTH = "lllyasviel/control_v11f1p_sd15_depth"
SDXL_DEPTH = "diffusers/controlnet-depth-sdxl-1.0"


def controlnet_config(unet_config: dict[str, Any], sizes: ZooSizes) -> dict[str, Any]:
    """A ``ControlNetModel`` config matching ``unet_config``: the UNet keys ControlNet shares, plus its own."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet_config.items() if k in accepted}
    config.update(
        conditioning_channels=3,
        conditioning_embedding_out_channels=list(sizes.controlnet_cond_channels),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return config


def unzero(model: Any, name: str) -> None:
    """Give every all-zero weight matrix seeded random values (scaled by fan-in); biases stay zero.

    diffusers zero-initialises the layers that make a new ControlNet or motion module a no-op;
    trained checkpoints are not no-ops, so neither may the zoo's be.
    """
    import torch

    gen = torch.Generator().manual_seed(seed_for(f"{name}/unzero"))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("weight") and param.ndim >= 2 and not bool(param.any()):
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)


def build_controlnet(path: Path, unet_config: dict[str, Any], sizes: ZooSizes, name: str) -> None:
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed_for(name))
    model = ControlNetModel(**controlnet_config(unet_config, sizes))
    unzero(model, name)
    # PyTorch's default conv init shrinks the signal at every layer of the 8-conv conditioning tower,
    # leaving the control image almost no say; He-normal keeps it (~10% of the residuals, as trained ones)
    gen = torch.Generator().manual_seed(seed_for(f"{name}/cond_embedding"))
    with torch.no_grad():
        for pname, param in model.controlnet_cond_embedding.named_parameters():
            if pname.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * (2 / param[0].numel()) ** 0.5)
    save_pretrained(model, path, sizes.dtype)


def build_sd15_depth(path: Path, sizes: ZooSizes) -> None:
    """``lllyasviel/control_v11f1p_sd15_depth``: a ControlNet for the SD1.5 UNet."""
    build_controlnet(path, sd15_unet_config(sizes.sd15_unet), sizes, SD15_DEPTH)


def build_sdxl_depth(path: Path, sizes: ZooSizes) -> None:
    """``diffusers/controlnet-depth-sdxl-1.0``: a ControlNet for the SDXL base UNet (text_time embedding)."""
    build_controlnet(path, sdxl_unet_config(sizes.sdxl_unet), sizes, SDXL_DEPTH)


def configs(sizes: ZooSizes) -> dict[str, dict[str, Any]]:
    """Config dicts, for dry runs and tests."""
    return {
        "controlnet/sd15-depth": controlnet_config(sd15_unet_config(sizes.sd15_unet), sizes),
        "controlnet/sdxl-depth": controlnet_config(sdxl_unet_config(sizes.sdxl_unet), sizes),
    }
