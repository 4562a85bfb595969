"""FaceID adapters from stored InsightFace embeddings equal the documented diffusers calls.

The store is filled by the real extract stage (faces and the CLIP embeddings of their aligned
crops); rows are planned and prepared from it as the generate stage does. Each reference call is
the diffusers FaceID recipe: `load_ip_adapter("h94/IP-Adapter-FaceID", subfolder=None, ...)`
(which also loads the checkpoint's LoRA), the face's `normed_embedding` from `FaceAnalysis` as
`ip_adapter_image_embeds` next to zeros, and for FaceID-Plus `clip_embeds` / `shortcut` /
`shortcut_scale` set on `unet.encoder_hid_proj.image_projection_layers[0]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faces_ws
import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline
from faces_ws import FACEID, LAION, REPO, SD15, SDXL
from PIL import Image
from reference import diffusers_call
from transformers import CLIPVisionModelWithProjection

from ipa_ops.generate.contract import RowRequest
from ipa_ops.generate.families import adapter_facts
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.plan import RowPlan
from ipa_ops.generate.preflight import check_flow
from ipa_ops.generate.prepare import prepare
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.stages.generate import run_generate
from ipa_ops.zoo import face_analysis_kwargs

TOL = 1e-4
LCM = "latent-consistency/lcm-lora-sdv1-5"
WEIGHTS = {
    "faceid": "ip-adapter-faceid_sd15.bin",
    "faceid-xl": "ip-adapter-faceid_sdxl.bin",
    "plus": "ip-adapter-faceid-plus_sd15.bin",
    "plusv2": "ip-adapter-faceid-plusv2_sd15.bin",
    "portrait": "ip-adapter-faceid-portrait_sd15.bin",
    "unnorm": "ip-adapter-faceid-portrait_sdxl_unnorm.bin",
}
ADAPTERS: dict[str, Any] = {a: {"source": FACEID, "weight_name": w, "encoder": "faces"} for a, w in WEIGHTS.items()}
for _plus in ("plus", "plusv2"):
    ADAPTERS[_plus]["clip_encoder"] = "laion"  # the encoder diffusers' FaceID-Plus recipe uses
ADAPTERS["plusv2"]["shortcut_scale"] = 0.9


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU


def _entry(adapter: str, images: list[str], scale: float, **extra: Any) -> list[dict[str, Any]]:
    return [{"adapter": adapter, "images": images, "scale": scale, **extra}]


def _rows(ws: faces_ws.Workspace) -> list[dict[str, Any]]:
    faces, blank = ws.faces, ws.blank
    rows = [
        ("fid", "sd15", _entry("faceid", faces[:1], 0.6)),
        ("fid-xl", "sdxl", _entry("faceid-xl", faces[:1], 0.6)),
        ("plus", "sd15", _entry("plus", faces[1:2], 0.7)),
        ("v2-a", "sd15", _entry("plusv2", faces[1:2], 0.7, face={"shortcut_scale": 0.6})),
        ("v2-b", "sd15", _entry("plusv2", faces[2:3], 0.8)),
        ("portrait", "sd15", _entry("portrait", faces, 0.8)),
        ("unnorm", "sdxl", _entry("unnorm", faces[:1], 0.7)),
        ("no-face", "sd15", _entry("faceid", [blank], 0.6)),
        ("skip", "sd15", _entry("faceid", [blank], 0.6, face={"fallback": "skip"})),
        ("drop", "sd15", _entry("faceid", [blank], 0.6, face={"fallback": "drop_adapter"})),
        ("xl-on-sd15", "sd15", _entry("faceid-xl", faces[:1], 0.6)),
    ]
    return [{"id": r, "model": m, "prompt": f"a portrait {r}", "seed": 7 + i, "adapters": a}
            for i, (r, m, a) in enumerate(rows)]  # fmt: skip


@pytest.fixture(scope="module")
def ws(zoo_dir: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared store (faces and their crops' CLIP embeddings, by the real extract stage) and planned rows."""
    shared = faces_ws.workspace(zoo_dir, tmp_path_factory)
    rows = _rows(shared)
    flow = shared.flow(ADAPTERS, rows, "faceid")
    plans, errors = shared.plan(flow)
    return {"shared": shared, "flow": flow, "faces": shared.faces, "blank": shared.blank, "plans": plans,
            "errors": errors, "store": shared.store, "rows": rows}  # fmt: skip


@pytest.fixture(scope="module")
def generator(ws: dict[str, Any]) -> Generator:
    return Generator(ws["flow"], device="cpu", batch_size=8)


def _request(ws: dict[str, Any], rid: str) -> RowRequest:
    plan: RowPlan = ws["plans"][rid]
    return prepare(plan, ws["store"])


def _ours(generator: Generator, row: RowRequest) -> np.ndarray:
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    return out.image


def _analyse(zoo: Path, path: str) -> Any:
    """The documented way to get a face: FaceAnalysis on the BGR image at det_size 640."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(**face_analysis_kwargs(zoo))
    app.prepare(ctx_id=-1, det_size=(640, 640))
    (face,) = app.get(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].copy())
    return face


def _id_embeds(faces: list[Any]) -> torch.Tensor:
    """diffusers' recipe: stack the normed embeddings [1, n, 1, 512], zeros for the negative."""
    ref = torch.stack([torch.from_numpy(f.normed_embedding).unsqueeze(0) for f in faces]).unsqueeze(0)
    return torch.cat([torch.zeros_like(ref), ref])


def _crop(path: str, face: Any) -> Image.Image:
    from insightface.utils import face_align

    rgb = np.asarray(Image.open(path).convert("RGB"))
    return Image.fromarray(face_align.norm_crop(rgb, landmark=face.kps, image_size=224))


def _pipe(zoo: Path, model: str, weight: str, clip: bool = False) -> Any:
    extra = {"image_encoder": CLIPVisionModelWithProjection.from_pretrained(zoo / LAION)} if clip else {}
    pipe = AutoPipelineForText2Image.from_pretrained(zoo / model, **extra)
    pipe.load_ip_adapter(str(zoo / FACEID), subfolder=None, weight_name=weight, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: Any, row: RowRequest, embeds: list[torch.Tensor] | None) -> np.ndarray:
    kwargs = {"ip_adapter_image_embeds": embeds} if embeds is not None else {}
    return diffusers_call(pipe, row, height=row.height, width=row.width, **kwargs)


def test_zoo_faceid_checkpoints_carry_their_lora(zoo_dir: Path) -> None:
    state = torch.load(zoo_dir / FACEID / WEIGHTS["faceid"], weights_only=True)
    assert "0.to_q_lora.down.weight" in state["ip_adapter"]  # self-attention of the first block: LoRA only
    assert {"1.to_k_ip.weight", "1.to_k_lora.down.weight"} <= set(state["ip_adapter"])
    facts = {a: adapter_facts(zoo_dir / FACEID / w) for a, w in WEIGHTS.items()}
    kinds = ["faceid", "faceid", "faceid_plus", "faceid_plus", "faceid", "portrait_unnorm"]
    assert [facts[a].kind for a in WEIGHTS] == kinds
    assert [facts[a].lora for a in WEIGHTS] == [True, True, True, True, False, False]  # portraits: no LoRA
    assert facts["portrait"].tokens == 16 and facts["faceid"].tokens == 4


@pytest.mark.parametrize(("rid", "model"), [("fid", SD15), ("fid-xl", SDXL)])
def test_faceid_row_matches_diffusers(ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str, model: str):
    row = _request(ws, rid)
    pipe = _pipe(zoo_dir, model, WEIGHTS[ws["plans"][rid].adapters[0].alias])
    pipe.set_ip_adapter_scale(0.6)
    face = _analyse(zoo_dir, ws["faces"][0])
    torch.testing.assert_close(row.adapters[0].embeds[0], torch.from_numpy(face.normed_embedding), atol=1e-6, rtol=0)
    expected = _call(pipe, row, [_id_embeds([face])])
    assert np.abs(_ours(generator, row) - expected).max() < TOL
    pipe.disable_lora()  # the LoRA that load_ip_adapter loaded really takes part
    assert np.abs(_call(pipe, row, [_id_embeds([face])]) - expected).max() > 1e-3


def test_portrait_unnorm_row_reads_the_raw_face_embedding(ws: dict[str, Any], generator: Generator, zoo_dir: Path):
    """Planned from the store: the unnormalised `face.embedding` (ComfyUI's is_portrait_unnorm), one token per
    face, zeros as the negative; the row equals diffusers' pipeline given those embeddings."""
    row = _request(ws, "unnorm")
    face = _analyse(zoo_dir, ws["faces"][0])
    raw = torch.from_numpy(face.embedding).view(1, 1, 512)
    torch.testing.assert_close(row.adapters[0].embeds, raw, atol=1e-5, rtol=0)
    assert not row.adapters[0].negative.any() and raw.norm() > 2  # not the unit-length normed embedding
    pipe = _pipe(zoo_dir, SDXL, WEIGHTS["unnorm"])
    pipe.set_ip_adapter_scale(0.7)
    expected = _call(pipe, row, [torch.stack([torch.zeros_like(raw), raw])])  # [neg; pos] x 1 face x 1 token
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def _plus_reference(ws: dict[str, Any], zoo: Path, rid: str, face_path: str, shortcut_scale: float | None) -> Any:
    """The FaceID-Plus recipe for one row; returns (pipe, expected image)."""
    weight = WEIGHTS[ws["plans"][rid].adapters[0].alias]
    pipe = _pipe(zoo, SD15, weight, clip=True)
    pipe.set_ip_adapter_scale(ws["plans"][rid].adapters[0].scale)
    face = _analyse(zoo, face_path)
    clip_embeds = pipe.prepare_ip_adapter_image_embeds([[_crop(face_path, face)]], None, "cpu", 1, True)[0]
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    layer.clip_embeds = clip_embeds
    layer.shortcut = shortcut_scale is not None  # True for Plus v2
    layer.shortcut_scale = shortcut_scale if shortcut_scale is not None else 1.0
    return _call(pipe, _request(ws, rid), [_id_embeds([face])])


@pytest.mark.parametrize(("rid", "face", "shortcut_scale"), [("plus", 1, None), ("v2-a", 1, 0.6)])
def test_faceid_plus_rows_match_diffusers(
    ws: dict[str, Any], generator: Generator, zoo_dir: Path, rid: str, face: int, shortcut_scale: float | None
) -> None:
    expected = _plus_reference(ws, zoo_dir, rid, ws["faces"][face], shortcut_scale)
    assert np.abs(_ours(generator, _request(ws, rid)) - expected).max() < TOL


def test_two_faces_share_one_faceid_plus_batch(ws: dict[str, Any], generator: Generator, zoo_dir: Path) -> None:
    rows = [_request(ws, "v2-a"), _request(ws, "v2-b")]
    assert rows[1].adapters[0].shortcut_scale == 0.9  # the flow's default; v2-a's own is 0.6
    calls, failures = generator.stats["calls"], generator.stats["batch_failures"]
    outs = generator.generate(rows)
    assert generator.stats["calls"] == calls + 1 and generator.stats["batch_failures"] == failures  # one call
    expected = [
        _plus_reference(ws, zoo_dir, "v2-a", ws["faces"][1], 0.6),
        _plus_reference(ws, zoo_dir, "v2-b", ws["faces"][2], 0.9),
    ]
    for out, exp in zip(outs, expected, strict=True):
        assert out.error == "" and np.abs(out.image - exp).max() < 2e-3, out.id
    assert np.abs(outs[0].image - outs[1].image).max() > 1e-2  # type: ignore[operator]


def test_faceid_lora_coexists_with_a_flow_lora(ws: dict[str, Any], zoo_dir: Path) -> None:
    """The FaceID LoRA is on for FaceID rows only; the flow's LoRA stays on for every row."""
    flow = ws["shared"].flow(ADAPTERS, ws["rows"], "faceid-lora", loras={"lcm": {"source": LCM, "weight": 0.7}})
    generator = Generator(flow, device="cpu")
    fid, drop = _request(ws, "fid"), _request(ws, "drop")
    ours = generator.generate([fid, drop])
    assert generator.stats == {"calls": 2, "batch_failures": 0}  # different FaceID LoRAs: two calls

    pipe = _pipe(zoo_dir, SD15, WEIGHTS["faceid"])  # IP-Adapter first, then the LoRA, as the guide does
    pipe.load_lora_weights(str(zoo_dir / LCM), adapter_name="lcm")
    pipe.set_adapters(["faceid_0", "lcm"], adapter_weights=[1.0, 0.7])
    pipe.set_ip_adapter_scale(0.6)
    expected = _call(pipe, fid, [_id_embeds([_analyse(zoo_dir, ws["faces"][0])])])
    assert ours[0].error == "" and np.abs(ours[0].image - expected).max() < TOL  # type: ignore[operator]

    plain = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(zoo_dir / LCM), adapter_name="lcm")
    plain.set_adapters(["lcm"], adapter_weights=[0.7])
    assert ours[1].error == "" and np.abs(ours[1].image - _call(plain, drop, None)).max() < TOL  # type: ignore[operator]


def test_portrait_several_faces_match_diffusers(ws: dict[str, Any], generator: Generator, zoo_dir: Path) -> None:
    row = _request(ws, "portrait")
    assert row.adapters[0].embeds.shape == (3, 512)
    pipe = _pipe(zoo_dir, SD15, WEIGHTS["portrait"])
    pipe.set_ip_adapter_scale(0.8)
    expected = _call(pipe, row, [_id_embeds([_analyse(zoo_dir, p) for p in ws["faces"]])])
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_no_face_fails_skips_or_drops(ws: dict[str, Any], generator: Generator, zoo_dir: Path) -> None:
    blank, errors = ws["blank"], ws["errors"]
    reason = f"{blank}: no face found (detection sizes tried: 640, 576, 512, 448, 384, 320)"
    assert errors["no-face"] == {
        "id": "no-face",
        "error": f"row no-face: adapters[0].images[0]: {reason}; give a reference with a face, or set face.fallback "
        "to skip or drop_adapter",
    }
    assert errors["skip"] == {
        "id": "skip",
        "error": f"row skip: adapters[0].images[0]: {reason} (face.fallback: skip)",
        "status": "skipped",
    }
    drop = ws["plans"]["drop"]
    assert drop.adapters == [] and list(drop.provenance["dropped_adapters"]) == ["faceid"]
    # rendered without the adapter, and without its LoRA: the plain pipeline's image
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15)
    pipe.set_progress_bar_config(disable=True)
    row = _request(ws, "drop")
    assert np.abs(_ours(generator, row) - _call(pipe, row, None)).max() < TOL


def test_adapter_of_another_model_fails_the_row(ws: dict[str, Any], generator: Generator) -> None:
    assert ws["errors"]["xl-on-sd15"]["error"].startswith(
        "row xl-on-sd15: adapters[0].adapter: adapter 'faceid-xl' (ip-adapter-faceid_sdxl.bin) is built for "
        "cross-attention dim 64 with 22 IP layers, but the row's model 'sd15' has 32 with 16; set the row's model to "
        "'sdxl'"
    )
    wrong = _request(ws, "fid-xl")
    wrong.model = "sd15"
    (out,) = generator.generate([wrong])
    assert out.image is None and out.error.startswith("row fid-xl: adapters: 'faceid-xl' not loaded for model 'sd15'")


def test_faceid_plus_preflight_needs_its_clip_encoder(ws: dict[str, Any]) -> None:
    flow = ws["flow"].model_copy(deep=True)
    flow.adapters["plus"].clip_encoder = None  # two clip encoders with hidden states: no default
    assert check_flow(flow)[1] == [
        "adapters.plus: ip-adapter-faceid-plus_sd15.bin is FaceID-Plus; it also reads CLIP hidden states of the "
        "aligned face crop: set clip_encoder to a clip encoder alias with hidden_states: true"
    ]
    flow.adapters["plus"].clip_encoder = "bigg"
    assert check_flow(flow)[1] == [
        "adapters.plus: ip-adapter-faceid-plus_sd15.bin expects image features of dim 48, but encoder 'bigg' has "
        "hidden size 64; ip-adapter-faceid-plus_sd15 needs the ViT-H encoder from models/image_encoder, not "
        "sdxl_models/image_encoder",
        "adapters.plus: ip-adapter-faceid-plus_sd15.bin consumes penultimate hidden states; set "
        "encoders.bigg.hidden_states: true and re-run extract",
    ]


def test_stage_runs_faceid_rows_end_to_end(ws: dict[str, Any]) -> None:
    rows = [r for r in ws["rows"] if r["id"] in ("fid", "v2-b", "no-face", "skip", "drop")]
    flow = ws["shared"].flow(ADAPTERS, rows, "faceid-stage")
    assert flow.stages.generate is not None
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["error"], summary["skipped"]) == (3, 1, 1)
    out = OutputDir(flow.stages.generate.output)
    results = out.read_results().set_index("id")
    assert dict(results["status"]) == {"fid": "ok", "v2-b": "ok", "drop": "ok", "no-face": "error", "skip": "skipped"}
    assert "no face found" in results.loc["skip", "error"]
    assert json.loads(results.loc["drop", "provenance"])["dropped_adapters"]["faceid"].endswith("320)")
    files = [out.resolve(str(p)) for rid in ("fid", "v2-b", "drop") for p in results.loc[rid, "outputs"]]
    assert len(files) == 3 and all(Path(f).is_file() for f in files)


def test_faceid_plus_mixed_batch_equals_rows_alone(ws: dict[str, Any], zoo_dir: Path) -> None:
    """Eight FaceID-Plus v2 rows in one call: other faces, shortcut scales, schedules, a second (CLIP) adapter,
    masks. Rows share a call only with rows that need the same FaceID LoRA, so all eight use `plusv2`."""
    masks = [str(REPO / "data" / "masks" / f"{side}.png") for side in ("left", "right")]
    faces, refs = ws["faces"], ws["shared"].refs
    style = {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"}
    style["encoder"] = "vit-h"
    plus = [
        _entry("plusv2", faces[:1], 0.7),
        _entry("plusv2", faces[1:2], 0.5, face={"shortcut_scale": 0.6}),
        _entry("plusv2", faces[2:3], {"preset": "style"}),
        _entry("plusv2", faces[:1], 0.6) + _entry("style", refs[:1], 0.4),
        _entry("plusv2", faces[1:2], {"value": 0.8, "end": 0.5}),
        _entry("plusv2", faces[2:3], 0.7) + _entry("style", refs[1:3], 0.6, masks=masks),
        _entry("plusv2", faces[:1], {"steps": [1.0, 0.5, 0.2]}, face={"shortcut_scale": 1.2}),
        _entry("plusv2", faces[1:2], 0.8) + _entry("style", refs[3:4], {"curve": "ease_out", "from": 1.0, "to": 0.2}),
    ]
    rows = [{"id": f"mx{i}", "model": "sd15", "prompt": f"a portrait {i}", "seed": 30 + i, "adapters": a}
            for i, a in enumerate(plus)]  # fmt: skip
    flow = ws["shared"].flow({**ADAPTERS, "style": style}, rows, "faceid-mixed")
    plans, errors = ws["shared"].plan(flow)
    assert errors == {}
    requests = [prepare(plans[r["id"]], ws["store"]) for r in rows]
    generator = Generator(flow, device="cpu", batch_size=8)
    outs = generator.generate(requests)
    assert generator.stats == {"calls": 1, "batch_failures": 0}  # one pipeline call for all eight
    for request, out in zip(requests, outs, strict=True):
        assert out.error == "" and out.image is not None, out.error
        assert np.abs(out.image - _ours(generator, request)).max() < 2e-3, out.id
    assert min(np.abs(outs[0].image - o.image).max() for o in outs[1:]) > 1e-2  # type: ignore[operator]
