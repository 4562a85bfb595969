"""The base-model sections of a flow: `models:` (pipelines, schedulers, compile) and single model folders.

Kept apart from spec.py, which composes every section into a `Flow`, so each file stays readable.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every flow section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def custom_resources_field(actor: str) -> Any:
    """A stage's `resources.custom_resources`: pins its `actor` actors to the nodes that advertise them."""
    return Field(
        default_factory=dict,
        description=f"Ray custom resources each {actor} actor needs, e.g. `{{a100: 1}}`: actors go only to nodes "
        "started with them (`ray start --resources`). Empty: none.",
    )


DType = Literal["float16", "bfloat16", "float32"]
SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "pndm", "unipc"]
# name -> diffusers class; each is built with `from_config(<the model's own scheduler config>)`
SCHEDULERS: dict[str, str] = dict(
    zip(
        get_args(SchedulerName),
        (
            "DDIMScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "LCMScheduler",
            "PNDMScheduler",
            "UniPCMultistepScheduler",
        ),
        strict=True,
    )
)


class ModelSpec(Strict):
    source: str = Field(description="Hub id (`org/name`) or local path of a diffusers pipeline folder.")
    subfolder: str | None = Field(None, description="Subfolder inside the source, if the pipeline is not at its root.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. `fp16`.")
    dtype: DType = Field("float16", description="Weights dtype on GPU; CPU always runs float32.")
    scheduler: SchedulerName | None = Field(
        None,
        description="Scheduler for rows that name none (ddim, euler, euler_a, dpmpp_2m, lcm, pndm, unipc), built "
        "with `from_config` from the model's own scheduler config; default: the model's own scheduler.",
    )
    scheduler_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Config overrides for the scheduler, as `from_config(config, **options)` takes them; e.g. "
        "AnimateDiff's `{clip_sample: false, timestep_spacing: linspace, beta_schedule: linear, steps_offset: 1}`.",
    )
    controlnet: str | None = Field(
        None, description="Alias (in `controlnets:`) of the ControlNet that rows with task `controlnet` use."
    )
    motion_adapter: str | None = Field(
        None,
        description="Alias (in `motion_adapters:`) of the AnimateDiff MotionAdapter that rows with task `video` use.",
    )
    vae_slicing: bool = Field(False, description="Decode a batch's latents one image at a time (less peak memory).")
    vae_tiling: bool = Field(
        False, description="Decode large images in overlapping tiles (far less memory at 1024 px and up)."
    )
    cpu_offload: Literal["model", "sequential"] | None = Field(
        None,
        description="CUDA only: `model` keeps each component on the GPU only while it runs (small slowdown), "
        "`sequential` each layer (smallest, slowest). Applied after the IP-Adapters load, as diffusers' guide says.",
    )
    compile: bool | Literal["regional", "whole"] = Field(
        False,
        description="torch.compile the denoiser: `regional` (or `true`) compiles its repeated transformer blocks "
        "(`compile_repeated_blocks`, quick to compile), `whole` the whole UNet forward; both with `fullgraph=True` "
        "(the batched IP attention has no graph break) and one graph per batch shape, whatever rows it mixes.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile `mode` when `compile` is set. `reduce-overhead` adds CUDA graphs (small batches on "
        "a fast GPU gain most); CUDA only: on CPU it is said once and the default mode is used.",
    )


class ModuleSpec(Strict):
    """A single diffusers model folder: a ControlNet or a MotionAdapter."""

    source: str = Field(description="Hub id or path, e.g. `lllyasviel/control_v11f1p_sd15_depth`.")
    subfolder: str | None = Field(None, description="Subfolder inside the source, if the model is not at its root.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. `fp16`.")
