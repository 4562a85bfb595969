"""The in-process generation core: resolved rows in, images out. No Ray here.

A `Generator` loads each base pipeline once with every IP-Adapter of the flow that fits it,
swaps in the batched IP attention, and runs rows that share a `group_key` (what one UNet batch
must share) as one diffusers pipeline call. Everything else varies per row: prompts, seeds,
references, masks and schedules ride in the per-sample `IPBatchState`. Because each row has
its own seeded torch.Generator, a row's image does not depend on which rows share its batch.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ipa_ops import attention, faceid, loras, tasks
from ipa_ops.flow import SCHEDULERS as SCHEDULERS  # re-exported: scheduler names live in the flow format
from ipa_ops.flow import AdapterSpec, Flow, ModelSpec
from ipa_ops.preflight import AdapterFacts, adapter_facts
from ipa_ops.schedules import ScheduleSpec, effective, layer_profile, schedule_hash, step_profile
from ipa_ops.sources import resolve


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


@dataclass
class LoadedModel:
    """A base pipeline with its adapters loaded and the batched attention installed."""

    pipe: Any
    adapters: list[str]  # flow aliases in load order (the order of ip_adapter_image_embeds)
    facts: list[AdapterFacts]
    layer_names: list[str]
    task_pipes: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str | None, Any] = field(default_factory=dict)
    faces: Any = None  # faceid.FaceIDModel: FaceID LoRAs and FaceID-Plus layers, bound per call

    def __post_init__(self) -> None:
        # the model's own scheduler, kept before any task pipe's scheduler is swapped (tasks.scheduler)
        self.schedulers.setdefault(None, self.pipe.scheduler)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Generator:
    """Runs RowRequests on loaded pipelines; keeps models loaded across batches."""

    def __init__(self, flow: Flow, device: str | None = None, batch_size: int = 8, cache_kv: bool = True):
        self.flow = flow
        self.device = device or default_device()
        self.batch_size = batch_size
        self.cache_kv = cache_kv
        self.models: dict[str, LoadedModel] = {}
        self.worker = f"{socket.gethostname()}:{self.device}"
        self.stats = {"calls": 0, "batch_failures": 0}  # a failed batch is retried row by row

    # -- loading -------------------------------------------------------------------------
    def dtype(self, spec: ModelSpec) -> torch.dtype:
        return torch.float32 if self.device == "cpu" else getattr(torch, spec.dtype)

    def load(self, alias: str) -> LoadedModel:
        """Load a base pipeline and every flow adapter built for it (once per model)."""
        if alias in self.models:
            return self.models[alias]
        from diffusers import AutoPipelineForText2Image

        spec = self.flow.models[alias]
        same = [a for a in self.models if _base(self.flow.models[a]) == _base(spec)]
        if same:  # another alias of the same base (e.g. with another controlnet): share it
            self.models[alias] = self.models[same[0]]
            return self.models[alias]
        mirror = self.flow.mirror_root()
        folder = resolve(spec.source, spec.subfolder, None, mirror, what=f"model {alias!r}").folder
        pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=self.dtype(spec), variant=spec.variant)
        pipe.set_progress_bar_config(disable=True)
        self.models[alias] = self.equip(pipe, compile=spec.compile)
        return self.models[alias]

    def equip(self, pipe: Any, compile: bool = False, text_encoder_loras: bool = True) -> LoadedModel:
        """Load every flow adapter that fits `pipe` (then the flow's LoRAs), and install the batched attention.

        Used for base pipelines and for pipelines with their own UNet (video); `text_encoder_loras=False`
        when the text encoder is shared with a base that already has the LoRAs.
        """
        cross = pipe.unet.config.cross_attention_dim
        aliases, facts, files = [], [], []
        for a_alias, a_spec in self.flow.adapters.items():
            file = self._adapter_file(a_alias, a_spec)
            found = adapter_facts(file)
            if found.cross_attention_dim == cross:
                aliases.append(a_alias)
                facts.append(found)
                files.append(file)
        if files:
            pipe.load_ip_adapter(
                [str(f.parent) for f in files],
                subfolder=[""] * len(files),
                weight_name=[f.name for f in files],
                image_encoder_folder=None,
            )
        loras.load(pipe, self.flow, text_encoder=text_encoder_loras)  # after the IP-Adapters, as the guide does
        pipe.to(self.device)
        names = attention.install(pipe.unet) if files else []
        if compile:
            pipe.unet.compile_repeated_blocks(fullgraph=False, dynamic=False)
        loaded = LoadedModel(pipe, aliases, facts, names)
        loaded.faces = faceid.after_load(pipe, aliases, facts, self.flow)
        return loaded

    def _adapter_file(self, alias: str, spec: AdapterSpec) -> Any:
        found = resolve(spec.source, spec.subfolder, spec.weight_name, self.flow.mirror_root(), f"adapter {alias!r}")
        return found.file

    def task_pipe(self, loaded: LoadedModel, task: str, scheduler: str | None, model: str | None = None) -> Any:
        """The pipeline for a task, sharing the base components (`from_pipe`, no second load; tasks.py)."""
        pipe = tasks.task_pipe(self, loaded, task, model)
        options = self.flow.models[model].scheduler_options if model in self.flow.models else {}
        pipe.scheduler = tasks.scheduler(loaded, scheduler, options)
        return pipe

    # -- running -------------------------------------------------------------------------
    def generate(self, rows: list[RowRequest]) -> list[RowOutput]:
        """Run rows in batches of `batch_size` rows that share a group key; order is kept."""
        by_group: dict[tuple, list[int]] = {}
        outputs: list[RowOutput | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            problem = self.adapter_problem(row)
            if problem:  # fails alone, before it can fail a batch
                outputs[i] = RowOutput(row.id, error=problem, worker=self.worker)
                continue
            by_group.setdefault((row.group_key(), faceid.lora_key(self, row)), []).append(i)
        for indices in by_group.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, out in zip(chunk, self.run_batch([rows[i] for i in chunk]), strict=True):
                    outputs[i] = out
        return [o for o in outputs if o is not None]

    def adapter_problem(self, row: RowRequest) -> str:
        """A row naming an adapter that is not loaded for its model (built for another base model)."""
        try:
            loaded = self.load(row.model)
        except Exception:  # noqa: BLE001 - a model that cannot load fails its rows in run_batch, with its error
            return ""
        foreign = [x.alias for x in row.adapters if x.alias not in loaded.adapters]
        if not foreign:
            return ""
        return (
            f"row {row.id}: adapters: {', '.join(map(repr, foreign))} not loaded for model {row.model!r} (built "
            f"for another cross-attention dim); use adapters made for {row.model!r} or set the row's model"
        )

    def run_batch(self, rows: list[RowRequest]) -> list[RowOutput]:
        """One pipeline call; if it fails, each row is retried alone so one bad row fails alone."""
        start = time.perf_counter()
        try:
            images, hashes = self._call(rows)
        except Exception as exc:  # noqa: BLE001 - a batch failure must not lose the other rows
            self.stats["batch_failures"] += 1
            if len(rows) == 1:
                return [RowOutput(rows[0].id, error=_one_line(exc), worker=self.worker)]
            return [out for row in rows for out in self.run_batch([row])]
        seconds = (time.perf_counter() - start) / len(rows)
        return [
            RowOutput(row.id, image=img, seconds=seconds, worker=self.worker, schedule_hashes=h)
            for row, img, h in zip(rows, images, hashes, strict=True)
        ]

    def _call(self, rows: list[RowRequest]) -> tuple[list[np.ndarray], list[dict[str, str]]]:
        first = rows[0]
        loaded = tasks.model_for(self, self.load(first.model), first)  # video: the AnimateDiff model
        pipe = self.task_pipe(loaded, first.task, first.scheduler, first.model)
        do_cfg = first.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        kwargs: dict[str, Any] = dict(
            prompt=[r.prompt for r in rows],
            # no negative prompt means diffusers' default (None): SDXL then uses zero embeddings
            # rather than encoding "", so a row without one must not share a call with rows with one
            negative_prompt=[r.negative_prompt for r in rows] if do_cfg and first.negative_prompt else None,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(int(r.seed)) for r in rows],
            output_type="np",
            **tasks.call_kwargs(rows),
        )
        state = None
        if loaded.adapters:
            state, embeds = self._ip_state(loaded, pipe, rows, do_cfg)
            tasks.spread_over_frames(state, first)
            kwargs.update(ip_adapter_image_embeds=embeds, callback_on_step_end=attention.StepCounter(state))
        attention.bind(pipe.unet, state)
        faceid.bind(loaded.faces, loaded.adapters, rows, do_cfg, self.device)  # FaceID LoRAs, per-row clip_embeds
        if state is not None:
            # diffusers repeats precomputed embeddings over the batch (one reference for all
            # prompts); ours are already one per row, so they pass through unchanged.
            pipe.prepare_ip_adapter_image_embeds = _PassThrough(embeds)
        try:
            self.stats["calls"] += 1
            result = tasks.outputs(pipe(**kwargs))
        finally:
            attention.bind(pipe.unet, None)
            faceid.unbind(loaded.faces)
            pipe.__dict__.pop("prepare_ip_adapter_image_embeds", None)
        hashes = [self._schedule_hashes(loaded, pipe, row) for row in rows]
        return result, hashes

    def _ip_state(
        self, loaded: LoadedModel, pipe: Any, rows: list[RowRequest], do_cfg: bool
    ) -> tuple[attention.IPBatchState, list[torch.Tensor]]:
        """Pad each adapter's images across rows and build the per-sample state."""
        n_rows, n_adapters, n_layers = len(rows), len(loaded.adapters), len(loaded.layer_names)
        layer_scales = torch.zeros(n_rows, n_adapters, n_layers)
        specs: list[list[ScheduleSpec | None]] = [[None] * n_adapters for _ in rows]
        embeds, valid, masks = [], [], []
        masked = torch.zeros(n_rows, n_adapters, dtype=torch.bool)
        dtype = pipe.unet.dtype
        for a, alias in enumerate(loaded.adapters):
            inputs = [next((x for x in r.adapters if x.alias == alias), None) for r in rows]
            used = [x for x in inputs if x is not None]
            item_shape = used[0].embeds.shape[1:] if used else _empty_shape(loaded.facts[a])
            n_max = max([x.embeds.shape[0] for x in used] or [1])
            pos = torch.zeros((n_rows, n_max, *item_shape))
            neg = torch.zeros_like(pos)
            ok = torch.zeros(n_rows, n_max, dtype=torch.bool)
            region = None
            if any(x.masks is not None for x in used):
                region = torch.zeros(n_rows, n_max, rows[0].height, rows[0].width)
            for b, x in enumerate(inputs):
                if x is None:
                    ok[b, 0] = True  # attend to a zero slot; the row's scale is 0 anyway
                    continue
                n = x.embeds.shape[0]
                pos[b, :n], neg[b, :n], ok[b, :n] = x.embeds, x.negative, True
                specs[b][a] = x.schedule
                layer_scales[b, a] = torch.as_tensor(
                    x.schedule.value * layer_profile(x.schedule, pipe.unet, loaded.layer_names)
                )
                if x.masks is not None and region is not None:
                    region[b, :n] = x.masks
                    masked[b, a] = True
            embeds.append((torch.cat([neg, pos]) if do_cfg else pos).to(self.device, dtype))
            valid.append(ok)
            masks.append(region)

        def resolve_steps(num_steps: int) -> torch.Tensor:
            out = torch.zeros(n_rows, n_adapters, num_steps)
            for b in range(n_rows):
                for a in range(n_adapters):
                    if specs[b][a] is not None:
                        out[b, a] = torch.as_tensor(step_profile(specs[b][a], num_steps))
            return out

        state = attention.IPBatchState(
            layer_scales=layer_scales,
            token_valid=valid,
            masks=masks,
            masked=masked,
            cache_kv=self.cache_kv,
            resolve_steps=resolve_steps,
            num_steps=lambda: pipe.num_timesteps,
        )
        return state, embeds

    def _schedule_hashes(self, loaded: LoadedModel, pipe: Any, row: RowRequest) -> dict[str, str]:
        """Hash of each adapter's effective [layers, steps] schedule, for provenance."""
        steps = pipe.num_timesteps
        return {
            x.alias: schedule_hash(effective(x.schedule, pipe.unet, loaded.layer_names, steps))
            for x in row.adapters
            if x.alias in loaded.adapters
        }


class _PassThrough:
    """Stands in for `prepare_ip_adapter_image_embeds`: per-row embeddings, already [neg; pos]."""

    def __init__(self, embeds: list[torch.Tensor]):
        self.embeds = embeds

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return self.embeds


def _base(spec: ModelSpec) -> tuple:
    """What makes two model aliases the same loaded base pipeline."""
    return (spec.source, spec.subfolder, spec.variant, spec.dtype, spec.compile)


def _empty_shape(facts: AdapterFacts) -> tuple[int, ...]:
    """Input shape of one zero image for an adapter no row of the batch uses."""
    if facts.needs_face:  # FaceID and FaceID-Plus: one ID embedding per image
        return (facts.face_dim,)
    return (1, facts.image_dim) if facts.needs_hidden_states else (facts.image_dim,)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
