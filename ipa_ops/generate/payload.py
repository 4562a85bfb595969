"""RowRequest <-> bytes, so resolved rows travel between Ray stages without pickle.

Tensors go into a safetensors blob (which cannot execute code when read) and everything
else into its JSON metadata; images travel as uint8 arrays.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.generate.contract import AdapterInput, RowRequest

_IMAGES = ("init_image", "mask_image", "control_image")
# AdapterInput tensors that may be None
_OPTIONAL = ("masks", "clip_embeds", "clip_negative", "frame_weights", "frame_slots")


def to_bytes(row: RowRequest) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    meta = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name not in ("adapters", *_IMAGES)}
    for name in _IMAGES:
        image = getattr(row, name)
        if image is not None:
            tensors[name] = torch.from_numpy(np.array(image.convert("L" if name == "mask_image" else "RGB")))
    adapters = []
    for i, x in enumerate(row.adapters):
        tensors[f"a{i}.embeds"] = x.embeds.float().contiguous()
        tensors[f"a{i}.negative"] = x.negative.float().contiguous()
        for name in _OPTIONAL:
            if getattr(x, name) is not None:
                tensors[f"a{i}.{name}"] = getattr(x, name).float().contiguous()
        adapters.append(
            {"alias": x.alias, "schedule": x.schedule.source, "shortcut_scale": x.shortcut_scale,
             "embeds_scaling": x.embeds_scaling, "unfold": x.unfold}
        )  # fmt: skip
    meta["adapters"] = adapters
    return st_save(tensors, metadata={"row": json.dumps(meta)})


def from_bytes(data: bytes) -> RowRequest:
    tensors = st_load(data)
    meta = json.loads(_metadata(data)["row"])
    adapters = [
        AdapterInput(
            alias=a["alias"],
            embeds=tensors[f"a{i}.embeds"],
            negative=tensors[f"a{i}.negative"],
            schedule=parse_schedule(a["schedule"]),
            shortcut_scale=a.get("shortcut_scale"),
            embeds_scaling=a.get("embeds_scaling", "V only"),
            unfold=bool(a.get("unfold")),
            **{name: tensors.get(f"a{i}.{name}") for name in _OPTIONAL},
        )
        for i, a in enumerate(meta.pop("adapters"))
    ]
    images = {}
    for name in _IMAGES:
        if name in tensors:
            images[name] = Image.fromarray(tensors[name].numpy())
    return RowRequest(**meta, **images, adapters=adapters)


def _metadata(data: bytes) -> dict[str, str]:
    """The JSON header of a safetensors blob (its `__metadata__`)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]
