"""The row contract: what planning hands the generator, and what the generator hands back.

`RowRequest` is a manifest row with every reference resolved to tensors and images;
`AdapterInput` one adapter's conditioning of it; `RowOutput` what became of it. Planning, faces,
tasks, the payload codec and the Ray stages depend on these types, never on the engine, so this
module imports nothing of the generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ipa_ops.flow.schedules import ScheduleSpec


@dataclass
class AdapterInput:
    """One adapter's conditioning for one row, already combined across its images."""

    alias: str
    embeds: torch.Tensor  # [n, D] pooled or [n, T, D] hidden states / face embeddings
    negative: torch.Tensor  # same shape: what replaces the image on the unconditional side
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    masks: torch.Tensor | None = None  # [n, H, W] in [0, 1], at the output size
    clip_embeds: torch.Tensor | None = None  # FaceID-Plus: [n, T, H] CLIP hidden states of the face crops
    clip_negative: torch.Tensor | None = None  # FaceID-Plus: their unconditional side, same shape
    shortcut_scale: float | None = None  # FaceID-Plus v2: this row's shortcut scale (None: the flow's)
    embeds_scaling: str = "V only"  # ComfyUI's embeds scaling (ip_state.EMBEDS_SCALING)
    unfold: bool = False  # video: image i (negative i, mask i) conditions frame i, the last repeated (frames.py)
    frame_weights: torch.Tensor | None = None  # video: [num_frames] weights multiplying the scale per frame
    frame_slots: torch.Tensor | None = None  # video, unfold: [num_frames] which image each frame takes (else i)


@dataclass
class RowRequest:
    """A manifest row with everything resolved: the generator's only input."""

    id: str
    prompt: str
    seed: int
    model: str
    negative_prompt: str = ""
    task: str = "text2img"
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    true_cfg_scale: float | None = None  # Flux: true CFG (a second pass with the negative prompt); None: off
    strength: float = 0.8
    scheduler: str | None = None
    init_image: Any = None  # PIL image (img2img, inpaint)
    mask_image: Any = None  # PIL image (inpaint)
    control_image: Any = None  # PIL image (controlnet), as given: the pipeline resizes it
    controlnet_scale: float = 1.0  # controlnet: `controlnet_conditioning_scale`
    num_frames: int | None = None  # video
    adapters: list[AdapterInput] = field(default_factory=list)

    def group_key(self) -> tuple:
        """What must be equal for rows to share one UNet batch."""
        strength = self.strength if self.task in ("img2img", "inpaint") else None
        # diffusers takes one controlnet_conditioning_scale and one num_frames per call
        per_call = {"controlnet": self.controlnet_scale, "video": self.num_frames}.get(self.task)
        return (
            self.model,
            self.task,
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            float(self.guidance_scale),
            bool(self.negative_prompt),
            strength,
            per_call,
        )


@dataclass
class RowOutput:
    """What became of one row: an image in [0, 1] (H, W, 3) float32 (video: (F, H, W, 3)), or an error line."""

    id: str
    image: np.ndarray | None = None
    error: str = ""
    seconds: float = 0.0
    worker: str = ""
    schedule_hashes: dict[str, str] = field(default_factory=dict)
    # which rows shared its pipeline call (indices into the list given to `Generator.generate`, in call order)
    # and with how many torch threads: on CPU both can change the last bit of an image, so a record keeps them
    batch: list[int] = field(default_factory=list)
    torch_threads: int = 0
