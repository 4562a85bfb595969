"""The in-process generation core: resolved rows in, images out. No Ray here.

A `Generator` loads each base pipeline once with every IP-Adapter of the flow that fits it,
swaps in the batched IP attention, and runs rows that share a `group_key` (what one UNet batch
must share) as one diffusers pipeline call. Everything else varies per row: prompts, seeds,
references, masks and schedules ride in the per-sample `IPBatchState`. Because each row has
its own seeded torch.Generator, a row's image does not depend on which rows share its batch.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipa_ops.flow.models import ModelSpec
from ipa_ops.flow.schedules import NoiseLevels, ScheduleSpec, schedule_hash, step_profile
from ipa_ops.flow.sources import resolve
from ipa_ops.flow.spec import AdapterSpec, Flow
from ipa_ops.generate import faceid, ip_state, loras, memory, records, tasks
from ipa_ops.generate.checkpoints import AdapterFacts, checkpoint_shapes
from ipa_ops.generate.contract import AdapterInput, RowOutput, RowRequest
from ipa_ops.generate.families import family_of
from ipa_ops.generate.families.base import ModelFamily, effective, layer_scales
from ipa_ops.generate.families.unet import UNetFamily
from ipa_ops.generate.loaded import LoadedModel

log = logging.getLogger(__name__)


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
        if self.device == "cpu":
            memory.steady_host_allocator()  # the same speed in every process (memory.py)

    # -- loading -------------------------------------------------------------------------
    def dtype(self, spec: ModelSpec) -> torch.dtype:
        return torch.float32 if self.device == "cpu" else getattr(torch, spec.dtype)

    def load(self, alias: str) -> LoadedModel:
        """Load a base pipeline and every flow adapter built for it (once per model)."""
        if alias in self.models:
            return self.models[alias]
        spec = self.flow.models[alias]
        same = [a for a in self.models if _base(self.flow.models[a]) == _base(spec)]
        if same:  # another alias of the same base (e.g. with another controlnet): share it
            self.models[alias] = self.models[same[0]]
            return self.models[alias]
        mirror = self.flow.mirror_root()
        folder = resolve(spec.source, spec.subfolder, None, mirror, what=f"model {alias!r}").folder
        family = family_of(Path(folder))
        pipe = family.load(Path(folder), self.dtype(spec), spec.variant)
        self.models[alias] = self.equip(pipe, family, compile=compile_plan(spec, self.device), spec=spec)
        return self.models[alias]

    def equip(
        self,
        pipe: Any,
        family: ModelFamily,
        compile: tuple[str, str] | None = None,
        text_encoder_loras: bool = True,
        spec: ModelSpec | None = None,
    ) -> LoadedModel:
        """Load every flow adapter that fits `pipe` (then the flow's LoRAs), and install the batched attention.

        Used for base pipelines and for pipelines with their own UNet (video); `text_encoder_loras=False`
        when the text encoder is shared with a base that already has the LoRAs; `spec` carries the memory options.
        """
        cross = family.cross_attention_dim(pipe)
        aliases, facts, files = [], [], []
        for a_alias, a_spec in self.flow.adapters.items():
            file = self._adapter_file(a_alias, a_spec)
            found = family.adapter_facts(checkpoint_shapes(Path(file)))  # None: another family's layout
            if found is not None and found.cross_attention_dim == cross:
                aliases.append(a_alias)
                facts.append(found)
                files.append(file)
        if files:
            family.load_adapters(pipe, files)
        loras.load(pipe, self.flow, text_encoder=text_encoder_loras)  # after the IP-Adapters, as the guide does
        memory.place(pipe, spec, self.device)  # after the adapters and LoRAs, as the guide says
        names = family.install_attention(pipe) if files else []
        if compile is not None:
            family.compile(pipe, *compile)
        compiled = compile is not None
        loaded = LoadedModel(pipe, family, aliases, facts, names, compiled=compiled, dtype=family.dtype(pipe))
        loaded.faces = faceid.after_load(pipe, aliases, facts, self.flow)
        return loaded

    def _adapter_file(self, alias: str, spec: AdapterSpec) -> Any:
        found = resolve(spec.source, spec.subfolder, spec.weight_name, self.flow.mirror_root(), f"adapter {alias!r}")
        return found.file

    def task_pipe(self, loaded: LoadedModel, task: str, scheduler: str | None, model: str | None = None) -> Any:
        """The pipeline for a task, sharing the base components (`from_pipe`, no second load; tasks.py)."""
        pipe = tasks.task_pipe(loaded, task, model, self.flow, self.device)
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
            loaded = self.models.get(row.model)
            faces = loaded.faces if loaded is not None else None
            key = loaded.family.group_key(row) if loaded is not None else row.group_key()
            by_group.setdefault((key, faceid.lora_key(faces, row)), []).append(i)
        for indices in by_group.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, out in zip(chunk, self.run_batch([rows[i] for i in chunk]), strict=True):
                    out.batch = [chunk[j] for j in out.batch]  # positions in the call -> in `rows`
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
            alone = [self.run_batch([row])[0] for row in rows]
            for i, out in enumerate(alone):
                out.batch = [i] if out.batch else []
            return alone
        seconds = (time.perf_counter() - start) / len(rows)
        threads, together = torch.get_num_threads(), list(range(len(rows)))
        return [
            RowOutput(row.id, img, "", seconds, self.worker, h, batch=together, torch_threads=threads)
            for row, img, h in zip(rows, images, hashes, strict=True)
        ]

    def _call(self, rows: list[RowRequest]) -> tuple[list[np.ndarray], list[dict[str, str]]]:
        first = rows[0]
        # video: the AnimateDiff model, equipped like a base model
        loaded = tasks.model_for(self.load(first.model), first, self.flow, self.equip)
        pipe = self.task_pipe(loaded, first.task, first.scheduler, first.model)
        family = loaded.family
        do_cfg = family.uses_cfg(pipe, first.guidance_scale)
        try:  # the set-up changes the shared pipeline (ip_call, call_kwargs, bind): the finally undoes it all
            kwargs: dict[str, Any] = dict(
                **family.prompt_kwargs([r.prompt for r in rows], [r.negative_prompt for r in rows], do_cfg),
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(int(r.seed)) for r in rows],
                output_type="np",
                **tasks.call_kwargs(rows, pipe),
                **family.call_kwargs(pipe, rows),
            )
            state = None
            if loaded.adapters:
                state, positives, negatives = self._ip_state(loaded, pipe, rows)
                tasks.spread_over_frames(state, rows, loaded.adapters)
                kwargs.update(family.ip_call(pipe, positives, negatives, do_cfg))
                kwargs.update(callback_on_step_end=ip_state.StepCounter(state))
            family.bind_attention(pipe, state)
            faceid.bind(loaded.faces, loaded.adapters, rows, do_cfg, self.device)  # FaceID LoRAs, per-row clip_embeds
            self.stats["calls"] += 1
            result = tasks.outputs(pipe(**kwargs))
        finally:
            family.bind_attention(pipe, None)
            family.end_call(pipe)
            faceid.unbind(loaded.faces)
        hashes = [self._schedule_hashes(loaded, pipe, row) for row in rows]
        return result, hashes

    def _ip_state(
        self, loaded: LoadedModel, pipe: Any, rows: list[RowRequest]
    ) -> tuple[ip_state.IPBatchState, list[torch.Tensor], list[torch.Tensor]]:
        """Pad each adapter's images across rows and build the per-sample state; per-adapter [rows, ...]
        positive and negative embeddings, on the device in the denoiser's dtype.

        An adapter listed several times in a row (ComfyUI's regional conditioning: one application per
        entry) gets one state slot per application, its images side by side on the adapter's image axis,
        so the projections still run once per adapter and each application attends its own slice."""
        family, dtype = loaded.family, loaded.dtype
        applications = [[[x for x in r.adapters if x.alias == alias] for r in rows] for alias in loaded.adapters]
        counts = [max([len(entries) for entries in per_row] + [1]) for per_row in applications]
        repeated = max(counts + [1]) > 1
        if repeated and not isinstance(family, UNetFamily):
            raise ValueError(f"an adapter listed twice in a row needs a UNet model (SD1.5 / SDXL), not {family.name}")
        if any(n > 1 and loaded.facts[a].needs_face for a, n in enumerate(counts)):
            raise ValueError("a FaceID adapter is applied once per row: list all its images in one entry")
        slots: list[tuple[int, list[AdapterInput | None]]] = []
        for a, per_row in enumerate(applications):
            for g in range(counts[a]):
                slots.append((a, [entries[g] if g < len(entries) else None for entries in per_row]))
        n_rows, n_slots, n_layers = len(rows), len(slots), len(loaded.layer_names)
        scales = torch.zeros(n_rows, n_slots, n_layers)
        uncond_image = torch.zeros(n_rows, n_slots, n_layers, dtype=torch.bool)
        embeds_scaling = torch.zeros(n_rows, n_slots, dtype=torch.long)
        specs: list[list[ScheduleSpec | None]] = [[None] * n_slots for _ in rows]
        parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in loaded.adapters]
        valid, masks, sources = [], [], []
        masked = torch.zeros(n_rows, n_slots, dtype=torch.bool)
        for s, (a, inputs) in enumerate(slots):
            used = [x for x in inputs if x is not None]
            shaped = [x for per_row in applications[a] for x in per_row]
            item_shape = shaped[0].embeds.shape[1:] if shaped else _empty_shape(loaded.facts[a])
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
                specs[b][s] = x.schedule
                values, swapped = layer_scales(family, x.schedule, pipe, loaded.layer_names)
                scales[b, s], uncond_image[b, s] = torch.as_tensor(values), torch.as_tensor(swapped)
                embeds_scaling[b, s] = ip_state.EMBEDS_SCALING.index(x.embeds_scaling)
                if x.masks is not None and region is not None:
                    if not x.unfold:  # unfold: one mask per frame, placed by tasks.spread_over_frames
                        region[b, :n] = x.masks
                    masked[b, s] = True
            start = sum(p.shape[1] for p, _ in parts[a])
            sources.append((a, start, start + n_max))
            parts[a].append((pos, neg))
            valid.append(ok)
            masks.append(region)
        positives = [torch.cat([p for p, _ in pairs], 1).to(self.device, dtype) for pairs in parts]
        negatives = [torch.cat([n for _, n in pairs], 1).to(self.device, dtype) for pairs in parts]

        def resolve_steps(num_steps: int) -> torch.Tensor:
            out = torch.zeros(n_rows, n_slots, num_steps)
            by_sigma = any(s is not None and s.by_sigma for row_specs in specs for s in row_specs)
            noise = noise_levels(pipe) if by_sigma else None
            for b in range(n_rows):
                for s in range(n_slots):
                    if specs[b][s] is not None:
                        out[b, s] = torch.as_tensor(step_profile(specs[b][s], num_steps, noise))
            return out

        state = ip_state.IPBatchState(
            layer_scales=scales,
            uncond_image=uncond_image,
            embeds_scaling=embeds_scaling,
            token_valid=valid,
            masks=masks,
            masked=masked,
            sources=sources if repeated else None,  # None: one slot per adapter, the path without repeats
            cache_kv=self.cache_kv,
            general=loaded.compiled,
            device=self.device,
            resolve_steps=resolve_steps,
            num_steps=lambda: pipe.num_timesteps,
        )
        return state, positives, negatives

    def _schedule_hashes(self, loaded: LoadedModel, pipe: Any, row: RowRequest) -> dict[str, str]:
        """Hash of each adapter's effective [layers, steps] schedule, for provenance."""
        steps = pipe.num_timesteps
        noise = noise_levels(pipe) if any(x.schedule.by_sigma for x in row.adapters) else None
        hashes: dict[str, str] = {}
        for x in row.adapters:
            if x.alias not in loaded.adapters:
                continue
            array = effective(loaded.family, x.schedule, pipe, loaded.layer_names, steps, noise)
            swapped = layer_scales(loaded.family, x.schedule, pipe, loaded.layer_names)[1]
            if swapped.any():  # precise weight types: which layers carry the image on the unconditional side
                array = np.concatenate([array, swapped[:, None].astype(np.float64)], axis=1)
            hashes[records.application_key(x.alias, hashes)] = schedule_hash(array)
        return hashes


def noise_levels(pipe: Any) -> NoiseLevels:
    """The noise level of each step of the pipeline's scheduler, as set for the current call."""
    scheduler = pipe.scheduler
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"start_at / end_at read a DDPM noise schedule; {type(scheduler).__name__} has none")
    return NoiseLevels.of(scheduler.timesteps.cpu().numpy(), scheduler.alphas_cumprod.cpu().numpy())


def compile_plan(spec: ModelSpec, device: str) -> tuple[str, str] | None:
    """(how, mode) to torch.compile a model's denoiser, or None; CUDA graphs only where there is CUDA."""
    if not spec.compile:
        return None
    how = "whole" if spec.compile == "whole" else "regional"
    mode = spec.compile_mode
    if "cuda" not in device and mode == "reduce-overhead":
        log.warning("compile_mode reduce-overhead makes CUDA graphs; on %s it does nothing, using the default", device)
        mode = "default"
    return how, mode


def _base(spec: ModelSpec) -> tuple:
    """What makes two model aliases the same loaded base pipeline."""
    memory = (spec.vae_slicing, spec.vae_tiling, spec.cpu_offload)
    return (spec.source, spec.subfolder, spec.variant, spec.dtype, spec.compile, spec.compile_mode, *memory)


def _empty_shape(facts: AdapterFacts) -> tuple[int, ...]:
    """Input shape of one zero image for an adapter no row of the batch uses."""
    if facts.needs_face:  # FaceID and FaceID-Plus: one ID embedding per image (portrait-unnorm: a 1-token sequence)
        return (1, facts.face_dim) if facts.raw_face else (facts.face_dim,)
    return (1, facts.image_dim) if facts.needs_hidden_states else (facts.image_dim,)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
