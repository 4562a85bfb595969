"""Metadata inside every image: the record, in the forms other tools read.

- `parameters` (tEXt; iTXt when the text is not Latin-1): AUTOMATIC1111's infotext, which PNG-info
  readers and Civitai parse: the prompt, a `Negative prompt:` line, then one line of `Key: value`
  pairs separated by `, ` (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model hash`, `Model`,
  then task and IP-Adapter settings). A value holding `,`, `:` or a newline is written as a JSON
  string, as A1111 quotes them; the IP-Adapter entries are themselves such lists, quoted, the way
  A1111's ControlNet extension writes its units.
- `ipa` (compressed iTXt): the full record as JSON; `ipa reproduce --png` reads it.
- `XML:com.adobe.xmp` (iTXt, uncompressed as the XMP spec asks for PNG): XMP whose IPTC
  `DigitalSourceType` marks the image as made by a trained model (`compositeWithTrainedAlgorithmicMedia`
  when it was made from an input image: img2img, inpaint).

Nothing time-dependent is written, so the same row gives the same bytes on every run. GIFs carry
the record JSON as their comment extension.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ipa_ops import __version__

RECORD_KEY = "ipa"
PARAMETERS_KEY = "parameters"
XMP_KEY = "XML:com.adobe.xmp"
IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
_COMPOSITE_TASKS = ("img2img", "inpaint")
# ipa scheduler names and diffusers classes -> the sampler labels A1111 writes
_SAMPLERS = {
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "lcm": "LCM",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LCMScheduler": "LCM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
}


def record_json(record: Mapping[str, Any]) -> str:
    """The record as one deterministic JSON text (sorted keys, no spaces)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digital_source_type(record: Mapping[str, Any]) -> str:
    """IPTC's term for how the image was made: from a prompt alone, or over an input image."""
    composite = record.get("task") in _COMPOSITE_TASKS
    return IPTC_SOURCE_TYPES + ("compositeWithTrainedAlgorithmicMedia" if composite else "trainedAlgorithmicMedia")


def sampler_label(record: Mapping[str, Any]) -> str:
    scheduler = record.get("scheduler") or {}
    for name in (scheduler.get("name"), scheduler.get("class_name")):
        if name:
            return _SAMPLERS.get(name, name)
    return "unknown"


def quote(text: Any) -> str:
    """A value as A1111 writes it: bare, or a JSON string when it holds `,`, `:` or a newline."""
    text = str(text)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _pairs(items: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{key}: {quote(value)}" for key, value in items if value is not None)


def _number(value: float) -> str:
    return f"{float(value):g}"


def a1111_parameters(record: Mapping[str, Any]) -> str:
    """The `parameters` text: prompt, `Negative prompt:` line (when there is one), settings line."""
    items: list[tuple[str, Any]] = [
        ("Steps", record["steps"]),
        ("Sampler", sampler_label(record)),
        ("CFG scale", _number(record["guidance_scale"])),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record.get("model_hash")),
        ("Model", record.get("model")),
    ]
    if record.get("strength") is not None:
        items.append(("Denoising strength", _number(record["strength"])))
    if record.get("num_frames") is not None:
        items.append(("Frames", record["num_frames"]))
    for component in record.get("components") or []:
        if component["kind"] == "controlnet":
            weight = _number(record.get("controlnet_scale") or 1.0)
            unit = _pairs([("Model", f"{component['alias']} [{component['fingerprint']}]"), ("Weight", weight)])
            items.append(("ControlNet 0", unit))
    for i, adapter in enumerate(record.get("adapters") or []):
        items.append((f"IP-Adapter {i}", _pairs(_adapter_items(adapter))))
    loras = record.get("loras") or []
    if loras:
        items.append(("Lora hashes", ", ".join(f"{lora['alias']}: {lora['fingerprint']}" for lora in loras)))
        items.append(("Lora weights", ", ".join(f"{lora['alias']}: {_number(lora['weight'])}" for lora in loras)))
    items.append(("Version", f"ipa {__version__}"))
    lines = [str(record.get("prompt") or "")]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(_pairs(items))
    return "\n".join(lines)


def _adapter_items(adapter: Mapping[str, Any]) -> list[tuple[str, Any]]:
    scale = adapter.get("scale")
    simple = isinstance(scale, int | float) and not isinstance(scale, bool)
    return [
        ("Model", f"{adapter['alias']} [{adapter.get('fingerprint')}]"),
        ("Weight", _number(scale) if simple else None),
        ("Schedule", None if simple else json.dumps(scale, sort_keys=True, separators=(",", ":"))),
        ("Schedule hash", adapter.get("schedule_hash")),
        ("Images", len(adapter.get("references") or [])),
        ("Negatives", len(adapter.get("negatives") or []) or None),
        ("Masks", len(adapter.get("masks") or []) or None),
        ("Combine", adapter.get("combine")),
    ]


def xmp_packet(record: Mapping[str, Any]) -> str:
    """An XMP packet marking the image as AI-generated (IPTC DigitalSourceType), nothing time-dependent."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/">\n'
        f"   <Iptc4xmpExt:DigitalSourceType>{digital_source_type(record)}</Iptc4xmpExt:DigitalSourceType>\n"
        "   <xmp:CreatorTool>ipa</xmp:CreatorTool>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def png_info(record: Mapping[str, Any]) -> Any:
    """Pillow `PngInfo` with the three chunks, for `image.save(..., pnginfo=...)`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(record))  # tEXt, or iTXt when not Latin-1
    info.add_itxt(RECORD_KEY, record_json(record), zip=True)
    info.add_itxt(XMP_KEY, xmp_packet(record), zip=False)
    return info


def gif_comment(record: Mapping[str, Any]) -> bytes:
    return record_json(record).encode()


def read_record(path: str) -> dict[str, Any]:
    """The record inside a PNG (`ipa` chunk) or GIF (comment); ValueError naming the file when absent."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(RECORD_KEY) if image.format == "PNG" else image.info.get("comment")
    if isinstance(text, bytes):
        text = text.decode()
    if not text:
        raise ValueError(
            f"{path}: no ipa record inside (written with `metadata: false`, before records existed, or by another "
            f"tool); reproduce it from its results row instead: ipa reproduce OUTPUT ROW_KEY --out DIR"
        )
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its ipa record is not JSON ({exc.msg}); the file changed after writing") from None
    if not isinstance(record, dict) or "version" not in record:
        raise ValueError(f"{path}: its ipa chunk is not an ipa record")
    return record
