"""LCM-LoRA rows equal the documented diffusers call; flow LoRAs keep FaceID LoRAs and enter row keys.

The reference is the diffusers guide's "Instant generation" recipe: `load_ip_adapter`, then
`load_lora_weights("latent-consistency/lcm-lora-sdv1-5")`, `LCMScheduler.from_config(pipe.scheduler
.config)`, 4 steps at guidance 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow, FlowError, load_flow, parse_flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM = "latent-consistency/lcm-lora-sdv1-5"
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU
STYLE = {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"}


def _flow(zoo: Path, weight: float, **extra: object) -> Flow:
    return Flow.model_validate(
        {
            "name": "lcm",
            "mirror": str(zoo),
            "models": {"sd15": {"source": SD15, "scheduler": "lcm"}},
            "loras": {"lcm": {"source": LCM, "weight_name": "pytorch_lora_weights.safetensors", "weight": weight}},
            "adapters": {"style": STYLE, **extra.pop("adapters", {})},  # type: ignore[dict-item]
            **extra,
        }
    )


def _documented(zoo: Path, ip_adapter: bool = True) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(zoo / SD15, dtype=torch.float32)
    if ip_adapter:
        pipe.load_ip_adapter(str(zoo / "h94/IP-Adapter"), subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.load_lora_weights(str(zoo / LCM))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _row(rid: str, seed: int, adapters: list[AdapterInput]) -> RowRequest:
    return RowRequest(
        id=rid,
        prompt=f"best quality, high quality {rid}",
        seed=seed,
        model="sd15",
        width=64,
        height=64,
        steps=4,
        guidance_scale=1.0,
        scheduler="lcm",
        adapters=adapters,
    )


def _run(pipe: StableDiffusionPipeline, row: RowRequest, **kw: object) -> np.ndarray:
    return pipe(
        prompt=row.prompt,
        num_inference_steps=4,
        guidance_scale=1.0,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(row.seed),
        output_type="np",
        **kw,
    ).images[0]


def test_lcm_lora_rows_match_the_guide(zoo_dir: Path) -> None:
    pipe = _documented(zoo_dir)
    # the zoo file is UNet-only, kohya-style named, and diffusers converts every pair of it
    keys = load_file(zoo_dir / LCM / "pytorch_lora_weights.safetensors")
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
    )
    pairs = sum(k.endswith(".lora_down.weight") for k in keys)
    assert pairs == sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) > 100
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(2)]
    embs = [pipe.prepare_ip_adapter_image_embeds([r], None, "cpu", 1, False)[0] for r in refs]  # no CFG at 1.0
    rows = [
        _row(f"r{i}", 20 + i, [AdapterInput("style", e[0], torch.zeros_like(e[0]), parse_schedule(s))])
        for i, (e, s) in enumerate(zip(embs, (0.6, 0.9), strict=True))
    ]
    gen = Generator(_flow(zoo_dir, 1.0), device="cpu")
    outs = gen.generate(rows)
    assert gen.stats == {"calls": 1, "batch_failures": 0}
    assert gen.models["sd15"].pipe.get_active_adapters() == ["lcm"]
    assert type(gen.models["sd15"].task_pipes["text2img"].scheduler).__name__ == "LCMScheduler"
    for out, row, emb, scale in zip(outs, rows, embs, (0.6, 0.9), strict=True):
        assert out.error == "" and out.image is not None, out.error
        pipe.set_ip_adapter_scale(scale)
        assert np.abs(out.image - _run(pipe, row, ip_adapter_image_embeds=[emb])).max() < TOL


def test_lora_weight_applies_and_faceid_lora_stays_loaded(zoo_dir: Path) -> None:
    """Flow LoRA at weight 0.5 next to a FaceID adapter whose checkpoint carries its own LoRA."""
    faceid = {"source": "h94/IP-Adapter-FaceID", "weight_name": "ip-adapter-faceid_sd15.bin", "encoder": "faces"}
    flow = _flow(zoo_dir, 0.5, encoders={"faces": {"type": "insightface"}}, adapters={"face": faceid})
    gen = Generator(flow, device="cpu")
    pipe = gen.load("sd15").pipe
    assert set(pipe.get_list_adapters()["unet"]) == {"faceid_1", "lcm"}  # diffusers named it after its index
    assert set(pipe.get_active_adapters()) == {"faceid_1", "lcm"}  # set_adapters kept diffusers' FaceID LoRA on

    row = _row("w", 7, [])  # uses no adapter: diffusers' call has no IP-Adapter and no FaceID LoRA
    (out,) = gen.generate([row])
    assert out.error == "" and out.image is not None, out.error
    reference = _documented(zoo_dir, ip_adapter=False)
    reference.set_adapters(["default_0"], adapter_weights=[0.5])
    assert np.abs(out.image - _run(reference, row)).max() < TOL
    reference.set_adapters(["default_0"], adapter_weights=[1.0])
    assert np.abs(out.image - _run(reference, row)).max() > 1e-3  # the weight matters
    assert "lcm" in pipe.get_active_adapters()  # per-call FaceID switching left the flow LoRA on


def test_lora_fingerprint_and_weight_enter_the_row_key(tmp_path: Path, zoo_dir: Path) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"id": "a", "prompt": "a lighthouse", "seed": 1}]).to_csv(manifest, index=False)

    def plan(*overrides: str) -> tuple[str, dict]:
        base = [f"mirror={zoo_dir}", f"stages.generate.manifest={manifest}", f"stages.generate.store={tmp_path / 's'}"]
        flow = load_flow(REPO / "flows" / "lcm.yaml", base + list(overrides))
        assert flow.stages.generate is not None
        plans, errors = plan_manifest(flow, flow.stages.generate)
        assert errors == []
        return plans[0].row_key, plans[0].provenance

    key, provenance = plan()
    assert provenance["loras"]["lcm"]["weight"] == 1.0 and len(provenance["loras"]["lcm"]["fingerprint"]) == 16
    assert plan("loras.lcm.weight=0.8")[0] != key
    assert plan("loras={}")[0] != key
    assert plan()[0] == key


def test_lora_alias_may_not_shadow_diffusers_faceid_names() -> None:
    with pytest.raises(FlowError, match="loras.faceid_0: aliases starting with faceid_"):
        parse_flow({"name": "x", "loras": {"faceid_0": {"source": LCM}}})
