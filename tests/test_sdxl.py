"""SDXL rows equal the diffusers IP-Adapter guide's SDXL calls; one flow mixes SD1.5 and SDXL.

The guide's calls take `ip_adapter_image` and let diffusers encode it (bigG from
`sdxl_models/image_encoder` for `ip-adapter_sdxl`, the ViT-H encoder passed as `image_encoder` for
the `_vit-h` adapters); our rows read the same images' embeddings from a store filled by the real
extract stage. The guide's inpainting example uses an SDXL inpainting checkpoint the zoo does not
have: here both sides inpaint with the base model (`AutoPipelineForInpainting.from_pipe`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faces_ws
import numpy as np
import pytest
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDIMScheduler,
    StableDiffusionPipeline,
)
from faces_ws import H94, SD15, SDXL
from PIL import Image
from reference import diffusers_call
from transformers import CLIPVisionModelWithProjection

from ipa_ops.flow.spec import Flow
from ipa_ops.generate.contract import RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.preflight import check_adapter, check_flow
from ipa_ops.generate.prepare import prepare

TOL = 1e-4
MASK = str(faces_ws.REPO / "data" / "masks" / "left.png")
WEIGHTS = {
    "sdxl": "ip-adapter_sdxl.bin",
    "sdxl-vith": "ip-adapter_sdxl_vit-h.safetensors",
    "plus": "ip-adapter-plus_sdxl_vit-h.safetensors",
    "plus-face": "ip-adapter-plus-face_sdxl_vit-h.safetensors",
}
ADAPTERS: dict[str, Any] = {
    **{
        a: {"source": H94, "subfolder": "sdxl_models", "weight_name": w, "encoder": "vit-h"} for a, w in WEIGHTS.items()
    },
    "style15": {"source": H94, "subfolder": "models", "weight_name": "ip-adapter_sd15.bin", "encoder": "vit-h"},
}
ADAPTERS["sdxl"]["encoder"] = "bigg"


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU


def _row(rid: str, adapters: list[tuple[str, list[str], float]], model: str = "sdxl", **extra: Any) -> dict[str, Any]:
    entries = [{"adapter": a, "images": images, "scale": scale} for a, images, scale in adapters]
    return {"id": rid, "model": model, "prompt": f"a picture {rid}", "seed": 3 + len(rid), "adapters": entries, **extra}


@pytest.fixture(scope="module")
def ws(zoo_dir: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    shared = faces_ws.workspace(zoo_dir, tmp_path_factory)
    refs, face = shared.refs, shared.faces[0]
    img = {"task": "img2img", "init_image": refs[3], "strength": 0.6}
    rows = [
        _row("xl-sdxl", [("sdxl", refs[:1], 0.6)]),
        _row("xl-sdxl-vith", [("sdxl-vith", refs[1:2], 0.6)]),
        _row("xl-plus", [("plus", refs[2:3], 0.6)]),
        _row("xl-plus-face", [("plus-face", [face], 0.6)]),
        _row("xl-img2img", [("sdxl", refs[:1], 0.6)], **img),
        _row("xl-inpaint", [("sdxl", refs[:1], 0.6)], **{**img, "task": "inpaint", "mask_image": MASK}),
        _row("xl-multi", [("plus", shared.styles, 0.7), ("plus-face", [face], 0.3)], scheduler="ddim"),
        _row("sd15-style", [("style15", refs[:1], 0.6)], model="sd15"),
        _row("sd15-wrong", [("sdxl", refs[:1], 0.6)], model="sd15"),
    ]
    flow = shared.flow(ADAPTERS, rows, "sdxl")
    plans, errors = shared.plan(flow)
    return {"shared": shared, "flow": flow, "plans": plans, "errors": errors}


@pytest.fixture(scope="module")
def generator(ws: dict[str, Any]) -> Generator:
    return Generator(ws["flow"], device="cpu", batch_size=8)


def _request(ws: dict[str, Any], rid: str) -> RowRequest:
    return prepare(ws["plans"][rid], ws["shared"].store)


def _guide_pipe(zoo: Path, weights: list[str]) -> Any:
    """The guide's SDXL set-up: bigG from the adapter folder, or the ViT-H encoder passed in for `_vit-h`."""
    extra = {}
    if any("vit-h" in w for w in weights):
        extra["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
            zoo / H94, subfolder="models/image_encoder"
        )
    pipe = AutoPipelineForText2Image.from_pretrained(zoo / SDXL, **extra)
    pipe.load_ip_adapter(str(zoo / H94), subfolder="sdxl_models", weight_name=weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guide_call(pipe: Any, row: RowRequest, images: list[Any], **kwargs: Any) -> np.ndarray:
    if row.task == "text2img" or row.task == "inpaint":
        kwargs.update(height=row.height, width=row.width)
    return diffusers_call(pipe, row, ip_adapter_image=images, **kwargs)


def _ours(generator: Generator, row: RowRequest) -> np.ndarray:
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    return out.image


def _crop(ws: dict[str, Any], rid: str) -> Image.Image:
    """The aligned face crop the store holds for a row's face reference (what a face adapter is fed)."""
    import io

    shared = ws["shared"]
    face_key = ws["plans"][rid].provenance["embedding_keys"][-1].split("/")[0]  # the crop's sha256
    rows = shared.store.table()
    face_row = rows[(rows["kind"] == "face") & (rows["crop_sha256"] == face_key)].iloc[0]
    return Image.open(io.BytesIO(shared.store.blob(face_row["key"]))).convert("RGB")


@pytest.mark.parametrize("rid", ["xl-sdxl", "xl-sdxl-vith", "xl-plus", "xl-plus-face"])
def test_sdxl_text2img_matches_guide(ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str) -> None:
    alias = rid.removeprefix("xl-")
    row = _request(ws, rid)
    pipe = _guide_pipe(zoo_dir, [WEIGHTS[alias]])
    pipe.set_ip_adapter_scale(0.6)
    if alias == "plus-face":  # fed the aligned face crop by default, as the face adapters are trained
        image = _crop(ws, rid)
    else:
        image = Image.open(ws["plans"][rid].report["references"][0]).convert("RGB")
    expected = _guide_call(pipe, row, [image])
    assert np.abs(_ours(generator, row) - expected).max() < TOL


@pytest.mark.parametrize("rid", ["xl-img2img", "xl-inpaint"])
def test_sdxl_img2img_and_inpaint_match_guide(ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str):
    row = _request(ws, rid)
    base = _guide_pipe(zoo_dir, [WEIGHTS["sdxl"]])
    base.set_ip_adapter_scale(0.6)
    init = Image.open(ws["shared"].refs[3]).convert("RGB").resize((64, 64))
    kwargs: dict[str, Any] = {"image": init, "strength": 0.6}
    if row.task == "inpaint":
        pipe = AutoPipelineForInpainting.from_pipe(base)
        kwargs["mask_image"] = Image.open(MASK).convert("L").resize((64, 64))
    else:
        pipe = AutoPipelineForImage2Image.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    expected = _guide_call(pipe, row, [Image.open(ws["shared"].refs[0]).convert("RGB")], **kwargs)
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_guide_multi_adapter_example_is_one_row(ws: dict[str, Any], generator: Generator, zoo_dir: Path) -> None:
    """Plus with a folder of ten style images and plus-face with one face, scales [0.7, 0.3], DDIM."""
    row = _request(ws, "xl-multi")
    assert [x.embeds.shape[0] for x in row.adapters] == [10, 1]
    pipe = _guide_pipe(zoo_dir, [WEIGHTS["plus"], WEIGHTS["plus-face"]])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_ip_adapter_scale([0.7, 0.3])
    style_images = [Image.open(p).convert("RGB") for p in ws["shared"].styles]
    expected = _guide_call(pipe, row, [style_images, _crop(ws, "xl-multi")])
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_vit_h_adapter_with_bigg_encoder_is_caught(ws: dict[str, Any]) -> None:
    flow: Flow = ws["flow"].model_copy(deep=True)
    flow.encoders["bigg"].hidden_states = True  # only the width is wrong
    spec = flow.adapters["plus"].model_copy(update={"encoder": "bigg"})
    model = ("sdxl", flow.models["sdxl"])
    _, problems = check_adapter("plus", spec, flow, model)
    assert problems == [
        "adapters.plus: ip-adapter-plus_sdxl_vit-h.safetensors expects image features of dim 48, but encoder 'bigg' "
        "has hidden size 64; ip-adapter-plus_sdxl_vit-h needs the ViT-H encoder from models/image_encoder, not "
        "sdxl_models/image_encoder"
    ]
    spec = flow.adapters["sdxl"].model_copy(update={"encoder": "vit-h"})
    assert check_adapter("sdxl", spec, flow, model)[1] == [
        "adapters.sdxl: ip-adapter_sdxl.bin expects image features of dim 40, but encoder 'vit-h' has projection dim "
        "24; ip-adapter_sdxl needs the ViT-bigG encoder from sdxl_models/image_encoder, not models/image_encoder"
    ]


def test_one_flow_runs_sd15_and_sdxl_rows_with_their_own_adapters(
    ws: dict[str, Any], generator: Generator, zoo_dir: Path
) -> None:
    assert ws["errors"]["sd15-wrong"]["error"] == (
        "row sd15-wrong: adapters[0].adapter: adapter 'sdxl' (ip-adapter_sdxl.bin) is built for cross-attention "
        "dim 64 with 22 IP layers, but the row's model 'sd15' has 32 with 16; set the row's model to 'sdxl'"
    )
    assert check_flow(ws["flow"])[1] == []  # each adapter fits one of the flow's models
    rows = [_request(ws, "sd15-style"), _request(ws, "xl-sdxl")]
    outs = generator.generate(rows)
    assert [o.error for o in outs] == ["", ""]
    assert generator.models["sd15"].adapters == ["style15"]  # each model loads only the adapters built for it
    assert generator.models["sdxl"].adapters == list(WEIGHTS)
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15)
    pipe.load_ip_adapter(str(zoo_dir / H94), subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.6)
    expected = _guide_call(pipe, rows[0], [Image.open(ws["shared"].refs[0]).convert("RGB")])
    assert np.abs(outs[0].image - expected).max() < TOL  # type: ignore[operator]
