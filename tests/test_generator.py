"""The generation core equals the documented diffusers calls (tiny zoo, CPU, fp32).

Each test runs a row through `Generator` and the same inputs through a stock diffusers pipeline
(its own IP-Adapter processors, `set_ip_adapter_scale`, `ip_adapter_image_embeds`, masks in
`cross_attention_kwargs`, `IPAdapterScaleCutoffCallback`) and compares the images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionPipeline,
)
from diffusers.callbacks import IPAdapterScaleCutoffCallback
from PIL import Image
from reference import diffusers_call

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.conditioning import preprocess_masks
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def _flow(zoo: Path) -> Flow:
    return Flow.model_validate(
        {
            "name": "t",
            "mirror": str(zoo),
            "models": {"sd15": {"source": SD15}},
            "encoders": {
                "vit-h": {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"},
                "vit-h-hs": {
                    "type": "clip",
                    "source": "h94/IP-Adapter",
                    "subfolder": "models/image_encoder",
                    "hidden_states": True,
                },
            },
            "adapters": {
                "style": {
                    "source": "h94/IP-Adapter",
                    "subfolder": "models",
                    "weight_name": "ip-adapter_sd15.bin",
                    "encoder": "vit-h",
                },
                "plus": {
                    "source": "h94/IP-Adapter",
                    "subfolder": "models",
                    "weight_name": "ip-adapter-plus_sd15.safetensors",
                    "encoder": "vit-h-hs",
                },
            },
        }
    )


@pytest.fixture(scope="module")
def generator(zoo_dir: Path) -> Generator:
    return Generator(_flow(zoo_dir), device="cpu", batch_size=8)


def _reference(zoo: Path, weights: list[str]) -> StableDiffusionPipeline:
    """A stock diffusers pipeline with the named adapters (and the image encoder) loaded."""
    pipe = StableDiffusionPipeline.from_pretrained(zoo / SD15, dtype=torch.float32)
    pipe.load_ip_adapter(str(zoo / "h94/IP-Adapter"), subfolder=["models"] * len(weights), weight_name=weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_style(zoo_dir: Path) -> StableDiffusionPipeline:
    return _reference(zoo_dir, ["ip-adapter_sd15.bin"])


def _refs(n: int) -> list[Image.Image]:
    return [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(n)]


def _embeds(pipe: StableDiffusionPipeline, images: list[list[Image.Image]]) -> list[torch.Tensor]:
    """diffusers' own embeddings: per adapter [2 (neg, pos), n_images, ...]."""
    return pipe.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)


def _input(alias: str, emb: torch.Tensor, scale: object, masks: torch.Tensor | None = None) -> AdapterInput:
    neg, pos = emb.chunk(2)
    return AdapterInput(alias, pos[0], neg[0], parse_schedule(scale), masks)


def _row(rid: str, seed: int, adapters: list[AdapterInput], **kw: object) -> RowRequest:
    base = dict(prompt=f"a photo {rid}", seed=seed, model="sd15", width=64, height=64, steps=4, guidance_scale=7.5)
    return RowRequest(id=rid, adapters=adapters, **{**base, **kw})  # type: ignore[arg-type]


def _diffusers(pipe: object, row: RowRequest, embeds: list[torch.Tensor], **kw: object) -> np.ndarray:
    return diffusers_call(pipe, row, ip_adapter_image_embeds=embeds, **kw)


def _ours(generator: Generator, row: RowRequest) -> np.ndarray:
    (out,) = generator.generate([row])
    assert out.error == "", out.error
    assert out.image is not None
    return out.image


def test_scalar_scale_matches_diffusers(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    emb = _embeds(ref_style, [_refs(1)])
    row = _row("a", 11, [_input("style", emb[0], 0.6)])
    ref_style.set_ip_adapter_scale(0.6)
    expected = _diffusers(ref_style, row, emb, height=64, width=64)
    got = _ours(generator, row)
    assert np.abs(got - expected).max() < TOL
    # the adapter really conditions the image: scale 0 differs
    zero = _ours(generator, _row("a", 11, [_input("style", emb[0], 0.0)]))
    assert np.abs(zero - expected).max() > 1e-3


def test_instantstyle_block_dict_matches_diffusers(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    blocks = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}
    emb = _embeds(ref_style, [_refs(1)])
    row = _row("b", 5, [_input("style", emb[0], {"layers": blocks})])
    ref_style.set_ip_adapter_scale(blocks)
    expected = _diffusers(ref_style, row, emb, height=64, width=64)
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_two_adapters_match_diffusers(generator: Generator, zoo_dir: Path) -> None:
    pipe = _reference(zoo_dir, ["ip-adapter_sd15.bin", "ip-adapter-plus_sd15.safetensors"])
    emb = _embeds(pipe, [_refs(1), _refs(2)[1:]])
    row = _row("c", 7, [_input("style", emb[0], 0.7), _input("plus", emb[1], 0.3)])
    pipe.set_ip_adapter_scale([0.7, 0.3])
    expected = _diffusers(pipe, row, emb, height=64, width=64)
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_masked_images_match_diffusers(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    masks = [Image.open(REPO / "data" / "masks" / f"{side}.png") for side in ("left", "right")]
    emb = _embeds(ref_style, [_refs(2)])
    processed = preprocess_masks(masks, 64, 64)  # [2, 64, 64]
    row = _row("d", 3, [_input("style", emb[0], 0.7, processed)])
    ref_style.set_ip_adapter_scale([[0.7, 0.7]])
    diff_masks = [processed.reshape(1, 2, 64, 64)]
    expected = _diffusers(
        ref_style, row, emb, height=64, width=64, cross_attention_kwargs={"ip_adapter_masks": diff_masks}
    )
    assert np.abs(_ours(generator, row) - expected).max() < TOL


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_diffusers(
    task: str, generator: Generator, ref_style: StableDiffusionPipeline
) -> None:
    init = _refs(3)[2].resize((64, 64))
    mask = Image.open(REPO / "data" / "masks" / "left.png")
    emb = _embeds(ref_style, [_refs(1)])
    extra = {"init_image": init, "strength": 0.75, "steps": 6}
    if task == "inpaint":
        extra["mask_image"] = mask
    row = _row("e", 9, [_input("style", emb[0], 0.5)], task=task, **extra)
    maker = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    pipe = maker.from_pipe(ref_style)
    ref_style.set_ip_adapter_scale(0.5)
    kw: dict[str, object] = {"image": init, "strength": 0.75}
    if task == "inpaint":
        kw.update(mask_image=mask, height=64, width=64)
    expected = _diffusers(pipe, row, emb, **kw)
    assert np.abs(_ours(generator, row) - expected).max() < TOL


def test_step_window_matches_cutoff_callback(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    emb = _embeds(ref_style, [_refs(1)])
    row = _row("f", 21, [_input("style", emb[0], {"value": 0.8, "end": 0.5})], steps=6)
    ref_style.set_ip_adapter_scale(0.8)
    expected = _diffusers(
        ref_style,
        row,
        emb,
        height=64,
        width=64,
        callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5),
    )
    assert np.abs(_ours(generator, row) - expected).max() < TOL
    # and the window matters: the full-length schedule gives another image
    full = _ours(generator, _row("f", 21, [_input("style", emb[0], 0.8)], steps=6))
    assert np.abs(full - expected).max() > 1e-3


def _mixed_rows(ref: StableDiffusionPipeline, zoo: Path) -> list[RowRequest]:
    """Eight rows that differ in everything a batch may mix: refs, counts, masks, adapters, schedules."""
    plus = _reference(zoo, ["ip-adapter-plus_sd15.safetensors"])
    masks = preprocess_masks([Image.open(REPO / "data" / "masks" / f"{s}.png") for s in ("left", "right")], 64, 64)
    one = [_embeds(ref, [[im]])[0] for im in _refs(4)]
    two = _embeds(ref, [_refs(2)])[0]
    hs = _embeds(plus, [_refs(3)[2:]])[0]
    return [
        _row("m0", 1, [_input("style", one[0], 0.6)]),
        _row("m1", 2, [_input("style", two, 0.7, masks)]),
        _row("m2", 3, [_input("style", one[1], 0.5), _input("plus", hs, 0.4)]),
        _row("m3", 4, [_input("style", one[2], {"preset": "style"})]),
        _row("m4", 5, []),
        _row("m5", 6, [_input("style", one[3], {"value": 0.9, "end": 0.5})]),
        _row("m6", 7, [_input("style", two, {"curve": "ease_out", "from": 1.0, "to": 0.2})]),
        _row("m7", 8, [_input("plus", hs, {"steps": [1.0, 0.5]})]),
    ]


def test_mixed_batch_equals_rows_alone(generator: Generator, ref_style: StableDiffusionPipeline, zoo_dir: Path) -> None:
    rows = _mixed_rows(ref_style, zoo_dir)
    failures = generator.stats["batch_failures"]
    batched = generator.run_batch(rows)
    assert generator.stats["batch_failures"] == failures  # one pipeline call, no per-row fallback
    assert [o.id for o in batched] == [r.id for r in rows]
    for row, out in zip(rows, batched, strict=True):
        assert out.error == "" and out.image is not None
        alone = _ours(generator, row)
        assert np.abs(out.image - alone).max() < 2e-3, row.id
    # rows really differ from each other (the batch is heterogeneous, not 8 copies)
    assert np.abs(batched[0].image - batched[4].image).max() > 1e-2  # type: ignore[operator]


def test_kv_cache_equals_uncached(zoo_dir: Path, ref_style: StableDiffusionPipeline) -> None:
    rows = _mixed_rows(ref_style, zoo_dir)[:4]
    with_cache, without = (
        Generator(_flow(zoo_dir), device="cpu"),
        Generator(_flow(zoo_dir), device="cpu", cache_kv=False),
    )
    cached, plain = with_cache.run_batch(rows), without.run_batch(rows)
    assert with_cache.stats == without.stats == {"calls": 1, "batch_failures": 0}
    for a, b in zip(cached, plain, strict=True):
        assert np.abs(a.image - b.image).max() < 1e-5  # type: ignore[operator]


def test_ip_projections_run_once_per_row_and_call(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    """to_k_ip / to_v_ip see each row's tokens once per call, and the shared negative once, not per step or row."""
    from ipa_ops.generate.attention import BatchedIPAttnProcessor

    emb = [_embeds(ref_style, [[im]])[0] for im in _refs(3)]
    rows = [_row(f"p{i}", 40 + i, [_input("style", e, 0.5 + 0.1 * i)]) for i, e in enumerate(emb)]
    unet = generator.load("sd15").pipe.unet
    proc = next(p for p in unet.attn_processors.values() if isinstance(p, BatchedIPAttnProcessor))
    seen: list[int] = []
    hook = proc.to_k_ip[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        outs = generator.run_batch(rows)
    finally:
        hook.remove()
    assert all(o.error == "" for o in outs)
    assert seen == [len(rows) + 1]  # 4 steps x 2 guidance halves x 3 rows would be 24 rows in 4 calls
    for row, out in zip(rows, outs, strict=True):  # and each row is still what it is alone
        assert np.abs(out.image - _ours(generator, row)).max() < 2e-3  # type: ignore[operator]


def test_text_and_image_projections_run_once_per_call(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    """The prompts' keys and values and the image projection are the same at every step: computed once a call."""
    from diffusers.models.attention_processor import Attention

    from ipa_ops.generate.attention import BatchedIPAttnProcessor

    emb = [_embeds(ref_style, [[im]])[0] for im in _refs(2)]
    rows = [_row(f"t{i}", 50 + i, [_input("style", e, 0.6)]) for i, e in enumerate(emb)]
    unet = generator.load("sd15").pipe.unet
    cross = next(
        m for m in unet.modules() if isinstance(m, Attention) and isinstance(m.processor, BatchedIPAttnProcessor)
    )
    calls = {"to_k": 0, "projection": 0}
    hooks = [
        cross.to_k.register_forward_hook(lambda *_: calls.__setitem__("to_k", calls["to_k"] + 1)),
        unet.encoder_hid_proj.image_projection_layers[0].register_forward_hook(
            lambda *_: calls.__setitem__("projection", calls["projection"] + 1)
        ),
    ]
    try:
        outs = generator.run_batch(rows)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"to_k": 1, "projection": 1}  # not once per step (4)
    ref_style.set_ip_adapter_scale(0.6)
    for row, out, e in zip(rows, outs, emb, strict=True):  # and each row is what diffusers makes of it
        assert np.abs(out.image - _diffusers(ref_style, row, [e], height=64, width=64)).max() < TOL


def test_one_image_rows_beside_a_masked_two_image_row(generator: Generator, ref_style: StableDiffusionPipeline) -> None:
    """The one-image rows' joint attention drops the padding slot the masked row's second image adds."""
    masks = preprocess_masks([Image.open(REPO / "data" / "masks" / f"{s}.png") for s in ("left", "right")], 64, 64)
    one = [_embeds(ref_style, [[im]])[0] for im in _refs(2)]
    rows = [
        _row("s0", 61, [_input("style", one[0], 0.6)]),
        _row("s1", 62, [_input("style", _embeds(ref_style, [_refs(2)])[0], 0.7, masks)]),
        _row("s2", 63, [_input("style", one[1], {"preset": "style"})]),
    ]
    for row, out in zip(rows, generator.run_batch(rows), strict=True):
        assert out.error == "" and out.image is not None
        assert np.abs(out.image - _ours(generator, row)).max() < 2e-3, row.id


def test_compiled_unet_follows_a_changed_schedule(zoo_dir: Path, ref_style: StableDiffusionPipeline) -> None:
    flow = _flow(zoo_dir)
    flow.models["sd15"].compile = True
    compiled, eager = Generator(flow, device="cpu"), Generator(_flow(zoo_dir), device="cpu")
    emb = _embeds(ref_style, [_refs(1)])
    first = _row("k", 4, [_input("style", emb[0], 0.9)])
    changed = _row("k", 4, [_input("style", emb[0], {"value": 0.9, "end": 0.3, "preset": "layout"})])
    a = _ours(compiled, first)
    b = _ours(compiled, changed)
    assert np.abs(a - b).max() > 1e-3  # the new schedule changed the image after compilation ...
    assert np.abs(b - _ours(eager, changed)).max() < 2e-3  # ... to what the eager UNet makes of it
    assert np.abs(a - _ours(eager, first)).max() < 2e-3


def test_generator_core_imports_without_ray() -> None:
    """The core must run on a GPU machine where Ray is not installed (benchmarks run it there)."""
    import subprocess
    import sys

    core = "ipa_ops.generate.generator, ipa_ops.generate.plan, ipa_ops.generate.prepare, ipa_ops.generate.manifest_plan"
    core += ", ipa_ops.zoo"
    code = f"import sys; sys.modules['ray'] = None; import {core}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-500:]
