"""Schedulers per row and per flow equal diffusers' `Scheduler.from_config(pipe.scheduler.config)`."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ipa_ops.flow.models import SCHEDULERS
from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow, FlowError, load_flow, parse_flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU
# the order matters: the model's own scheduler comes after others were used, and must still be its own
ORDER = ["ddim", None, "euler", "euler_a", "dpmpp_2m", "lcm"]


def test_each_scheduler_matches_from_config(zoo_dir: Path) -> None:
    flow = Flow.model_validate(
        {
            "name": "s",
            "mirror": str(zoo_dir),
            "models": {"sd15": {"source": SD15}},
            "adapters": {
                "style": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"}
            },
        }
    )
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo_dir / "h94/IP-Adapter"), subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.6)
    own = pipe.scheduler
    ref = Image.open(REPO / "data" / "refs" / "ref-0.png").convert("RGB")
    emb = pipe.prepare_ip_adapter_image_embeds([ref], None, "cpu", 1, True)[0]
    neg, pos = emb.chunk(2)
    rows = [
        RowRequest(
            id=str(name),
            prompt="a lighthouse at dusk",
            seed=3,
            model="sd15",
            width=64,
            height=64,
            steps=3,
            guidance_scale=7.5,
            scheduler=name,
            adapters=[AdapterInput("style", pos[0], neg[0], parse_schedule(0.6))],
        )
        for name in ORDER
    ]
    gen = Generator(flow, device="cpu")
    outs = gen.generate(rows)
    assert gen.stats == {"calls": len(ORDER), "batch_failures": 0}  # one group per scheduler
    seen = []
    for out, name in zip(outs, ORDER, strict=True):
        assert out.error == "" and out.image is not None, out.error
        pipe.scheduler = own if name is None else getattr(diffusers, SCHEDULERS[name]).from_config(own.config)
        expected = pipe(
            prompt="a lighthouse at dusk",
            num_inference_steps=3,
            guidance_scale=7.5,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(3),
            ip_adapter_image_embeds=[emb],
            output_type="np",
        ).images[0]
        assert np.abs(out.image - expected).max() < TOL, name
        assert all(np.abs(out.image - other).max() > 1e-3 for other in seen), name  # each really differs
        seen.append(out.image)


def test_row_column_overrides_the_flow_scheduler(tmp_path: Path, zoo_dir: Path) -> None:
    manifest = tmp_path / "m.csv"
    rows = [{"id": "a", "prompt": "x", "scheduler": "euler"}, {"id": "b", "prompt": "y"}]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    overrides = [f"mirror={zoo_dir}", f"stages.generate.manifest={manifest}", "models.sd15.scheduler=dpmpp_2m"]
    flow = load_flow(REPO / "flows" / "quickstart.yaml", overrides)
    assert flow.stages.generate is not None
    plans, errors = plan_manifest(flow, flow.stages.generate)
    assert errors == []
    assert {p.id: p.request["scheduler"] for p in plans} == {"a": "euler", "b": "dpmpp_2m"}


def test_unknown_scheduler_is_one_line_listing_the_choices(tmp_path: Path, zoo_dir: Path) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"id": "a", "prompt": "x", "scheduler": "dpm++"}]).to_csv(manifest, index=False)
    flow = load_flow(REPO / "flows" / "quickstart.yaml", [f"mirror={zoo_dir}", f"stages.generate.manifest={manifest}"])
    assert flow.stages.generate is not None
    plans, errors = plan_manifest(flow, flow.stages.generate)
    assert plans == []
    assert [e["error"] for e in errors] == [
        "row a: scheduler: must be one of ddim, euler, euler_a, dpmpp_2m, lcm, pndm, unipc; got 'dpm++'"
    ]
    with pytest.raises(FlowError) as info:
        parse_flow({"name": "x", "models": {"sd15": {"source": SD15, "scheduler": "eulr"}}})
    assert info.value.problems == [
        "models.sd15.scheduler: must be one of 'ddim', 'euler', 'euler_a', 'dpmpp_2m', 'lcm', 'pndm' or 'unipc', "
        "got 'eulr'"
    ]
