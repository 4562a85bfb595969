"""The zoo's InsightFace pack (``insightface/models/buffalo_l``) and faces it detects.

Load it through insightface's own code path; the pack is plain ONNX files, no manifest, so
insightface 2.1 routes them by shape (``det_10g.onnx`` -> SCRFD, ``w600k_r50.onnx`` ->
ArcFace)::

    app = FaceAnalysis(name="buffalo_l", root=f"{mirror}/insightface",
                       allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1)                       # default det sizes (128, 128) and (640, 640)
    faces = app.get(np.asarray(draw_face())[:, :, ::-1])   # BGR, as cv2 reads images

What the detector responds to (brightness = the brightest of the three channels, 0..255):

* a *face* is a round, solid, bright blob (brightness >= 208 all over, e.g. any saturated or
  light colour; inner detail is fine as long as it stays that bright) on a dark background
  (brightness <= 48) with a dark margin around it, e.g. what ``draw_face`` draws;
* its radius in detector-input pixels (image pixels x det size / longer image side) must be
  about 6..208 (stride 8 reports 5..52, stride 16 16..104, stride 32 32..208), so at det size
  640 radii of 1%..32% of a square image's side are found, and with insightface's default det
  sizes (128 and 640) anything from 1% up to a disc filling the image;
* several faces are reported separately when the gap between discs is at least about one
  radius; closer blobs merge into one non-round shape, which is rejected;
* the score of a clear face is 0.98 or more, of anything else about 0 (sizes at the limits
  fall in between);
* the box is the disc's bounding square and the five landmarks sit where ArcFace's template
  puts eyes, nose and mouth when that square is the aligned 112x112 crop, so the aligned crop is
  the disc and the embedding depends on what is painted inside it;
* no face: uniform images darker than 176 (black, any mid grey), noise, gradients, anything on
  a non-dark background, discs touching each other, elongated shapes. (A uniform *white*
  non-square image can pass as one face at small det sizes: do not use it as a no-face case.)

The recognizer is a random convolutional net, so embeddings carry no identity semantics, but
they are deterministic, differ between different drawings (seeds), and are nearly equal for the
same drawing at another position or scale.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PACK = "buffalo_l"
PACK_DIR = f"insightface/models/{PACK}"  # relative to the mirror root
DETECTOR_FILE = "det_10g.onnx"
RECOGNIZER_FILE = "w600k_r50.onnx"
BACKGROUND = (14, 14, 18)

Point = tuple[float, float]
# ArcFace's 112x112 landmark template; the zoo maps the disc's bounding square onto the crop.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
KPS_UNIT = (ARCFACE_DST - 56.0) / 56.0  # landmark offsets in units of the disc radius


def face_analysis_kwargs(mirror: str | Path) -> dict[str, object]:
    """The exact ``FaceAnalysis`` arguments that load the zoo pack from ``mirror``."""
    return {
        "name": PACK,
        "root": str(Path(mirror) / "insightface"),
        "allowed_modules": ["detection", "recognition"],
        "providers": ["CPUExecutionProvider"],
    }


def _colour(rng: np.random.Generator, value: float = 1.0) -> tuple[int, int, int]:
    """A bright colour: its brightest channel is ``value * 255`` (>= 208 keeps it a face)."""
    h, s = float(rng.random()), float(rng.uniform(0.15, 0.85))
    r, g, b = colorsys.hsv_to_rgb(h, s, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def landmarks(center: Point, radius: float) -> np.ndarray:
    """The five landmarks (eyes, nose, mouth corners) the detector reports for this disc."""
    return np.asarray(center, dtype=np.float64) + radius * KPS_UNIT


def paint_face(img: Image.Image, center: Point, radius: float, seed: int = 0) -> Image.Image:
    """Paint one detectable face (a bright disc with seeded features) onto ``img`` in place."""
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(img)
    cx, cy = center
    r = float(radius)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng))
    for _ in range(int(rng.integers(2, 5))):  # seeded patches: different seeds, different crops
        px, py = rng.uniform(-0.5, 0.5, size=2) * r
        pr = float(rng.uniform(0.1, 0.3)) * r
        draw.ellipse([cx + px - pr, cy + py - pr, cx + px + pr, cy + py + pr], fill=_colour(rng, 0.9))
    kps = landmarks(center, r)
    feature = _colour(rng, 0.85)
    er = max(1.0, 0.12 * r)
    for x, y in kps[:2]:
        draw.ellipse([x - er, y - er * 0.7, x + er, y + er * 0.7], fill=feature)
    nx, ny = kps[2]
    draw.polygon([(nx, ny - 0.15 * r), (nx - 0.06 * r, ny + 0.03 * r), (nx + 0.06 * r, ny + 0.03 * r)], fill=feature)
    (lx, ly), (rx, ry) = kps[3], kps[4]
    draw.line([(lx, ly), ((lx + rx) / 2, ly + 0.06 * r), (rx, ry)], fill=feature, width=max(1, int(0.05 * r)))
    return img


def draw_face(
    size: tuple[int, int] = (256, 256),
    center: Point | None = None,
    radius: float | None = None,
    seed: int = 0,
) -> Image.Image:
    """An RGB image with one face the zoo detector finds (see the module docstring).

    Defaults: centred, radius 0.3 of the shorter side. Different seeds paint different colours
    and features, hence different embeddings.
    """
    w, h = size
    center = center if center is not None else (w / 2, h / 2)
    radius = radius if radius is not None else 0.3 * min(w, h)
    return paint_face(Image.new("RGB", (w, h), BACKGROUND), center, radius, seed)


def draw_faces(size: tuple[int, int], faces: Sequence[tuple[Point, float, int]]) -> Image.Image:
    """Several faces ``(center, radius, seed)``; keep at least one radius between discs."""
    img = Image.new("RGB", size, BACKGROUND)
    for center, radius, seed in faces:
        paint_face(img, center, radius, seed)
    return img


def blank_image(size: tuple[int, int] = (256, 256), level: int = 128) -> Image.Image:
    """A uniform image; the detector finds no face in it for ``level`` below 176."""
    return Image.new("RGB", size, (level, level, level))
