"""Encoder ids: `alias@<16 hex>`, a digest of the weights and of everything that shapes the output.

The id is half of every store key, so it must change whenever the stored numbers would (other
weights, other preprocessing or crop mode, hidden states on/off, other face selection or detection
sizes) and must be computable without loading a model: the generator derives keys on the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ipa_ops.errors import UserError
from ipa_ops.flow import EncoderSpec
from ipa_ops.sources import fingerprint, resolve

ALGORITHM = "ipa-extract-1"  # bump when the way embeddings are computed changes
FACE_CROP_SIZE = 224  # insightface norm_crop size used by IP-Adapter FaceID-Plus / plus-face
MIN_DET_SIZE = 320
DET_STEP = 64
# the CLIPImageProcessor settings that change pixels; the backend class (PIL / torchvision) is left out
_PREPROCESS_KEYS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def clip_folder(spec: EncoderSpec, mirror: str | None) -> Path:
    """The local folder of a CLIP vision encoder (path, mirror, or HF cache)."""
    assert spec.source is not None
    return resolve(spec.source, spec.subfolder, mirror=mirror, what="clip encoder").folder


def clip_processor(folder: Path) -> Any:
    """The encoder's own CLIPImageProcessor, else the one diffusers' `load_ip_adapter` builds."""
    from transformers import CLIPImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(folder))
    size = clip_image_size(folder)
    return CLIPImageProcessor(size=size, crop_size=size)


def clip_image_size(folder: Path) -> int:
    """`image_size` of the vision config, read from config.json without loading weights."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"clip encoder {folder}: cannot read config.json ({exc})") from None
    return int(config.get("vision_config", config).get("image_size", 224))


def preprocessing(processor: Any, crop: str) -> dict[str, Any]:
    """The settings that decide the pixels the encoder sees."""
    settings = {k: getattr(processor, k, None) for k in _PREPROCESS_KEYS}
    return {**json.loads(json.dumps(settings, default=str)), "crop_mode": crop}


def face_pack_dir(spec: EncoderSpec, mirror: str | None) -> Path:
    """The InsightFace pack folder: `pack` as a directory, else `<root>/models/<pack>`."""
    direct = Path(spec.pack).expanduser()
    if direct.is_dir():
        return direct.resolve()
    roots = [spec.root] if spec.root else []
    if mirror:
        roots.append(str(Path(mirror) / "insightface"))
    roots.append(os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))
    for root in roots:
        folder = Path(root).expanduser() / "models" / spec.pack
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder.resolve()
    looked = ", ".join(str(Path(r).expanduser() / "models" / spec.pack) for r in roots)
    raise UserError(
        f"insightface pack {spec.pack!r} not found (looked in {looked}); set `root:` of the encoder, "
        "`mirror:` / IPA_MIRROR to a zoo, or unpack the model pack there"
    )


def det_sizes(largest: int) -> list[int]:
    """Detection sizes tried in order: the configured one, then down by 64 to 320."""
    sizes = list(range(largest, MIN_DET_SIZE - 1, -DET_STEP)) or [largest]
    if largest > MIN_DET_SIZE and sizes[-1] != MIN_DET_SIZE:
        sizes.append(MIN_DET_SIZE)
    return sizes


def encoder_id(alias: str, spec: EncoderSpec, mirror: str | None) -> str:
    """`alias@<16 hex>` from the weights' fingerprint and the output-shaping settings; no model load."""
    if spec.type == "clip":
        folder = clip_folder(spec, mirror)
        facts: dict[str, Any] = {
            "weights": fingerprint(folder),
            "preprocess": preprocessing(clip_processor(folder), spec.crop),
            "hidden_states": spec.hidden_states,
        }
    else:
        pack = face_pack_dir(spec, mirror)
        facts = {
            "weights": fingerprint(pack),
            "det_sizes": det_sizes(spec.det_size),
            "face": spec.face,
            "crop_size": FACE_CROP_SIZE,
        }
    facts["algorithm"] = ALGORITHM
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{alias}@{digest}"
