"""Batched IP attention for SD3.5's joint blocks (InstantX's adapter): per-row scales in one batch.

diffusers' `SD3IPAdapterJointAttnProcessor2_0` holds one scale for the whole pipeline (and fails on
a tensor scale: `if self.scale != 0`). This processor computes the same per block: the joint
attention unchanged, then the IP tokens AdaLN-normed on the image projection's timestep embedding,
the block's image queries (its own RMS norm, not the block's) attending to the image keys and the
IP keys together, and that output added to the image stream times each row's scale before the
output projection. The IP tokens come from `IPAdapterTimeImageProjection`, which reads the
timestep: they change every step, so nothing is cached across steps. Per-row, per-layer, per-step
scales come from `ip_state.IPBatchState`; a pre-hook on the transformer settles it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ipa_ops.generate.ip_state import IPBatchState, IPLayerProcessor


class SD3BatchedIPProcessor(IPLayerProcessor):
    """One joint block's attention with per-row IP scales (see module doc)."""

    def __init__(self, layer: int, stock: Any):
        super().__init__(layer, stock.to_k_ip.weight.device)
        self.norm_ip, self.to_k_ip, self.to_v_ip = stock.norm_ip, stock.to_k_ip, stock.to_v_ip
        self.norm_q, self.norm_k, self.norm_ip_k = stock.norm_q, stock.norm_k, stock.norm_ip_k

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> Any:
        image_len, heads = hidden_states.shape[1], attn.heads
        img_query = self._heads(attn.to_q(hidden_states), heads)
        img_key = self._heads(attn.to_k(hidden_states), heads)
        img_value = self._heads(attn.to_v(hidden_states), heads)
        query = attn.norm_q(img_query) if attn.norm_q is not None else img_query
        key = attn.norm_k(img_key) if attn.norm_k is not None else img_key
        value = img_value
        if encoder_hidden_states is not None:
            ctx_q = self._heads(attn.add_q_proj(encoder_hidden_states), heads)
            ctx_k = self._heads(attn.add_k_proj(encoder_hidden_states), heads)
            ctx_v = self._heads(attn.add_v_proj(encoder_hidden_states), heads)
            ctx_q = attn.norm_added_q(ctx_q) if attn.norm_added_q is not None else ctx_q
            ctx_k = attn.norm_added_k(ctx_k) if attn.norm_added_k is not None else ctx_k
            query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, ctx_q), (key, ctx_k), (value, ctx_v)))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1]).to(query.dtype)
        image, context = out[:, :image_len], out[:, image_len:]
        if encoder_hidden_states is not None and not attn.context_pre_only:
            context = attn.to_add_out(context)
        state = self.state
        if ip_hidden_states is not None and state is not None and state.attends(0, self.layer):
            scale = state.scales(0, self, image.shape[0], image.dtype)
            tokens = self.norm_ip(ip_hidden_states, temb=temb)
            ip_key = self.norm_ip_k(self._heads(self.to_k_ip(tokens), heads))
            ip_value = self._heads(self.to_v_ip(tokens), heads)
            both_k, both_v = torch.cat([self.norm_k(img_key), ip_key], dim=2), torch.cat([img_value, ip_value], dim=2)
            ip = F.scaled_dot_product_attention(self.norm_q(img_query), both_k, both_v, dropout_p=0.0, is_causal=False)
            ip = ip.transpose(1, 2).reshape(image.shape).to(image.dtype)
            image = image + scale[:, None, None] * ip
        image = attn.to_out[1](attn.to_out[0](image))
        return (image, context) if encoder_hidden_states is not None else image


def install(transformer: Any) -> list[str]:
    """Swap the stock SD3 IP processors for batched ones; the IP layer (joint block) names in order."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    processors: dict[str, Any] = {}
    names: list[str] = []
    for name, proc in transformer.attn_processors.items():
        if isinstance(proc, SD3IPAdapterJointAttnProcessor2_0):
            proc = SD3BatchedIPProcessor(len(names), proc)
        if isinstance(proc, SD3BatchedIPProcessor):
            names.append(name)
        processors[name] = proc
    batched = [p for p in processors.values() if isinstance(p, SD3BatchedIPProcessor)]
    transformer.set_attn_processor(processors)  # (empties the dict)
    transformer._ipa_processors = batched
    if getattr(transformer, "_ipa_prepare", None) is None:
        transformer._ipa_prepare = transformer.register_forward_pre_hook(_prepare_state)
    return names


def _prepare_state(transformer: Any, args: Any) -> None:
    state = getattr(transformer, "_ipa_state", None)
    if state is not None:
        state.prepare()


def bind(transformer: Any, state: IPBatchState | None) -> None:
    """Point the batched processors at one call's state (None: they add nothing)."""
    transformer._ipa_state = state
    for proc in getattr(transformer, "_ipa_processors", ()):
        proc.state = state
