"""Face adapters on CLIP (full-face, plus-face) are fed the aligned face crop, and equal the guide's call.

The diffusers guide's face model example loads `ip-adapter-full-face_sd15.bin` with a DDIM scheduler
and passes a face image as `ip_adapter_image`; our rows pass the reference image and, by default,
read the CLIP embedding of its aligned face crop from the store (the crop the extract stage made
with InsightFace). `face: {crop: false}` per row, or `face_crop: false` per adapter, feeds the whole
image instead. Also here: the example flows validate against the tiny zoo.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import faces_ws
import numpy as np
import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline
from faces_ws import H94, SD15
from PIL import Image
from reference import diffusers_call

from ipa_ops.cli import main
from ipa_ops.flow.spec import parse_flow
from ipa_ops.generate.contract import RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.preflight import check_flow
from ipa_ops.generate.prepare import prepare

TOL = 1e-4
WEIGHTS = {"full-face": "ip-adapter-full-face_sd15.bin", "plus-face": "ip-adapter-plus-face_sd15.safetensors"}
ADAPTERS: dict[str, Any] = {
    a: {"source": H94, "subfolder": "models", "weight_name": w, "encoder": "vit-h", "scale": 0.5}
    for a, w in WEIGHTS.items()
}
ADAPTERS["whole"] = {**ADAPTERS["plus-face"], "face_crop": False}
ADAPTERS["optional"] = {**ADAPTERS["full-face"], "fallback": "drop_adapter"}


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU


@pytest.fixture(scope="module")
def ws(zoo_dir: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    shared = faces_ws.workspace(zoo_dir, tmp_path_factory)
    face, blank = shared.faces[0], shared.blank

    def row(rid: str, adapter: str, images: list[str], **face_options: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"adapter": adapter, "images": images}
        if face_options:
            entry["face"] = face_options
        return {"id": rid, "prompt": f"a chef {rid}", "seed": 26, "scheduler": "ddim", "adapters": [entry]}

    rows = [
        row("full-face", "full-face", [face]),
        row("plus-face", "plus-face", [face]),
        row("row-whole", "plus-face", [face], crop=False),
        row("flow-whole", "whole", [face]),
        row("row-crop", "whole", [face], crop=True),
        row("no-face", "full-face", [blank]),
        row("drop", "full-face", [blank], fallback="drop_adapter"),
        row("flow-drop", "optional", [blank]),
        row("row-overrides-flow", "optional", [blank], fallback="skip"),
    ]
    flow = shared.flow(ADAPTERS, rows, "faces")
    plans, errors = shared.plan(flow)
    return {"shared": shared, "flow": flow, "plans": plans, "errors": errors}


@pytest.fixture(scope="module")
def generator(ws: dict[str, Any]) -> Generator:
    return Generator(ws["flow"], device="cpu")


def _guide(zoo: Path, weight: str, row: RowRequest, image: Image.Image | None) -> np.ndarray:
    """The guide's face model call: SD1.5, DDIM, the adapter (its image encoder loads with it), scale 0.5."""
    pipe = StableDiffusionPipeline.from_pretrained(zoo / SD15)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if image is not None:
        pipe.load_ip_adapter(str(zoo / H94), subfolder="models", weight_name=weight)
        pipe.set_ip_adapter_scale(0.5)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"ip_adapter_image": image} if image is not None else {}
    return diffusers_call(pipe, row, height=row.height, width=row.width, **kwargs)


def _crop(ws: dict[str, Any]) -> Image.Image:
    """The aligned crop of the face reference, as the extract stage stored it (InsightFace norm_crop)."""
    shared = ws["shared"]
    table = shared.store.table()
    face_row = table[(table["kind"] == "face") & (table["source_uri"] == shared.faces[0])].iloc[0]
    return Image.open(io.BytesIO(shared.store.blob(face_row["key"]))).convert("RGB")


def _ours(ws: dict[str, Any], generator: Generator, rid: str) -> tuple[RowRequest, np.ndarray]:
    row = prepare(ws["plans"][rid], ws["shared"].store)
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    return row, out.image


@pytest.mark.parametrize("rid", ["full-face", "plus-face", "row-crop"])
def test_face_adapters_are_fed_the_aligned_crop(ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str):
    row, ours = _ours(ws, generator, rid)
    weight = ws["flow"].adapters[ws["plans"][rid].adapters[0].alias].weight_name
    assert np.abs(ours - _guide(zoo_dir, weight, row, _crop(ws))).max() < TOL


@pytest.mark.parametrize("rid", ["row-whole", "flow-whole"])
def test_whole_image_on_request(ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str) -> None:
    row, ours = _ours(ws, generator, rid)
    whole = Image.open(ws["shared"].faces[0]).convert("RGB")
    expected = _guide(zoo_dir, WEIGHTS["plus-face"], row, whole)
    assert np.abs(ours - expected).max() < TOL
    assert np.abs(ours - _guide(zoo_dir, WEIGHTS["plus-face"], row, _crop(ws))).max() > 1e-3  # the crop differs


def test_face_crop_without_a_face(ws: dict[str, Any], generator: Generator, zoo_dir: Path) -> None:
    blank = ws["shared"].blank
    assert ws["errors"]["no-face"]["error"] == (
        f"row no-face: adapters[0].images[0]: {blank}: no face found (detection sizes tried: 640, 576, 512, 448, "
        "384, 320); give a reference with a face, or set face.fallback to skip or drop_adapter"
    )
    assert ws["plans"]["drop"].adapters == [] and ws["plans"]["flow-drop"].adapters == []  # row or flow fallback
    assert ws["errors"]["row-overrides-flow"]["status"] == "skipped"
    row, ours = _ours(ws, generator, "drop")
    assert np.abs(ours - _guide(zoo_dir, WEIGHTS["full-face"], row, None)).max() < TOL


def test_crop_adapter_needs_a_face_encoder(zoo_dir: Path) -> None:
    encoders = {"vit-h": faces_ws.ENCODERS["vit-h"]}
    flow = parse_flow({"name": "f", "mirror": str(zoo_dir), "models": {"sd15": {"source": SD15}},
                       "encoders": encoders, "adapters": {"face": ADAPTERS["plus-face"]},
                       "stages": {"generate": {"manifest": "m.csv", "model": "sd15", "output": "o"}}})  # fmt: skip
    assert check_flow(flow)[1] == [
        "adapters.face: ip-adapter-plus-face_sd15.safetensors is fed aligned face crops (face_crop) but the flow has "
        "no single insightface encoder to find them; add one (or set face_encoder), or set face_crop: false for "
        "whole images"
    ]
    flow.adapters["face"].face_crop = False
    assert check_flow(flow)[1] == []


@pytest.mark.parametrize("name", ["sdxl", "faces", "faceid"])
def test_example_flows_validate_on_the_zoo(
    name: str, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IPA_MIRROR", str(zoo_dir))
    assert main(["validate", str(faces_ws.REPO / "flows" / f"{name}.yaml")]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip() == "ok"
