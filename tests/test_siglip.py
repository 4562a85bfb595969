"""SigLIP (SD3.5's IP-Adapter encoder) in the store's encoder: what diffusers' SD3 `encode_image` computes.

`StableDiffusion3Pipeline.encode_image` = the folder's image processor, then
`SiglipVisionModel(..., output_hidden_states=True).hidden_states[-2]`; its negative is zeros of that shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, SiglipVisionModel
from zoo_flows import REPO

from ipa_ops.store.encoders.clip import ClipEncoder
from ipa_ops.store.encoders.siglip import SiglipEncoder, vision_encoder
from ipa_ops.zoo import build_family_zoo
from ipa_ops.zoo.flux import CLIP_L_REPO
from ipa_ops.zoo.sd3 import SIGLIP_REPO

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_zoo(tmp_path_factory.mktemp("sd3-zoo"), ("sd3", "flux"))


def test_siglip_folder_encodes_penultimate_hidden_states_as_diffusers(zoo: Path) -> None:
    folder = zoo / SIGLIP_REPO
    encoder = vision_encoder(folder, hidden_states=True, crop="center", gpu=False)
    assert isinstance(encoder, SiglipEncoder)
    assert isinstance(vision_encoder(zoo / CLIP_L_REPO, False, "center", False), ClipEncoder)
    images = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(2)]
    ours = encoder.encode(images)
    model = SiglipVisionModel.from_pretrained(str(folder)).eval()
    pixels = AutoImageProcessor.from_pretrained(str(folder))(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True).hidden_states[-2].numpy()
    tokens = (model.config.image_size // model.config.patch_size) ** 2
    assert ours[0]["hidden_states"].shape == (tokens, model.config.hidden_size)
    for i in range(2):
        assert np.abs(ours[i]["hidden_states"] - expected[i]).max() < 1e-5
    assert np.abs(ours[0]["hidden_states"] - ours[1]["hidden_states"]).max() > 1e-3  # the image matters
    uncond = encoder.uncond()["hidden_states"]
    assert uncond.shape == (tokens, model.config.hidden_size) and not uncond.any()  # zeros_like, as diffusers
