"""Where a loaded pipeline lives: on the device, or offloaded to the CPU, and how its VAE decodes.

The diffusers guide's memory options, per model in the flow: VAE slicing (decode a batch one image
at a time), VAE tiling (decode large images in overlapping tiles) and CPU offload (`model`: each
component on the GPU only while it runs; `sequential`: each layer, slowest and smallest). They are
applied after the IP-Adapters and LoRAs are loaded, as the guide warns, so every component the
adapters added is offloaded too.

On the CPU, `steady_host_allocator` also stops glibc's malloc from handing the UNet's activation
buffers back to the kernel between layers (see its docstring).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_steady: bool | None = None


def steady_host_allocator() -> bool:
    """Fix glibc malloc's thresholds for this process (once): buffers up to 32 MiB come from the heap and up
    to 512 MiB of freed heap stays mapped. Whether it applied (glibc only; `IPA_HOST_MALLOC=default` opts out).

    Why: glibc adjusts both thresholds as memory is freed, so whether a 1-30 MiB activation buffer is
    reused or unmapped and faulted back in page by page depends on the process's history. On a 2-core
    machine the same generation loop took 4.0 s in one process and 4.9 s in the next, the difference
    being ~360,000 minor page faults a pass (benchmarks/bench_generate.py); with the thresholds fixed,
    every process gets the fast case. The price is up to 512 MiB of freed memory kept by the process.
    """
    global _steady
    if _steady is None:
        _steady = False
        if os.environ.get("IPA_HOST_MALLOC", "") != "default" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(None)
            _steady = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 512 << 20))
            log.debug("glibc malloc thresholds fixed (mmap 32 MiB, trim 512 MiB): %s", _steady)
    return _steady
