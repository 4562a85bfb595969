"""Reading reference images from any fsspec URI, hashing them, and normalising them to RGB.

Every image that enters a pipeline (extract references, init/mask/control images) passes through
`read_image`, so all stages see the same pixels for the same bytes: EXIF orientation applied,
alpha composited over white, CMYK / 16-bit / palette converted the way a viewer would show them,
the first frame of an animation, and a pixel limit checked before decoding (decompression bombs).
Problems surface as one-line `ImageError`s naming the URI, which callers turn into `error` rows.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Literal, NamedTuple

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ipa_ops.errors import UserError

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".jfif")
_CHUNK = 1 << 20
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used; the message is one line: `<uri>: <reason>`."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{uri}: {self.reason}")


class Decoded(NamedTuple):
    """A normalised image and what was done to it (recorded in the store's `notes`)."""

    image: Image.Image
    notes: list[str]


def local_or_uri(path: str) -> str:
    """Local paths become absolute (relative ones against the CWD); URIs with a protocol stay as given."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def read_bytes(uri: str) -> bytes:
    """The whole file, or ImageError saying why it could not be read."""
    try:
        with fsspec.open(uri, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageError(uri, "file not found") from None
    except IsADirectoryError:
        raise ImageError(uri, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(uri, "permission denied") from None
    except Exception as exc:  # unknown protocol, missing filesystem package, network errors, ...
        raise ImageError(uri, f"cannot read ({type(exc).__name__}: {exc})") from None


def exists(uri: str) -> bool:
    """Whether a file is at `uri` (False, not an exception, for unreachable or malformed URIs)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return bool(fs.isfile(path))
    except Exception:
        return False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(uri: str) -> str:
    """sha256 of a file's bytes, streamed so large files never sit in memory whole."""
    digest = hashlib.sha256()
    try:
        with fsspec.open(uri, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise ImageError(uri, "file not found") from None
    except Exception as exc:
        raise ImageError(uri, f"cannot read ({type(exc).__name__}: {exc})") from None
    return digest.hexdigest()


def read_image(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, mode: Literal["RGB", "L"] = "RGB") -> Decoded:
    """Read and normalise the image at `uri`; raise ImageError (one line, naming the URI) if unusable."""
    return decode_image(read_bytes(uri), uri, max_pixels, mode)


def decode_image(
    data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, mode: Literal["RGB", "L"] = "RGB"
) -> Decoded:
    """Decode bytes already read from `uri` (the URI only names the image in errors)."""
    if not data:
        raise ImageError(uri, "empty file (0 bytes)")
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(uri, "not an image (no known image format)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(uri, f"refused: over Pillow's decompression-bomb limit ({exc})") from None
        except Exception as exc:
            raise ImageError(uri, f"corrupt or truncated image header ({type(exc).__name__}: {exc})") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                uri,
                f"refused: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                "(decompression-bomb guard; raise max_pixels to allow it)",
            )
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            img.seek(0)
            notes.append(f"animated ({frames} frames): first frame used")
        try:
            img.load()
        except Exception as exc:  # truncated / corrupt data surfaces only when pixels are decoded
            raise ImageError(uri, f"corrupt or truncated {img.format or 'image'} data ({exc})") from None
    try:
        img = _apply_exif(img, notes)
        rgb = _to_rgb(img, notes)
    except Exception as exc:
        raise ImageError(uri, f"cannot convert {img.mode} image to RGB ({type(exc).__name__}: {exc})") from None
    if mode == "L":
        return Decoded(rgb.convert("L"), notes)
    return Decoded(rgb, notes)


def _apply_exif(img: Image.Image, notes: list[str]) -> Image.Image:
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (None, 1):
        return img
    notes.append(f"EXIF orientation {orientation} applied")
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way an image viewer would show it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            notes.append("palette converted to RGB")
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            notes.append(f"{img.mode}: fully opaque alpha dropped")
            return rgba.convert("RGB")
        notes.append(f"{img.mode}: alpha composited over white")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img, notes)
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img, notes)
    notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one (as viewers do), else Pillow's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                notes.append("CMYK converted to sRGB via embedded ICC profile")
                return out
        except Exception:  # a broken profile falls back to the plain conversion
            pass
    notes.append("CMYK converted to RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """16/32-bit integer and float greyscale scaled to 8 bits instead of Pillow's clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr) * scale, 0, 255)
        notes.append("float greyscale scaled to 8-bit RGB")
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
        notes.append(f"{img.mode} 16-bit greyscale scaled to 8-bit RGB")
    return Image.fromarray(np.round(out).astype(np.uint8), "L").convert("RGB")


def expand_inputs(images: str | list[str]) -> list[str]:
    """The URIs an extract stage reads: a directory, a glob, a list, or a Parquet/CSV with a `uri` column.

    Directories are walked recursively and filtered by image suffix; explicit lists and table rows are
    taken as given (a bad entry becomes an `error` row later, never a silent skip).
    """
    if isinstance(images, list):
        out: list[str] = []
        for item in images:
            out.extend(expand_inputs(item) if _is_collection(item) else [local_or_uri(item)])
        return out
    uri = local_or_uri(images)
    lowered = uri.lower()
    if lowered.endswith((".parquet", ".pq", ".csv")):
        return [local_or_uri(str(u)) for u in _table_uris(uri)]
    fs, path = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if any(ch in path for ch in "*?["):
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        return [_with_protocol(protocol, fs, p) for p in found]
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES))
        return [_with_protocol(protocol, fs, p) for p in found]
    if not fs.exists(path):
        raise UserError(f"{uri}: no such file or directory (expected a directory, glob, image, or Parquet/CSV list)")
    return [uri]


def _is_collection(item: str) -> bool:
    """A list entry that names many images (a directory, glob or table) rather than one file."""
    if any(ch in item for ch in "*?[") or item.lower().endswith((".parquet", ".pq", ".csv")):
        return True
    try:
        fs, path = fsspec.core.url_to_fs(local_or_uri(item))
        return bool(fs.isdir(path))
    except Exception:
        return False


def _with_protocol(protocol: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if not protocol or protocol == "file://":
        return path if not protocol else f"file://{path}"
    return fs.unstrip_protocol(path)


def _table_uris(uri: str) -> list[str]:
    import pandas as pd

    with fsspec.open(uri, "rb") as fh:
        table = pd.read_csv(fh) if uri.lower().endswith(".csv") else pd.read_parquet(fh)
    if "uri" not in table.columns:
        raise UserError(f"{uri}: has no `uri` column (columns: {', '.join(map(str, table.columns))})")
    return [str(u) for u in table["uri"].dropna()]
