"""A row's files: a PNG, or for a video a looping GIF and one PNG per frame, each committed atomically.

Every file carries the row's record unless the flow says `metadata: false` (records/metadata.py):
PNGs the A1111 `parameters` text, the `ipa` record JSON and XMP; the GIF the record JSON as its
comment. Nothing time-dependent goes in, so the same row always gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ipa_ops.outputs.folder import OutputDir
from ipa_ops.records import metadata

GIF_FPS = 10  # diffusers' `export_to_gif` default


@dataclass
class Encoded:
    """A row's output as bytes: the main file (`ext`: png or gif) and, for a video, its frame PNGs."""

    ext: str
    data: bytes
    frames: list[bytes] = field(default_factory=list)


def encode_outputs(array: np.ndarray, record: Mapping[str, Any] | None = None) -> Encoded:
    """Encode a row's uint8 output, with `record` inside every file when given."""
    from PIL import Image

    if array.ndim == 3:
        return Encoded("png", _png(Image.fromarray(array), record))
    frames = [Image.fromarray(frame) for frame in array]
    gif = io.BytesIO()
    extra = {"comment": metadata.gif_comment(record)} if record else {}
    frames[0].save(
        gif, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // GIF_FPS, loop=0, **extra
    )
    pngs = [_png(frame, {**record, "frame": i} if record else None) for i, frame in enumerate(frames)]
    return Encoded("gif", gif.getvalue(), pngs)


def write_outputs(
    out: OutputDir, row_key: str, array: np.ndarray, record: Mapping[str, Any] | None = None
) -> list[str]:
    """Write a row's uint8 output; returns the URIs for the results row (what the report shows first).

    An image (H, W, 3) becomes `images/<key[:2]>/<key>.png`; a video (F, H, W, 3) becomes
    `images/<key[:2]>/<key>.gif` (looping, 10 fps, as `diffusers.utils.export_to_gif`) followed by
    `images/<key[:2]>/<key>/<i>.png` frames (paths from `OutputDir.image_path` / `frame_path`).
    `record` (None: no metadata) goes inside every file.
    """
    encoded = encode_outputs(array, record)
    written = [out.write_bytes_atomic(out.image_path(row_key, encoded.ext), encoded.data)]
    for i, frame in enumerate(encoded.frames):
        written.append(out.write_bytes_atomic(out.frame_path(row_key, i), frame))
    return written


def _png(image: Any, record: Mapping[str, Any] | None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=metadata.png_info(record) if record else None)
    return buf.getvalue()
