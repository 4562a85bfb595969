"""Task pipelines and what each task adds to a row: text2img, img2img, inpaint, controlnet, video.

The base pipeline of a model loads once (`Generator.load`). Every other task is made from it the
way diffusers documents, sharing its components instead of loading them again:

- img2img / inpaint: `AutoPipelineForImage2Image/Inpainting.from_pipe(base)`;
- controlnet: `AutoPipelineForText2Image.from_pipe(base, controlnet=ControlNetModel.from_pretrained(...))`
  (the model's `controlnet:` alias names the ControlNet; a `FluxControlNetModel` folder makes a
  `FluxControlNetPipeline`, an `SD3ControlNetModel` one a `StableDiffusion3ControlNetPipeline`), so
  the IP-Adapter attention and the LoRAs of the base denoiser serve ControlNet rows too;
- video: `AnimateDiffPipeline.from_pipe(base, motion_adapter=..., unet=<the base UNet's weights>)`.
  AnimateDiff needs its own `UNetMotionModel` (diffusers builds it from a plain UNet2D with
  `from_unet2d`), so the video pipeline gets a clean copy of the UNet weights, and then the
  IP-Adapters and LoRAs are loaded into it as the guide does (`load_ip_adapter` on the
  AnimateDiff pipeline); text encoder, VAE and tokenizer stay shared with the base.

The rest of this module is what differs per task around the one pipeline call: the call's
arguments, spreading per-row IP state over video frames, reading the result, and what a task
adds to a row's plan and key. Writing a row's files is `outputs/files.py`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ipa_ops.flow.models import SCHEDULERS, ModelSpec
from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.ip_state import IPBatchState
from ipa_ops.generate.loaded import LoadedModel
from ipa_ops.manifest.frames import frame_slots, per_frame

Equip = Callable[..., LoadedModel]  # Generator.equip: loads the flow's adapters and LoRAs into a pipeline


# -- pipelines ---------------------------------------------------------------------------
def model_for(loaded: LoadedModel, row: RowRequest, flow: Flow, equip: Equip) -> LoadedModel:
    """The loaded model a row runs on: the base one, or for video its AnimateDiff counterpart."""
    if row.task != "video":
        return loaded
    spec = flow.models[row.model]
    if spec.motion_adapter is None:
        raise ValueError(f"model {row.model!r} has no motion adapter; set models.{row.model}.motion_adapter")
    key = f"video:{spec.motion_adapter}"
    if key not in loaded.task_pipes:
        loaded.task_pipes[key] = _video_model(loaded, spec, flow, equip)
    return loaded.task_pipes[key]


def _video_model(loaded: LoadedModel, spec: ModelSpec, flow: Flow, equip: Equip) -> LoadedModel:
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    mirror, dtype = flow.mirror_root(), loaded.pipe.unet.dtype
    motion = flow.motion_adapters[spec.motion_adapter or ""]
    where = resolve(motion.source, motion.subfolder, None, mirror, f"motion adapter {spec.motion_adapter!r}")
    adapter = MotionAdapter.from_pretrained(where.folder, variant=motion.variant, dtype=dtype)
    base = resolve(spec.source, spec.subfolder, None, mirror, f"model {spec.source!r}").folder
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=spec.variant, dtype=dtype)
    pipe = AnimateDiffPipeline.from_pipe(loaded.pipe, motion_adapter=adapter, unet=unet, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    video = equip(pipe, loaded.family, text_encoder_loras=False)
    video.schedulers[None] = loaded.schedulers[None]  # the model's own, whatever a task pipe was given since
    return video


def task_pipe(loaded: LoadedModel, task: str, model: str | None, flow: Flow, device: str) -> Any:
    """The pipeline for `task` on `loaded`, made once with `from_pipe` and cached."""
    spec = flow.models.get(model) if model else None
    key = task
    if task == "controlnet":
        if spec is None or spec.controlnet is None:
            raise ValueError(f"model {model!r} has no controlnet; set models.{model}.controlnet in the flow")
        key = f"controlnet:{spec.controlnet}"
    if key not in loaded.task_pipes:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        if task in ("text2img", "video"):  # a video row's `loaded` already is its AnimateDiff model
            pipe = loaded.pipe
        elif task == "img2img":
            pipe = AutoPipelineForImage2Image.from_pipe(loaded.pipe)
        elif task == "inpaint":
            pipe = AutoPipelineForInpainting.from_pipe(loaded.pipe)
        elif task == "controlnet":
            assert spec is not None and spec.controlnet is not None
            controlnet = _controlnet(flow, spec.controlnet, (model or "", loaded.family.name), loaded.dtype, device)
            pipe = AutoPipelineForText2Image.from_pipe(loaded.pipe, controlnet=controlnet)
        else:
            raise ValueError(f"task {task!r} is not supported; use text2img, img2img, inpaint, controlnet or video")
        pipe.set_progress_bar_config(disable=True)
        loaded.task_pipes[key] = pipe
    return loaded.task_pipes[key]


CONTROLNET_CLASSES = {  # a ControlNet folder's class -> the families whose pipelines take it
    "ControlNetModel": ("sd15", "sdxl"),
    "FluxControlNetModel": ("flux",),
    "SD3ControlNetModel": ("sd3",),
}


def controlnet_folder(flow: Flow, alias: str) -> tuple[Any, str]:
    """The folder of a flow ControlNet alias and the class its `config.json` names."""
    spec = flow.controlnets[alias]
    folder = resolve(spec.source, spec.subfolder, None, flow.mirror_root(), f"controlnet {alias!r}").folder
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return folder, config.get("_class_name", "ControlNetModel")


def controlnet_problem(alias: str, name: str, model: str, family: str) -> str:
    """One line when the ControlNet class `name` is not one the pipeline of `model` (of `family`) takes."""
    if name not in CONTROLNET_CLASSES:
        return f"controlnets.{alias}: {name} is not supported; use a {' or '.join(CONTROLNET_CLASSES)}"
    if family in CONTROLNET_CLASSES[name]:
        return ""
    fits = next(c for c, families in CONTROLNET_CLASSES.items() if family in families)
    return (
        f"controlnets.{alias}: a {name} runs on {'/'.join(CONTROLNET_CLASSES[name])} models, but model "
        f"{model!r} is {family}; set models.{model}.controlnet to the alias of a {fits} folder"
    )


def _controlnet(flow: Flow, alias: str, model: tuple[str, str], dtype: Any, device: str) -> Any:
    """The ControlNet of a flow alias, as the class its `config.json` names, if the pipeline of `model`
    (alias, family name) takes it: a wrong pairing fails in one line, not deep in `from_pipe`."""
    import diffusers

    folder, name = controlnet_folder(flow, alias)
    problem = controlnet_problem(alias, name, *model)
    if problem:
        raise ValueError(problem)
    variant = flow.controlnets[alias].variant
    return getattr(diffusers, name).from_pretrained(folder, variant=variant, dtype=dtype).to(device)


def scheduler(loaded: LoadedModel, name: str | None, options: dict[str, Any]) -> Any:
    """A scheduler built as diffusers users do: `Class.from_config(<model's own config>, **options)`.

    The model's own scheduler is kept from load time (`loaded.schedulers[None]`), so a row's
    scheduler never derives from another row's choice; each (name, options) is built once.
    """
    base = loaded.schedulers[None]
    if name is None and not options:
        return base
    key = json.dumps([name, options], sort_keys=True)
    if key not in loaded.schedulers:
        import diffusers

        if name is not None and name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; one of {', '.join(SCHEDULERS)}")
        cls = getattr(diffusers, SCHEDULERS[name]) if name is not None else type(base)
        loaded.schedulers[key] = cls.from_config(base.config, **options)
    return loaded.schedulers[key]


# -- one call ----------------------------------------------------------------------------
def call_kwargs(rows: list[RowRequest], pipe: Any = None) -> dict[str, Any]:
    """The task's own pipeline arguments for a batch of rows that share a group key.

    The control images go in as `image` (UNet ControlNet pipelines) or `control_image` (Flux's),
    whichever the pipeline's call takes."""
    first = rows[0]
    task = first.task
    if task in ("img2img", "inpaint"):
        out: dict[str, Any] = dict(image=[r.init_image for r in rows], strength=first.strength)
        if task == "inpaint":
            out.update(mask_image=[r.mask_image for r in rows], height=first.height, width=first.width)
        return out
    out = dict(height=first.height, width=first.width)
    if task == "controlnet":
        takes = inspect.signature(pipe.__call__).parameters if pipe is not None else {}
        control = "control_image" if "control_image" in takes else "image"
        out[control] = [r.control_image for r in rows]
        out["controlnet_conditioning_scale"] = float(first.controlnet_scale)
    elif task == "video":
        out.update(num_frames=int(first.num_frames or 16))
    return out


def spread_over_frames(state: IPBatchState, rows: list[RowRequest], aliases: list[str]) -> None:
    """Repeat each row's IP state once per frame (video rows), then apply its per-frame controls.

    AnimateDiff runs the UNet on `rows x frames` samples, frames of one row adjacent
    (`repeat_interleave` of the IP tokens); the batched attention reads per-sample state, so each
    row's scales, token slots and masks are repeated the same way. A row's frame weights then scale
    its frames' samples, and under unfold each frame keeps only its own image's token slot (and mask).
    """
    if rows[0].task != "video":
        return
    frames = int(rows[0].num_frames or 16)
    state.layer_scales = state.layer_scales.repeat_interleave(frames, 0)
    state.token_valid = [v.repeat_interleave(frames, 0) for v in state.token_valid]
    state.masks = [m.repeat_interleave(frames, 0) if m is not None else None for m in state.masks]
    if state.masked is not None:
        state.masked = state.masked.repeat_interleave(frames, 0)
    if state.uncond_image is not None:
        state.uncond_image = state.uncond_image.repeat_interleave(frames, 0)
    if state.embeds_scaling is not None:
        state.embeds_scaling = state.embeds_scaling.repeat_interleave(frames, 0)
    per_row = state.resolve_steps
    state.resolve_steps = lambda steps: per_row(steps).repeat_interleave(frames, 0)
    for b, row in enumerate(rows):
        for a, alias in enumerate(aliases):
            entry = next((x for x in row.adapters if x.alias == alias), None)
            if entry is not None:
                _per_frame(state, a, entry, slice(b * frames, (b + 1) * frames), frames)


def _per_frame(state: IPBatchState, adapter: int, entry: AdapterInput, samples: slice, frames: int) -> None:
    """ComfyUI's list weight and unfold_batch for one row's adapter over its frames' samples."""
    if entry.frame_weights is not None:
        weights = torch.tensor(per_frame(entry.frame_weights.tolist(), frames), dtype=state.layer_scales.dtype)
        state.layer_scales[samples, adapter] *= weights[:, None]
    if not entry.unfold:
        return
    frame = torch.arange(frames)
    given = entry.frame_slots  # IPAdapterWeights' full batch: each image for several frames
    slots = per_frame([int(s) for s in given.tolist()], frames) if given is not None else None
    own = torch.tensor(slots or frame_slots(entry.embeds.shape[0], frames))
    valid = torch.zeros_like(state.token_valid[adapter][samples])
    valid[frame, own] = True  # joint attention over valid slots = the frame's own image alone
    state.token_valid[adapter][samples] = valid
    masks = state.masks[adapter]
    if entry.masks is not None and masks is not None:  # each frame's mask on its own slot, 0 on the others
        region = torch.zeros_like(masks[samples])
        region[frame, own] = entry.masks[torch.tensor(frame_slots(entry.masks.shape[0], frames))]
        masks[samples] = region


def outputs(result: Any) -> list[np.ndarray]:
    """Per-row float arrays in [0, 1]: (H, W, 3) images, or (F, H, W, 3) videos."""
    items = result.frames if getattr(result, "frames", None) is not None else result.images
    return [np.asarray(item, dtype=np.float32) for item in items]


# -- planning ----------------------------------------------------------------------------
def component_fingerprints(flow: Flow) -> dict[str, str]:
    """`controlnet:<alias>` and `motion_adapter:<alias>` -> weight fingerprints, for row keys."""
    mirror, found = flow.mirror_root(), {}
    for kind, specs in (("controlnet", flow.controlnets), ("motion_adapter", flow.motion_adapters)):
        for alias, spec in specs.items():
            folder = resolve(spec.source, spec.subfolder, None, mirror, f"{kind.replace('_', ' ')} {alias!r}").folder
            found[f"{kind}:{alias}"] = fingerprint(folder)
    return found


def request_fields(row: Any, flow: Flow, model: str) -> dict[str, Any]:
    """RowRequest fields only some tasks have (so other rows' keys do not change).

    Raises ValueError (one line naming the row) when the row's model lacks what its task needs.
    """
    needs = {"controlnet": "controlnet", "video": "motion_adapter"}.get(row.task)
    if needs and getattr(flow.models[model], needs) is None:
        raise ValueError(
            f"row {row.id}: task: model {model!r} has no {needs}, which task {row.task} needs; "
            f"set models.{model}.{needs} to an alias of {needs}s: in the flow, or use another model"
        )
    if row.task == "controlnet":
        return {"controlnet_scale": float(row.controlnet_scale)}
    if row.task == "video":
        return {"num_frames": int(row.num_frames or 16)}
    return {}


def identity(request: dict[str, Any], flow: Flow, found: dict[str, str], control_sha: str | None) -> dict[str, Any]:
    """What the task's extra models and inputs add to a row key (nothing for plain tasks)."""
    spec = flow.models[request["model"]]
    extra: dict[str, Any] = {}
    if request["task"] == "controlnet" and spec.controlnet:
        extra.update(controlnet=found.get(f"controlnet:{spec.controlnet}"), control_image=control_sha)
    if request["task"] == "video" and spec.motion_adapter:
        extra["motion_adapter"] = found.get(f"motion_adapter:{spec.motion_adapter}")
    if spec.scheduler_options:
        extra["scheduler_options"] = spec.scheduler_options
    return extra
