"""SD3.5 rows equal the diffusers IP-Adapter guide's SD3 call; a mixed batch equals its rows alone.

The guide loads InstantX's adapter with `StableDiffusion3Pipeline.load_ip_adapter(..., image_encoder_folder=
<SigLIP>)` (scale 0.5 after loading, `set_ip_adapter_scale` to change it) and passes `ip_adapter_image`; our
rows read SigLIP's penultimate hidden states of the same images from a store filled by the real extract
stage. The SD3.5 repositories are built into this module's own zoo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from zoo_flows import REPO, outputs_and_calls, run_example_flow, validate_lines

from ipa_ops.flow.spec import parse_flow
from ipa_ops.generate.contract import RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.generate.prepare import prepare
from ipa_ops.stages.extract import run_extract
from ipa_ops.store.dataset import EmbeddingStore
from ipa_ops.zoo import build_family_zoo
from ipa_ops.zoo.sd3 import INSTANTX_REPO, INSTANTX_WEIGHT, SD35_REPO, SIGLIP_REPO

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU

TOL = 1e-4
BATCH_TOL = 2e-3
REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
LATE = [0.0] * 19 + [1.0] * 19  # the last 19 joint blocks


def _entry(images: list[str], scale: Any) -> dict[str, Any]:
    return {"adapter": "instantx", "images": images, "scale": scale}


ROWS: list[dict[str, Any]] = [
    {"id": "guide", "seed": 0, "adapters": [_entry(REFS[:1], 0.5)]},
    {"id": "other-ref", "seed": 0, "adapters": [_entry(REFS[1:2], 0.5)]},
    {"id": "strong", "seed": 1, "adapters": [_entry(REFS[2:3], 0.9)]},
    {"id": "late", "seed": 2, "adapters": [_entry(REFS[3:4], {"layers": {"blocks": LATE}})]},
    {"id": "window", "seed": 3, "adapters": [_entry(REFS[:1], {"value": 0.8, "end": 0.5})]},
    {"id": "curve", "seed": 4, "adapters": [_entry(REFS[1:2], {"value": 1.2, "curve": "ease_in"})]},
    {"id": "none", "seed": 5, "adapters": []},
    {"id": "average", "seed": 6, "adapters": [{**_entry(REFS[2:4], 0.6), "combine": "average"}]},
]
NEGATIVE = {"id": "negative", "seed": 7, "adapters": [_entry(REFS[:1], 0.5)], "negative_prompt": "blurry"}
MASKS = [str(REPO / "data" / "masks" / "left.png")]
# img2img rows share a call (one strength); their init images, references and scales are per row
IMAGE_TASKS: list[dict[str, Any]] = [
    {"id": "img2img", "seed": 10, "adapters": [_entry(REFS[:1], 0.5)], "task": "img2img", "init_image": REFS[3]},
    {"id": "img2img-other", "seed": 11, "adapters": [_entry(REFS[1:2], {"value": 0.9, "end": 0.5})],
     "task": "img2img", "init_image": REFS[2]},
    {"id": "img2img-none", "seed": 12, "adapters": [], "task": "img2img", "init_image": REFS[1]},
    {"id": "inpaint", "seed": 13, "adapters": [_entry(REFS[2:3], 0.5)], "task": "inpaint", "init_image": REFS[3],
     "mask_image": str(REPO / "data" / "masks" / "left.png")},
    {"id": "masked", "seed": 14, "adapters": [{**_entry(REFS[:1], 0.5), "masks": MASKS}]},
]  # fmt: skip
for _row in IMAGE_TASKS[:4]:
    _row.update(strength=0.6, steps=4)  # 4 steps at strength 0.6: the last 3 are run


@pytest.fixture(scope="module")
def sd3_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_zoo(tmp_path_factory.mktemp("sd3-zoo"), ("sd3", "flux"))


@pytest.fixture(scope="module")
def ws(sd3_zoo: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return workspace(sd3_zoo, tmp_path_factory.mktemp("sd3-ws"), [*ROWS, NEGATIVE, *IMAGE_TASKS])


def sd3_flow_data() -> dict[str, Any]:
    return yaml.safe_load((REPO / "flows" / "sd3.yaml").read_text())


def workspace(zoo: Path, root: Path, rows: list[dict[str, Any]], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """`rows` as a manifest on `flows/sd3.yaml` (or `data`, a flow dict) on the zoo: the extract stage run
    into `root`, the rows planned and read into RowRequests, and a CPU Generator of the flow."""
    manifest = root / "rows.csv"
    frame = pd.DataFrame([{"prompt": "a photo of a cat", **r} for r in rows])
    frame["adapters"] = frame["adapters"].map(json.dumps)
    if "steps" in frame:
        frame["steps"] = frame["steps"].astype("Int64")  # empty for most rows, not 4.0
    frame.to_csv(manifest, index=False)
    data = json.loads(json.dumps(data if data is not None else sd3_flow_data()))
    data["mirror"] = str(zoo)
    data["stages"]["extract"].update(images=REFS, store=str(root / "store"), resources={"batch_size": 8})
    data["stages"]["generate"].update(
        manifest=str(manifest), store=str(root / "store"), output=str(root / "out"),
        defaults={"width": 32, "height": 32, "steps": 2, "guidance_scale": 5.0}, resources={"batch_size": 8},
    )  # fmt: skip
    flow = parse_flow(data)
    assert flow.stages.extract is not None and flow.stages.generate is not None
    run_extract(flow, flow.stages.extract)
    plans, errors = plan_manifest(flow, flow.stages.generate)
    assert errors == []
    store = EmbeddingStore(str(root / "store"))
    rows_read = {p.id: prepare(p, store) for p in plans}
    return {"flow": flow, "data": data, "rows": rows_read, "root": root, "plans": plans,
            "generator": Generator(flow, device="cpu", batch_size=8)}  # fmt: skip


def _guide_pipe(zoo: Path, scale: Any) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(zoo / SD35_REPO, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo / INSTANTX_REPO), weight_name=INSTANTX_WEIGHT, subfolder="",
                         image_encoder_folder=str(zoo / SIGLIP_REPO), low_cpu_mem_usage=False)  # fmt: skip
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guide_call(pipe: StableDiffusion3Pipeline, row: RowRequest, image: Any, **task: Any) -> np.ndarray:
    return pipe(
        row.prompt, negative_prompt=row.negative_prompt or None, ip_adapter_image=image,
        num_inference_steps=row.steps, guidance_scale=row.guidance_scale, width=row.width, height=row.height,
        generator=torch.Generator("cpu").manual_seed(row.seed), output_type="np", **task,
    ).images[0]  # fmt: skip


def _ours(generator: Generator, row: RowRequest) -> np.ndarray:
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    return out.image


@pytest.mark.parametrize("rid", ["guide", "negative"])
def test_sd3_row_matches_the_guide(ws: dict[str, Any], sd3_zoo: Path, rid: str) -> None:
    row = ws["rows"][rid]
    pipe = _guide_pipe(sd3_zoo, 0.5)
    image = Image.open(REFS[0]).convert("RGB")
    ours = _ours(ws["generator"], row)
    assert np.abs(ours - _guide_call(pipe, row, image)).max() < TOL
    pipe.set_ip_adapter_scale(0.0)
    assert np.abs(ours - _guide_call(pipe, row, image)).max() > 1e-2  # the adapter does something


def test_mixed_batch_equals_each_row_alone_in_one_transformer_call_per_step(ws: dict[str, Any]) -> None:
    """Eight rows: other references, scales, per-block, window and curve schedules, an averaged pair and a
    row with no adapter, CFG on, in one call per step; each equals the row run alone."""
    generator: Generator = ws["generator"]
    rows = [ws["rows"][r["id"]] for r in ROWS]
    outs, calls = outputs_and_calls(generator, "sd3", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == rows[0].steps  # [negative; positive] of all eight rows in one transformer call
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - _ours(generator, row)).max() < BATCH_TOL, row.id
    by_id = {o.id: o.image for o in outs}
    assert np.abs(by_id["guide"] - by_id["other-ref"]).max() > 1e-2  # each row attends to its own reference


def test_validate_refuses_family_and_encoder_mismatches(
    ws: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = json.loads(json.dumps(ws["data"]))
    assert validate_lines(tmp_path, base, capsys) == ["ok"]
    xlabs = json.loads(json.dumps(base))
    xlabs["encoders"]["clip-l"] = {"type": "clip", "source": "openai/clip-vit-large-patch14"}
    xlabs["stages"]["extract"]["encoders"] = ["siglip", "clip-l"]
    xlabs["adapters"]["instantx"] = {
        "source": "XLabs-AI/flux-ip-adapter", "weight_name": "ip_adapter.safetensors", "encoder": "clip-l"
    }  # fmt: skip
    assert validate_lines(tmp_path, xlabs, capsys) == [
        "adapters.instantx: ip_adapter.safetensors is a Flux IP-Adapter (XLabs layout), but model 'sd3' is an "
        "SD3.5 pipeline; use InstantX/SD3.5-Large-IP-Adapter (ip-adapter.safetensors) with it, or run this "
        "adapter on a Flux model (black-forest-labs/FLUX.1-dev)"
    ]
    clip = json.loads(json.dumps(base))
    clip["encoders"]["siglip"]["source"] = "openai/clip-vit-large-patch14"
    assert validate_lines(tmp_path, clip, capsys) == [
        "adapters.instantx: ip-adapter.safetensors takes SigLIP image features, but encoder 'siglip' is clip "
        "(openai/clip-vit-large-patch14); ip-adapter needs SigLIP's penultimate hidden states "
        "(google/siglip-so400m-patch14-384)"
    ]


def test_example_flow_validates_and_runs_on_the_zoo(
    ws: dict[str, Any], sd3_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = ws["root"] / "store"  # the extract stage filled it with the same encoder over the same data/refs
    run_example_flow("sd3", sd3_zoo, store, tmp_path, monkeypatch, capsys)



@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_the_guide(ws: dict[str, Any], sd3_zoo: Path, task: str) -> None:
    """diffusers' StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline take IP-Adapter embeddings:
    the guide's call made with `from_pipe` over the IP-Adapter pipeline."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    row = ws["rows"][task]
    base = _guide_pipe(sd3_zoo, 0.5)
    kwargs: dict[str, Any] = {"image": Image.open(REFS[3]).convert("RGB").resize((32, 32)), "strength": 0.6}
    if task == "inpaint":
        pipe = StableDiffusion3InpaintPipeline.from_pipe(base)
        kwargs["mask_image"] = Image.open(REPO / "data" / "masks" / "left.png").convert("L").resize((32, 32))
    else:
        pipe = StableDiffusion3Img2ImgPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(REFS[0 if task == "img2img" else 2]).convert("RGB")
    expected = pipe(
        row.prompt, ip_adapter_image=reference, num_inference_steps=row.steps, guidance_scale=row.guidance_scale,
        width=row.width, height=row.height, generator=torch.Generator("cpu").manual_seed(row.seed),
        output_type="np", **kwargs,
    ).images[0]  # fmt: skip
    ours = _ours(ws["generator"], row)
    assert np.abs(ours - expected).max() < TOL
    assert np.abs(ours - _ours(ws["generator"], ws["rows"]["guide"])).max() > 1e-2  # the init image counts


def test_img2img_rows_share_a_call_and_equal_each_row_alone(ws: dict[str, Any]) -> None:
    """Three img2img rows (other init images, references, schedules, one without the adapter) in one call."""
    generator: Generator = ws["generator"]
    rows = [ws["rows"][r] for r in ("img2img", "img2img-other", "img2img-none")]
    outs, calls = outputs_and_calls(generator, "sd3", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == outputs_and_calls(generator, "sd3", rows[:1])[1] == 3  # as many transformer calls as one row alone
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - _ours(generator, row)).max() < BATCH_TOL, row.id


def test_lora_row_matches_the_guide(ws: dict[str, Any], sd3_zoo: Path) -> None:
    """A flow LoRA: `load_ip_adapter`, then `load_lora_weights(..., adapter_name=...)` and `set_adapters`."""
    from ipa_ops.zoo.lora import WEIGHT_NAME, save_transformer_lora

    folder = sd3_zoo / "test-loras" / "sd35-style"
    base = _guide_pipe(sd3_zoo, 0.5)
    if not (folder / WEIGHT_NAME).exists():
        save_transformer_lora(StableDiffusion3Pipeline, folder, base.transformer, rank=4, name="sd35-style")
    base.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name="style")
    base.set_adapters(["style"], adapter_weights=[0.8])
    row = ws["rows"]["guide"]
    expected = _guide_call(base, row, Image.open(REFS[0]).convert("RGB"))
    data = json.loads(json.dumps(ws["data"]))
    data["loras"] = {"style": {"source": "test-loras/sd35-style", "weight": 0.8}}
    ours = _ours(Generator(parse_flow(data), device="cpu", batch_size=8), row)
    assert np.abs(ours - expected).max() < TOL
    assert np.abs(ours - _ours(ws["generator"], row)).max() > 1e-2  # the LoRA does something


def test_region_masks_fail_alone_with_one_line(ws: dict[str, Any]) -> None:
    outs = ws["generator"].generate([ws["rows"]["masked"], ws["rows"]["guide"]])
    assert outs[0].error == (
        "ValueError: row masked: adapters.instantx: region masks are not supported on SD3.5 (diffusers' IP "
        "attention for SD3.5 has no mask); drop the row's masks or run it on an SD1.5/SDXL model"
    )
    assert outs[1].error == ""


def test_validate_refuses_a_second_sd3_adapter(
    ws: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(json.dumps(ws["data"]))
    data["adapters"]["again"] = dict(data["adapters"]["instantx"])
    assert validate_lines(tmp_path, data, capsys) == [
        "adapters: again, instantx are all SD3.5 IP-Adapters, but an SD3.5 pipeline takes one (diffusers' SD3 "
        "loader and InstantX's processor hold one image projection and one IP attention per block); keep one of "
        "them in this flow and run the others in a flow of their own"
    ]
