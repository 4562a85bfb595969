"""Noise negatives: ipa's IPAdapterNoise images equal ComfyUI's node (comfy_reference.make_noise), bit for bit
where it matters (8 bits, what ComfyUI's CLIP preprocessing sees), deterministic, and `ipa noise` writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_reference import make_noise
from PIL import Image

from ipa_ops.cli import main
from ipa_ops.commands.noise import noise_name
from ipa_ops.store.noise import NOISE_TYPES, noise_image, to_uint8

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
PHOTO = (np.random.default_rng(3).random((150, 130, 3)) * 255).astype(np.uint8)  # not square, not 224
SOURCES = {"black": None, "photo": PHOTO, "square-224": np.ascontiguousarray(np.resize(PHOTO, (224, 224, 3)))}


def _comfy(source: np.ndarray | None, kind: str, strength: float, blur: int) -> np.ndarray:
    """ComfyUI's node on its [1, H, W, 3] float image (LoadImage: uint8 / 255)."""
    image = None if source is None else torch.from_numpy(source.astype(np.float32) / 255.0)[None]
    return make_noise(kind, strength, blur, image)[0].numpy()


@pytest.mark.parametrize("kind", NOISE_TYPES)
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize(("strength", "blur"), [(1.0, 0), (0.35, 4), (0.8, 7)])
def test_noise_is_comfyuis(kind: str, source: str, strength: float, blur: int) -> None:
    ours = noise_image(SOURCES[source], kind, strength, blur)
    expected = _comfy(SOURCES[source], kind, strength, blur)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert np.abs(ours - expected).max() < 1e-4  # the reference writes torchvision's blur and warp its own way
    # ComfyUI's clip_preprocess rounds to 8 bits: the PNG holds exactly what its CLIP sees (ties aside)
    comfy_pixels = torch.clip(255.0 * torch.from_numpy(expected), 0, 255).round().numpy()
    assert np.mean(to_uint8(ours) == comfy_pixels) > 0.999


def test_noise_is_deterministic_and_seeded_by_the_image() -> None:
    once, again = noise_image(PHOTO, "dissolve", 0.5), noise_image(PHOTO, "dissolve", 0.5)
    assert np.array_equal(once, again)
    other = noise_image(255 - PHOTO, "dissolve", 0.5)
    assert np.abs(once - other).max() > 0.5
    still = noise_image(PHOTO, "fade", 0.0)  # no noise: the squared, resized reference itself
    assert np.abs(still - noise_image(PHOTO, "fade", 0.0, 0)).max() == 0 and still.std() > 0.1
    assert np.abs(noise_image(None, "gaussian", 0.0)).max() == 0  # black stays black without noise


@pytest.mark.parametrize(
    ("kind", "strength", "blur", "message"),
    [
        ("blur", 1.0, 0, "noise type must be one of fade, dissolve, gaussian, shuffle; got 'blur'"),
        ("fade", 1.5, 0, "noise strength is between 0 and 1"),
        ("fade", 1.0, 40, "noise blur is a kernel size from 0 to 32"),
    ],
)
def test_bad_noise_settings_say_what_is_wrong(kind: str, strength: float, blur: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        noise_image(None, kind, strength, blur)
    assert message in str(err.value)


def test_noise_command_writes_the_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = REPO / "data" / "refs" / "ref-0.png"
    assert main(["noise", "shuffle", str(ref), "--strength", "0.6", "--blur", "3", "--out", str(tmp_path)]) == 0
    path = tmp_path / noise_name(str(ref), "shuffle", 0.6, 3)
    assert capsys.readouterr().out.split() == [str(path)] and path.name == "ref-0.noise-shuffle-s0.6-b3.png"
    written = np.asarray(Image.open(path))
    assert np.array_equal(written, to_uint8(noise_image(np.asarray(Image.open(ref).convert("RGB")), "shuffle", 0.6, 3)))
    assert main(["noise", "fade", "--out", str(tmp_path)]) == 0  # no image: IPAdapterNoise's black input
    assert (tmp_path / "noise-fade-s1-b0.png").is_file()
    assert main(["noise", "wobble", "--out", str(tmp_path)]) == 2
    assert "ipa noise: noise type must be one of" in capsys.readouterr().err
