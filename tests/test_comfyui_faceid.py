"""ComfyUI parity for FaceID: the LoRA strength and the portrait-unnorm checkpoint kind (tiny zoo, CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def test_faceid_lora_weight_equals_diffusers_set_adapters(zoo_dir: Path) -> None:
    """`lora_weight: 0.6` (ComfyUI's default strength) is diffusers' `set_adapters(["faceid_0"], [0.6])`."""
    from diffusers import AutoPipelineForText2Image

    from ipa_ops.flow.spec import Flow

    sd15, faceid = "stable-diffusion-v1-5/stable-diffusion-v1-5", "h94/IP-Adapter-FaceID"
    weight = "ip-adapter-faceid_sd15.bin"
    adapter = {"source": faceid, "weight_name": weight, "encoder": "faces", "lora_weight": 0.6}
    flow = Flow.model_validate({"name": "f", "mirror": str(zoo_dir), "models": {"sd15": {"source": sd15}},
                                "encoders": {"faces": {"type": "insightface"}},
                                "adapters": {"fid": adapter}})  # fmt: skip
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(2)), dim=-1)
    x = AdapterInput("fid", face, torch.zeros_like(face), parse_schedule(0.7))
    row = RowRequest(id="f", prompt="a portrait", seed=4, model="sd15", width=64, height=64, steps=4, adapters=[x])
    (out,) = Generator(flow, device="cpu").generate([row])
    assert out.error == "" and out.image is not None, out.error
    pipe = AutoPipelineForText2Image.from_pretrained(zoo_dir / sd15)
    pipe.load_ip_adapter(str(zoo_dir / faceid), subfolder=None, weight_name=weight, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.7)
    embeds = [torch.stack([torch.zeros_like(face), face])[:, :, None]]  # [neg; pos] x 1 image x 1 x 512
    call = dict(prompt=row.prompt, num_inference_steps=4, guidance_scale=7.5, height=64, width=64, output_type="np")

    def diffusers_image() -> np.ndarray:
        return pipe(generator=torch.Generator("cpu").manual_seed(4), ip_adapter_image_embeds=embeds, **call).images[0]

    pipe.set_adapters(["faceid_0"], adapter_weights=[0.6])
    assert np.abs(out.image - diffusers_image()).max() < TOL
    pipe.set_adapters(["faceid_0"], adapter_weights=[1.0])
    assert np.abs(out.image - diffusers_image()).max() > 1e-3  # the weight really changed the image


UNNORM = "ip-adapter-faceid-portrait_sdxl_unnorm.bin"


@pytest.fixture(scope="module")
def unnorm_file(zoo_dir: Path) -> Path:
    """The zoo's portrait-unnorm checkpoint, in h94/IP-Adapter-FaceID as on the hub."""
    return zoo_dir / "h94/IP-Adapter-FaceID" / UNNORM


def test_portrait_unnorm_is_its_own_kind(zoo_dir: Path, unnorm_file: Path) -> None:
    """ComfyUI tells it by the file name; its keys are a Plus Resampler over the 512-wide raw face embedding."""
    from ipa_ops.generate.checkpoints import checkpoint_shapes
    from ipa_ops.generate.families.unet import h94_adapter_facts

    facts = h94_adapter_facts(checkpoint_shapes(unnorm_file))
    assert facts is not None and facts.kind == "portrait_unnorm" and facts.raw_face and facts.needs_face
    assert (facts.face_dim, facts.tokens, facts.lora, facts.needs_hidden_states) == (512, 16, False, False)
    plus = h94_adapter_facts(checkpoint_shapes(zoo_dir / "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin"))
    assert plus is not None and plus.kind == "plus"  # the same layout without the name stays Plus


def test_portrait_unnorm_row_equals_diffusers(zoo_dir: Path, unnorm_file: Path) -> None:
    """The raw face embedding as a one-token sequence through the checkpoint's Resampler, zeros as the negative
    (ComfyUI's `is_portrait_unnorm` path) == diffusers' pipeline given the same embeddings."""
    from diffusers import AutoPipelineForText2Image

    from ipa_ops.flow.spec import Flow

    adapter = {"source": str(unnorm_file.parent), "weight_name": UNNORM, "encoder": "faces"}
    flow = Flow.model_validate({"name": "u", "mirror": str(zoo_dir), "models": {"sdxl": {"source": SDXL}},
                                "encoders": {"faces": {"type": "insightface"}},
                                "adapters": {"unnorm": adapter}})  # fmt: skip
    raw = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(6)) * 20  # unnormalised: |e| ~ 450
    x = AdapterInput("unnorm", raw, torch.zeros_like(raw), parse_schedule(0.7))
    row = RowRequest(id="u", prompt="a portrait", seed=8, model="sdxl", width=64, height=64, steps=4, adapters=[x])
    generator = Generator(flow, device="cpu")
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    assert generator.load("sdxl").facts[0].kind == "portrait_unnorm"
    pipe = AutoPipelineForText2Image.from_pretrained(zoo_dir / SDXL, dtype=torch.float32)
    pipe.load_ip_adapter(str(unnorm_file.parent), subfolder=None, weight_name=UNNORM, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.7)
    embeds = [torch.stack([torch.zeros_like(raw), raw])]  # [neg; pos] x 1 image x 1 token x 512
    call = dict(prompt=row.prompt, num_inference_steps=4, guidance_scale=7.5, height=64, width=64, output_type="np")
    expected = pipe(generator=torch.Generator("cpu").manual_seed(8), ip_adapter_image_embeds=embeds, **call).images[0]
    assert np.abs(out.image - expected).max() < TOL
    pipe.set_ip_adapter_scale(0.0)
    plain = pipe(generator=torch.Generator("cpu").manual_seed(8), ip_adapter_image_embeds=embeds, **call).images[0]
    assert np.abs(out.image - plain).max() > 1e-3  # the face embedding conditioned the image
    # in a mixed batch: another face with a weight type and a sigma window, and a row without adapters
    other = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(7)) * 20
    spec = parse_schedule({"weight_type": "strong style transfer", "value": 0.9, "end_at": 0.6})
    rows = [row, RowRequest(id="u2", prompt="a face", seed=9, model="sdxl", width=64, height=64, steps=4,
                            adapters=[AdapterInput("unnorm", other, torch.zeros_like(other), spec)]),
            RowRequest(id="u3", prompt="a room", seed=10, model="sdxl", width=64, height=64, steps=4)]  # fmt: skip
    failures = generator.stats["batch_failures"]
    batched = generator.run_batch(rows)
    assert generator.stats["batch_failures"] == failures  # one pipeline call
    for r, got in zip(rows, batched, strict=True):
        alone = out if r is row else generator.generate([r])[0]
        assert got.image is not None and alone.image is not None, r.id
        assert np.abs(got.image - alone.image).max() < 2e-3, r.id


def test_faceid_plus_negative_is_its_clip_encoders_black_image(zoo_dir: Path) -> None:
    """FaceID-Plus takes its crops' unconditional side from its clip_encoder: `uncond_image: black` there is
    ComfyUI's black image (IPAdapterPlus encodes zeros [1, 224, 224, 3] for FaceID-Plus too)."""
    from ipa_ops.generate import faceid
    from ipa_ops.store.encoders.clip import ClipEncoder

    folder = zoo_dir / "h94/IP-Adapter/models/image_encoder"
    stored = {enc: torch.from_numpy(ClipEncoder(folder, hidden_states=True, uncond_image=enc).uncond()["hidden_states"])
              for enc in ("zeros", "black")}  # fmt: skip
    crop = torch.randn(*stored["black"].shape, generator=torch.Generator().manual_seed(3))

    class Store:  # the two calls attach makes
        def get(self, keys: list[str], field: str) -> list[torch.Tensor]:
            return [crop for _ in keys]

        def uncond(self, encoder: str, field: str) -> torch.Tensor:
            assert field == "hidden_states"
            return stored[encoder]

    negatives = {}
    for enc in ("zeros", "black"):
        x = AdapterInput("fid", torch.zeros(1, 512), torch.zeros(1, 512), parse_schedule(1.0))
        faceid.attach(x, {"clip_keys": ["k"], "clip_encoder": enc, "shortcut_scale": 1.0}, "concat", Store())  # type: ignore[arg-type]
        negatives[enc] = x.clip_negative
    torch.testing.assert_close(negatives["black"], stored["black"][None])
    assert (negatives["black"] - negatives["zeros"]).abs().max() > 1e-3
