"""Reference preparation as ComfyUI's PrepImageForClipVision: crop positions, pad, interpolation, sharpening.

Expected values come from `comfy_prep_reference.py`, a transcription of ComfyUI's node; the
embeddings are checked against the tiny zoo's CLIP run on ComfyUI's own `clip_preprocess` of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_prep_reference import clip_preprocess, contrast_adaptive_sharpening, prep_image, to_tensor_image
from PIL import Image

from ipa_ops.errors import UserError
from ipa_ops.flow.prep import CROP_POSITIONS, INTERPOLATIONS, ReferencePrep
from ipa_ops.flow.spec import EncoderSpec
from ipa_ops.store.encoders import prep
from ipa_ops.store.encoders.ids import encoder_id

pytestmark = pytest.mark.usefixtures("single_thread")
ENCODER = "h94/IP-Adapter/models/image_encoder"


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """A gradient with noise and a bright block: edges for the sharpening, structure for the crops."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    base[height // 3 : height // 2, width // 4 : width // 2] = 250
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


PICTURES = {"wide_odd": (301, 200), "tall": (150, 260), "square": (97, 97)}


@pytest.mark.parametrize("shape", sorted(PICTURES))
@pytest.mark.parametrize("position", CROP_POSITIONS)
def test_crop_positions_and_pad_are_comfyuis(shape: str, position: str) -> None:
    image = _picture(*PICTURES[shape], seed=len(shape))
    spec = ReferencePrep(crop_position=position)
    got = prep.prepare(image, spec)
    expected = prep_image(to_tensor_image(image), "LANCZOS", position, 0.0)[0].numpy()
    assert got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_crop_positions_keep_different_squares() -> None:
    """Each position keeps its own part of a non-square image (a test that would catch a position ignored)."""
    image = _picture(301, 200, seed=1)
    wide = {p: prep.prepare(image, ReferencePrep(crop_position=p)) for p in ("left", "center", "right", "pad")}
    assert all(abs(wide[a] - wide[b]).max() > 0.1 for a in wide for b in wide if a < b)
    tall = _picture(150, 260, seed=2)
    assert abs(prep.prepare(tall, ReferencePrep(crop_position="top")) - prep.prepare(
        tall, ReferencePrep(crop_position="bottom"))).max() > 0.1  # fmt: skip
    assert prep.crop_box(301, 200, "top") == prep.crop_box(301, 200, "center")  # top/bottom only move tall images


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_interpolations_are_comfyuis(interpolation: str) -> None:
    image = _picture(150, 260, seed=5)
    got = prep.prepare(image, ReferencePrep(crop_position="top", interpolation=interpolation))
    expected = prep_image(to_tensor_image(image), interpolation, "top", 0.0)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("amount", [0.05, 0.4, 1.0])
def test_sharpening_is_comfyuis_contrast_adaptive_sharpening(amount: float) -> None:
    image = _picture(301, 200, seed=9)
    got = prep.prepare(image, ReferencePrep(crop_position="right", sharpening=amount, interpolation="BICUBIC"))
    expected = prep_image(to_tensor_image(image), "BICUBIC", "right", amount)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    plain = prep.prepare(image, ReferencePrep(crop_position="right", interpolation="BICUBIC"))
    assert abs(got - plain).max() > 0.01  # sharpening changes the pixels
    black = np.zeros((8, 8, 3), dtype=np.float32)  # 0/0 in the local weight: ComfyUI's nan_to_num gives black
    np.testing.assert_array_equal(prep.sharpen(black, amount), black)
    ref = contrast_adaptive_sharpening(torch.from_numpy(black).permute(2, 0, 1)[None], amount)
    assert not ref.any()


def test_encoder_with_prep_embeds_comfyuis_prepared_pixels(zoo_dir: Path) -> None:
    """The stored embeddings are CLIP of ComfyUI's prepared image through ComfyUI's clip_preprocess."""
    from transformers import CLIPVisionModelWithProjection

    from ipa_ops.store.encoders.siglip import vision_encoder

    folder = zoo_dir / ENCODER
    spec = ReferencePrep(crop_position="bottom", interpolation="BILINEAR", sharpening=0.5)
    encoder = vision_encoder(folder, hidden_states=True, crop="center", gpu=False, prep=spec)
    images = [_picture(150, 260, seed=3), _picture(301, 200, seed=4)]
    got = encoder.encode(images)
    prepared = torch.cat([prep_image(to_tensor_image(im), "BILINEAR", "bottom", 0.5) for im in images])
    pixels = clip_preprocess(prepared)
    torch.testing.assert_close(encoder.pixel_values(images), pixels, atol=1e-5, rtol=0)
    model = CLIPVisionModelWithProjection.from_pretrained(folder)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    for i in range(2):
        np.testing.assert_allclose(got[i]["image_embeds"], out.image_embeds[i].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[i]["hidden_states"], out.hidden_states[-2][i].numpy(), atol=1e-4, rtol=0)
    plain = vision_encoder(folder, hidden_states=True, crop="center", gpu=False).encode(images)
    assert abs(plain[0]["image_embeds"] - got[0]["image_embeds"]).max() > 1e-3  # another image, other numbers


def test_prep_enters_the_encoder_id_and_old_ids_stay(zoo_dir: Path) -> None:
    spec = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder", "hidden_states": True}
    variants = [{}, {"prep": {}}, {"prep": {"crop_position": "top"}}, {"prep": {"interpolation": "BICUBIC"}},
                {"prep": {"sharpening": 0.3}}, {"prep": {"size": 256}}]  # fmt: skip
    ids = [encoder_id("e", EncoderSpec.model_validate({**spec, **extra}), str(zoo_dir)) for extra in variants]
    assert len(set(ids)) == len(ids)
    old = encoder_id("e", EncoderSpec.model_validate(spec), str(zoo_dir))
    assert old == ids[0]  # without prep, nothing is added: ids of earlier stores stay


def test_prep_errors_name_the_field(tmp_path: Path) -> None:
    from ipa_ops.flow.spec import load_flow

    flow = tmp_path / "f.yaml"
    body = (
        "name: t\nmodels: {m: {source: x}}\nencoders:\n  e: {type: clip, source: x, crop: pad, prep: {}}\n"
        "adapters: {}\nstages: {}\n"
    )
    flow.write_text(body)
    with pytest.raises(UserError, match=r"encoders\.e.*`prep` is for clip encoders and replaces `crop`"):
        load_flow(flow)
    flow.write_text(body.replace("crop: pad, prep: {}", "prep: {crop_position: middle}"))
    with pytest.raises(UserError, match=r"encoders\.e\.prep\.crop_position"):
        load_flow(flow)
    flow.write_text(body.replace("crop: pad, prep: {}", "prep: {sharpening: 2}"))
    with pytest.raises(UserError, match=r"encoders\.e\.prep\.sharpening"):
        load_flow(flow)
