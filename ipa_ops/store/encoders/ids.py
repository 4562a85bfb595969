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
from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.flow.spec import EncoderSpec

# bump when the way embeddings are computed, or ids are derived, changes (2: preprocessing read from JSON)
ALGORITHM = "ipa-extract-2"
FACE_CROP_SIZE = 224  # insightface norm_crop size used by IP-Adapter FaceID-Plus / plus-face
MIN_DET_SIZE = 320
DET_STEP = 64
# CLIPImageProcessor's defaults for the settings below (OpenAI CLIP: 224 px, bicubic, its mean and std)
_CLIP_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}
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


def preprocessing(folder: Path, crop: str) -> dict[str, Any]:
    """The settings that decide the pixels the encoder sees, read from JSON without importing transformers.

    `ipa run` computes encoder ids on the driver before anything is encoded; importing transformers
    there would cost seconds of start-up. `processor_settings` reads the same values off a live
    processor, and a test holds the two equal, so a transformers upgrade that changes a default
    fails that test instead of silently mixing embeddings under one id.
    """
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            given = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"clip encoder {folder}: cannot read preprocessor_config.json ({exc})") from None
    else:  # diffusers' load_ip_adapter builds CLIPImageProcessor(size=image_size, crop_size=image_size)
        size = clip_image_size(folder)
        given = {"size": size, "crop_size": size}
    settings = {k: given.get(k, _CLIP_DEFAULTS[k]) for k in _PREPROCESS_KEYS}  # null stays None, as in transformers
    try:
        settings["size"] = _size(settings["size"], square=bool(given.get("default_to_square")))
        settings["crop_size"] = _size(settings["crop_size"], square=True)
    except (TypeError, ValueError):
        raise UserError(
            f"clip encoder {folder}: preprocessor_config.json has a size or crop_size ipa cannot read "
            f"({settings['size']!r}, {settings['crop_size']!r}); give an int or a dict of ints"
        ) from None
    return {**settings, "crop_mode": crop}


def processor_settings(processor: Any) -> dict[str, Any]:
    """The `_PREPROCESS_KEYS` of a live CLIPImageProcessor, in `preprocessing`'s form."""
    settings: dict[str, Any] = {}
    for key in _PREPROCESS_KEYS:
        value = getattr(processor, key, None)
        if hasattr(value, "__dataclass_fields__"):  # transformers' SizeDict
            value = {f: getattr(value, f) for f in value.__dataclass_fields__ if getattr(value, f) is not None}
        settings[key] = value
    return json.loads(json.dumps(settings, default=int))  # enums (resample) as their values


def _size(value: Any, square: bool) -> dict[str, int] | None:
    """transformers' reading of a size: an int is the shortest edge (size) or a square (crop_size), a
    pair is (height, width)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return {"height": value, "width": value} if square else {"shortest_edge": value}


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
            "preprocess": preprocessing(folder, spec.crop),
            "hidden_states": spec.hidden_states,
        }
        if spec.uncond_image != "zeros":  # diffusers' default adds nothing: old encoder ids stay
            facts["uncond_image"] = spec.uncond_image
        for option in (spec.prep, spec.tiles):  # ComfyUI's preparations: other pixels, other embeddings
            if option is not None:
                facts.update(option.facts())
    else:
        pack = face_pack_dir(spec, mirror)
        facts = {
            "weights": fingerprint(pack),
            "det_sizes": det_sizes(spec.det_size),
            "face": spec.face,
            "crop_size": spec.face_crop_size,
        }
    facts["algorithm"] = ALGORITHM
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{alias}@{digest}"
