"""Per-frame controls of video rows: ComfyUI's unfold_batch, IPAdapterWeights' frame weights, per-frame masks.

Each video row through ipa's batched attention is held to the documented AnimateDiff pipeline
whose IP processors compute ComfyUI's per-frame maths one sample at a time
(`comfy_frames_reference.FrameProcessor`), with the frame weights from a transcription of
`IPAdapterWeights`; a mixed batch of such rows equals each row alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from comfy_frames_reference import full_batch
from comfy_frames_reference import ipadapter_weights as comfy_weights
from comfy_frames_reference import run as frames_run
from diffusers import AnimateDiffPipeline
from PIL import Image
from test_comfy_tiles import record_round_trip
from test_video import DDIM_OPTIONS, MOTION, SD15, documented  # noqa: F401 - documented is a fixture

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow, load_flow
from ipa_ops.generate import conditioning, manifest_plan
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.manifest.frames import FrameOptions, frame_plan, ipadapter_weights, per_frame
from ipa_ops.store.encoders.ids import encoder_id

REPO = Path(__file__).resolve().parents[1]
FRAMES = 4
TOL = 1e-4
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("timing", ["custom", "linear", "ease_in_out", "ease_in", "ease_out"])
@pytest.mark.parametrize("given", [("1.0, 0.0", 0, 0, 9999), ("0.2,\n0.9", 8, 2, 6), ("", 5, 0, 9999)])
def test_frame_weights_are_ipadapter_weights(timing: str, given: tuple) -> None:
    text, frames, start, end = given
    options = FrameOptions(weights=text, timing=timing, frames=frames or None, start_frame=start, end_frame=end)
    expected, inverted = comfy_weights(text, timing, frames or 16, start, end)
    assert ipadapter_weights(options, 16) == pytest.approx(expected, abs=1e-12)
    invert = options.model_copy(update={"invert": True})
    assert ipadapter_weights(invert, 16) == pytest.approx(inverted, abs=1e-12)
    assert per_frame([1.0, 0.5], 4) == [1.0, 0.5, 0.5, 0.5] and per_frame([1.0, 0.5, 0.2], 2) == [1.0, 0.5]


@pytest.mark.parametrize("given", [("0.0, 1.0", "linear", 3, 1, 2, 3), ("1, 0.5, 0.2", "custom", None, 0, 1, 2),
                                   ("0.2, 1", "ease_in_out", 4, 2, 0, 1)])  # fmt: skip
def test_full_batch_is_ipadapter_weights_with_images(given: tuple) -> None:
    text, timing, frames, start, end, images = given
    options = FrameOptions(method="full batch", weights=text, timing=timing, frames=frames,
                           add_starting_frames=start, add_ending_frames=end)  # fmt: skip
    curve, _ = comfy_weights(text, timing, frames or 0)
    weights, slots = full_batch(curve, images, start, end)
    for num_frames in (len(weights), 5, 20):  # fitted to the video as tensor_to_size fits them
        plan = frame_plan(options, num_frames, images)
        assert plan["unfold"] is True
        assert plan["weights"] == pytest.approx(per_frame(weights, num_frames), abs=1e-12)
        assert plan["slots"] == per_frame(slots, num_frames)


@pytest.fixture(scope="module")
def generator(zoo_dir: Path) -> Generator:
    flow = Flow.model_validate(
        {
            "name": "v",
            "mirror": str(zoo_dir),
            "models": {
                "sd15": {"source": SD15, "motion_adapter": "ad", "scheduler": "ddim", "scheduler_options": DDIM_OPTIONS}
            },
            "motion_adapters": {"ad": {"source": MOTION}},
            "adapters": {
                "style": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin"}
            },
        }
    )
    return Generator(flow, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def embeds(documented: AnimateDiffPipeline) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F811
    """(positives [4, D], negatives [4, D]) of the four reference images, as the documented pipeline makes them."""
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(4)]
    pairs = [documented.prepare_ip_adapter_image_embeds([r], None, "cpu", 1, True)[0] for r in refs]
    return torch.cat([p[1] for p in pairs]), torch.cat([p[0] for p in pairs])


def _masks() -> torch.Tensor:
    """Three region masks at the output size: left half, right half, top half."""
    boxes = [(0, 0, 32, 64), (32, 0, 64, 64), (0, 0, 64, 32)]
    images = []
    for box in boxes:
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, box)
        images.append(mask)
    return conditioning.preprocess_masks(images, 64, 64)


# (images, unfold, frame options or None, masks, scale)
CASES = {
    "unfold": (3, True, None, False, 0.8),
    "weights": (1, False, {"weights": "0.0, 1.0", "timing": "ease_in_out"}, False, 0.9),
    "masks": (1, True, {"weights": "1.0, 0.3", "timing": "linear", "invert": True}, True, 0.7),
    "unfold_masks": (2, True, None, True, 0.6),
    "full_batch": (2, True, {"method": "full batch", "weights": "0.3, 1", "timing": "linear", "frames": 2}, False, 0.8),
}


def _row(name: str, embeds: tuple[torch.Tensor, torch.Tensor], seed: int) -> RowRequest:
    n, unfold, options, masked, scale = CASES[name]
    plan = frame_plan(FrameOptions(unfold=unfold, **(options or {})), FRAMES, n)
    weights = torch.tensor(plan["weights"]) if plan and plan["weights"] is not None else None
    slots = torch.tensor(plan["slots"]) if plan and plan["slots"] is not None else None
    entry = AdapterInput("style", embeds[0][:n], embeds[1][:n], parse_schedule(scale), _masks() if masked else None,
                         unfold=unfold, frame_weights=weights, frame_slots=slots)  # fmt: skip
    return RowRequest(id=name, prompt=f"a bear waving {name}", negative_prompt="bad quality", seed=seed,
                      model="sd15", task="video", width=64, height=64, steps=2, guidance_scale=7.5,
                      num_frames=FRAMES, scheduler="ddim", adapters=[entry])  # fmt: skip


def _reference(pipe: AnimateDiffPipeline, name: str, row: RowRequest, embeds: tuple) -> np.ndarray:
    n, unfold, options, masked, scale = CASES[name]
    weights, order = None, list(range(n))
    if options is not None:  # ComfyUI's own IPAdapterWeights output for the same settings
        plain, inverted = comfy_weights(options["weights"], options["timing"], options.get("frames", FRAMES))
        weights = torch.tensor(inverted if options.get("invert") else plain)
        if options.get("method"):  # its image_1 (the images, each held for the curve) is the batch ComfyUI unfolds
            plain, order = full_batch(plain, n)
            weights = torch.tensor(plain)
    emb = torch.stack([embeds[1][:n][order], embeds[0][:n][order]])  # [negative; positive] x images
    processor = dict(frames=FRAMES, scale=scale, unfold=unfold, weights=weights, masks=_masks() if masked else None)
    result = frames_run(
        pipe, processor, prompt=row.prompt, negative_prompt=row.negative_prompt, ip_adapter_image_embeds=[emb],
        num_frames=FRAMES, guidance_scale=7.5, num_inference_steps=2, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(row.seed), output_type="np",
    )  # fmt: skip
    return result.frames[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_video_row_equals_comfyuis_per_frame_maths(
    generator: Generator, documented: AnimateDiffPipeline, embeds: tuple, name: str  # noqa: F811
) -> None:
    row = _row(name, embeds, seed=3)
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    expected = _reference(documented, name, row, embeds)
    assert out.image.shape == (FRAMES, 64, 64, 3)
    assert np.abs(out.image - expected).max() < TOL
    # the control changes the video: the same row without it (all images at every frame, flat weight) differs
    plain = _row(name, embeds, seed=3)
    plain.adapters[0].unfold, plain.adapters[0].frame_weights = False, None
    plain.adapters[0].masks = plain.adapters[0].masks[:1] if plain.adapters[0].masks is not None else None
    plain.adapters[0].embeds, plain.adapters[0].negative = plain.adapters[0].embeds[:1], plain.adapters[0].negative[:1]
    (other,) = generator.generate([plain])
    assert np.abs(other.image - out.image).max() > 1e-3


def test_mixed_video_batch_equals_each_row_alone(generator: Generator, embeds: tuple) -> None:
    rows = [_row(name, embeds, seed=20 + i) for i, name in enumerate(sorted(CASES))]
    plain = _row("unfold", embeds, seed=30)
    plain.id, plain.adapters[0].unfold = "plain", False  # three images attended jointly at every frame
    rows.append(plain)
    before = generator.stats["calls"]
    together = generator.generate(rows)
    assert generator.stats["calls"] == before + 2  # batch_size 4: five rows in two calls, mixed controls in each
    for row, out in zip(rows, together, strict=True):
        assert out.error == "", out.error
        (alone,) = generator.generate([row])
        assert np.abs(out.image - alone.image).max() < 2e-3, row.id


def _plan(tmp_path: Path, zoo_dir: Path, entries: list[dict], monkeypatch: pytest.MonkeyPatch, **row: object):
    """Plan one video row per adapter entry on flows/video.yaml; references are store keys the store 'has'."""
    flow = load_flow(REPO / "flows" / "video.yaml", [f"mirror={zoo_dir}"])
    eid = encoder_id("vit-h", flow.encoders["vit-h"], flow.mirror_root())
    keys = [f"{c * 64}/{eid}" for c in "abc"]
    monkeypatch.setattr(manifest_plan, "usable_keys", lambda store: set(keys))
    rows = [
        {"id": f"r{i}", "prompt": "x", "seed": 1, "num_frames": FRAMES, "steps": 2, **row,
         "adapters": json.dumps([{"adapter": "style", "images": keys[: e.pop("n", 1)], **e}])}
        for i, e in enumerate(entries)
    ]  # fmt: skip
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    assert flow.stages.generate is not None
    flow.stages.generate.store = None
    return plan_manifest(flow, flow.stages.generate, str(manifest))


def test_frames_plan_and_row_keys(tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [
        {"n": 3},
        {"n": 3, "frames": {"unfold": False}},  # nothing per frame: the same maths and key as no frames
        {"n": 3, "frames": {"unfold": True}},
        {"n": 1, "frames": {"weights": "0.0, 1.0", "timing": "ease_in"}},
        {"n": 1, "frames": {"weights": [1.0, 0.5]}},
        {"n": 2, "frames": {"unfold": True}, "image_weights": [1.0, 0.5], "embeds_scaling": "K+V"},
    ]
    plans, errors = _plan(tmp_path, zoo_dir, entries, monkeypatch)
    assert errors == []
    by_id = {p.id: p for p in plans}
    assert by_id["r0"].row_key == by_id["r1"].row_key != by_id["r2"].row_key
    assert by_id["r2"].adapters[0].frames == {"unfold": True, "weights": None, "slots": None}
    assert by_id["r3"].adapters[0].frames["weights"] == pytest.approx(comfy_weights("0.0, 1.0", "ease_in", FRAMES)[0])
    assert by_id["r4"].adapters[0].frames["weights"] == [1.0, 0.5, 0.5, 0.5]  # the last repeats (tensor_to_size)
    assert len({p.row_key for p in plans}) == 5
    comfy = ("frames", "image_weights", "embeds_scaling")
    for plan in plans:  # `ipa reproduce` reads them back from the record
        again = record_round_trip(plan).adapters[0]
        assert [getattr(again, k) for k in comfy] == [getattr(plan.adapters[0], k) for k in comfy]


@pytest.mark.parametrize(
    ("entry", "row", "field", "message"),
    [
        ({"frames": {"unfold": True}}, {"task": "text2img"}, "adapters[0].frames", "for task video rows"),
        ({"n": 2, "combine": "average", "frames": {"unfold": True}}, {}, "adapters[0].combine", "leave combine"),
        ({"frames": {"weights": "1, 0", "timing": "linear", "start_frame": 3}}, {}, "adapters[0].frames", "at least 2"),
        ({"frames": {"weights": "1, x"}}, {}, "adapters[0].frames.weights", "separated by commas"),
        ({"frames": {"unfold": True, "speed": 2}}, {}, "adapters[0].frames.speed", "allowed: unfold, weights"),
        ({"frames": "{not json"}, {}, "adapters[0].frames", "not valid JSON"),
        ({"frames": {"method": "full batch", "weights": "0, 1", "timing": "linear"}}, {}, "adapters[0].frames",
         "give `frames`"),
    ],
)
def test_bad_frames_say_what_is_wrong(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch, entry: dict, row: dict, field: str, message: str
) -> None:
    plans, errors = _plan(tmp_path, zoo_dir, [entry], monkeypatch, **row)
    assert plans == [] and len(errors) == 1
    text = errors[0]["error"]
    assert field in text and message in text and "\n" not in text, text


def test_unfold_masks_may_be_one_per_frame(tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under unfold, masks go frame by frame (any count); without it, one mask per image as before."""
    masks = []
    for i in range(3):
        path = tmp_path / f"mask{i}.png"
        Image.new("L", (512, 512), 255 * (i % 2)).save(path)
        masks.append(str(path))
    entries = [{"masks": masks, "frames": {"unfold": True}}, {"masks": masks}]
    plans, errors = _plan(tmp_path, zoo_dir, entries, monkeypatch, width=512, height=512)
    assert [p.id for p in plans] == ["r0"]
    assert len(errors) == 1 and "adapters[0].masks" in errors[0]["error"] and "one mask per image" in errors[0]["error"]


def test_frames_and_tiles_through_the_ray_stages(tmp_path: Path, zoo_dir: Path, ray_local: None) -> None:
    """The real extract and generate stages: a tiled encoder's tiles, an unfold row and a tiled video row."""
    from zoo_flows import zoo_flow

    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.stages.extract import run_extract
    from ipa_ops.stages.generate import run_generate

    refs = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(2)]
    unfold = {"adapter": "style", "images": refs, "frames": {"unfold": True, "weights": "1, 0.5"}}
    rows = [
        {"id": "unfold", "prompt": "a bear", "seed": 1, "adapters": json.dumps([unfold])},
        {"id": "tiled", "prompt": "a bear", "seed": 2,
         "adapters": json.dumps([{"adapter": "style", "images": refs[:1], "tiled": True, "scale": 0.7}])},
    ]  # fmt: skip
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    flow = zoo_flow(
        "video", tmp_path, zoo_dir, manifest, "stages.generate.defaults.num_frames=2",
        "encoders.vit-h.tiles={sharpening: 0.2}", "stages.extract.resources.num_gpus=0",
        "stages.generate.resources.num_gpus=0",
    )  # fmt: skip
    assert flow.stages.extract is not None and flow.stages.generate is not None
    counts = run_extract(flow, flow.stages.extract)
    assert counts["vit-h"]["failed"] == 0 and counts["vit-h"]["new"] > 4  # the images and their tiles
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["error"]) == (2, 0), summary
    results = OutputDir(str(tmp_path / "out")).read_results().set_index("id")
    adapters = {rid: results.loc[rid, "adapters"][0] for rid in ("unfold", "tiled")}
    frames = adapters["unfold"]["frames"]  # pandas reads the Arrow lists as numpy arrays
    assert frames["unfold"] is True and list(frames["weights"]) == [1.0, 0.5]
    assert len(adapters["tiled"]["tiles"]["boxes"]) == 4 and len(adapters["tiled"]["references"]) == 4
    again = run_generate(flow, flow.stages.generate)  # row keys are stable: nothing to redo
    assert (again["ok"], again["skipped"]) == (0, 2)
