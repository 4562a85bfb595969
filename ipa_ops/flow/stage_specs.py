"""The stage sections of a flow file: `stages.extract`, `stages.generate` (its defaults and
resources) and where `stages.score` plugs in; `spec.py` holds the flow around them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ipa_ops.flow.models import Strict, custom_resources_field
from ipa_ops.flow.score_spec import ScoreStage
from ipa_ops.storage.lease import LeaseSpec


class Resources(Strict):
    actors: int = Field(1, ge=1, description="Number of actors in the pool.")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (0 on CPU-only machines).")
    num_cpus: float = Field(1, gt=0, description="CPUs per actor.")
    batch_size: int = Field(8, ge=1, description="Rows per actor batch.")


class GenerateResources(Resources):
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads in each generator actor. Default: left alone on GPU actors; on a "
        "CPU-only cluster the cluster's cores divided among the actors, so a CPU run uses the whole machine "
        "(Ray would otherwise give the actor one thread per CPU it reserves).",
    )
    custom_resources: dict[str, float] = custom_resources_field("generator")


class ExtractResources(Resources):
    calls_per_actor: int | None = Field(
        None,
        ge=1,
        description="Batches one encoder actor works on at once, in threads (image preprocessing and torch release "
        "the GIL); each call gets num_cpus / calls torch threads. Default: 1 on GPU actors (more overlap "
        "preprocessing with the GPU's work but multiply activation memory), the actor's CPUs rounded down on CPU "
        "actors. InsightFace encoders analyse one image at a time whatever this says. On a CPU-only machine one "
        "actor holding every core, with one call per core, starts once and beats one single-threaded actor per core.",
    )
    custom_resources: dict[str, float] = custom_resources_field("encoder")


class ExtractStage(Strict):
    images: str | list[str] = Field(
        description="Reference images: a directory, a glob, a list of URIs, or a Parquet/CSV with a `uri` column."
    )
    encoders: list[str] = Field(min_length=1, description="Aliases of the encoders to run.")
    store: str = Field(description="URI of the embedding store (any fsspec filesystem).")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Images larger than this many pixels are refused (decompression-bomb guard)."
    )
    resources: ExtractResources = Field(default_factory=lambda: ExtractResources(batch_size=32))


class GenerateDefaults(Strict):
    """Values for manifest columns a row leaves empty."""

    negative_prompt: str = Field("", description="Default negative prompt.")
    task: Literal["text2img", "img2img", "inpaint", "controlnet", "video"] = Field("text2img")
    width: int = Field(512, ge=8, multiple_of=8, description="Output width in pixels.")
    height: int = Field(512, ge=8, multiple_of=8, description="Output height in pixels.")
    steps: int = Field(30, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    true_cfg_scale: float | None = Field(
        None, gt=1, description="Flux: true CFG scale for rows with a negative prompt; empty: off."
    )
    strength: float = Field(0.8, gt=0, le=1, description="img2img / inpaint strength.")
    controlnet_scale: float = Field(
        1.0, ge=0, description="ControlNet rows: diffusers' `controlnet_conditioning_scale`."
    )
    num_frames: int | None = Field(
        None, ge=1, description="Video rows: frames per video (AnimateDiff uses 16); empty: each video row sets it."
    )


class GenerateStage(Strict):
    manifest: str = Field(description="Manifest file (Parquet, CSV or JSONL), glob or partitioned folder.")
    model: str = Field(description="Default model alias for rows that name none.")
    store: str | None = Field(None, description="Embedding store URI the rows' references resolve against.")
    output: str = Field(description="Output directory (images/, results/, run.json, report.html).")
    encode_missing: bool = Field(
        False, description="Encode references missing from the store on the fly instead of failing the row."
    )
    defaults: GenerateDefaults = Field(default_factory=GenerateDefaults)
    resources: GenerateResources = Field(default_factory=GenerateResources)
    lease: LeaseSpec = Field(
        default_factory=LeaseSpec, description="One writer per output: what a second run on this output does."
    )
    commit_rows: int = Field(
        5000, ge=1, description="Results rows the driver buffers before committing them as one Parquet part "
        "(few large parts; a crash loses at most these, and the next run makes them again)."
    )
    commit_seconds: float = Field(
        60.0,
        gt=0,
        description="Seconds after the last commit from which the next finished batch commits the buffer, "
        "full or not (checked as rows arrive).",
    )
    stop_grace_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="On SIGTERM or Ctrl-C: seconds the run may take to finish and commit the batches already "
        "being generated before it stops anyway (env IPA_STOP_GRACE_S overrides); a second signal stops at once.",
    )


class Stages(Strict):
    extract: ExtractStage | None = Field(None, description="Embedding extraction into the store.")
    generate: GenerateStage | None = Field(None, description="Manifest rows to images.")
    score: ScoreStage | None = Field(
        None, description="Quality scores of every image of an output (after generate, or alone on an output)."
    )
