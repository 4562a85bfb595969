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
