"""InstantX's SD3.5 IP-Adapter layout (the SD3 family's, `sd3.py`; kept apart so classification sees it first).

`image_proj.*` is an `IPAdapterTimeImageProjection` (SigLIP penultimate hidden states and the
timestep -> `latents.shape[1]` tokens) and `ip_adapter.<i>.{norm_ip.linear,to_k_ip,to_v_ip}` one IP
layer per joint block. Its keys also look like h94's (`image_proj.*`, `ip_adapter.*.to_k_ip`), so it
is recognised first (`norm_ip`, `time_embedding`), or it would be taken for a Plus adapter.
"""

from __future__ import annotations

from ipa_ops.generate.checkpoints import AdapterFacts


def is_instantx(shapes: dict[str, tuple[int, ...]]) -> bool:
    return "ip_adapter.0.norm_ip.linear.weight" in shapes or "image_proj.time_embedding.linear_1.weight" in shapes


def instantx_adapter_facts(shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
    """(kind `sd3`, IP width, joint blocks, SigLIP hidden size, tokens), or None in another layout."""
    if not is_instantx(shapes) or "ip_adapter.0.to_k_ip.weight" not in shapes:
        return None
    layers = sum(1 for k in shapes if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight"))
    cross = shapes["ip_adapter.0.to_k_ip.weight"][1]
    image_dim = shapes["image_proj.proj_in.weight"][1]
    tokens = shapes["image_proj.latents"][1]
    return AdapterFacts("sd3", cross, layers, image_dim, 0, tokens, family="sd3")
