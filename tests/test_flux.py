"""Flux rows equal the diffusers IP-Adapter guide's Flux call; a mixed batch equals its rows alone.

The guide loads XLabs' adapter with `FluxPipeline.load_ip_adapter(..., image_encoder_pretrained_model_name_or_path=
"openai/clip-vit-large-patch14")`, sets `set_ip_adapter_scale` and passes `ip_adapter_image`; our rows read
the same images' CLIP-L embeddings from a store filled by the real extract stage. The Flux repositories are
built into this module's own zoo (the shared UNet zoo is linked in for the cross-family checks).
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
from diffusers import FluxPipeline
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
from ipa_ops.zoo.common import save_safetensors
from ipa_ops.zoo.flux import CLIP_L_REPO, FLUX_REPO, FLUX_TINY, XLABS_REPO, XLABS_WEIGHT, xlabs_state_dict
from ipa_ops.zoo.flux_controlnet import FLUX_CANNY

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU

TOL = 1e-4
BATCH_TOL = 2e-3
SECOND = "ip_adapter_second.safetensors"  # a second XLabs-layout adapter, other weights
REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
LATE = [0.0] * 9 + [1.0] * 10  # the last ten double blocks


@pytest.fixture(scope="module")
def flux_zoo(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path) -> Path:
    root = build_family_zoo(tmp_path_factory.mktemp("flux-zoo"), ("flux", "sd3"))
    save_safetensors(root / XLABS_REPO / SECOND, xlabs_state_dict(FLUX_TINY, torch.float32, seed_name="second"))
    for repo in ("stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter"):  # for the mismatch checks
        (root / repo).parent.mkdir(parents=True, exist_ok=True)
        (root / repo).symlink_to(zoo_dir / repo)
    return root


def _flow_dict(zoo: Path, root: Path, manifest: Path | str) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "flows" / "flux.yaml").read_text())
    data["mirror"] = str(zoo)
    data["adapters"]["second"] = {"source": XLABS_REPO, "weight_name": SECOND, "encoder": "clip-l"}
    data["models"]["flux"]["controlnet"] = "canny"
    data["controlnets"] = {"canny": {"source": FLUX_CANNY}}
    data["stages"]["extract"].update(images=REFS, store=str(root / "store"), resources={"batch_size": 8})
    data["stages"]["generate"].update(
        manifest=str(manifest), store=str(root / "store"), output=str(root / "out"),
        defaults={"width": 32, "height": 32, "steps": 2, "guidance_scale": 3.5}, resources={"batch_size": 8},
    )  # fmt: skip
    return data


def _entry(adapter: str, images: list[str], scale: Any) -> dict[str, Any]:
    return {"adapter": adapter, "images": images, "scale": scale}


ROWS: list[dict[str, Any]] = [
    {"id": "guide", "seed": 0, "adapters": [_entry("xlabs", REFS[:1], 0.7)]},
    {"id": "two", "seed": 1, "adapters": [_entry("xlabs", REFS[:1], {"layers": {"blocks": LATE}}),
                                          _entry("second", REFS[1:2], 0.3)]},  # fmt: skip
    {"id": "other-ref", "seed": 0, "adapters": [_entry("xlabs", REFS[1:2], 0.7)]},
    {"id": "half", "seed": 2, "adapters": [_entry("xlabs", REFS[2:3], 0.4)], "guidance_scale": 2.0},
    {"id": "window", "seed": 3, "adapters": [_entry("xlabs", REFS[3:4], {"value": 0.9, "end": 0.5})],
     "guidance_scale": 5.0},  # fmt: skip
    {"id": "curve", "seed": 4, "adapters": [_entry("second", REFS[:2], {"value": 1.2, "curve": "linear"})]},
    {"id": "none", "seed": 5, "adapters": [], "guidance_scale": 1.0},
    {"id": "both-refs", "seed": 6, "adapters": [_entry("xlabs", REFS[2:4], 0.6)], "guidance_scale": 4.0},
]


# ControlNet rows (one conditioning scale per call): other control images, references, schedules and guidance
CONTROL: list[dict[str, Any]] = [
    {"id": "cn", "seed": 20, "adapters": [_entry("xlabs", REFS[:1], 0.7)], "control_image": REFS[2]},
    {"id": "cn-other", "seed": 21, "adapters": [_entry("xlabs", REFS[1:2], {"value": 0.9, "end": 0.5})],
     "control_image": REFS[3], "guidance_scale": 5.0},
    {"id": "cn-none", "seed": 22, "adapters": [], "control_image": REFS[1], "guidance_scale": 2.0},
]  # fmt: skip
for _row in CONTROL:
    _row.update(task="controlnet", controlnet_scale=0.8)
MASKED = {"id": "masked", "seed": 23, "adapters": [{**_entry("xlabs", REFS[:1], 0.7),
                                                   "masks": [str(REPO / "data" / "masks" / "left.png")]}]}  # fmt: skip


# true CFG: a negative prompt, the black negative image diffusers uses by default, per-row scales
TRUE_CFG: list[dict[str, Any]] = [
    {"id": "cfg", "seed": 7, "adapters": [_entry("xlabs", REFS[:1], 0.7)], "negative_prompt": "blurry",
     "true_cfg_scale": 4.0},
    {"id": "cfg-other", "seed": 8, "adapters": [_entry("xlabs", REFS[1:2], 0.5)], "negative_prompt": "dark",
     "true_cfg_scale": 2.0, "guidance_scale": 5.0},
    {"id": "cfg-none", "seed": 9, "adapters": [], "negative_prompt": "a cat", "true_cfg_scale": 3.0},
]  # fmt: skip


IMAGE_TASKS: list[dict[str, Any]] = [
    {"id": "img2img", "seed": 10, "adapters": [_entry("xlabs", REFS[:1], 0.7)], "task": "img2img",
     "init_image": REFS[3], "strength": 0.6},
    {"id": "inpaint", "seed": 11, "adapters": [_entry("xlabs", REFS[1:2], 0.7)], "task": "inpaint",
     "init_image": REFS[3], "mask_image": str(REPO / "data" / "masks" / "left.png"), "strength": 0.6},
]  # fmt: skip


@pytest.fixture(scope="module")
def ws(flux_zoo: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("flux-ws")
    Image.new("RGB", (32, 32)).save(root / "black.png")  # what FluxPipeline encodes as the negative image by default
    manifest = root / "rows.csv"
    rows = ROWS + IMAGE_TASKS + CONTROL + [MASKED] + [
        {**r, "adapters": [{**a, "negative_images": [str(root / "black.png")]} for a in r["adapters"]]}
        for r in TRUE_CFG
    ]
    frame = pd.DataFrame([{"prompt": "a photo of a cat", "guidance_scale": 3.5, **r} for r in rows])
    frame["adapters"] = frame["adapters"].map(json.dumps)
    frame.to_csv(manifest, index=False)
    data = _flow_dict(flux_zoo, root, manifest)
    data["stages"]["extract"]["images"] = [*REFS, str(root / "black.png")]
    flow = parse_flow(data)
    assert flow.stages.extract is not None and flow.stages.generate is not None
    run_extract(flow, flow.stages.extract)
    plans, errors = plan_manifest(flow, flow.stages.generate)
    assert errors == []
    store = EmbeddingStore(str(root / "store"))
    rows = {p.id: prepare(p, store) for p in plans}
    return {"flow": flow, "data": data, "rows": rows, "root": root,
            "generator": Generator(flow, device="cpu", batch_size=8)}  # fmt: skip


def _guide_pipe(zoo: Path, weights: list[str], scale: Any) -> FluxPipeline:
    """The guide's Flux set-up: XLabs' adapter(s) with CLIP ViT-L/14 as the image encoder (fp32 on CPU)."""
    pipe = FluxPipeline.from_pretrained(zoo / FLUX_REPO, dtype=torch.float32)
    pipe.load_ip_adapter(
        str(zoo / XLABS_REPO),
        weight_name=weights,
        image_encoder_pretrained_model_name_or_path=str(zoo / CLIP_L_REPO),
        image_encoder_dtype=torch.float32,
    )
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guide_call(pipe: FluxPipeline, row: RowRequest, images: list[Any], **kwargs: Any) -> np.ndarray:
    return pipe(
        row.prompt,
        ip_adapter_image=images,
        num_inference_steps=row.steps,
        guidance_scale=row.guidance_scale,
        width=row.width,
        height=row.height,
        generator=torch.Generator("cpu").manual_seed(row.seed),
        output_type="np",
        **kwargs,
    ).images[0]


def _ours(generator: Generator, row: RowRequest) -> np.ndarray:
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    return out.image


def _image(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


def test_flux_row_matches_the_guide(ws: dict[str, Any], flux_zoo: Path) -> None:
    row = ws["rows"]["guide"]
    expected = _guide_call(_guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.7), row, [_image(REFS[0])])
    ours = _ours(ws["generator"], row)
    assert np.abs(ours - expected).max() < TOL
    without = _guide_call(_guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.0), row, [_image(REFS[0])])
    assert np.abs(ours - without).max() > 1e-2  # the adapter does something at this scale


def test_two_adapters_with_per_block_scales_match_the_guide(ws: dict[str, Any], flux_zoo: Path) -> None:
    """Two XLabs adapters, the first only on the last ten double blocks (set_ip_adapter_scale's list form)."""
    row = ws["rows"]["two"]
    pipe = _guide_pipe(flux_zoo, [XLABS_WEIGHT, SECOND], [LATE, 0.3])
    expected = _guide_call(pipe, row, [_image(REFS[0]), _image(REFS[1])])
    assert np.abs(_ours(ws["generator"], row) - expected).max() < TOL


def test_mixed_batch_equals_each_row_alone_in_one_transformer_call_per_step(ws: dict[str, Any]) -> None:
    """Eight rows: other references, scales, per-block and per-step schedules, two adapters, a row with no
    adapter and five distilled-guidance values, in one call; each equals the row run alone."""
    generator: Generator = ws["generator"]
    rows = [ws["rows"][r["id"]] for r in ROWS]
    outs, calls = outputs_and_calls(generator, "flux", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == rows[0].steps  # one transformer call per step for all eight rows
    alone = {row.id: _ours(generator, row) for row in rows}
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - alone[row.id]).max() < BATCH_TOL, row.id
    by_id = {o.id: o.image for o in outs}
    assert np.abs(by_id["guide"] - by_id["other-ref"]).max() > 1e-2  # each row attends to its own reference


def test_true_cfg_row_matches_the_guide(ws: dict[str, Any], flux_zoo: Path) -> None:
    """`pipe(prompt, negative_prompt=..., true_cfg_scale=4, ip_adapter_image=img)`: its negative image is black."""
    row = ws["rows"]["cfg"]
    pipe = _guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.7)
    black = Image.new("RGB", (32, 32))
    expected = _guide_call(pipe, row, [_image(REFS[0])], negative_prompt="blurry", true_cfg_scale=4.0,
                           negative_ip_adapter_image=[black])  # fmt: skip
    default_negative = _guide_call(pipe, row, [_image(REFS[0])], negative_prompt="blurry", true_cfg_scale=4.0)
    assert np.abs(expected - default_negative).max() < TOL  # the guide's default negative image is that black one
    plain = _guide_call(pipe, row, [_image(REFS[0])])
    ours = _ours(ws["generator"], row)
    assert np.abs(ours - expected).max() < TOL
    assert np.abs(ours - plain).max() > 1e-2  # the second pass does something


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_the_guide(ws: dict[str, Any], flux_zoo: Path, task: str) -> None:
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    row = ws["rows"][task]
    base = _guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.7)
    init = _image(REFS[3]).resize((32, 32))
    kwargs: dict[str, Any] = {"image": init, "strength": 0.6}
    if task == "inpaint":
        pipe = FluxInpaintPipeline.from_pipe(base)
        kwargs["mask_image"] = Image.open(REPO / "data" / "masks" / "left.png").convert("L").resize((32, 32))
    else:
        pipe = FluxImg2ImgPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    expected = _guide_call(pipe, row, [_image(REFS[0] if task == "img2img" else REFS[1])], **kwargs)
    assert np.abs(_ours(ws["generator"], row) - expected).max() < TOL


def test_true_cfg_rows_with_their_own_scales_share_a_call(ws: dict[str, Any]) -> None:
    generator: Generator = ws["generator"]
    rows = [ws["rows"][r["id"]] for r in TRUE_CFG]
    outs, calls = outputs_and_calls(generator, "flux", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == 2 * rows[0].steps  # a positive and a negative pass per step, for all three rows
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - _ours(generator, row)).max() < BATCH_TOL, row.id


@pytest.mark.parametrize("how", ["regional", "whole"])
def test_compiled_transformer_takes_mixed_batches_in_one_graph(ws: dict[str, Any], how: str) -> None:
    """fullgraph=True (a graph break is an error), traced with backend="eager"; a batch with other
    schedules and seeds reuses the graphs (a recompile raises) and equals the eager engine."""
    import dataclasses

    import torch._dynamo
    from torch._dynamo.utils import counters

    from ipa_ops.flow.schedules import parse_schedule

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = Generator(ws["flow"], device="cpu", batch_size=8)
        loaded = compiled.load("flux")
        loaded.family.compile(loaded.pipe, how, "default", backend="eager")
        loaded.compiled = True  # what Generator.load sets for a model whose flow says `compile`
        rows = [ws["rows"][r] for r in ("guide", "two", "window", "none")]
        assert [o.error for o in compiled.run_batch(rows)] == [""] * len(rows)
        assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] > 0
        graphs = counters["stats"]["unique_graphs"]
        specs = [{"value": 0.5, "start": 0.5}, {"layers": {"blocks": LATE[::-1]}}, 1.1]
        again = [
            dataclasses.replace(r, seed=r.seed + 100, adapters=[
                dataclasses.replace(x, schedule=parse_schedule(specs[(i + j) % len(specs)]))
                for j, x in enumerate(r.adapters)])
            for i, r in enumerate(rows)
        ]  # fmt: skip
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = compiled.run_batch(again)
        assert compiled.stats["batch_failures"] == 0 and counters["stats"]["unique_graphs"] == graphs
        for row, out, ref in zip(again, second, ws["generator"].run_batch(again), strict=True):
            assert np.abs(out.image - ref.image).max() < BATCH_TOL, row.id
    finally:
        torch._dynamo.reset()


def test_negative_prompt_without_true_cfg_fails_alone_with_one_line(ws: dict[str, Any]) -> None:
    bad = RowRequest(**{**ws["rows"]["guide"].__dict__, "id": "neg", "negative_prompt": "blurry"})
    outs = ws["generator"].generate([bad, ws["rows"]["none"]])
    assert outs[0].error == (
        "ValueError: row neg: on Flux a negative_prompt is used only with true CFG: set both negative_prompt and "
        "true_cfg_scale (> 1), or neither"
    )
    assert outs[1].error == ""


def test_validate_refuses_family_and_encoder_mismatches(
    ws: dict[str, Any], flux_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _flow_dict(flux_zoo, ws["root"], ws["root"] / "rows.csv")
    del base["adapters"]["second"]
    assert validate_lines(tmp_path, base, capsys) == ["ok"]
    on_sdxl = json.loads(json.dumps(base))
    on_sdxl["models"]["flux"] = {"source": "stabilityai/stable-diffusion-xl-base-1.0"}
    assert validate_lines(tmp_path, on_sdxl, capsys) == [
        "adapters.xlabs: ip_adapter.safetensors is a Flux IP-Adapter (XLabs layout), but model 'flux' is an SDXL "
        "pipeline; use an h94/IP-Adapter adapter from sdxl_models/ (e.g. ip-adapter_sdxl.bin) with it, or run this "
        "adapter on a Flux model (black-forest-labs/FLUX.1-dev)"
    ]
    h94_on_flux = json.loads(json.dumps(base))
    bigg = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "sdxl_models/image_encoder"}
    h94_on_flux["encoders"]["bigg"] = bigg
    h94_on_flux["stages"]["extract"]["encoders"] = ["clip-l", "bigg"]
    h94_on_flux["adapters"]["xlabs"] = {
        "source": "h94/IP-Adapter", "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.bin", "encoder": "bigg"
    }  # fmt: skip
    assert validate_lines(tmp_path, h94_on_flux, capsys) == [
        "adapters.xlabs: ip-adapter_sdxl.bin is an SD1.5/SDXL IP-Adapter (h94 layout), but model 'flux' is a Flux "
        "pipeline; use XLabs-AI/flux-ip-adapter (ip_adapter.safetensors) with it, or run this adapter on an SD1.5 "
        "or SDXL model"
    ]
    siglip = json.loads(json.dumps(base))
    siglip["encoders"]["clip-l"]["source"] = "google/siglip-so400m-patch14-384"
    assert validate_lines(tmp_path, siglip, capsys) == [
        "adapters.xlabs: ip_adapter.safetensors takes CLIP image features, but encoder 'clip-l' is siglip "
        "(google/siglip-so400m-patch14-384); ip_adapter needs CLIP ViT-L/14's pooled image_embeds "
        "(openai/clip-vit-large-patch14)"
    ]
    sd3_on_flux = json.loads(json.dumps(siglip))
    sd3_on_flux["encoders"]["clip-l"]["hidden_states"] = True
    instantx = {"source": "InstantX/SD3.5-Large-IP-Adapter", "weight_name": "ip-adapter.safetensors"}
    sd3_on_flux["adapters"]["xlabs"].update(instantx)
    assert validate_lines(tmp_path, sd3_on_flux, capsys) == [
        "adapters.xlabs: ip-adapter.safetensors is an SD3.5 IP-Adapter (InstantX layout), but model 'flux' is a Flux "
        "pipeline; use XLabs-AI/flux-ip-adapter (ip_adapter.safetensors) with it, or run this adapter on an SD3.5 "
        "model (stabilityai/stable-diffusion-3.5-large)"
    ]
    vit_h = json.loads(json.dumps(base))
    vit_h["encoders"]["clip-l"] = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}
    assert validate_lines(tmp_path, vit_h, capsys) == [
        "adapters.xlabs: ip_adapter.safetensors expects image features of dim 28, but encoder 'clip-l' has "
        "projection dim 24; ip_adapter needs CLIP ViT-L/14's pooled image_embeds (openai/clip-vit-large-patch14)"
    ]


def test_example_flow_validates_and_runs_on_the_zoo(
    ws: dict[str, Any], flux_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = ws["root"] / "store"  # the extract stage filled it with the same encoder over the same data/refs
    run_example_flow("flux", flux_zoo, store, tmp_path, monkeypatch, capsys)



def test_controlnet_row_matches_the_guide(ws: dict[str, Any], flux_zoo: Path) -> None:
    """`FluxControlNetPipeline.from_pipe(<IP-Adapter pipeline>, controlnet=FluxControlNetModel...)` with the
    reference as `ip_adapter_image` and the control image as `control_image`."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    row = ws["rows"]["cn"]
    controlnet = FluxControlNetModel.from_pretrained(flux_zoo / FLUX_CANNY, dtype=torch.float32)
    pipe = FluxControlNetPipeline.from_pipe(_guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.7), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    expected = _guide_call(pipe, row, [_image(REFS[0])], control_image=_image(REFS[2]),
                           controlnet_conditioning_scale=0.8)  # fmt: skip
    ours = _ours(ws["generator"], row)
    assert np.abs(ours - expected).max() < TOL
    plain = _guide_call(pipe, row, [_image(REFS[0])], control_image=_image(REFS[1]), controlnet_conditioning_scale=0.8)
    assert np.abs(ours - plain).max() > 1e-2  # the control image counts


def test_controlnet_rows_with_their_own_guidance_share_a_call(ws: dict[str, Any]) -> None:
    """Three ControlNet rows: other control images, references, schedules and distilled guidance (the
    ControlNet gets each row's too), one without the adapter, in one transformer call per step."""
    generator: Generator = ws["generator"]
    rows = [ws["rows"][r["id"]] for r in CONTROL]
    outs, calls = outputs_and_calls(generator, "flux", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == rows[0].steps
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - _ours(generator, row)).max() < BATCH_TOL, row.id


def test_lora_row_matches_the_guide(ws: dict[str, Any], flux_zoo: Path) -> None:
    """A flow LoRA: `load_ip_adapter`, then `FluxPipeline.load_lora_weights(..., adapter_name=...)`, `set_adapters`."""
    from ipa_ops.zoo.lora import WEIGHT_NAME, save_transformer_lora

    folder = flux_zoo / "test-loras" / "flux-style"
    base = _guide_pipe(flux_zoo, [XLABS_WEIGHT], 0.7)
    if not (folder / WEIGHT_NAME).exists():
        save_transformer_lora(FluxPipeline, folder, base.transformer, rank=4, name="flux-style")
    base.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name="style")
    base.set_adapters(["style"], adapter_weights=[0.8])
    row = ws["rows"]["guide"]
    expected = _guide_call(base, row, [_image(REFS[0])])
    data = json.loads(json.dumps(ws["data"]))
    data["loras"] = {"style": {"source": "test-loras/flux-style", "weight": 0.8}}
    ours = _ours(Generator(parse_flow(data), device="cpu", batch_size=8), row)
    assert np.abs(ours - expected).max() < TOL
    assert np.abs(ours - _ours(ws["generator"], row)).max() > 1e-2  # the LoRA does something


def test_region_masks_fail_alone_with_one_line(ws: dict[str, Any]) -> None:
    outs = ws["generator"].generate([ws["rows"]["masked"], ws["rows"]["guide"]])
    assert outs[0].error == (
        "ValueError: row masked: adapters.xlabs: region masks are not supported on Flux (diffusers' IP "
        "attention for Flux has no mask); drop the row's masks or run it on an SD1.5/SDXL model"
    )
    assert outs[1].error == ""
