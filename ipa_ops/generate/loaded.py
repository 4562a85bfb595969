"""A loaded base pipeline: its model family, its adapters, the batched attention's layer names and caches.

Kept apart from the generator so that the task pipelines (tasks.py) and the FaceID binding read
what was loaded without importing the engine that loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.families.base import ModelFamily


@dataclass
class LoadedModel:
    """A base pipeline with its adapters loaded and the batched attention installed."""

    pipe: Any
    family: ModelFamily  # how this pipeline's layers, calls and presets work
    adapters: list[str]  # flow aliases in load order (the order of ip_adapter_image_embeds)
    facts: list[AdapterFacts]
    layer_names: list[str]
    dtype: Any = None  # the denoiser's dtype, read once (reading it walks the parameters)
    compiled: bool = False  # the denoiser is torch.compiled: the batched attention takes no data-dependent branch
    task_pipes: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str | None, Any] = field(default_factory=dict)
    faces: Any = None  # faceid.FaceIDModel: FaceID LoRAs and FaceID-Plus layers, bound per call

    def __post_init__(self) -> None:
        # the model's own scheduler, kept before any task pipe's scheduler is swapped (tasks.scheduler)
        self.schedulers.setdefault(None, self.pipe.scheduler)
