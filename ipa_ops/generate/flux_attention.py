"""Batched IP attention for Flux's double-stream blocks: per-row tokens, scales and guidance in one batch.

diffusers' `FluxIPAdapterAttnProcessor` holds one scale list per adapter for the whole pipeline,
and the pipeline repeats the given image embeddings once per prompt, so in a batch of
different references every row attends to every row's images. This processor does what the
stock one does per block (query after its RMS norm and before RoPE, one softmax over an
adapter's image tokens, output added after the block's feed-forward residual), with everything
that varies per row read from the shared `IPBatchState` of `ip_state.py`: the
[rows, adapters, layers, steps] scale table, which image slots are real, and the step. IP keys
and values depend only on the image tokens, so they are projected at the first step of a call
and reused (`cache_kv`).

The transformer's forward pre-hook (`install`) settles the state before the first step and
swaps the pipeline's one distilled-guidance value for a per-row tensor, so rows with different
`guidance_scale` share a call. With true CFG each step runs the transformer twice, on the positive
and on the negative image embeddings; the K/V cache keeps the two passes apart.
"""

from __future__ import annotations

from typing import Any

import torch

from ipa_ops.generate.ip_state import IPBatchState, IPLayerProcessor


class FluxBatchedIPProcessor(IPLayerProcessor):
    """Flux double-block attention plus per-row IP attention (see module doc)."""

    def __init__(self, layer: int, to_k_ip: torch.nn.ModuleList, to_v_ip: torch.nn.ModuleList):
        super().__init__(layer, to_k_ip[0].weight.device)
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.pass_key = 0  # which pass of a step (true CFG: positive or negative embeddings), for the K/V cache

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: Any = None,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if ip_adapter_masks is not None:
            raise ValueError("region masks are not supported on Flux (its IP attention has no mask); drop the masks")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        ip_query = query  # the IP attention reads the image queries before RoPE, as XLabs trained it
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
        encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        joint = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        joint = joint.flatten(2, 3).to(query.dtype)
        text_len = encoder_hidden_states.shape[1]  # type: ignore[union-attr]
        context, image = joint[:, :text_len], joint[:, text_len:]
        image = attn.to_out[1](attn.to_out[0](image))
        context = attn.to_add_out(context)
        if ip_hidden_states is None or self.state is None:
            return image, context, torch.zeros_like(image)
        return image, context, self._ip_attention(attn, ip_query, ip_hidden_states)

    def _kv(self, adapter: int, tokens: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """IP keys and values [B, n*T, heads, head_dim]; projected once per call when caching."""
        state = self.state
        assert state is not None
        key = (adapter, id(self), self.pass_key) if state.cache_kv else None  # compiled: no cache, no id guards
        cached = state._kv.get(key) if key is not None else None
        if cached is not None:
            return cached
        flat = tokens.flatten(1, 2)  # [B, n, T, D] -> [B, n*T, D]
        kv = tuple(proj[adapter](flat).unflatten(-1, (-1, head_dim)) for proj in (self.to_k_ip, self.to_v_ip))
        if key is not None:
            state._kv[key] = kv  # type: ignore[index]
        return kv  # type: ignore[return-value]

    def _ip_attention(self, attn: Any, ip_query: torch.Tensor, ip_hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Sum over adapters of each row's scale times its IP attention output."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        state = self.state
        assert state is not None
        batch, queries = ip_query.shape[:2]
        total = torch.zeros(batch, queries, attn.heads * attn.head_dim, dtype=ip_query.dtype, device=ip_query.device)
        for adapter, tokens in enumerate(ip_hidden_states):
            if not state.attends(adapter, self.layer):
                continue
            scale = state.scales(adapter, self, batch, ip_query.dtype)
            ip_key, ip_value = self._kv(adapter, tokens, attn.head_dim)
            mask = None
            if state.general or state.padded[adapter]:  # padded image slots attend nothing
                valid = state.rows(state.token_valid[adapter], batch).repeat_interleave(tokens.shape[2], dim=1)
                mask = valid[:, None, None, :]
            out = dispatch_attention_fn(ip_query, ip_key, ip_value, attn_mask=mask, dropout_p=0.0, is_causal=False)
            total = total + scale[:, None, None] * out.flatten(2, 3).to(ip_query.dtype)
        return total


def install(transformer: Any) -> list[str]:
    """Swap the stock Flux IP processors for batched ones; the IP layer (double block) names in order."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    processors: dict[str, Any] = {}
    names: list[str] = []
    for name, proc in transformer.attn_processors.items():
        if isinstance(proc, FluxIPAdapterAttnProcessor):
            proc = FluxBatchedIPProcessor(len(names), proc.to_k_ip, proc.to_v_ip)
        if isinstance(proc, FluxBatchedIPProcessor):
            names.append(name)
        processors[name] = proc
    batched = [p for p in processors.values() if isinstance(p, FluxBatchedIPProcessor)]
    transformer.set_attn_processor(processors)  # (empties the dict)
    transformer._ipa_processors = batched
    _hook(transformer)
    return names


def _hook(transformer: Any) -> None:
    if getattr(transformer, "_ipa_prepare", None) is None:
        transformer._ipa_prepare = transformer.register_forward_pre_hook(_before_forward, with_kwargs=True)


def _before_forward(transformer: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Settle the bound call's IP state, tell the processors which pass this is, give each row its guidance."""
    state = getattr(transformer, "_ipa_state", None)
    if state is not None:
        state.prepare()
        # the pipeline hands the same embeddings list to every step of a pass (true CFG: a second list)
        embeds = (kwargs.get("joint_attention_kwargs") or {}).get("ip_adapter_image_embeds")
        for proc in getattr(transformer, "_ipa_processors", ()):
            proc.pass_key = id(embeds)
    guidance = getattr(transformer, "_ipa_guidance", None)
    if guidance is not None and kwargs.get("guidance") is not None:
        given = kwargs["guidance"]
        kwargs["guidance"] = guidance.to(given.device, given.dtype).repeat(given.shape[0] // guidance.shape[0])
    return args, kwargs


def set_guidance(transformer: Any, guidance: torch.Tensor | None) -> None:
    """Each row's distilled guidance for the next call ([rows]; None: the pipeline's one value)."""
    _hook(transformer)
    transformer._ipa_guidance = guidance


def bind(transformer: Any, state: IPBatchState | None) -> None:
    """Point the batched processors at one call's state (None: they add nothing)."""
    _hook(transformer)
    transformer._ipa_state = state
    for proc in getattr(transformer, "_ipa_processors", ()):
        proc.state = state
