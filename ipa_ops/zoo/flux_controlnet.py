"""``InstantX/FLUX.1-dev-Controlnet-Canny``: a ``FluxControlNetModel`` folder for the zoo's FLUX.1-dev.

The real repository is one ``FluxControlNetModel`` (``config.json`` + safetensors) with the Flux
transformer's widths, 5 double and 10 single blocks and a guidance embedding; its control image is
VAE-encoded and packed like the latents. The zoo derives the config from its own Flux transformer
config, with 2 double blocks and 1 single block at the tiny size (the transformer spreads the
ControlNet's residuals over its blocks, so any count works), and gives the zero-initialised
output layers seeded random values so the control image changes the result (`controlnet.unzero`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import save_pretrained, seed_for
from .controlnet import unzero
from .flux import FLUX_SIZES, flux_sizes, transformer_config
from .sizes import ZooSizes

FLUX_CANNY = "InstantX/FLUX.1-dev-Controlnet-Canny"
_BLOCKS = {"full": (5, 10)}  # the real repository's double / single blocks; smaller sizes: (2, 1)


def flux_controlnet_config(size: str) -> dict[str, Any]:
    """The ControlNet's `config.json`: the transformer's widths, fewer blocks, guidance embedding on."""
    config = transformer_config(FLUX_SIZES[size])
    double, single = _BLOCKS.get(size, (2, 1))
    config.update(_class_name="FluxControlNetModel", num_layers=double, num_single_layers=single,
                  num_mode=None, conditioning_embedding_channels=None)  # fmt: skip
    return config


def build_flux_canny(path: Path, sizes: ZooSizes) -> None:
    import torch
    from diffusers import FluxControlNetModel

    flux_sizes(sizes)  # the sizes this zoo size has (raises for an unknown one)
    torch.manual_seed(seed_for(FLUX_CANNY))
    config = {k: v for k, v in flux_controlnet_config(sizes.name).items() if not k.startswith("_")}
    model = FluxControlNetModel(**config)
    unzero(model, FLUX_CANNY)
    save_pretrained(model, path, sizes.dtype)
