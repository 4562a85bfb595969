"""The manifest: one row per output. This module owns the row models (`ManifestRow`, `AdapterRef`).

`MANIFEST_SCHEMA`, `read_manifest` and `write_manifest` (the on-disk format, in `manifest_io`) are
re-exported here; `manifest_checks.check_rows` checks rows against a flow before anything runs.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from ipa_ops.flow.models import SchedulerName
from ipa_ops.manifest.frames import FrameOptions
from ipa_ops.manifest.reading import ADAPTER_FIELD_DOCS, COLUMN_DOCS
from ipa_ops.manifest.reading import MANIFEST_SCHEMA as MANIFEST_SCHEMA
from ipa_ops.manifest.reading import image_size as image_size  # re-exported: the public face of the manifest
from ipa_ops.manifest.reading import read_manifest as read_manifest
from ipa_ops.manifest.reading import uri_exists as uri_exists
from ipa_ops.manifest.reading import write_manifest as write_manifest

Task = Literal["text2img", "img2img", "inpaint", "controlnet", "video"]
Combine = Literal[
    "concat", "average", "norm_average", "norm average", "add", "subtract", "max", "min", "subtract_sum", "unit_average"
]
EmbedsScaling = Literal["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
MaskFit = Literal["pad", "crop"]
Fallback = Literal["skip", "drop_adapter"]
CHOICES: dict[str, tuple[str, ...]] = {
    "task": get_args(Task),
    "combine": get_args(Combine),
    "embeds_scaling": get_args(EmbedsScaling),
    "mask_fit": get_args(MaskFit),
    "fallback": get_args(Fallback),
    "scheduler": get_args(SchedulerName),
}
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "img2img": ("init_image",),
    "inpaint": ("init_image", "mask_image"),
    "controlnet": ("control_image",),
    "video": ("num_frames",),
}
STORE_KEY = re.compile(r"^[0-9a-f]{64}/\S+$")  # `<image_sha256>/<encoder_id>`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaceOptions(_Strict):
    fallback: Fallback | None = Field(
        None,
        description="No face in a reference: `skip` the row, or `drop_adapter` and render without it; "
        "empty: the adapter's flow `fallback` (default: the row fails with the reason).",
    )
    crop: bool | None = Field(
        None, description="CLIP face adapters: true feeds the aligned face crop, false the whole image; empty: flow."
    )
    shortcut_scale: float | None = Field(
        None, allow_inf_nan=False, description="FaceID-Plus v2: weight of the face structure; empty: the flow's."
    )


class AdapterRef(_Strict):
    adapter: str = Field(description=ADAPTER_FIELD_DOCS["adapter"])
    images: list[str] = Field(min_length=1, description=ADAPTER_FIELD_DOCS["images"])
    masks: list[str] = Field(default_factory=list, description=ADAPTER_FIELD_DOCS["masks"])
    negative_images: list[str] = Field(default_factory=list, description=ADAPTER_FIELD_DOCS["negative_images"])
    combine: Combine = Field("concat", description=ADAPTER_FIELD_DOCS["combine"])
    scale: Any = Field(1.0, description="Scale schedule, decoded from JSON; `schedules.parse_schedule` reads it.")
    image_weights: list[float] | None = Field(None, description=ADAPTER_FIELD_DOCS["image_weights"])
    embeds_scaling: EmbedsScaling | None = Field(None, description=ADAPTER_FIELD_DOCS["embeds_scaling"])
    mask_fit: MaskFit | None = Field(None, description=ADAPTER_FIELD_DOCS["mask_fit"])
    soft_masks: bool = Field(False, description=ADAPTER_FIELD_DOCS["soft_masks"])
    face: FaceOptions | None = Field(
        None, description="Face options (FaceID adapters, CLIP adapters fed face crops); set with defaults for FaceID."
    )
    frames: FrameOptions | None = Field(None, description=ADAPTER_FIELD_DOCS["frames"])
    tiled: bool = Field(False, description=ADAPTER_FIELD_DOCS["tiled"])

    def scale_text(self) -> str:
        """The schedule as written, for results and the report."""
        return json.dumps(self.scale)


class ManifestRow(_Strict):
    id: str = Field(min_length=1, description=COLUMN_DOCS["id"])
    prompt: str = Field("", description=COLUMN_DOCS["prompt"])
    negative_prompt: str = Field("", description=COLUMN_DOCS["negative_prompt"])
    seed: int = Field(ge=0, lt=2**63, description=COLUMN_DOCS["seed"])
    task: Task = Field("text2img", description=COLUMN_DOCS["task"])
    model: str = Field(description=COLUMN_DOCS["model"])
    width: int = Field(gt=0, multiple_of=8, description=COLUMN_DOCS["width"])
    height: int = Field(gt=0, multiple_of=8, description=COLUMN_DOCS["height"])
    steps: int = Field(ge=1, description=COLUMN_DOCS["steps"])
    guidance_scale: float = Field(ge=0, allow_inf_nan=False, description=COLUMN_DOCS["guidance_scale"])
    true_cfg_scale: float | None = Field(None, gt=1, allow_inf_nan=False, description=COLUMN_DOCS["true_cfg_scale"])
    init_image: str | None = Field(None, description=COLUMN_DOCS["init_image"])
    mask_image: str | None = Field(None, description=COLUMN_DOCS["mask_image"])
    control_image: str | None = Field(None, description=COLUMN_DOCS["control_image"])
    strength: float = Field(0.8, gt=0, le=1, allow_inf_nan=False, description=COLUMN_DOCS["strength"])
    controlnet_scale: float = Field(1.0, ge=0, allow_inf_nan=False, description=COLUMN_DOCS["controlnet_scale"])
    num_frames: int | None = Field(None, ge=1, description=COLUMN_DOCS["num_frames"])
    scheduler: SchedulerName | None = Field(None, description=COLUMN_DOCS["scheduler"])
    adapters: list[AdapterRef] = Field(default_factory=list, description="IP-Adapter entries.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="`x_` user columns and partition values, carried to the results."
    )

    def result_fields(self) -> dict[str, Any]:
        """The results columns that describe this row (what the report shows), plus its metadata."""
        scale = "; ".join(
            a.scale_text() if len(self.adapters) == 1 else f"{a.adapter}: {a.scale_text()}" for a in self.adapters
        )
        return {
            "id": self.id,
            "seed": self.seed,
            "prompt": self.prompt,
            "references": [uri for a in self.adapters for uri in a.images],
            "masks": [uri for a in self.adapters for uri in a.masks],
            "scale": scale,
            **self.metadata,
        }
