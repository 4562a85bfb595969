"""ComfyUI parity in planning: combine modes, per-image weights, embeds scaling fields, row keys."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from comfy_reference import combine_embeds

from ipa_ops.flow.spec import load_flow
from ipa_ops.generate import conditioning, manifest_plan
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.generate.prepare import prepare
from ipa_ops.store.encoders.ids import encoder_id

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["add", "subtract", "average", "norm average", "max", "min"])
@pytest.mark.parametrize("shape", [(3, 24), (2, 5, 32)])
def test_combine_modes_are_comfyuis(method: str, shape: tuple[int, ...]) -> None:
    embeds = torch.randn(*shape, generator=torch.Generator().manual_seed(len(method)))
    ours = conditioning.combine(embeds, method)
    torch.testing.assert_close(ours, combine_embeds(embeds, method), rtol=0, atol=1e-6)
    if method == "norm average":  # the underscore spelling is the same maths
        torch.testing.assert_close(conditioning.combine(embeds, "norm_average"), ours, rtol=0, atol=0)


def test_ipas_earlier_formulas_keep_their_own_names() -> None:
    embeds = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    summed = embeds[:1] - embeds[1:].sum(0, keepdim=True)
    torch.testing.assert_close(conditioning.combine(embeds, "subtract_sum"), summed)
    norms = embeds.norm(dim=-1, keepdim=True)
    unit = (embeds / norms).mean(0, keepdim=True) * norms.mean(0, keepdim=True)
    torch.testing.assert_close(conditioning.combine(embeds, "unit_average"), unit)
    assert not torch.allclose(conditioning.combine(embeds, "subtract"), conditioning.combine(embeds, "subtract_sum"))


def _plan(tmp_path: Path, zoo_dir: Path, entries: list[dict], monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Plan one row per adapter entry on the quickstart flow; references are store keys the store 'has'."""
    flow = load_flow(REPO / "flows" / "quickstart.yaml", [f"mirror={zoo_dir}"])
    eid = encoder_id("vit-h", flow.encoders["vit-h"], flow.mirror_root())
    keys = [f"{c * 64}/{eid}" for c in "abc"]
    monkeypatch.setattr(manifest_plan, "usable_keys", lambda store: set(keys))
    def entry(e: dict) -> dict:  # a list of entries: the adapter applied once per entry
        return {"adapter": "style", "images": keys[: e.pop("n", 1)], **e}

    rows = [
        {"id": f"r{i}", "prompt": "x", "seed": 1, "adapters": json.dumps([entry(x) for x in e] if isinstance(e, list)
                                                                          else [entry(e)])}
        for i, e in enumerate(entries)
    ]  # fmt: skip
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    assert flow.stages.generate is not None
    flow.stages.generate.store = None
    return plan_manifest(flow, flow.stages.generate, str(manifest))


ENTRIES = [
    {"n": 2, "combine": "average"},
    {"n": 2, "combine": "subtract"},
    {"n": 1, "combine": "subtract"},
    {"n": 3, "combine": "norm average"},
    {"n": 1},
    {"n": 2, "combine": "max", "image_weights": [1.0, 0.5], "embeds_scaling": "K+V"},
    {"n": 1, "embeds_scaling": "V only"},
]


def test_row_keys_move_only_where_the_maths_changed(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans, errors = _plan(tmp_path, zoo_dir, [dict(e) for e in ENTRIES], monkeypatch)
    assert errors == []
    new = {p.id: p.row_key for p in plans}
    # the keys as planned before ComfyUI's maths: no combine version (the new fields, unset, add nothing)
    monkeypatch.setattr(conditioning, "combine_identity", lambda mode, images: {})
    old = {p.id: p.row_key for p in _plan(tmp_path, zoo_dir, [dict(e) for e in ENTRIES], monkeypatch)[0]}
    changed = {rid for rid in new if new[rid] != old[rid]}
    assert changed == {"r1", "r3"}  # subtract and norm average of several images; one image is the same maths
    assert new["r6"] == new["r4"]  # V only is the default: the same row, the same key
    by_id = {p.id: p for p in plans}
    assert by_id["r5"].adapters[0].embeds_scaling == "K+V" and by_id["r5"].adapters[0].image_weights == [1.0, 0.5]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"n": 2, "image_weights": [1.0]}, "adapters[0].image_weights: 1 weight for 2 images; give one per image"),
        ({"n": 1, "embeds_scaling": "K+V only"}, "adapters[0].embeds_scaling"),
        ({"n": 1, "combine": "median"}, "adapters[0].combine: must be one of"),
    ],
)
def test_bad_comfy_fields_name_the_field(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch, entry: dict, message: str
) -> None:
    plans, errors = _plan(tmp_path, zoo_dir, [entry], monkeypatch)
    assert plans == [] and len(errors) == 1
    assert message in errors[0]["error"] and "\n" not in errors[0]["error"]


class _Store:
    """Embeddings by key, as EmbeddingStore.get / uncond return them (prepare's only store calls)."""

    def __init__(self, embeds: dict[str, torch.Tensor]):
        self.embeds = embeds

    def get(self, keys: list[str], field: str) -> list[torch.Tensor]:
        return [self.embeds[k] for k in keys]

    def uncond(self, encoder: str, field: str) -> torch.Tensor:
        return torch.zeros_like(next(iter(self.embeds.values())))


def test_image_weights_scale_each_image_before_combining(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = {"n": 2, "combine": "subtract", "image_weights": [0.5, 2.0], "embeds_scaling": "K+mean(V) w/ C penalty"}
    (plan,), errors = _plan(tmp_path, zoo_dir, [entry], monkeypatch)
    assert errors == []
    seeded = [torch.Generator().manual_seed(i) for i in range(2)]
    embeds = {k: torch.randn(24, generator=g) for g, k in zip(seeded, plan.adapters[0].keys, strict=True)}
    req = prepare(plan, _Store(embeds))  # type: ignore[arg-type]
    a, b = embeds.values()
    expected = combine_embeds(torch.stack([a * 0.5, b * 2.0]), "subtract")  # IPAdapterEncoder's weight, then combine
    torch.testing.assert_close(req.adapters[0].embeds, expected)
    assert req.adapters[0].embeds_scaling == "K+mean(V) w/ C penalty"
    torch.testing.assert_close(req.adapters[0].negative, torch.zeros(1, 24))  # negatives are not weighted


def test_embeds_scaling_travels_between_stages() -> None:
    from ipa_ops.flow.schedules import parse_schedule
    from ipa_ops.generate.contract import AdapterInput, RowRequest
    from ipa_ops.generate.payload import from_bytes, to_bytes

    spec = {"weight_type": "style transfer precise", "style_boost": 2.0, "start_at": 0.2}
    x = AdapterInput("style", torch.ones(1, 4), torch.zeros(1, 4), parse_schedule(spec), embeds_scaling="K+V")
    back = from_bytes(to_bytes(RowRequest(id="a", prompt="p", seed=1, model="sd15", adapters=[x]))).adapters[0]
    assert back.embeds_scaling == "K+V" and back.schedule == x.schedule


def test_black_unconditional_image_is_comfyuis(zoo_dir: Path) -> None:
    """`uncond_image: black` is ComfyUI's negative for Plus adapters: a black image through its clip_preprocess."""
    from transformers import CLIPVisionModelWithProjection

    from ipa_ops.flow.spec import EncoderSpec
    from ipa_ops.store.encoders.clip import ClipEncoder
    from ipa_ops.store.encoders.ids import clip_image_size

    folder = zoo_dir / "h94/IP-Adapter/models/image_encoder"
    black = ClipEncoder(folder, hidden_states=True, uncond_image="black").uncond()
    zeros = ClipEncoder(folder, hidden_states=True).uncond()
    size = clip_image_size(folder)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # ComfyUI's clip_preprocess
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (torch.zeros(1, 3, size, size) - mean) / std
    model = CLIPVisionModelWithProjection.from_pretrained(folder)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(torch.from_numpy(black["hidden_states"]), expected, atol=1e-5, rtol=0)
    assert abs(black["hidden_states"] - zeros["hidden_states"]).max() > 1e-3
    assert not black["image_embeds"].any()  # pooled adapters: zeros, as in ComfyUI and diffusers
    spec = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder", "hidden_states": True}
    ids = [encoder_id("e", EncoderSpec.model_validate({**spec, **extra}), str(zoo_dir))
           for extra in ({}, {"uncond_image": "zeros"}, {"uncond_image": "black"})]  # fmt: skip
    assert ids[0] == ids[1] != ids[2]  # the default keeps old encoder ids


def test_one_adapter_applied_twice_plans_two_entries(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each entry of a repeated alias is one application with its own images, scale and scaling; order counts."""
    first, second = {"n": 1, "scale": {"weight_type": "ease in"}}, {"n": 2, "scale": 0.4, "embeds_scaling": "K+V"}
    entries = [[dict(first), dict(second)], [dict(second), dict(first)], dict(first)]
    plans, errors = _plan(tmp_path, zoo_dir, entries, monkeypatch)
    assert errors == []
    twice, swapped, once = plans
    assert [a.alias for a in twice.adapters] == ["style", "style"] and len(twice.adapters[1].keys) == 2
    assert len({twice.row_key, swapped.row_key, once.row_key}) == 3
    embeds = {k: torch.randn(24, generator=torch.Generator().manual_seed(i)) for i, k in enumerate("abc")}
    by_key = {k: embeds[k[0]] for a in twice.adapters for k in a.keys}
    req = prepare(twice, _Store(by_key))  # type: ignore[arg-type]
    assert [x.embeds.shape[0] for x in req.adapters] == [1, 2]
    assert [x.embeds_scaling for x in req.adapters] == ["V only", "K+V"]


def test_portrait_unnorm_reads_the_raw_face_embedding() -> None:
    """The unnormalised face embedding, as a one-token sequence, with a zero negative (ComfyUI's is_portrait_unnorm)."""
    from ipa_ops.generate.plan import AdapterPlan, RowPlan

    raw = torch.randn(512, generator=torch.Generator().manual_seed(1)) * 20
    adapter = AdapterPlan("unnorm", "face_embedding", "faces@0", ["k"], [], [], "concat", 0.7)
    request = {"id": "u", "prompt": "p", "seed": 1, "model": "sdxl", "width": 64, "height": 64}
    plan = RowPlan("u", "key", request, None, None, [adapter])

    class Faces(_Store):
        def uncond(self, encoder: str, field: str) -> torch.Tensor:
            raise AssertionError("the face encoder's stored negative has no raw embedding")

    req = prepare(plan, Faces({"k": raw}))  # type: ignore[arg-type]
    torch.testing.assert_close(req.adapters[0].embeds, raw.view(1, 1, 512))
    torch.testing.assert_close(req.adapters[0].negative, torch.zeros(1, 1, 512))


def test_faceid_lora_weight_enters_row_keys_only_when_not_one() -> None:
    from ipa_ops.flow.spec import Flow
    from ipa_ops.generate.checkpoints import AdapterFacts
    from ipa_ops.generate.plan import _lora_weight

    adapters = {"fid": {"source": "h94/IP-Adapter-FaceID", "weight_name": "f.bin", "encoder": "faces"}}
    flow = Flow.model_validate({"name": "f", "models": {"m": {"source": "x"}}, "adapters": adapters,
                                "encoders": {"faces": {"type": "insightface"}}})  # fmt: skip
    with_lora = {"fid": AdapterFacts("faceid", 768, 16, 0, 512, 4, lora=True)}
    assert _lora_weight(flow, "fid", with_lora) == {}  # diffusers' 1.0: old row keys stay
    flow.adapters["fid"].lora_weight = 0.6
    assert _lora_weight(flow, "fid", with_lora) == {"lora_weight": 0.6}  # ComfyUI's strength moves the key
    assert _lora_weight(flow, "fid", {"fid": AdapterFacts("faceid", 768, 16, 0, 512, 16, lora=False)}) == {}


def test_face_crop_size_is_comfyuis_for_sdxl(zoo_dir: Path) -> None:
    """`face_crop_size: 256` crops as ComfyUI's SDXL FaceID (norm_crop image_size=256); only then the id moves."""
    import numpy as np
    from insightface.utils.face_align import norm_crop

    from ipa_ops.flow.spec import EncoderSpec
    from ipa_ops.store.encoders.face import FaceEncoder
    from ipa_ops.zoo import draw_face

    pack = zoo_dir / "insightface/models/buffalo_l"
    face = draw_face((200, 200), radius=70, seed=5)
    found = FaceEncoder(pack, det_size=320, crop_size=256).encode(face)
    assert found["status"] == "ok" and found["crop"].shape == (256, 256, 3)
    kps = found["kps"].reshape(5, 2)
    assert np.array_equal(found["crop"], norm_crop(np.asarray(face.convert("RGB")), landmark=kps, image_size=256))
    assert FaceEncoder(pack, det_size=320).encode(face)["crop"].shape == (224, 224, 3)
    ids = [encoder_id("f", EncoderSpec.model_validate({"type": "insightface", **extra}), str(zoo_dir))
           for extra in ({}, {"face_crop_size": 224}, {"face_crop_size": 256})]  # fmt: skip
    assert ids[0] == ids[1] != ids[2]
    with pytest.raises(ValueError, match="face_crop_size must be a multiple of 112 or 128"):
        EncoderSpec.model_validate({"type": "insightface", "face_crop_size": 250})
