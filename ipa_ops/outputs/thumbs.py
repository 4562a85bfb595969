"""Thumbnails: small WebP files made once per row, when its images are committed.

    <output>/thumbs/<k[:2]>/<row_key>.webp     the row's output (a video's first frame), 256 px
    <output>/report/refs/<sha256(uri)[:20]>.webp  a reference or mask, 128 px, made once per file

The report used to embed every row's thumbnail as a data URI and re-read every image on every
build, so it grew without bound (15 KB a row) and each build cost the whole folder's history. Now
the generate stage writes the output thumbnail next to the image, and a report page only links
to it; rows written before thumbnails existed get theirs made once, the first time a page shows them.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import fsspec
import numpy as np

from ipa_ops.outputs.folder import OutputDir, check_key

OUTPUT_SIZE = 256  # px, longest side of an output's thumbnail
REFERENCE_SIZE = 128  # px, references and masks
QUALITY = 80


def thumb_path(out: OutputDir, row_key: str) -> str:
    """`<output>/thumbs/<k[:2]>/<row_key>.webp` (fanned out like images/)."""
    key = check_key(row_key)
    return out.path("thumbs", key[:2], f"{key}.webp")


def reference_thumb_path(out: OutputDir, uri: str) -> str:
    """Where the thumbnail of a reference (or mask) file lives; named by a hash of its URI."""
    return out.path("report", "refs", hashlib.sha256(uri.encode()).hexdigest()[:20] + ".webp")


def write_thumbnail(out: OutputDir, row_key: str, array: np.ndarray) -> str:
    """The thumbnail of a row's uint8 output (H, W, 3), or of a video's first frame (F, H, W, 3)."""
    from PIL import Image

    frame = array if array.ndim == 3 else array[0]
    return out.write_bytes_atomic(thumb_path(out, row_key), webp(Image.fromarray(frame), OUTPUT_SIZE))


def ensure_thumbnail(out: OutputDir, target: str, source: str, size: int) -> bool:
    """Make `target` from the image at `source` unless it exists; False when `source` cannot be read."""
    if out.exists(target):
        return True
    from PIL import Image

    try:
        with fsspec.open(source, "rb") as f, Image.open(io.BytesIO(f.read())) as img:
            data = webp(img, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # missing or unreadable: the page says so
    out.write_bytes_atomic(target, data)
    return True


def webp(image: Any, size: int) -> bytes:
    """`image` shrunk to fit `size` px, as WebP (no metadata, so the same image gives the same bytes)."""
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buf, format="WEBP", quality=QUALITY)
    return buf.getvalue()
