"""Tiled references as ComfyUI's IPAdapterTiled: tiles, their regions, their store rows, the row's image.

The tiles and masks are held to a transcription of `IPAdapterTiled.apply_tiled`
(`comfy_prep_reference.tiled_tiles`); a tiled row through ipa (extract, plan, prepare, batched
attention) equals the stock diffusers pipeline given CLIP of ComfyUI's tiles as masked images.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from comfy_prep_reference import tiled_tiles, to_tensor_image
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image
from reference import diffusers_call
from test_comfy_prep import _picture

from ipa_ops.flow.spec import Flow
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.generate.plan import RowPlan
from ipa_ops.generate.prepare import prepare
from ipa_ops.generate.reproduce import plan_of
from ipa_ops.records.schema import RECORD_COLUMNS, from_columns, to_columns
from ipa_ops.stages.extract import EncodeActor, _job, _table
from ipa_ops.stages.extract_rows import Committer
from ipa_ops.store.dataset import EmbeddingStore, content_key
from ipa_ops.store.encoders import tiles
from ipa_ops.store.encoders.ids import encoder_id
from ipa_ops.store.images import read_image, sha256_of

pytestmark = pytest.mark.usefixtures("single_thread")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SIZES = [(600, 500), (900, 300), (1000, 300), (1400, 200), (300, 700), (256, 1100)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sharpening", [0.0, 0.5])
def test_tiles_and_regions_are_ipadaptertileds(size: tuple[int, int], sharpening: float) -> None:
    image = _picture(*size, seed=size[0])
    got, plan = tiles.prepared(image, sharpening)
    expected_tiles, expected_masks = tiled_tiles(to_tensor_image(image), sharpening)
    assert len(plan.boxes) == len(expected_tiles) > 1
    for (left, top, right, bottom), tile, mask in zip(plan.boxes, expected_tiles, expected_masks, strict=True):
        np.testing.assert_allclose(got[top:bottom, left:right], tile[0].numpy(), atol=1e-6, rtol=0)
        assert mask.shape[1:] == (plan.frame[1], plan.frame[0])
    masks = tiles.region_masks(plan.frame, list(plan.boxes))
    for ours, theirs in zip(masks, expected_masks, strict=True):
        np.testing.assert_array_equal(np.asarray(ours) / 255.0, theirs[0].numpy())


def _user_mask(width: int, height: int) -> Image.Image:
    """An attention mask with soft edges: a white disc on black."""
    y, x = np.mgrid[0:height, 0:width]
    disc = np.clip(1.5 - np.hypot((x - width / 3) / (width / 4), (y - height / 2) / (height / 3)), 0, 1)
    return Image.fromarray((disc * 255).astype(np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_an_entrys_own_mask_is_carried_as_ipadaptertiled_carries_it(size: tuple[int, int]) -> None:
    image, mask = _picture(*size, seed=1), _user_mask(300, 200)
    plan = tiles.layout(*size)
    inside = tiles.mask_frame(mask, *size)
    given = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]
    _, expected = tiled_tiles(to_tensor_image(image), 0.0, given)
    for (left, top, right, bottom), theirs in zip(plan.boxes, expected, strict=True):
        np.testing.assert_allclose(inside[top:bottom, left:right], theirs[0, top:bottom, left:right].numpy(), atol=1e-6)
    ours = tiles.region_masks(plan.frame, list(plan.boxes), inside)
    for mine, theirs in zip(ours, expected, strict=True):  # 8-bit images of the same values
        assert np.abs(np.asarray(mine) / 255.0 - theirs[0].clamp(0, 1).numpy()).max() <= 0.5 / 255 + 1e-6


def test_tile_layouts_cover_the_image() -> None:
    quarters = ((0, 0, 256, 256), (256, 0, 512, 256), (0, 256, 256, 512), (256, 256, 512, 512))
    assert tiles.layout(600, 500).boxes == quarters  # almost square: 512 x 512, four tiles
    wide = tiles.layout(1000, 300)  # 853 x 256: four tiles overlapping by 57 px
    assert wide.frame == (853, 256) and [b[0] for b in wide.boxes] == [0, 199, 398, 597]
    assert tiles.layout(1400, 200).frame == (1024, 256)  # beyond 4:1, the centre 4 tiles
    assert tiles.tile_sha("a" * 64, 0, 0.0) != tiles.tile_sha("a" * 64, 0, 0.5) != tiles.tile_sha("a" * 64, 1, 0.5)


def _flow(zoo: Path, root: Path, manifest: Path, sharpening: float | None = 0.3) -> Flow:
    encoder = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}
    return Flow.model_validate({
        "name": "tiled", "mirror": str(zoo), "models": {"sd15": {"source": SD15}},
        "encoders": {"vit-t": {**encoder, **({"tiles": {"sharpening": sharpening}} if sharpening is not None else {})}},
        "adapters": {"style": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin",
                               "encoder": "vit-t"}},
        "stages": {"generate": {"manifest": str(manifest), "model": "sd15", "store": str(root / "store"),
                                "output": str(root / "out")}},
    })  # fmt: skip


def _extract(flow: Flow, uris: list[str]) -> EmbeddingStore:
    """The extract stage's encoder actor, run in this process, committed as the stage commits."""
    spec, mirror = flow.encoders["vit-t"], flow.mirror_root()
    actor = EncodeActor("vit-t", spec.model_dump_json(), mirror, encoder_id("vit-t", spec, mirror), False, True)
    jobs = []
    for uri in uris:
        image = read_image(uri)[0]
        jobs.append(_job(uri, sha256_of(uri), "vit-t", "todo", width=image.width, height=image.height,
                         pixels=image.tobytes()))  # fmt: skip
    store = EmbeddingStore(str(Path(flow.stages.generate.store)))
    committer = Committer(store, {}, 10_000, 1e9)
    for job in actor(_table(jobs)).to_pylist():
        for row in pickle.loads(job["result"]):
            committer.add(row)
    committer.flush()
    store.refresh()
    return store


@pytest.fixture(scope="module")
def tiled(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiled")
    images = {"wide": _picture(900, 300, seed=11), "tall": _picture(300, 700, seed=12)}
    uris = {}
    for name, image in images.items():
        uris[name] = str(root / f"{name}.png")
        image.save(uris[name])
    mask = root / "mask.png"
    _user_mask(64, 64).save(mask)
    manifest = root / "m.csv"
    rows = [
        {"id": "tiled-wide", "prompt": "a tiled thing", "seed": 4, "width": 64, "height": 64, "steps": 3,
         "adapters": json.dumps([{"adapter": "style", "images": [uris["wide"]], "tiled": True, "scale": 0.8}])},
        {"id": "tiled-tall", "prompt": "a tall thing", "seed": 5, "width": 64, "height": 64, "steps": 3,
         "adapters": json.dumps([{"adapter": "style", "images": [uris["tall"]], "tiled": True, "scale": 0.6}])},
        {"id": "tiled-masked", "prompt": "a masked thing", "seed": 7, "width": 64, "height": 64, "steps": 3,
         "adapters": json.dumps([{"adapter": "style", "images": [uris["wide"]], "masks": [str(mask)], "tiled": True,
                                  "soft_masks": True, "scale": 0.9}])},
        {"id": "whole", "prompt": "a whole thing", "seed": 6, "width": 64, "height": 64, "steps": 3,
         "adapters": json.dumps([{"adapter": "style", "images": [uris["wide"]], "scale": 0.7}])},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(manifest, index=False)
    flow = _flow(zoo_dir, root, manifest)
    store = _extract(flow, list(uris.values()))
    return {"flow": flow, "store": store, "uris": uris, "images": images, "root": root, "mask": mask}


def test_extract_stores_comfyuis_tiles_under_derived_keys(tiled: dict, zoo_dir: Path) -> None:
    """Each tile is a store row `<tile_sha>/<encoder id>`: CLIP of ComfyUI's tile through the encoder's processor."""
    from transformers import CLIPVisionModelWithProjection

    from ipa_ops.store.encoders.prep import to_pil
    from ipa_ops.store.encoders.siglip import vision_encoder

    flow, store = tiled["flow"], tiled["store"]
    enc = encoder_id("vit-t", flow.encoders["vit-t"], flow.mirror_root())
    folder = zoo_dir / "h94/IP-Adapter/models/image_encoder"
    processor = vision_encoder(folder, False, "center", False).processor
    model = CLIPVisionModelWithProjection.from_pretrained(folder)
    for name, image in tiled["images"].items():
        sha = sha256_of(tiled["uris"][name])
        expected, _ = tiled_tiles(to_tensor_image(image), 0.3)
        keys = [content_key(tiles.tile_sha(sha, i, 0.3), enc) for i in range(len(expected))]
        stored = torch.stack(store.get(keys))
        pixels = processor([to_pil(t[0].numpy()) for t in expected], return_tensors="pt").pixel_values
        with torch.no_grad():
            direct = model(pixels).image_embeds
        torch.testing.assert_close(stored, direct, atol=1e-4, rtol=0)
        assert content_key(sha, enc) in store.keys()  # the whole image too, for entries without `tiled`
    untiled = flow.encoders["vit-t"].model_copy(update={"tiles": None})
    assert enc != encoder_id("vit-t", untiled, flow.mirror_root())  # tiles enter the encoder id


@pytest.fixture(scope="module")
def pipe(zoo_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo_dir / "h94/IP-Adapter"), subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiled_rows_equal_diffusers_with_comfyuis_tiles_as_masked_images(
    tiled: dict, zoo_dir: Path, pipe: StableDiffusionPipeline
) -> None:
    flow, store = tiled["flow"], tiled["store"]
    plans, errors = plan_manifest(flow, flow.stages.generate)
    assert errors == []
    requests = [prepare(p, store) for p in plans]
    generator = Generator(flow, device="cpu", batch_size=4)
    together = generator.generate(requests)
    assert generator.stats["calls"] == 1  # tiled (4, 3 and 4 masked tiles) and whole-image rows in one call
    enc = encoder_id("vit-t", flow.encoders["vit-t"], flow.mirror_root())
    for request, out in zip(requests, together, strict=True):
        assert out.error == "", out.error
        (alone,) = generator.generate([request])
        assert np.abs(out.image - alone.image).max() < 2e-3
        if request.id == "whole":
            continue
        name, scale, user = {"tiled-wide": ("wide", 0.8, None), "tiled-tall": ("tall", 0.6, None),
                             "tiled-masked": ("wide", 0.9, tiled["mask"])}[request.id]  # fmt: skip
        sha = sha256_of(tiled["uris"][name])
        given = None if user is None else torch.from_numpy(np.asarray(Image.open(user), dtype=np.float32) / 255)[None]
        expected_tiles, expected_masks = tiled_tiles(to_tensor_image(tiled["images"][name]), 0.3, given)
        n = len(expected_tiles)
        keys = [content_key(tiles.tile_sha(sha, i, 0.3), enc) for i in range(n)]
        pos = torch.stack(store.get(keys))
        emb = torch.stack([torch.zeros_like(pos), pos])  # diffusers' negative of a pooled adapter: zeros
        levels = [np.round(m[0].clamp(0, 1).numpy() * 255).astype(np.uint8) for m in expected_masks]
        mask_images = [Image.fromarray(level) for level in levels]
        processor = IPAdapterMaskProcessor(do_binarize=user is None)  # the masked row asks for soft masks
        masks = processor.preprocess(mask_images, height=64, width=64).reshape(1, n, 64, 64)
        pipe.set_ip_adapter_scale([[scale] * n])
        expected = diffusers_call(pipe, request, ip_adapter_image_embeds=[emb], height=64, width=64,
                                  cross_attention_kwargs={"ip_adapter_masks": [masks]})  # fmt: skip
        assert np.abs(alone.image - expected).max() < 1e-4, request.id
    by_id = {r.id: out.image for r, out in zip(requests, together, strict=True)}
    assert np.abs(by_id["tiled-wide"] - by_id["whole"]).max() > 1e-3  # tiles are not the whole image
    assert np.abs(by_id["tiled-wide"] - by_id["tiled-masked"]).max() > 1e-3  # nor is a masked tiling


def test_bad_tiled_entries_say_what_is_wrong(tiled: dict, zoo_dir: Path, tmp_path: Path) -> None:
    uris = tiled["uris"]
    store = tiled["flow"].stages.generate.store
    flow = tiled["flow"]
    key = content_key(sha256_of(uris["wide"]), encoder_id("vit-t", flow.encoders["vit-t"], flow.mirror_root()))
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    entries = [
        ({"images": [uris["wide"], uris["tall"]], "tiled": True}, "adapters[0].tiled: a tiled entry takes one image"),
        ({"images": [uris["wide"]], "masks": [str(mask), str(mask)], "tiled": True}, "at most one mask"),
        ({"images": [key], "tiled": True}, "needs the image file, not a store key"),
    ]
    rows = [{"id": f"b{i}", "prompt": "x", "seed": 1, "width": 64, "height": 64, "steps": 2,
             "adapters": json.dumps([{"adapter": "style", **e}])} for i, (e, _) in enumerate(entries)]  # fmt: skip
    manifest = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    flow = _flow(zoo_dir, tiled["root"], manifest)
    flow.stages.generate.store = store
    _, errors = plan_manifest(flow, flow.stages.generate)
    by_id = {e["id"]: e["error"] for e in errors}
    for i, (_, message) in enumerate(entries):
        assert message in by_id[f"b{i}"] and "\n" not in by_id[f"b{i}"], by_id[f"b{i}"]
    plain = _flow(zoo_dir, tiled["root"], manifest, sharpening=None)
    entry = [{"adapter": "style", "images": [uris["wide"]], "tiled": True}]
    pd.DataFrame(rows[:1]).assign(adapters=json.dumps(entry)).to_csv(manifest, index=False)
    _, errors = plan_manifest(plain, plain.stages.generate)
    assert len(errors) == 1 and "encoder 'vit-t' stores no tiles; set encoders.vit-t.tiles" in errors[0]["error"]


def record_round_trip(plan: RowPlan) -> RowPlan:
    """A plan's record through the results columns (Arrow) and back, as `ipa reproduce` reads it."""
    schema = pa.schema(
        [(name, pa.string()) for name in ("id", "row_key", "prompt", "model_fingerprint")] + [("seed", pa.int64())]
        + [(name, kind) for name, (kind, _) in RECORD_COLUMNS.items()]
    )  # fmt: skip
    columns = {**to_columns(plan.record), **{k: plan.record.get(k) for k in ("id", "row_key", "prompt", "seed")}}
    row = pa.Table.from_pylist([columns], schema=schema).to_pylist()[0]
    return plan_of(from_columns(row))


def test_reproduce_keeps_the_tiles(tiled: dict) -> None:
    flow = tiled["flow"]
    plans, _ = plan_manifest(flow, flow.stages.generate)
    for plan in plans:
        again = record_round_trip(plan)
        fields = [(a.keys, a.tiles, a.frames) for a in plan.adapters]
        assert [(a.keys, a.tiles, a.frames) for a in again.adapters] == fields
    by_id = {p.id: p for p in plans}
    assert by_id["tiled-wide"].adapters[0].tiles is not None and "tiles" not in by_id["whole"].record["adapters"][0]
