"""The per-call state the batched IP attention reads: what each row of one pipeline call wants.

`IPBatchState` holds, for the rows of one call, everything that varies per row: the
[rows, applications, layers, steps] scale table, which image slots are real (`token_valid`), region
masks and which rows use them (`masks`, `masked`), ComfyUI's precise swap (`uncond_image`) and
embeds scaling, and which adapter and images each application reads (`sources`). It settles every
per-call decision once, before the first UNet step (`prepare`), so the processors in
`attention.py` (UNet), `flux_attention.py` and `sd3_attention.py` only look things up.
`StepCounter` is the step callback that moves it to the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.image_processor import IPAdapterMaskProcessor


@dataclass
class IPBatchState:
    """What one pipeline call's rows want from the IP layers; shared by all processors.

    Everything the processors decide is settled once per call, before the first UNet step
    (`prepare`, run by a forward pre-hook on the UNet, outside any compiled region): the
    [rows, adapters, layers, steps] scale table, and, for eager runs, host-side flags that let a
    layer skip work no row needs. With `general` set (a compiled UNet) the processors take no
    data-dependent branch at all: every adapter is attended at every layer and step, padded
    slots are always masked out and regional rows are chosen with `torch.where`, so one graph
    serves every batch of the same shapes and nothing in a step waits on the device.
    """

    layer_scales: torch.Tensor  # [B, A, L] per row, adapter, IP layer
    step_scales: torch.Tensor | None = None  # [B, A, S], resolved by prepare()
    token_valid: list[torch.Tensor] = field(default_factory=list)  # per adapter [B, n]
    masks: list[torch.Tensor | None] = field(default_factory=list)  # per adapter [B, n, H, W]
    masked: torch.Tensor | None = None  # [B, A] bool: row uses region masks for this adapter
    uncond_image: torch.Tensor | None = None  # [B, A, L] bool: image on the unconditional side (precise types)
    embeds_scaling: torch.Tensor | None = None  # [B, A] long: index into EMBEDS_SCALING
    sources: list[tuple[int, int, int]] | None = None  # per application: (adapter, start, stop); None: A = adapters
    step_index: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    cache_kv: bool = True
    resolve_steps: Any = None  # callable(num_steps) -> [B, A, S], called by prepare()
    num_steps: Any = None  # callable() -> int, the pipeline's actual loop length
    general: bool = False  # compiled UNet: no data-dependent branches (see above)
    device: str | torch.device = "cpu"  # where the UNet runs (with CPU offload, not where it waits)
    table: torch.Tensor | None = None  # [B, A, L, S] scale of every row, adapter, layer and step
    step: int = 0  # host copy of step_index, for the eager flags
    active: list[list[list[bool]]] = field(default_factory=list)  # [A][L][S]: some row's scale is not 0
    padded: list[bool] = field(default_factory=list)  # per adapter: some image slot is padding
    any_masked: list[bool] = field(default_factory=list)  # per adapter: some row uses region masks
    all_masked: list[bool] = field(default_factory=list)  # per adapter: every row does
    any_uncond: list[bool] = field(default_factory=list)  # per adapter: some row swaps a layer
    any_scaling: list[bool] = field(default_factory=list)  # per adapter: some row scales K (not V only)
    needed: list[list[list[bool]]] = field(default_factory=list)  # [B][A][L]: the row's scale is not 0 at some step
    _kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _samples: dict[tuple, torch.Tensor | None] = field(default_factory=dict)
    _weights: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _distinct: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    _step_rows: dict[tuple, torch.Tensor] = field(default_factory=dict)  # eager: (step, batch, dtype) -> [batch, A, L]
    _text: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # per layer
    _projected: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (image embeds, their projection)
    slot_counts: list[list[int]] = field(default_factory=list)  # per adapter, per row: real slots (-1: not a prefix)

    def prepare(self) -> None:
        """Resolve the step profile and every per-call decision; once per call (idempotent)."""
        if self.table is not None:
            return
        device = self.device
        self.step_scales = self.resolve_steps(self.num_steps())
        table = self.layer_scales[..., None] * self.step_scales[:, :, None, :]
        masked = self.masked if self.masked is not None else torch.zeros(table.shape[:2], dtype=torch.bool)
        self.active = (table != 0).any(dim=0).tolist()
        self.needed = (table != 0).any(dim=3).tolist()
        self.padded = [not bool(v.all()) for v in self.token_valid]
        self.any_masked = [m is not None and bool(masked[:, a].any()) for a, m in enumerate(self.masks)]
        self.all_masked = [m is not None and bool(masked[:, a].all()) for a, m in enumerate(self.masks)]
        rows, adapters, layers = self.layer_scales.shape
        if self.uncond_image is None:
            self.uncond_image = torch.zeros(rows, adapters, layers, dtype=torch.bool)
        if self.embeds_scaling is None:
            self.embeds_scaling = torch.zeros(rows, adapters, dtype=torch.long)
        self.any_uncond = self.uncond_image.any(dim=2).any(dim=0).tolist()
        self.any_scaling = (self.embeds_scaling != 0).any(dim=0).tolist()
        self.slot_counts = [_prefix_counts(v.cpu()) for v in self.token_valid]
        self.uncond_image = self.uncond_image.to(device)
        self.embeds_scaling = self.embeds_scaling.to(device)
        self.table = table.to(device)
        self.masked = masked.to(device)
        self.token_valid = [v.to(device) for v in self.token_valid]
        self.masks = [m.to(device) if m is not None else None for m in self.masks]
        self.step_index = self.step_index.to(device)
        if self.general:  # nothing cached across steps: the graph must not depend on a Python dict
            self.cache_kv = False

    def scales(self, adapter: int, layer: IPLayerProcessor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[batch] scales for this adapter and `layer` at the current step (CFG halves repeated).

        Compiled (`general`): layer and step are read as tensors, not Python ints, so one compiled block
        serves every layer and step. Eager: a view into the step's [batch, A, L] table, made once per step."""
        assert self.table is not None, "IPBatchState.prepare() runs before the first UNet step"
        if self.general:
            per_row = self.table[:, adapter].index_select(1, layer.layer_index).index_select(2, self.step_index)
            return per_row[:, 0, 0].repeat(batch // per_row.shape[0]).to(dtype)
        key = (self.step, batch, dtype)
        if key not in self._step_rows:
            self._step_rows = {key: self.rows(self.table[..., self.step], batch).to(dtype)}  # the last step's goes
        return self._step_rows[key][:, adapter, layer.layer]

    def attends(self, adapter: int, layer: int) -> bool:
        """Whether some row needs this adapter at this layer and step (always, when general)."""
        return self.general or self.active[adapter][layer][min(self.step, len(self.active[adapter][layer]) - 1)]

    def advance(self, step_index: int) -> None:
        """Move to the step after `step_index` (clamped to the last scheduled step)."""
        last = self.step_scales.shape[-1] - 1 if self.step_scales is not None else step_index + 1
        self.step = min(step_index + 1, last)
        self.step_index.fill_(self.step)

    def applications(self, ip_hidden_states: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
        """(application, adapter, its tokens [B, n, T, C]) for every application of this call."""
        if self.sources is None:
            return [(a, a, tokens) for a, tokens in enumerate(ip_hidden_states)]
        return [(i, a, ip_hidden_states[a][:, start:stop]) for i, (a, start, stop) in enumerate(self.sources)]

    def distinct(self, adapter: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows to project, index that expands them back) when every negative row of a CFG batch is the
        same; None otherwise. Decided once per call and adapter: every layer sees the same tokens."""
        if adapter not in self._distinct:
            rows = self.layer_scales.shape[0]
            same = tokens.shape[0] == 2 * rows and all(torch.equal(tokens[0], tokens[i]) for i in range(1, rows))
            keep = torch.tensor([0, *range(rows, 2 * rows)], device=tokens.device)
            back = torch.tensor([0] * rows + list(range(1, rows + 1)), device=tokens.device)
            self._distinct[adapter] = (keep, back) if same and rows > 1 else None
        return self._distinct[adapter]

    def precise(
        self, adapter: int, layer: torch.Tensor, ip_key: torch.Tensor, ip_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ComfyUI's precise swap at this layer: rows flagged here take their image's keys and values on the
        unconditional half, and their conditional half adds nothing (ComfyUI zeros its tokens; the IP
        projections have no bias, so zero tokens attend to zero values). Returns (keys, values, keep [batch]).

        A gather with a per-row index, not a branch: the same graph serves every batch."""
        assert self.uncond_image is not None
        swap = self.uncond_image[:, adapter].index_select(1, layer)[:, 0]  # [rows]
        rows, batch = swap.shape[0], ip_key.shape[0]
        keep = (~swap).to(ip_key.dtype)
        if batch == rows:  # no guidance: only the conditional side, which the swap empties
            return ip_key, ip_value, keep
        own = torch.arange(rows, device=swap.device)
        index = torch.cat([torch.where(swap, own + rows, own), own + rows])  # [negative half; positive half]
        keep = torch.cat([torch.ones_like(keep), keep])
        return ip_key.index_select(0, index), ip_value.index_select(0, index), keep

    def kv_scaling(self, adapter: int, scale: torch.Tensor, inner: int) -> tuple[torch.Tensor, ...]:
        """Per-sample (key factor, value factor, value-mean factor, output factor) of ComfyUI's embeds scaling.

        `V only` scales the attention output; `K+V` scales keys and values; the `C penalty` modes first
        multiply the weight by inner_dim / 1280; `K+mean(V)` scales only the values' mean over tokens."""
        assert self.embeds_scaling is not None
        mode = self.rows(self.embeds_scaling[:, adapter], scale.shape[0])
        one = torch.ones_like(scale)
        weight = scale * torch.where(mode >= 2, one * (inner / 1280.0), one)
        key = torch.where(mode == 0, one, weight)
        value = torch.where((mode == 1) | (mode == 2), weight, one)
        mean = torch.where(mode == 3, weight - 1, one * 0)
        return key, value, mean, torch.where(mode == 0, scale, one)

    def samples(self, adapter: int, layer: int, batch: int, regional: bool) -> torch.Tensor | None:
        """Eager runs: the UNet samples (CFG halves included) whose rows need this adapter's joint
        (`regional` False) or masked (True) attention at this layer; None when that is every sample.

        Settled on the host once per call and layer, so a batch whose rows differ in masks or in which
        adapters they use does each row's work only, not the union of all rows' work."""
        key = (adapter, layer, batch, regional)
        if key not in self._samples:
            count, rows = len(self.needed), self._subset(adapter, layer, regional)
            index = [r + half * count for half in range(batch // count) for r in rows]
            self._samples[key] = None if len(index) == batch else torch.tensor(index, device=self.device)
        return self._samples[key]

    def joint_slots(self, adapter: int, layer: int) -> tuple[int, bool]:
        """Eager runs: (image slots, whether padding must be masked) for the samples of this adapter's
        joint attention at this layer. When every such row has its real images first, the slots past
        the longest row are dropped, and when all have the same count no padding mask is needed: a
        mask-free attention over fewer tokens, the same result."""
        key = (adapter, layer, "slots")
        if key not in self._samples:
            counts = [self.slot_counts[adapter][r] for r in self._subset(adapter, layer, regional=False)]
            if counts and min(counts) >= 1:  # all prefixes (-1: a gap) and none empty
                self._samples[key] = (max(counts), min(counts) != max(counts))  # type: ignore[assignment]
            else:
                self._samples[key] = (self.token_valid[adapter].shape[1], self.padded[adapter])  # type: ignore[assignment]
        return self._samples[key]  # type: ignore[return-value]

    def _subset(self, adapter: int, layer: int, regional: bool) -> list[int]:
        """Rows that need this adapter at this layer, through its masked path (`regional`) or its joint one."""
        regional_rows = self.masked is not None and self.masks[adapter] is not None
        masked = self.masked[:, adapter].tolist() if regional_rows else []  # type: ignore[index]
        return [
            r for r, need in enumerate(self.needed)
            if need[adapter][layer] and bool(masked and masked[r]) == regional
        ]  # fmt: skip

    def text_kv(self, layer: int, context: torch.Tensor, project: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A cross-attention layer's text keys and values: the prompts are the same tensor at every step
        of a call, so with caching they are projected at the first step only (`project(context)`)."""
        cached = self._text.get(layer) if self.cache_kv else None
        if cached is not None and cached[0] is context:
            return cached[1], cached[2]
        key, value = project(context)
        if self.cache_kv:
            self._text[layer] = (context, key, value)  # holding `context` keeps its identity unique
        return key, value

    def projection(self, image_embeds: list[torch.Tensor], project: Any) -> list[torch.Tensor]:
        """The UNet's image projection of this call's embeddings: the same tensors at every step, so with
        caching the projection (a Resampler for Plus adapters) runs once per call, not once per step."""
        if not self.cache_kv:
            return project(image_embeds)
        seen = self._projected
        same = seen is not None and len(seen[0]) == len(image_embeds)
        if not (same and all(a is b for a, b in zip(seen[0], image_embeds, strict=True))):  # type: ignore[index]
            self._projected = (list(image_embeds), project(image_embeds))
        return self._projected[1]  # type: ignore[index]

    def mask_weight(self, adapter: int, image: int, batch: int, queries: int) -> torch.Tensor:
        """[batch, queries, 1] region weight of one image slot, downsampled as diffusers does; once per
        call and query length when caching (it is the same at every step)."""
        key = (adapter, image, batch, queries)
        if key in self._weights:
            return self._weights[key]
        masks = self.masks[adapter]
        assert masks is not None
        weight = IPAdapterMaskProcessor.downsample(self.rows(masks, batch)[:, image], batch, queries, 1)
        if self.cache_kv:
            self._weights[key] = weight
        return weight

    def rows(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """Repeat a per-row tensor over the CFG halves of a UNet batch."""
        return tensor.repeat((batch // tensor.shape[0],) + (1,) * (tensor.ndim - 1))


def _prefix_counts(valid: torch.Tensor) -> list[int]:
    """Per row of [rows, n] slot flags: how many slots are real when they come first, else -1."""
    counts = valid.sum(dim=1)
    prefix = valid.cumprod(dim=1).sum(dim=1) == counts
    return torch.where(prefix, counts, torch.full_like(counts, -1)).tolist()


EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")  # ComfyUI's names


class StepCounter:
    """`callback_on_step_end` that tells the attention which denoising step comes next."""

    tensor_inputs: list[str] = []

    def __init__(self, state: IPBatchState):
        self.state = state

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.state.advance(step_index)
        return callback_kwargs


class IPLayerProcessor(torch.nn.Module):
    """What every batched IP processor (UNet, Flux, SD3.5) holds: its IP layer's index and the call's state.

    The index is also a buffer: compiled code reads it as data, so all layers share one graph."""

    def __init__(self, layer: int, device: torch.device):
        super().__init__()
        self.layer = layer
        self.register_buffer("layer_index", torch.tensor([layer], dtype=torch.long, device=device), persistent=False)
        self.state: IPBatchState | None = None
