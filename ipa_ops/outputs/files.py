"""A row's files: a PNG, or for a video a looping GIF and one PNG per frame, each committed atomically."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ipa_ops.outputs.folder import OutputDir

GIF_FPS = 10  # diffusers' `export_to_gif` default


def write_outputs(out: OutputDir, row_key: str, array: np.ndarray) -> list[str]:
    """Write a row's uint8 output; returns the URIs for the results row (what the report shows first).

    An image (H, W, 3) becomes `images/<key[:2]>/<key>.png`; a video (F, H, W, 3) becomes
    `images/<key[:2]>/<key>.gif` (looping, 10 fps, as `diffusers.utils.export_to_gif`) followed by
    `images/<key[:2]>/<key>/<i>.png` frames (paths from `OutputDir.image_path` / `frame_path`).
    """
    from PIL import Image

    if array.ndim == 3:
        return [out.write_bytes_atomic(out.image_path(row_key), _png(Image.fromarray(array)))]
    frames = [Image.fromarray(frame) for frame in array]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // GIF_FPS, loop=0)
    written = [out.write_bytes_atomic(out.image_path(row_key, "gif"), gif.getvalue())]
    for i, frame in enumerate(frames):
        written.append(out.write_bytes_atomic(out.frame_path(row_key, i), _png(frame)))
    return written


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
