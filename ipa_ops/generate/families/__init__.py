"""Model families (SD1.5, SDXL, Flux, SD3.5): one module each behind the `ModelFamily` protocol, registered here.

Owns what differs between base models; imports the batched attention and the flow format, and
nothing of the generator. To add a family: write `<name>.py` with a `FAMILY` that implements
`base.ModelFamily`, add it to `FAMILIES`, and give the zoo its repository.
"""

from __future__ import annotations

from pathlib import Path

from ipa_ops.generate.checkpoints import AdapterFacts, checkpoint_shapes
from ipa_ops.generate.families import flux, sd3, sd3_layout, sd15, sdxl
from ipa_ops.generate.families.base import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (sdxl.FAMILY, sd15.FAMILY, flux.FAMILY, sd3.FAMILY)


class UnknownFamily(ValueError):
    """A base-model folder no registered family claims."""


def family_of(folder: Path) -> ModelFamily:
    """The family of a base-model folder, from its configs; UnknownFamily names the folder."""
    for family in FAMILIES:
        if family.claims(folder):
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise UnknownFamily(
        f"{folder}: not a pipeline folder of a family ipa runs ({names}; each reads unet/config.json); "
        f"point the model's source at a diffusers pipeline folder"
    )


def adapter_facts(path: str | Path) -> AdapterFacts:
    """An IP-Adapter checkpoint's facts, from the first family whose checkpoint layout it is in."""
    shapes = checkpoint_shapes(Path(path))
    sd3 = sd3_layout.instantx_adapter_facts(shapes)  # before h94's reading, which takes it for a Plus adapter
    if sd3 is not None:
        return sd3
    for family in FAMILIES:
        facts = family.adapter_facts(shapes)
        if facts is not None:
            return facts
    raise ValueError(
        f"{path}: not an IP-Adapter checkpoint (no image_proj / ip_adapter.*.to_k_ip weights, nor "
        f"XLabs' ip_adapter_proj_model / double_blocks.*.ip_adapter_double_stream_k_proj)"
    )
