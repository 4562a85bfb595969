"""InsightFace face embeddings for FaceID adapters, with the retries a batch job needs.

Per image: detect at the configured size, and when nothing is found retry at smaller sizes (down
to 320 in steps of 64) before recording `no_face`; pick one face (`largest`, `best_score` or an
index); keep its normed and raw embeddings, box, landmarks and score, and the aligned crop
(`norm_crop`, 224 px as IP-Adapter FaceID-Plus uses it) as PNG bytes for CLIP encoding.
No Ray here: the extract stage wraps it in an actor.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ipa_ops.store.encoders.ids import FACE_CROP_SIZE, det_sizes


def providers(gpu: bool) -> list[str]:
    """ONNX Runtime providers: CUDA first when asked for and available, CPU always as fallback."""
    import onnxruntime

    if gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def choose_face(faces: list[Any], rule: str) -> int | None:
    """Index of the face to keep under `rule`, or None when an index rule points past the faces."""
    if rule == "largest":
        return int(np.argmax([(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]))
    if rule == "best_score":
        return int(np.argmax([float(f.det_score) for f in faces]))
    try:
        index = int(rule)
    except ValueError:
        raise ValueError(f"face must be `largest`, `best_score` or an index, got {rule!r}") from None
    return index if 0 <= index < len(faces) else None


def _tried(sizes: list[int]) -> dict[str, list[int]]:
    return {"det_sizes_tried": list(sizes)}


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class FaceEncoder:
    """`FaceAnalysis` (detection + recognition only) over RGB images; one result dict per image."""

    def __init__(
        self, pack_dir: str | Path, det_size: int = 640, face: str = "largest", gpu: bool = False,
        crop_size: int = FACE_CROP_SIZE,
    ):  # fmt: skip
        from insightface.app import FaceAnalysis

        self.providers = providers(gpu)
        self.ctx_id = 0 if self.providers[0] == "CUDAExecutionProvider" else -1
        self.app = FaceAnalysis(
            name=str(pack_dir), allowed_modules=["detection", "recognition"], providers=self.providers
        )
        self.sizes = det_sizes(det_size)
        self.rule = face
        if face not in ("largest", "best_score"):
            choose_face([], face)  # raises now, not on the first image, for a rule that is not an index
        self._prepared: int | None = None
        self.crop_size = crop_size  # aligned crop side: 224 (diffusers), 256 (ComfyUI's SDXL FaceID)

    def _detect(self, bgr: np.ndarray, size: int) -> list[Any]:
        if self._prepared != size:
            self.app.prepare(ctx_id=self.ctx_id, det_size=(size, size))
            self._prepared = size
        return self.app.get(bgr)

    def encode(self, image: Image.Image) -> dict[str, Any]:
        """A store-row fragment: status `ok` with the face fields, or `no_face` with the sizes tried."""
        from insightface.utils.face_align import norm_crop

        rgb = np.asarray(image.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface expects cv2's channel order
        tried: list[int] = []
        for size in self.sizes:
            tried.append(size)
            faces = self._detect(bgr, size)
            if faces:
                break
        else:
            sizes = ", ".join(map(str, tried))
            return {"status": "no_face", "error": f"no face found (detection sizes tried: {sizes})", **_tried(tried)}
        index = choose_face(faces, self.rule)
        if index is None:
            return {
                "status": "no_face",
                "error": f"face index {self.rule} requested but {len(faces)} face(s) found at size {tried[-1]}",
                **_tried(tried),
            }
        face = faces[index]
        crop = norm_crop(rgb, landmark=face.kps, image_size=self.crop_size)
        png = png_bytes(crop)
        return {
            "status": "ok",
            "image_embeds": np.asarray(face.normed_embedding, dtype=np.float32),
            "face_embedding": np.asarray(face.embedding, dtype=np.float32),
            "bbox": np.asarray(face.bbox, dtype=np.float32),
            "kps": np.asarray(face.kps, dtype=np.float32).reshape(-1),
            "det_score": float(face.det_score),
            "num_faces": len(faces),
            "face_index": index,
            "det_size": tried[-1],
            **_tried(tried),
            "crop_png": png,
            "crop_sha256": hashlib.sha256(png).hexdigest(),
            "crop": crop,
        }

    def embedding_dim(self) -> int:
        """Width of the recognition output (512 for ArcFace packs), for the stored negative."""
        shape = self.app.models["recognition"].output_shape
        return int(shape[-1])
