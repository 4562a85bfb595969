"""Image reading: normalisation to RGB as a viewer shows it, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ipa_ops.errors import UserError
from ipa_ops.store.images import ImageError, exists, expand_inputs, read_image, sha256_of


def _save(path: Path, img: Image.Image, fmt: str | None = None, **kw: object) -> Path:
    img.save(path, format=fmt, **kw)
    return path


def _noise(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_rgb_png_is_unchanged(tmp_path: Path) -> None:
    img = _noise()
    out, notes = read_image(str(_save(tmp_path / "a.png", img)))
    assert out.mode == "RGB" and notes == []
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _noise(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out, notes = read_image(str(_save(tmp_path / "r.jpg", img, exif=exif.tobytes(), quality=95)))
    assert out.size == (20, 40)
    assert any("EXIF orientation 6" in n for n in notes)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_over_white(tmp_path: Path, mode: str) -> None:
    rgba = Image.new("RGBA", (8, 8), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black pixel
    img = rgba.convert(mode) if mode != "P" else rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P":
        img.info["transparency"] = img.getpixel((0, 0))
    out, notes = read_image(str(_save(tmp_path / f"t_{mode}.png", img)))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert any("alpha composited over white" in n for n in notes)


def test_cmyk_and_16_bit_grey(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out, notes = read_image(str(_save(tmp_path / "c.jpg", cmyk, quality=100)))
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60 and any("CMYK" in n for n in notes)
    grey = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert grey.mode.startswith("I;16")
    out, notes = read_image(str(_save(tmp_path / "g16.png", grey)))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert any("16-bit" in n for n in notes)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out, notes = read_image(str(path))
    assert out.getpixel((3, 3)) == (255, 0, 0)
    assert any("animated (2 frames)" in n for n in notes)


def test_mask_mode_and_sha(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", _noise())
    mask, _ = read_image(str(path), mode="L")
    assert mask.mode == "L"
    assert sha256_of(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_of(f"file://{path}") == sha256_of(str(path))


def _truncated(tmp_path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = {
    "missing": (lambda p: p / "nope.png", "file not found"),
    "zero bytes": (lambda p: _write(p / "empty.png", b""), "empty file (0 bytes)"),
    "not an image": (lambda p: _write(p / "text.png", b"hello"), "not an image"),
    "truncated png": (lambda p: _truncated(p, "PNG"), "corrupt or truncated PNG data"),
    "truncated jpeg": (lambda p: _truncated(p, "JPEG"), "corrupt or truncated JPEG data"),
    "over the pixel limit": (lambda p: _save(p / "big.png", _noise(100, 50)), "5000 pixels is over the limit of 4999"),
    "unreadable uri": (lambda p: "unknownfs://bucket/x.png", "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    uri = str(make(tmp_path))
    with pytest.raises(ImageError) as info:
        read_image(uri, max_pixels=4999)
    message = str(info.value)
    assert message.startswith(f"{uri}: ") and reason in message
    assert "\n" not in message


def test_memory_filesystem_and_exists() -> None:
    buf = io.BytesIO()
    _noise().save(buf, format="PNG")
    fsspec.filesystem("memory").pipe("/imgs/a.png", buf.getvalue())
    out, _ = read_image("memory:///imgs/a.png")
    assert out.size == (48, 32)
    assert exists("memory:///imgs/a.png") and not exists("memory:///imgs/b.png")
    assert not exists("unknownfs://x")


def test_expand_inputs_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "refs" / "sub").mkdir(parents=True)
    a = _save(tmp_path / "refs" / "a.png", _noise())
    b = _save(tmp_path / "refs" / "sub" / "b.JPG", _noise(), "JPEG")
    (tmp_path / "refs" / "notes.txt").write_text("skip me")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs("refs") == [str(a), str(b)]  # recursive, image suffixes only, absolute
    assert expand_inputs(str(tmp_path / "refs" / "*.png")) == [str(a)]
    assert expand_inputs(["refs/a.png", "missing.png"]) == [str(a), str(tmp_path / "missing.png")]
    pd.DataFrame({"uri": ["refs/a.png", str(b)]}).to_csv("list.csv", index=False)
    pd.DataFrame({"uri": ["refs/a.png"]}).to_parquet("list.parquet")
    assert expand_inputs("list.csv") == [str(a), str(b)]
    assert expand_inputs(["list.parquet", "refs/sub"]) == [str(a), str(b)]
    pd.DataFrame({"path": ["x"]}).to_csv("bad.csv", index=False)
    with pytest.raises(UserError, match="bad.csv: has no `uri` column"):
        expand_inputs("bad.csv")
    with pytest.raises(UserError, match="no_refs: no such file or directory"):
        expand_inputs("no_refs/")
