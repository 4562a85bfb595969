"""Batched IP-Adapter attention: per-sample IP tokens, scales and masks in one UNet batch.

diffusers' `IPAdapterAttnProcessor2_0` holds one scale per adapter for the whole pipeline and
expects every sample to use the same number of reference images. This processor computes the
same thing per sample instead, reading everything that varies from a shared `IPBatchState`
(`ip_state.py`):

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

import functools
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ipa_ops.generate.ip_state import IPBatchState, IPLayerProcessor


class BatchedIPAttnProcessor(IPLayerProcessor):
    """IP-Adapter cross-attention with per-sample tokens, scales and masks (see module doc)."""

    def __init__(self, layer: int, to_k_ip: torch.nn.ModuleList, to_v_ip: torch.nn.ModuleList):
        super().__init__(layer, to_k_ip[0].weight.device)
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip

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
        if encoder_hidden_states is None:  # self-attention
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        elif self.state is not None:
            key, value = self.state.text_kv(self.layer, encoder_hidden_states, lambda c: _text_projection(attn, c))
        else:
            key, value = _text_projection(attn, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if ip_hidden_states is not None and self.state is not None:
            hidden_states = self._ip_attention(attn, query, ip_hidden_states, head_dim, hidden_states)

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
        self,
        attn: Attention,
        query: torch.Tensor,
        ip_hidden_states: list[torch.Tensor],
        head_dim: int,
        hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """`hidden_states` plus, per application, each sample's scale times its IP attention output.

        Eager runs add into `hidden_states` in place, sample subsets with `index_add_`."""
        state = self.state
        assert state is not None
        batch = query.shape[0]
        for adapter, projection, tokens in state.applications(ip_hidden_states):
            if not state.attends(adapter, self.layer):  # eager: a host flag settled before the loop
                continue
            scale = state.scales(adapter, self, batch, query.dtype)
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
            n_tokens = ip_key.shape[2]
            regional_rows = state.masks[adapter] is not None  # a shape fact: some row of the call has masks
            if state.general:  # every sample through both paths, chosen by torch.where: one graph
                valid = state.rows(state.token_valid[adapter], batch).repeat_interleave(n_tokens, dim=1)
                out = self._joint_attention(attn, query, ip_key, ip_value, valid, factors, head_dim)
                if regional_rows:
                    assert state.masked is not None
                    masked = state.rows(state.masked[:, adapter], batch)
                    regional = self._masked_attention(attn, query, ip_key, ip_value, adapter, None, head_dim, factors)
                    out = torch.where(masked[:, None, None], regional, out)
                hidden_states = hidden_states + scale[:, None, None] * out
                continue
            for regional in (False, True) if regional_rows and state.any_masked[adapter] else (False,):
                index = state.samples(adapter, self.layer, batch, regional)  # each sample through its row's path
                if index is not None and index.numel() == 0:
                    continue
                pick = _picker(index)
                part_factors = None if factors is None else [pick(f) for f in factors]
                q, k, v = pick(query), pick(ip_key), pick(ip_value)
                if regional:
                    part = self._masked_attention(attn, q, k, v, adapter, index, head_dim, part_factors, batch)
                else:
                    slots, padded = state.joint_slots(adapter, self.layer)
                    k, v = k[:, :slots], v[:, :slots]
                    valid = None
                    if padded:
                        valid = pick(state.rows(state.token_valid[adapter][:, :slots], batch))
                        valid = valid.repeat_interleave(n_tokens, dim=1)
                    part = self._joint_attention(attn, q, k, v, valid, part_factors, head_dim)
                part = part * pick(scale)[:, None, None]
                if index is None:
                    hidden_states += part
                else:
                    hidden_states.index_add_(0, index, part)
        return hidden_states

    def _joint_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        ip_key: torch.Tensor,
        ip_value: torch.Tensor,
        valid: torch.Tensor | None,
        factors: list[torch.Tensor] | None,
        head_dim: int,
    ) -> torch.Tensor:
        """One softmax over all of a sample's image tokens (diffusers' concat behaviour); padded slots
        (`valid` False) attend nothing."""
        batch = query.shape[0]
        keys = ip_key.reshape(batch, -1, ip_key.shape[-1])
        values = ip_value.reshape(batch, -1, ip_value.shape[-1])
        if factors is not None:
            keys, values = _scaled(keys, values, factors, valid)
        keys = keys.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        values = values.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        token_mask = None if valid is None else valid[:, None, None, :]
        joint = F.scaled_dot_product_attention(query, keys, values, attn_mask=token_mask)
        return joint.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

    def _masked_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        ip_key: torch.Tensor,
        ip_value: torch.Tensor,
        adapter: int,
        index: torch.Tensor | None,
        head_dim: int,
        factors: list[torch.Tensor] | None = None,
        full_batch: int | None = None,
    ) -> torch.Tensor:
        """Each image attended alone and weighted by its region mask (diffusers' masked path), for the
        samples `index` picks from a batch of `full_batch` (all when None); embeds scaling, when some
        row uses it, scales each image's keys and values (its own token mean)."""
        state = self.state
        assert state is not None
        batch = query.shape[0]
        out = None
        for i in range(ip_key.shape[1]):
            keys, values = ip_key[:, i], ip_value[:, i]
            if factors is not None:
                keys, values = _scaled(keys, values, factors, None)
            keys = keys.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
            values = values.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
            part = F.scaled_dot_product_attention(query, keys, values)
            part = part.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            weight = _picker(index)(state.mask_weight(adapter, i, full_batch or batch, part.shape[1]))
            part = part * weight.to(dtype=query.dtype, device=query.device)
            out = part if out is None else out + part
        assert out is not None
        return out


def _text_projection(attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the text tokens, as diffusers' processor makes them."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def _picker(index: torch.Tensor | None) -> Any:
    """tensor -> its samples at `index` (dim 0), or itself when `index` is None (every sample)."""
    return (lambda t: t) if index is None else (lambda t: t.index_select(0, index))


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
    projection = getattr(unet, "encoder_hid_proj", None)
    if names and projection is not None and "_ipa_project" not in projection.__dict__:
        # diffusers projects the image embeddings at every step; the bound state projects them once a call
        projection._ipa_project = projection.forward
        projection.forward = functools.partial(_project_once, unet, projection._ipa_project)
    return names


def _project_once(unet: Any, project: Any, image_embeds: Any) -> Any:
    state = getattr(unet, "_ipa_state", None)
    if state is None or not isinstance(image_embeds, list):
        return project(image_embeds)
    return state.projection(image_embeds, project)


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
