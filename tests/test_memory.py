"""The guide's memory options change where a pipeline lives and how its VAE decodes, not the images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from test_generator import _embeds, _flow, _input, _reference, _refs, _row

from ipa_ops.generate.generator import Generator

pytestmark = pytest.mark.usefixtures("single_thread")


def test_vae_slicing_tiling_and_offload_keep_the_images(zoo_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref: StableDiffusionPipeline = _reference(zoo_dir, ["ip-adapter_sd15.bin"])
    emb = [_embeds(ref, [[im]])[0] for im in _refs(3)]
    rows = [_row(f"v{i}", 7 + i, [_input("style", e, 0.5 + 0.2 * i)]) for i, e in enumerate(emb)]
    plain = Generator(_flow(zoo_dir), device="cpu").run_batch(rows)
    flow = _flow(zoo_dir)
    spec = flow.models["sd15"]
    spec.vae_slicing, spec.vae_tiling, spec.cpu_offload = True, True, "model"
    saving = Generator(flow, device="cpu")
    with caplog.at_level(logging.WARNING):
        pipe = saving.load("sd15").pipe
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert "cpu_offload model moves components to the GPU only while they run; on cpu it does nothing" in caplog.text
    for a, b in zip(plain, saving.run_batch(rows), strict=True):
        assert a.image is not None and b.image is not None
        assert np.abs(a.image - b.image).max() < 1e-5, a.id  # one by one, and one tile each at 64 px


_FAULTS = """
import resource, sys, torch
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.generator import Generator
if sys.argv[1] == "cpu":
    Generator(Flow.model_validate({"name": "t", "models": {"m": {"source": "x"}}}), device="cpu")
def once():  # freed buffers of the sizes a small UNet's activations have
    xs = [torch.empty(n << 20, dtype=torch.uint8).fill_(1) for n in (24, 8, 16, 4, 12)]
    del xs
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_cpu_generator_keeps_freed_buffers_mapped() -> None:
    """With glibc's own moving thresholds, freed buffers go back to the kernel and fault in again page by
    page; a CPU Generator fixes the thresholds, so reusing them costs (almost) no page faults."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    moving, fixed = faults("none"), faults("cpu")
    assert fixed * 4 < moving, (fixed, moving)
