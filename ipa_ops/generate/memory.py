"""Where a loaded pipeline lives: on the device, or offloaded to the CPU, and how its VAE decodes.

The diffusers guide's memory options, per model in the flow: VAE slicing (decode a batch one image
at a time), VAE tiling (decode large images in overlapping tiles) and CPU offload (`model`: each
component on the GPU only while it runs; `sequential`: each layer, slowest and smallest). They are
applied after the IP-Adapters and LoRAs are loaded, as the guide warns, so every component the
adapters added is offloaded too.
"""

from __future__ import annotations

import logging
from typing import Any

from ipa_ops.flow.models import ModelSpec

log = logging.getLogger(__name__)


def place(pipe: Any, spec: ModelSpec | None, device: str) -> None:
    """Apply a model's memory options to `pipe` and put it on `device` (or offload it there)."""
    if spec is not None and spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec is not None and spec.vae_tiling:
        pipe.vae.enable_tiling()
    offload = spec.cpu_offload if spec is not None else None
    if offload is not None and "cuda" not in device:
        log.warning("cpu_offload %s moves components to the GPU only while they run; on %s it does nothing", offload,
                    device)  # fmt: skip
        offload = None
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
