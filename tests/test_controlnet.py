"""ControlNet rows equal the documented diffusers ControlNet + IP-Adapter call (tiny zoo, CPU, fp32).

The reference is the guide's "Structural control" recipe: `ControlNetModel.from_pretrained`,
`StableDiffusion(XL)ControlNetPipeline.from_pretrained(base, controlnet=...)`, `load_ip_adapter`,
`set_ip_adapter_scale`, then `pipe(image=depth_map, ip_adapter_image_embeds=...)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image
from reference import diffusers_call

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow, load_flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
CN15 = "lllyasviel/control_v11f1p_sd15_depth"
CNXL = "diffusers/controlnet-depth-sdxl-1.0"
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU


def _flow(zoo: Path) -> Flow:
    adapter = {"source": "h94/IP-Adapter", "encoder": "vit-h"}
    return Flow.model_validate(
        {
            "name": "cn",
            "mirror": str(zoo),
            "models": {
                "sd15": {"source": SD15, "controlnet": "depth"},
                "sdxl": {"source": SDXL, "controlnet": "depth-xl"},
            },
            "controlnets": {"depth": {"source": CN15}, "depth-xl": {"source": CNXL}},
            "encoders": {"vit-h": {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}},
            "adapters": {
                "style": {**adapter, "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"},
                "style-xl": {**adapter, "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.bin"},
            },
        }
    )


@pytest.fixture(scope="module")
def generator(zoo_dir: Path) -> Generator:
    return Generator(_flow(zoo_dir), device="cpu", batch_size=4)


def depth_map(seed: int, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """A smooth synthetic depth map, deliberately not at the output size (the pipeline resizes it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    depth = np.sin(xx / (5 + 5 * rng.random())) + np.cos(yy / (4 + 4 * rng.random()))
    grey = ((depth - depth.min()) / np.ptp(depth) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, -1))


def _reference(pipe_cls: type, zoo: Path, base: str, controlnet: str, subfolder: str, weight: str) -> object:
    """The guide's recipe, verbatim but for the paths."""
    cn = ControlNetModel.from_pretrained(zoo / controlnet, dtype=torch.float32)
    pipe = pipe_cls.from_pretrained(zoo / base, controlnet=cn, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo / "h94/IP-Adapter"), subfolder=subfolder, weight_name=weight)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(pipe: object, seed: int) -> torch.Tensor:
    ref = Image.open(REPO / "data" / "refs" / f"ref-{seed % 4}.png").convert("RGB")
    return pipe.prepare_ip_adapter_image_embeds([ref], None, "cpu", 1, True)[0]  # type: ignore[attr-defined]


def _row(rid: str, model: str, alias: str, emb: torch.Tensor, scale: float, seed: int, cn_scale: float) -> RowRequest:
    neg, pos = emb.chunk(2)
    return RowRequest(
        id=rid,
        prompt=f"a statue {rid}",
        negative_prompt="lowres",
        seed=seed,
        model=model,
        task="controlnet",
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.5,
        control_image=depth_map(seed),
        controlnet_scale=cn_scale,
        adapters=[AdapterInput(alias, pos[0], neg[0], parse_schedule(scale))],
    )


def _documented(pipe: object, row: RowRequest, emb: torch.Tensor, scale: float) -> np.ndarray:
    pipe.set_ip_adapter_scale(scale)  # type: ignore[attr-defined]
    return diffusers_call(
        pipe,
        row,
        image=row.control_image,
        ip_adapter_image_embeds=[emb],
        controlnet_conditioning_scale=row.controlnet_scale,
        height=row.height,
        width=row.width,
    )


def test_sd15_controlnet_rows_match_diffusers_in_one_batch(generator: Generator, zoo_dir: Path) -> None:
    pipe = _reference(StableDiffusionControlNetPipeline, zoo_dir, SD15, CN15, "models", "ip-adapter_sd15.bin")
    emb = [_embeds(pipe, 0), _embeds(pipe, 1)]
    rows = [_row("a", "sd15", "style", emb[0], 0.6, 3, 0.8), _row("b", "sd15", "style", emb[1], 0.3, 4, 0.8)]
    calls, failures = generator.stats["calls"], generator.stats["batch_failures"]
    outs = generator.generate(rows)
    assert generator.stats["calls"] == calls + 1 and generator.stats["batch_failures"] == failures
    for out, row, e, scale in zip(outs, rows, emb, (0.6, 0.3), strict=True):
        assert out.error == "" and out.image is not None, out.error
        expected = _documented(pipe, row, e, scale)
        assert np.abs(out.image - expected).max() < TOL
    # the control image and its scale really condition the image
    other_map = _row("a", "sd15", "style", emb[0], 0.6, 3, 0.8)
    other_map.control_image = depth_map(99)
    weaker = _row("a", "sd15", "style", emb[0], 0.6, 3, 0.2)
    for changed in generator.generate([other_map, weaker]):
        assert np.abs(changed.image - outs[0].image).max() > 1e-3  # type: ignore[operator]
    # the base model is shared, not loaded again, and its text2img pipe is still the plain one
    loaded = generator.models["sd15"]
    assert loaded.task_pipes["controlnet:depth"].unet is loaded.pipe.unet
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"


def test_sdxl_controlnet_row_matches_diffusers(generator: Generator, zoo_dir: Path) -> None:
    pipe = _reference(StableDiffusionXLControlNetPipeline, zoo_dir, SDXL, CNXL, "sdxl_models", "ip-adapter_sdxl.bin")
    emb = _embeds(pipe, 2)
    row = _row("x", "sdxl", "style-xl", emb, 0.5, 5, 0.7)
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    assert np.abs(out.image - _documented(pipe, row, emb, 0.5)).max() < TOL
    assert type(generator.models["sdxl"].task_pipes["controlnet:depth-xl"]).__name__ == (
        "StableDiffusionXLControlNetPipeline"
    )


def test_controlnet_scale_splits_batches(generator: Generator) -> None:
    """diffusers takes one controlnet_conditioning_scale per call: rows with different ones do not share it."""
    emb = torch.zeros(2, 1, 24)
    a = _row("a", "sd15", "style", emb, 0.5, 1, 0.5)
    b = _row("b", "sd15", "style", emb, 0.5, 1, 1.0)
    assert a.group_key() != b.group_key()
    b.controlnet_scale = 0.5
    assert a.group_key() == b.group_key()


def test_controlnet_row_survives_the_ray_payload() -> None:
    """Rows travel between Ray stages as safetensors + JSON: the control image and scale come through."""
    from ipa_ops.generate import payload

    row = _row("p", "sd15", "style", torch.zeros(2, 1, 24), 0.5, 1, 0.35)
    back = payload.from_bytes(payload.to_bytes(row))
    assert (back.task, back.controlnet_scale, back.group_key()) == ("controlnet", 0.35, row.group_key())
    assert np.array_equal(np.asarray(back.control_image), np.asarray(row.control_image))


def test_model_aliases_of_one_base_share_it(zoo_dir: Path) -> None:
    """Two ControlNets on one base: two model aliases, one loaded pipeline."""
    flow = _flow(zoo_dir)
    flow.models["sd15-plain"] = flow.models["sd15"].model_copy(update={"controlnet": None})
    gen = Generator(flow, device="cpu")
    assert gen.load("sd15-plain") is gen.load("sd15")


def test_control_image_scale_and_controlnet_enter_the_row_key(tmp_path: Path, zoo_dir: Path) -> None:
    depth = [str(REPO / "data" / "control" / f"depth-{i}.png") for i in range(2)]
    rows = [
        {"id": "a", "task": "controlnet", "control_image": depth[0], "controlnet_scale": 1.0},
        {"id": "b", "task": "controlnet", "control_image": depth[1], "controlnet_scale": 1.0},
        {"id": "c", "task": "controlnet", "control_image": depth[0], "controlnet_scale": 0.5},
        {"id": "d", "task": "controlnet", "control_image": depth[0], "model": "sdxl"},
        {"id": "e", "task": "text2img"},
    ]
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"prompt": "a statue", "seed": 1, **r} for r in rows]).to_csv(manifest, index=False)

    def plan(*overrides: str) -> tuple[dict[str, str], list[str]]:
        base = [f"mirror={zoo_dir}", f"stages.generate.manifest={manifest}", f"stages.generate.store={tmp_path}"]
        flow = load_flow(REPO / "flows" / "controlnet.yaml", base + list(overrides))
        assert flow.stages.generate is not None
        plans, errors = plan_manifest(flow, flow.stages.generate)
        return {p.id: p.row_key for p in plans}, [e["error"] for e in errors]

    keys, errors = plan()
    assert errors == [] and len(set(keys.values())) == 5
    moved, _ = plan("controlnets.depth.source=diffusers/controlnet-depth-sdxl-1.0")  # other weights
    assert moved["a"] != keys["a"] and moved["e"] == keys["e"]  # a text2img row does not use the ControlNet
    _, errors = plan("models.sdxl.controlnet=null")
    assert errors == [
        "row d: task: model 'sdxl' has no controlnet, which task controlnet needs; set models.sdxl.controlnet to "
        "an alias of controlnets: in the flow, or use another model"
    ]
