"""Video rows equal the documented AnimateDiff + IP-Adapter call; the Ray stage writes GIF + frames.

The reference is the diffusers guide's "Video" recipe: `MotionAdapter.from_pretrained`,
`AnimateDiffPipeline.from_pretrained(base, motion_adapter=...)`, `DDIMScheduler.from_pretrained(base,
subfolder="scheduler", clip_sample=False, timestep_spacing="linspace", beta_schedule="linear",
steps_offset=1)`, `load_ip_adapter`, then `pipe(num_frames=..., ip_adapter_image_embeds=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
from PIL import Image
from reports import report_text
from zoo_flows import zoo_flow

from ipa_ops.commands.core import flow_problems
from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow, load_flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.stages.extract import run_extract
from ipa_ops.stages.generate import run_generate
from ipa_ops.store.dataset import EmbeddingStore

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MOTION = "guoyww/animatediff-motion-adapter-v1-5-2"
DDIM_OPTIONS = {"clip_sample": False, "timestep_spacing": "linspace", "beta_schedule": "linear", "steps_offset": 1}
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU


@pytest.fixture(scope="module")
def documented(zoo_dir: Path) -> AnimateDiffPipeline:
    """The guide's pipeline, verbatim but for the paths."""
    adapter = MotionAdapter.from_pretrained(zoo_dir / MOTION, dtype=torch.float32)
    pipe = AnimateDiffPipeline.from_pretrained(zoo_dir / SD15, motion_adapter=adapter, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_pretrained(zoo_dir / SD15, subfolder="scheduler", **DDIM_OPTIONS)
    pipe.load_ip_adapter(str(zoo_dir / "h94/IP-Adapter"), subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(
    pipe: AnimateDiffPipeline, prompt: str, seed: int, emb: torch.Tensor, scale: float, frames: int
) -> np.ndarray:
    pipe.set_ip_adapter_scale(scale)
    return pipe(
        prompt=prompt,
        negative_prompt="bad quality",
        ip_adapter_image_embeds=[emb],
        num_frames=frames,
        guidance_scale=7.5,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]


def test_video_rows_match_animatediff_in_one_batch(zoo_dir: Path, documented: AnimateDiffPipeline) -> None:
    flow = Flow.model_validate(
        {
            "name": "v",
            "mirror": str(zoo_dir),
            "models": {
                "sd15": {
                    "source": SD15,
                    "motion_adapter": "ad",
                    "scheduler": "ddim",
                    "scheduler_options": DDIM_OPTIONS,
                }
            },
            "motion_adapters": {"ad": {"source": MOTION}},
            "adapters": {
                "style": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"}
            },
        }
    )
    gen = Generator(flow, device="cpu", batch_size=4)
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(2)]
    embs = [documented.prepare_ip_adapter_image_embeds([r], None, "cpu", 1, True)[0] for r in refs]
    rows = []
    for i, (emb, scale) in enumerate(zip(embs, (0.6, 0.2), strict=True)):
        neg, pos = emb.chunk(2)
        rows.append(
            RowRequest(
                id=f"v{i}",
                prompt=f"a bear waving {i}",
                negative_prompt="bad quality",
                seed=10 + i,
                model="sd15",
                task="video",
                width=64,
                height=64,
                steps=2,
                guidance_scale=7.5,
                num_frames=3,
                scheduler="ddim",
                adapters=[AdapterInput("style", pos[0], neg[0], parse_schedule(scale))],
            )
        )
    outs = gen.generate(rows)
    assert gen.stats == {"calls": 1, "batch_failures": 0}  # both videos in one AnimateDiff call
    for out, row, emb, scale in zip(outs, rows, embs, (0.6, 0.2), strict=True):
        assert out.error == "" and out.image is not None, out.error
        assert out.image.shape == (3, 64, 64, 3)
        expected = _call(documented, row.prompt, row.seed, emb, scale, 3)
        assert np.abs(out.image - expected).max() < TOL
    # the base pipeline is not replaced: text2img rows still run on the plain UNet
    assert type(gen.models["sd15"].pipe).__name__ == "StableDiffusionPipeline"
    video = gen.models["sd15"].task_pipes["video:ad"].pipe
    assert type(video.unet).__name__ == "UNetMotionModel" and video.text_encoder is gen.models["sd15"].pipe.text_encoder


def _stage_flow(root: Path, zoo: Path, manifest: Path) -> Flow:
    return zoo_flow(
        "video", root, zoo, manifest,
        "stages.generate.defaults.num_frames=3",
        "stages.generate.defaults.negative_prompt='bad quality'",
        "stages.extract.resources.num_gpus=0",
        "stages.generate.resources.num_gpus=0",
    )  # fmt: skip


def test_video_flow_on_the_ray_stage_writes_gif_and_frames(
    tmp_path: Path, zoo_dir: Path, ray_local: None, documented: AnimateDiffPipeline
) -> None:
    manifest = tmp_path / "video.csv"
    adapters = [{"adapter": "style", "images": [str(REPO / "data/refs/ref-0.png")], "scale": 0.6}]
    row = {"id": "vid-1", "prompt": "a gummy bear waving", "seed": 5, "adapters": json.dumps(adapters)}
    pd.DataFrame([row]).to_csv(manifest, index=False)
    flow = _stage_flow(tmp_path, zoo_dir, manifest)
    assert flow.stages.extract is not None and flow.stages.generate is not None
    run_extract(flow, flow.stages.extract)
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["error"]) == (1, 0)

    results = OutputDir(str(tmp_path / "out")).read_results()
    outputs = list(results.iloc[0]["outputs"])
    key = results.iloc[0]["row_key"]
    assert outputs[0].endswith(f"images/{key[:2]}/{key}.gif") and len(outputs) == 4
    assert all(Path(p).parent == Path(outputs[0]).with_suffix("") for p in outputs[1:])  # frames: images/<k[:2]>/<k>/
    assert [Path(p).name for p in outputs[1:]] == ["00000.png", "00001.png", "00002.png"]
    gif = Image.open(outputs[0])
    assert gif.n_frames == 3 and gif.size == (64, 64)
    assert f"{key}.gif" in report_text(tmp_path / "out")

    # the frames are the documented call's, with the store's embeddings (uint8 rounding apart)
    store = EmbeddingStore(str(tmp_path / "store"))
    ref_key = json.loads(results.iloc[0]["provenance"])["embedding_keys"][0]  # `<sha256>/<encoder id>`
    pos = store.get([ref_key])[0][None, None]
    neg = store.uncond(ref_key.split("/", 1)[1])[None, None]
    expected = _call(documented, "a gummy bear waving", 5, torch.cat([neg, pos]), 0.6, 3)
    frames = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in outputs[1:]])
    assert np.abs(frames - np.round(expected * 255)).max() <= 1

    again = run_generate(flow, flow.stages.generate)  # a video is done when its GIF and all frames exist
    assert (again["ok"], again["skipped"]) == (0, 1)
    Path(outputs[2]).unlink()  # ... and not done once a frame is gone: the next run makes it again
    assert key not in OutputDir(str(tmp_path / "out")).done_keys()


@pytest.mark.parametrize("name", ["controlnet", "video", "lcm"])
def test_example_flows_validate_on_the_tiny_zoo(name: str, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPA_MIRROR", str(zoo_dir))
    assert flow_problems(load_flow(REPO / "flows" / f"{name}.yaml")) == []
