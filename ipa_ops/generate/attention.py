"""Batched IP-Adapter attention: per-sample IP tokens, scales and masks in one UNet batch.

diffusers' `IPAdapterAttnProcessor2_0` holds one scale per adapter for the whole pipeline and
expects every sample to use the same number of reference images. This processor computes the
same thing per sample instead, reading everything that varies from a shared `IPBatchState`:

- `scales(adapter, layer)`: one scale per sample for this layer at the current step, from a
  [rows, adapters, layers, steps] table settled before the first step (`prepare`);
- `token_valid[adapter]`: [B, n_images] which image slots are real (others are padding);
- `masks[adapter]`: [B, n_images, H, W] region masks, used for rows whose `masked` flag is set.

- `uncond_image`: [B, A, L] where a ComfyUI "precise" weight type puts the row's image on the
  unconditional side at a layer (its conditional side then adds nothing there);
- `embeds_scaling`: [B, A] ComfyUI's embeds scaling per row (`V only`, `K+V`, `K+V w/ C penalty`,
  `K+mean(V) w/ C penalty`), applied to the cached keys and values, so projections still run once.
- `sources`: when a row lists one adapter several times (ComfyUI's regional conditioning), the A
  axis counts applications, not adapters: application i attends images [start, stop) of adapter
  `sources[i][0]`'s tokens with its own scales, masks and flags, through that adapter's projections.

For a sample with no masks the adapter's images are attended jointly (one softmax over all
their tokens, diffusers' concat behaviour); with masks each image is attended separately and
weighted by its downsampled mask, as diffusers does when `ip_adapter_masks` is given.
The IP keys and values depend only on the IP tokens, so they are computed at the first step of
a pipeline call and reused for every later step (`cache_kv`), and the unconditional half, whose
tokens are the same for every row of an adapter, is projected once rather than once per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention


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
    _kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _distinct: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)

    def prepare(self) -> None:
        """Resolve the step profile and every per-call decision; once per call (idempotent)."""
        if self.table is not None:
            return
        device = self.device
        self.step_scales = self.resolve_steps(self.num_steps())
        table = self.layer_scales[..., None] * self.step_scales[:, :, None, :]
        masked = self.masked if self.masked is not None else torch.zeros(table.shape[:2], dtype=torch.bool)
        self.active = (table != 0).any(dim=0).tolist()
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
        self.uncond_image = self.uncond_image.to(device)
        self.embeds_scaling = self.embeds_scaling.to(device)
        self.table = table.to(device)
        self.masked = masked.to(device)
        self.token_valid = [v.to(device) for v in self.token_valid]
        self.masks = [m.to(device) if m is not None else None for m in self.masks]
        self.step_index = self.step_index.to(device)
        if self.general:  # nothing cached across steps: the graph must not depend on a Python dict
            self.cache_kv = False

    def scales(self, adapter: int, layer: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch] scales for this adapter and layer at the current step (CFG halves repeated).

        Layer and step are tensors, not Python ints, so a compiled block serves every layer and step."""
        assert self.table is not None, "IPBatchState.prepare() runs before the first UNet step"
        per_row = self.table[:, adapter].index_select(1, layer).index_select(2, self.step_index)[:, 0, 0]
        return per_row.repeat(batch // per_row.shape[0])

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

    def rows(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """Repeat a per-row tensor over the CFG halves of a UNet batch."""
        return tensor.repeat((batch // tensor.shape[0],) + (1,) * (tensor.ndim - 1))


EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")  # ComfyUI's names


class StepCounter:
    """`callback_on_step_end` that tells the attention which denoising step comes next."""

    tensor_inputs: list[str] = []

    def __init__(self, state: IPBatchState):
        self.state = state

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.state.advance(step_index)
        return callback_kwargs


class BatchedIPAttnProcessor(torch.nn.Module):
    """IP-Adapter cross-attention with per-sample tokens, scales and masks (see module doc)."""

    def __init__(self, layer: int, to_k_ip: torch.nn.ModuleList, to_v_ip: torch.nn.ModuleList):
        super().__init__()
        self.layer = layer
        # the same index as a tensor: compiled code reads it as data, so all layers share one graph
        device = to_k_ip[0].weight.device
        self.register_buffer("layer_index", torch.tensor([layer], dtype=torch.long, device=device), persistent=False)
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.state: IPBatchState | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if ip_hidden_states is not None and self.state is not None:
            hidden_states = hidden_states + self._ip_attention(attn, query, ip_hidden_states, head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _kv(self, slot: int, adapter: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IP keys and values [B, n, T, inner] of one application; computed once per pipeline call when caching."""
        state = self.state
        assert state is not None
        if state.cache_kv and (slot, id(self)) in state._kv:
            return state._kv[(slot, id(self))]
        distinct = state.distinct(slot, tokens) if state.cache_kv else None
        if distinct is None:
            kv = self.to_k_ip[adapter](tokens), self.to_v_ip[adapter](tokens)
        else:  # the shared negative once, then every row's own tokens; expanded back to the full batch
            keep, back = distinct
            unique = tokens.index_select(0, keep)
            key, value = (proj[adapter](unique).index_select(0, back) for proj in (self.to_k_ip, self.to_v_ip))
            kv = key, value
        if state.cache_kv:
            state._kv[(slot, id(self))] = kv
        return kv

    def _ip_attention(
        self, attn: Attention, query: torch.Tensor, ip_hidden_states: list[torch.Tensor], head_dim: int
    ) -> torch.Tensor:
        """Sum over adapters of scale * IP attention output, per sample."""
        state = self.state
        assert state is not None
        batch, _, queries, _ = query.shape
        total = torch.zeros(batch, queries, attn.heads * head_dim, dtype=query.dtype, device=query.device)
        for adapter, projection, tokens in state.applications(ip_hidden_states):
            if not state.attends(adapter, self.layer):  # eager: a host flag settled before the loop
                continue
            scale = state.scales(adapter, self.layer_index, batch).to(query.dtype)
            if tokens.ndim == 3:  # [B, n*T, C] projections without an image axis
                tokens = tokens.unsqueeze(1)
            ip_key, ip_value = self._kv(adapter, projection, tokens)
            keep = None
            if state.general or state.any_uncond[adapter]:
                ip_key, ip_value, keep = state.precise(adapter, self.layer_index, ip_key, ip_value)
            factors = None
            if state.general or state.any_scaling[adapter]:
                *factors, scale = state.kv_scaling(adapter, scale, ip_key.shape[-1])
            if keep is not None:
                scale = scale * keep
            n_images, n_tokens = ip_key.shape[1], ip_key.shape[2]
            regional_rows = state.masks[adapter] is not None  # a shape fact: some row of the call has masks
            out = torch.zeros_like(total)
            if state.general or not state.all_masked[adapter]:
                keys = ip_key.reshape(batch, n_images * n_tokens, -1)
                values = ip_value.reshape(batch, n_images * n_tokens, -1)
                token_mask = valid = None
                if state.general or state.padded[adapter]:
                    valid = state.rows(state.token_valid[adapter], batch).repeat_interleave(n_tokens, dim=1)
                    token_mask = valid[:, None, None, :]
                if factors is not None:
                    keys, values = _scaled(keys, values, factors, valid)
                keys = keys.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
                values = values.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
                joint = F.scaled_dot_product_attention(query, keys, values, attn_mask=token_mask)
                out = joint.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            if regional_rows and (state.general or state.any_masked[adapter]):
                assert state.masked is not None
                masked = state.rows(state.masked[:, adapter], batch)
                regional = self._masked_attention(attn, query, ip_key, ip_value, adapter, batch, head_dim, factors)
                out = torch.where(masked[:, None, None], regional, out)
            total = total + scale[:, None, None] * out
        return total

    def _masked_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        ip_key: torch.Tensor,
        ip_value: torch.Tensor,
        adapter: int,
        batch: int,
        head_dim: int,
        factors: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Each image attended alone and weighted by its region mask (diffusers' masked path); embeds
        scaling, when some row uses it, scales each image's keys and values (its own token mean)."""
        state = self.state
        assert state is not None
        masks = state.masks[adapter]
        assert masks is not None
        masks = state.rows(masks, batch)  # [batch, n, H, W]
        out = None
        for i in range(ip_key.shape[1]):
            keys, values = ip_key[:, i], ip_value[:, i]
            if factors is not None:
                keys, values = _scaled(keys, values, factors, None)
            keys = keys.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
            values = values.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
            part = F.scaled_dot_product_attention(query, keys, values)
            part = part.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            weight = IPAdapterMaskProcessor.downsample(masks[:, i], batch, part.shape[1], 1)
            part = part * weight.to(dtype=query.dtype, device=query.device)
            out = part if out is None else out + part
        assert out is not None
        return out


def _scaled(
    keys: torch.Tensor, values: torch.Tensor, factors: list[torch.Tensor], valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, tokens, inner] keys and values under per-sample embeds-scaling factors (`kv_scaling`).

    The values' mean is over the sample's real tokens (padding slots excluded), as the row alone has them."""
    key, value, mean_factor = (f.to(values.dtype)[:, None, None] for f in factors)
    if valid is None:
        mean = values.mean(dim=1, keepdim=True)
    else:
        weight = valid.to(values.dtype)[..., None]
        mean = (values * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1)
    return keys * key, values * value + mean * mean_factor


def install(unet: Any) -> list[str]:
    """Swap diffusers' IP-Adapter processors for batched ones; returns the IP layer names in order."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    processors = {}
    names: list[str] = []
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            processors[name] = BatchedIPAttnProcessor(len(names), proc.to_k_ip, proc.to_v_ip)
            names.append(name)
        elif isinstance(proc, BatchedIPAttnProcessor):
            names.append(name)
            processors[name] = proc
        else:
            processors[name] = proc
    # bind() runs twice per call: walking every module's processor each time costs ms per call
    batched = [p for p in processors.values() if isinstance(p, BatchedIPAttnProcessor)]
    unet.set_attn_processor(processors)  # (empties the dict)
    unet._ipa_processors = batched
    if names and getattr(unet, "_ipa_prepare", None) is None:
        unet._ipa_prepare = unet.register_forward_pre_hook(_prepare_state)
    return names


def _prepare_state(unet: Any, args: Any) -> None:
    """UNet forward pre-hook: settle the bound call's state before its first step (eager, outside compile)."""
    state = getattr(unet, "_ipa_state", None)
    if state is not None:
        state.prepare()


def bind(unet: Any, state: IPBatchState | None) -> None:
    """Point every batched processor at this call's state (None: IP layers contribute nothing)."""
    unet._ipa_state = state
    for proc in getattr(unet, "_ipa_processors", ()):
        proc.state = state
