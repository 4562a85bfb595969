"""ComfyUI_IPAdapter_plus parity: weight types, precise types, embeds scaling, sigma windows.

The expected values come from `comfy_reference.py`, a transcription of ComfyUI's own control flow;
the pipeline tests run one row through ipa's batched attention and the same row through a stock
diffusers pipeline whose IP processors compute ComfyUI's maths directly (tiny zoo, CPU, fp32).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_reference import ComfyRow, attention_weight, comfy_index, comfy_sigma, execute_weight
from comfy_reference import percent_to_sigma as comfy_percent_to_sigma
from comfy_reference import run as comfy_run
from diffusers import StableDiffusionPipeline
from PIL import Image
from test_generator import _embeds, _flow, _input, _reference, _refs, _row

from ipa_ops.flow.schedules import WEIGHT_TYPES, NoiseLevels, parse_schedule, percent_to_sigma, step_profile
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.weight_types import comfy_layers, layer_weights
from ipa_ops.zoo.sd import sd15_unet_config, sdxl_unet_config, unet_from_config
from ipa_ops.zoo.sizes import FULL

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4


def _ip_layer_names(family: str) -> list[str]:
    """The IP layer names (processor names, checkpoint order) of the real-size UNet, built on the meta device."""
    config = sd15_unet_config(FULL.sd15_unet) if family == "sd15" else sdxl_unet_config(FULL.sdxl_unet)
    unet = unet_from_config(config, meta=True)
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


NAMES = {family: _ip_layer_names(family) for family in ("sd15", "sdxl")}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_layer_index_is_comfyuis_execution_order(family: str) -> None:
    names = NAMES[family]
    assert len(names) == (16 if family == "sd15" else 70)
    mapped = comfy_layers(names)
    assert mapped == [comfy_index(n, family == "sdxl") for n in names]
    # checkpoint order puts the up blocks before the mid block; ComfyUI's index puts the middle first
    mid = next(i for i, n in enumerate(names) if n.startswith("mid_block"))
    assert mid > max(i for i, n in enumerate(names) if n.startswith("up_blocks"))
    assert mapped[mid] == ((6, "middle") if family == "sd15" else (4, "middle"))
    if family == "sdxl":  # every transformer block of a module shares its index: InstantStyle's blocks
        style = [n for n, (i, _) in zip(names, mapped, strict=True) if i == 6]
        assert len(style) == 10 and all(n.startswith("up_blocks.0.attentions.1.") for n in style)
        assert {n.split(".transformer")[0] for n, (i, _) in zip(names, mapped, strict=True) if i == 3} == {
            "down_blocks.2.attentions.1"
        }


SETTINGS = [
    {"value": 0.8},
    {"value": -0.4, "composition": 0.3},
    {"value": 1.3, "style_boost": 2.5},
    {"value": 0.7, "composition_boost": 0.2},
]


def _fits(weight_type: str, given: dict) -> bool:
    """Boosts go with their precise type, `composition` with the style-and-composition types."""
    owners = {"style_boost": "style transfer precise", "composition_boost": "composition precise"}
    if any(k in given and weight_type != owner for k, owner in owners.items()):
        return False
    return "composition" not in given or "style and composition" in weight_type


CASES = [(t, s) for t in WEIGHT_TYPES for s in SETTINGS if _fits(t, s)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("weight_type", "given"), CASES)
def test_weight_types_equal_comfyuis_weights(family: str, weight_type: str, given: dict) -> None:
    spec = parse_schedule({"weight_type": weight_type, **given})
    names, sdxl = NAMES[family], family == "sdxl"
    ours, swapped = layer_weights(family, spec, names)
    extra = {k: given[k] for k in ("composition", "style_boost", "composition_boost") if k in given}
    weight, kind = execute_weight(weight_type, given["value"], sdxl, **extra)
    for i, name in enumerate(names):
        expected, swap = attention_weight(weight, kind, *comfy_index(name, sdxl), sdxl)
        assert ours[i] == pytest.approx(expected, abs=1e-12), (name, weight_type)
        assert bool(swapped[i]) == swap, (name, weight_type)
    if "precise" in weight_type:
        assert swapped.any() and not swapped.all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("weight_type", ["linear", "ease in", "style transfer precise", "composition precise"])
def test_layer_weights_are_comfyuis(family: str, weight_type: str) -> None:
    """IPAdapterMS's `layer_weights` text, verbatim, or as a mapping."""
    text = "0:1.0, 3:0.5, 4:2, 6:-0.3, 9:1.25"
    names, sdxl = NAMES[family], family == "sdxl"
    weight, kind = execute_weight(weight_type, 0.8, sdxl, layer_weights=text)
    expected = [attention_weight(weight, kind, *comfy_index(n, sdxl), sdxl) for n in names]
    for spec in ({"weight_type": weight_type, "value": 0.8, "layer_weights": text},
                 {"weight_type": weight_type, "value": 0.8, "layer_weights": {"0": 1.0, "3": 0.5, "4": 2, "6": -0.3,
                                                                             "9": 1.25}}):  # fmt: skip
        ours, swapped = layer_weights(family, parse_schedule(spec), names)
        assert ours.tolist() == pytest.approx([w for w, _ in expected], abs=1e-12)
        assert swapped.tolist() == [s for _, s in expected]


def test_weight_types_are_layer_forms_and_curves_are_step_forms() -> None:
    layer = parse_schedule({"weight_type": "ease in", "value": 0.8})
    assert step_profile(layer, 5).tolist() == [1.0] * 5  # a weight type leaves the steps alone
    ours, _ = layer_weights("sd15", layer, NAMES["sd15"])
    assert ours[0] == pytest.approx(0.8) and ours[0] > ours[-2]  # ... and falls over layers
    both = parse_schedule({"weight_type": "ease in", "curve": "ease_in"})
    assert step_profile(both, 3).tolist() == [0.0, 0.25, 1.0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"weight_type": "ease_in"}, "unknown weight_type 'ease_in' (ComfyUI's names, verbatim)"),
        ({"weight_type": "linear", "preset": "style"}, "give one layer form"),
        ({"weight_type": "composition", "style_boost": 1.0}, 'style_boost belongs to weight_type "style transfer'),
        ({"composition": 0.5}, "composition weighs the composition layers"),
        ({"start_at": 0.9, "end_at": 0.1}, "start_at 0.9 is after end_at 0.1"),
        ({"end_at": 2}, "end_at is a fraction of the noise schedule"),
        ({"layer_weights": "0=1"}, "layer_weights: write ComfyUI's 'index:weight, ...'"),
        ({"layer_weights": {"x": 1}}, "layer_weights: 'x' is not a ComfyUI layer index"),
    ],
)
def test_bad_comfy_schedules_say_what_is_wrong(bad: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_schedule(bad)
    assert message in str(err.value)


def test_boost_alone_implies_its_precise_type() -> None:
    assert parse_schedule({"style_boost": 2.0}).weight_type == "style transfer precise"
    assert parse_schedule({"composition_boost": 0.0}).weight_type == "composition precise"


def test_sigma_window_is_comfyuis(ref_style: StableDiffusionPipeline) -> None:
    scheduler = ref_style.scheduler
    scheduler.set_timesteps(25)
    alphas = scheduler.alphas_cumprod
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
    noise = NoiseLevels.of(scheduler.timesteps.numpy(), alphas.numpy())
    for start, end in ((0.0, 1.0), (0.2, 0.7), (0.5, 0.5), (0.0, 0.35), (0.61, 1.0)):
        ours = step_profile(parse_schedule({"start_at": start, "end_at": end}), len(scheduler.timesteps), noise)
        high, low = comfy_percent_to_sigma(start, log_sigmas), comfy_percent_to_sigma(end, log_sigmas)
        sigmas = [comfy_sigma(t.reshape(1), log_sigmas).item() for t in scheduler.timesteps]
        assert ours.tolist() == [float(low <= s <= high) for s in sigmas], (start, end)
        assert percent_to_sigma(start, noise.log_sigmas) == pytest.approx(high, rel=1e-5)


# -- through the pipeline -----------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(zoo_dir: Path) -> Generator:
    return Generator(_flow(zoo_dir), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def ref_style(zoo_dir: Path) -> StableDiffusionPipeline:
    return _reference(zoo_dir, ["ip-adapter_sd15.bin"])


def _log_sigmas(pipe: StableDiffusionPipeline) -> torch.Tensor:
    alphas = pipe.scheduler.alphas_cumprod
    return (((1 - alphas) / alphas) ** 0.5).log()


# (ipa's scale spec, its embeds_scaling, ComfyUI's settings) for the same conditioning
CONTROLS = [
    ({"weight_type": "ease in", "value": 0.8}, "V only", {"weight_type": "ease in", "weight": 0.8}),
    (
        {"weight_type": "style transfer precise", "value": 0.9, "style_boost": 1.6},
        "V only",
        {"weight_type": "style transfer precise", "weight": 0.9, "style_boost": 1.6},
    ),
    (
        {"weight_type": "composition precise", "value": 0.7, "composition_boost": 0.4},
        "V only",
        {"weight_type": "composition precise", "weight": 0.7, "composition_boost": 0.4},
    ),
    ({"value": 0.8}, "K+V", {"weight": 0.8, "embeds_scaling": "K+V"}),
    ({"value": 1.4}, "K+V w/ C penalty", {"weight": 1.4, "embeds_scaling": "K+V w/ C penalty"}),
    ({"value": 1.2}, "K+mean(V) w/ C penalty", {"weight": 1.2, "embeds_scaling": "K+mean(V) w/ C penalty"}),
    ({"value": 0.9, "start_at": 0.3, "end_at": 0.8}, "V only", {"weight": 0.9, "start_at": 0.3, "end_at": 0.8}),
    (
        {"weight_type": "style and composition", "value": 0.6, "composition": 1.5},
        "K+mean(V) w/ C penalty",
        {"weight_type": "style and composition", "weight": 0.6, "composition": 1.5,
         "embeds_scaling": "K+mean(V) w/ C penalty"},
    ),  # fmt: skip
]


def _control_row(ref: StableDiffusionPipeline, i: int, emb: torch.Tensor) -> RowRequest:
    spec, scaling, _ = CONTROLS[i]
    adapter = dataclasses.replace(_input("style", emb, spec), embeds_scaling=scaling)
    return _row(f"c{i}", 20 + i, [adapter], steps=5)


def _comfy(ref: StableDiffusionPipeline, row: RowRequest, emb: torch.Tensor, i: int) -> np.ndarray:
    settings = CONTROLS[i][2]
    comfy = ComfyRow(log_sigmas=_log_sigmas(ref), **settings)
    seeded = torch.Generator("cpu").manual_seed(row.seed)
    call = dict(prompt=row.prompt, num_inference_steps=row.steps, guidance_scale=row.guidance_scale,
                generator=seeded, output_type="np", height=64, width=64)  # fmt: skip
    return comfy_run(ref, comfy, ip_adapter_image_embeds=[emb], **call).images[0]


@pytest.mark.parametrize("i", range(len(CONTROLS)))
def test_row_equals_comfyuis_maths(generator: Generator, ref_style: StableDiffusionPipeline, i: int) -> None:
    emb = _embeds(ref_style, [_refs(1)])[0]
    row = _control_row(ref_style, i, emb)
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    expected = _comfy(ref_style, row, emb, i)
    assert np.abs(out.image - expected).max() < TOL
    plain = generator.generate([_row(row.id, row.seed, [_input("style", emb, 0.8)], steps=5)])[0].image
    assert np.abs(out.image - plain).max() > 1e-3  # the control changed the image


def test_mixed_batch_of_new_controls_equals_rows_alone(
    zoo_dir: Path, generator: Generator, ref_style: StableDiffusionPipeline
) -> None:
    refs = _refs(4)
    embs = [_embeds(ref_style, [[refs[i % 4]]])[0] for i in range(len(CONTROLS))]
    rows = [_control_row(ref_style, i, e) for i, e in enumerate(embs)]
    two = _embeds(ref_style, [refs[:2]])[0]  # two images (the others pad to two slots): K+mean(V) over real tokens
    two_images = dataclasses.replace(rows[5].adapters[0], embeds=two[1], negative=two[0])
    rows[5] = dataclasses.replace(rows[5], adapters=[two_images])
    rows.append(_regional_row(list(_embeds(ref_style, [refs[1:4]])[0].split(1, dim=1)), "m-regional", 40))
    rows.append(_noise_row(zoo_dir, ref_style, 3, "m-noise", 41))
    failures = generator.stats["batch_failures"]
    batched = generator.run_batch(rows)
    assert generator.stats["batch_failures"] == failures  # one pipeline call
    for row, out in zip(rows, batched, strict=True):
        assert out.error == "" and out.image is not None, out.error
        (alone,) = generator.generate([row])
        assert np.abs(out.image - alone.image).max() < 2e-3, row.id  # type: ignore[operator]


SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_CONTROLS = [
    (
        {"weight_type": "composition precise", "value": 0.8, "composition_boost": 0.5},
        "K+V w/ C penalty",
        {"weight_type": "composition precise", "weight": 0.8, "composition_boost": 0.5,
         "embeds_scaling": "K+V w/ C penalty", "sdxl": True},
    ),  # fmt: skip
    (
        {"weight_type": "strong style and composition", "value": 1.1, "composition": 0.4, "end_at": 0.7},
        "V only",
        {"weight_type": "strong style and composition", "weight": 1.1, "composition": 0.4, "end_at": 0.7,
         "sdxl": True},
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def sdxl(zoo_dir: Path) -> tuple[Generator, object]:
    from diffusers import AutoPipelineForText2Image

    from ipa_ops.flow.spec import Flow

    adapter = {"source": "h94/IP-Adapter", "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl_vit-h.bin"}
    flow = Flow.model_validate({"name": "x", "mirror": str(zoo_dir), "models": {"sdxl": {"source": SDXL}},
                                "adapters": {"xl": adapter}})  # fmt: skip
    pipe = AutoPipelineForText2Image.from_pretrained(zoo_dir / SDXL, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo_dir / "h94/IP-Adapter"), subfolder="sdxl_models", weight_name=adapter["weight_name"],
                         image_encoder_folder=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return Generator(flow, device="cpu"), pipe


@pytest.mark.parametrize("i", range(len(SDXL_CONTROLS)))
def test_sdxl_row_equals_comfyuis_maths(sdxl: tuple[Generator, object], i: int) -> None:
    from ipa_ops.generate.contract import AdapterInput

    generator, pipe = sdxl
    dim = generator.load("sdxl").facts[0].image_dim
    pos = torch.randn(1, dim, generator=torch.Generator().manual_seed(5))
    spec, scaling, settings = SDXL_CONTROLS[i]
    x = AdapterInput("xl", pos, torch.zeros_like(pos), parse_schedule(spec), embeds_scaling=scaling)
    row = RowRequest(id="x", prompt="a harbour", seed=9, model="sdxl", width=64, height=64, steps=5, adapters=[x])
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    comfy = ComfyRow(log_sigmas=_log_sigmas(pipe), **settings)  # type: ignore[arg-type]
    call = dict(prompt=row.prompt, num_inference_steps=5, guidance_scale=row.guidance_scale, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(9), output_type="np")  # fmt: skip
    embeds = torch.stack([torch.zeros_like(pos), pos])  # [negative; positive], one image each
    expected = comfy_run(pipe, comfy, ip_adapter_image_embeds=[embeds], **call).images[0]
    assert np.abs(out.image - expected).max() < TOL


# -- one adapter applied several times in a row (IPAdapterRegionalConditioning + CombineParams) --------

# (ipa's entry: scale spec, embeds_scaling, mask side; ComfyUI's node settings) per application
REGIONAL = [
    ({"weight_type": "ease in", "value": 0.9}, "V only", "left", {"weight_type": "ease in", "weight": 0.9}),
    ({"value": 0.7, "start_at": 0.2, "end_at": 0.8}, "K+V", "right",
     {"weight": 0.7, "start_at": 0.2, "end_at": 0.8, "embeds_scaling": "K+V"}),
    ({"weight_type": "style transfer precise", "value": 0.6, "style_boost": 1.2}, "V only", None,
     {"weight_type": "style transfer precise", "weight": 0.6, "style_boost": 1.2}),
]  # fmt: skip


def _half(side: str | None) -> torch.Tensor | None:
    if side is None:
        return None
    mask = torch.zeros(1, 64, 64)
    mask[..., :32] = 1.0 if side == "left" else 0.0
    mask[..., 32:] = 1.0 if side == "right" else 0.0
    return mask


def _regional_row(embs: list[torch.Tensor], rid: str = "regional", seed: int = 31) -> RowRequest:
    entries = []
    for (spec, scaling, side, _), emb in zip(REGIONAL, embs, strict=True):
        entries.append(dataclasses.replace(_input("style", emb, spec, _half(side)), embeds_scaling=scaling))
    return _row(rid, seed, entries, steps=5)


def test_adapter_applied_three_times_equals_comfyuis_patches(
    generator: Generator, ref_style: StableDiffusionPipeline
) -> None:
    """Three entries of one adapter, each with its own image, mask, weight type, window and scaling, are three
    ComfyUI patches of the same weights: each attends its own image and their outputs add."""
    embs = _embeds(ref_style, [_refs(3)])[0].split(1, dim=1)  # per image [2 (neg, pos), 1, D]
    row = _regional_row(list(embs))
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    assert len(generator.load("sd15").adapters) == len(set(generator.load("sd15").adapters))  # loaded once
    log_sigmas = _log_sigmas(ref_style)
    comfy = [ComfyRow(log_sigmas=log_sigmas, mask=_half(side), **settings) for _, _, side, settings in REGIONAL]
    call = dict(prompt=row.prompt, num_inference_steps=5, guidance_scale=row.guidance_scale, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(row.seed), output_type="np")  # fmt: skip
    embeds = torch.cat(embs, dim=1)  # the three applications' images side by side: [neg; pos] x 3
    expected = comfy_run(ref_style, comfy, ip_adapter_image_embeds=[embeds], **call).images[0]
    assert np.abs(out.image - expected).max() < TOL
    first_only = dataclasses.replace(row, adapters=row.adapters[:1])
    assert np.abs(out.image - generator.generate([first_only])[0].image).max() > 1e-3  # the others count
    hashes = out.schedule_hashes
    assert set(hashes) == {"style", "style#2", "style#3"} and len(set(hashes.values())) == 3


# -- noise negatives (IPAdapterNoise into image_negative) ------------------------------------------


def _noise_row(zoo_dir: Path, ref: StableDiffusionPipeline, image: int, rid: str, seed: int) -> RowRequest:
    """A row whose negative is the `ipa noise` PNG of its own reference, encoded by ipa's encoder as extract does."""
    from ipa_ops.store.encoders.clip import ClipEncoder
    from ipa_ops.store.noise import noise_image, to_uint8

    picture = _refs(image + 1)[image]
    noise = Image.fromarray(to_uint8(noise_image(np.asarray(picture), "gaussian", 0.7, 3)))
    negative = ClipEncoder(zoo_dir / "h94/IP-Adapter/models/image_encoder").encode([noise])[0]["image_embeds"]
    emb = _embeds(ref, [[picture]])[0]
    x = AdapterInput("style", emb[1], torch.from_numpy(negative)[None], parse_schedule(0.8))
    return _row(rid, seed, [x], steps=5)


def test_noise_negative_row_equals_comfyuis_maths(
    zoo_dir: Path, generator: Generator, ref_style: StableDiffusionPipeline
) -> None:
    from ipa_ops.store.noise import noise_image, to_uint8

    row = _noise_row(zoo_dir, ref_style, 2, "noise", 33)
    (out,) = generator.generate([row])
    assert out.error == "" and out.image is not None, out.error
    picture = _refs(3)[2]
    noise = Image.fromarray(to_uint8(noise_image(np.asarray(picture), "gaussian", 0.7, 3)))
    with torch.no_grad():  # diffusers' encode_image of the negative image
        pixels = ref_style.feature_extractor(noise, return_tensors="pt").pixel_values
        negative = ref_style.image_encoder(pixels).image_embeds
    embeds = torch.stack([negative, row.adapters[0].embeds])  # [neg; pos] x 1 image
    call = dict(prompt=row.prompt, num_inference_steps=5, guidance_scale=row.guidance_scale, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(row.seed), output_type="np")  # fmt: skip
    expected = comfy_run(ref_style, ComfyRow(weight=0.8), ip_adapter_image_embeds=[embeds], **call).images[0]
    assert np.abs(out.image - expected).max() < TOL
    zero = dataclasses.replace(row.adapters[0], negative=torch.zeros_like(row.adapters[0].negative))
    plain = generator.generate([dataclasses.replace(row, adapters=[zero])])[0].image
    assert np.abs(out.image - plain).max() > 1e-3  # the noise negative changed the image
