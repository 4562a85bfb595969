"""SD3.5 in the zoo: stable-diffusion-3.5-large, InstantX's IP-Adapter and the SigLIP encoder it reads.

`InstantX/SD3.5-Large-IP-Adapter/ip-adapter.safetensors` holds `image_proj.*` (an
`IPAdapterTimeImageProjection`: SigLIP hidden states plus the timestep -> 64 tokens, depth 4, its
width a multiple of 64 since diffusers derives heads as `to_q.out // 64`) in InstantX's own key
names (`layers.<i>.0.norm1`, `layers.<i>.1.0`, ...; diffusers renames them on load) and
`ip_adapter.<i>.{norm_ip.linear,to_k_ip,to_v_ip}.*` per joint block (38 in SD3.5 Large).
`google/siglip-so400m-patch14-384` is a whole `SiglipModel` folder. The tiny SD3.5 pipeline keeps
the 38 joint blocks, 16 latent channels and the three text towers (CLIP-L and CLIP-G with
projections, T5), whose CLIP hidden sizes add up to the T5 width as in the real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import save_pretrained, save_safetensors, seed_for, torch_dtype, write_json
from .sizes import ZooSizes

INSTANTX_REPO = "InstantX/SD3.5-Large-IP-Adapter"
INSTANTX_WEIGHT = "ip-adapter.safetensors"
SIGLIP_REPO = "google/siglip-so400m-patch14-384"


@dataclass(frozen=True)
class SD3AdapterSizes:
    inner_dim: int  # SD3.5 Large: 38 heads x 64
    head_dim: int
    num_layers: int  # joint blocks
    siglip_hidden: int
    siglip_intermediate: int
    siglip_layers: int
    siglip_heads: int
    proj_hidden: int  # image projection width, a multiple of 64
    num_queries: int = 64
    timestep_in_dim: int = 320
    image_size: int = 384
    patch_size: int = 14


SD3_FULL = SD3AdapterSizes(2432, 64, 38, 1152, 4304, 27, 16, 1280)
SD3_TINY = SD3AdapterSizes(32, 16, 38, 36, 72, 2, 2, 64, num_queries=8, timestep_in_dim=32, image_size=28)
SD3_SIZES = {"tiny": SD3_TINY, "small": SD3_TINY, "full": SD3_FULL}

# diffusers' names for InstantX's resampler keys (the inverse of what `load_ip_adapter` renames)
_INSTANTX_NAMES = (
    ("ln0", "0.norm1"),
    ("ln1", "0.norm2"),
    ("attn.to_q", "0.to_q"),
    ("attn.to_kv", "0.to_kv"),
    ("attn.to_out.0", "0.to_out"),
    ("adaln_norm", "1.0"),
    ("ff.net.0.proj", "1.1"),
    ("ff.net.2", "1.3"),
    ("adaln_proj", "2.1"),
)


def _instantx_key(key: str) -> str:
    if not key.startswith("layers."):
        return key
    _, idx, rest = key.split(".", 2)
    for ours, theirs in _INSTANTX_NAMES:
        if rest.startswith(ours + "."):
            return f"layers.{idx}.{theirs}.{rest[len(ours) + 1 :]}"
    return key


def instantx_state_dict(s: SD3AdapterSizes, dtype: Any) -> dict[str, Any]:
    """The checkpoint's tensors in InstantX's layout, from diffusers' own modules at these sizes."""
    import torch
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed_for(INSTANTX_REPO))
    proj = IPAdapterTimeImageProjection(
        embed_dim=s.siglip_hidden, output_dim=s.inner_dim, hidden_dim=s.proj_hidden, heads=s.proj_hidden // 64,
        num_queries=s.num_queries, timestep_in_dim=s.timestep_in_dim,
    )  # fmt: skip
    out = {f"image_proj.{_instantx_key(k)}": v for k, v in proj.state_dict().items()}
    for i in range(s.num_layers):
        layer = SD3IPAdapterJointAttnProcessor2_0(s.inner_dim, s.inner_dim, s.head_dim, s.proj_hidden)
        out.update({f"ip_adapter.{i}.{k}": v for k, v in layer.state_dict().items()})
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def build_instantx(path: Path, sizes: ZooSizes) -> None:
    save_safetensors(path / INSTANTX_WEIGHT, instantx_state_dict(SD3_SIZES[sizes.name], torch_dtype(sizes.dtype)))


def siglip_config(s: SD3AdapterSizes) -> dict[str, Any]:
    vision = {
        "hidden_size": s.siglip_hidden, "intermediate_size": s.siglip_intermediate,
        "num_hidden_layers": s.siglip_layers, "num_attention_heads": s.siglip_heads,
        "image_size": s.image_size, "patch_size": s.patch_size,
    }  # fmt: skip
    text = {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    return {"text_config": {**text, "vocab_size": 256}, "vision_config": vision}


def build_siglip(path: Path, sizes: ZooSizes) -> None:
    """`google/siglip-so400m-patch14-384`: a SiglipModel and its preprocessor config."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    s = SD3_SIZES[sizes.name]
    torch.manual_seed(seed_for(SIGLIP_REPO))
    save_pretrained(SiglipModel(SiglipConfig(**siglip_config(s))), path, sizes.dtype)
    write_json(
        path / "preprocessor_config.json",
        {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": s.image_size, "width": s.image_size},
        },
    )  # fmt: skip


SD35_REPO = "stabilityai/stable-diffusion-3.5-large"


def sd35_transformer_config(s: SD3AdapterSizes, t5_dim: int, pooled: int) -> dict[str, Any]:
    """`transformer/config.json` of SD3.5 Large (38 joint blocks, RMS qk-norm, no dual attention)."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": s.head_dim,
        "caption_projection_dim": s.inner_dim,
        "dual_attention_layers": [],
        "in_channels": 16,
        "joint_attention_dim": t5_dim,
        "num_attention_heads": s.inner_dim // s.head_dim,
        "num_layers": s.num_layers,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": pooled,
        "pos_embed_max_size": 192 if s is SD3_FULL else 16,
        "qk_norm": "rms_norm",
        "sample_size": 128 if s is SD3_FULL else 8,
    }


def sd35_model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.31.0.dev0",
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def sd35_text_sizes(sizes: ZooSizes) -> tuple[Any, Any, Any]:
    """CLIP-L and CLIP-G (with projections) and T5 of the SD3.5 pipeline at `sizes`."""
    from .flux import flux_sizes
    from .sizes import TextSizes

    f = flux_sizes(sizes)
    full = SD3_SIZES[sizes.name] is SD3_FULL
    clip_l = TextSizes(768, 3072, 12, 12, projection_dim=768) if full else TextSizes(16, 32, 2, 2, projection_dim=16)
    clip_g = TextSizes(1280, 5120, 32, 20, 1280, "gelu") if full else TextSizes(16, 32, 2, 2, 16, "gelu")
    t5 = f.t5 if full else type(f.t5)(d_model=clip_l.hidden_size + clip_g.hidden_size, d_ff=64, d_kv=16,
                                       num_heads=2, num_layers=2, vocab_size=128)  # fmt: skip
    return clip_l, clip_g, t5


def sd35_config(sizes: ZooSizes) -> dict[str, Any]:
    """The zoo SD3.5 pipeline's `transformer/config.json` at `sizes`."""
    clip_l, clip_g, t5 = sd35_text_sizes(sizes)
    return sd35_transformer_config(SD3_SIZES[sizes.name], t5.d_model, clip_l.projection_dim + clip_g.projection_dim)


def build_sd35(path: Path, sizes: ZooSizes) -> None:
    """The SD3.5 Large pipeline folder: CLIP-L and CLIP-G (with projections), T5, 16-channel VAE."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .clip import build_text_encoder, write_tokenizer
    from .flux import flux_sizes, scheduler_config, t5_config, vae_config, write_t5_tokenizer

    f = flux_sizes(sizes)
    clip_l, clip_g, t5 = sd35_text_sizes(sizes)
    write_json(path / "model_index.json", sd35_model_index())
    write_json(path / "scheduler" / "scheduler_config.json", {**scheduler_config(schnell=True), "shift": 3.0})
    config = sd35_config(sizes)
    torch.manual_seed(seed_for(f"{SD35_REPO}/transformer"))
    model = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    save_pretrained(model, path / "transformer", sizes.dtype)
    vae = {**vae_config(f), "scaling_factor": 1.5305, "shift_factor": 0.0609}
    torch.manual_seed(seed_for(f"{SD35_REPO}/vae"))
    save_pretrained(AutoencoderKL(**{k: v for k, v in vae.items() if not k.startswith("_")}), path / "vae", sizes.dtype)
    build_text_encoder(path / "text_encoder", clip_l, sizes, f"{SD35_REPO}/text_encoder", with_projection=True)
    build_text_encoder(path / "text_encoder_2", clip_g, sizes, f"{SD35_REPO}/text_encoder_2", with_projection=True)
    write_tokenizer(path / "tokenizer", sizes)
    write_tokenizer(path / "tokenizer_2", sizes, pad_token="!")
    torch.manual_seed(seed_for(f"{SD35_REPO}/text_encoder_3"))
    save_pretrained(T5EncoderModel(T5Config(**t5_config(t5))), path / "text_encoder_3", sizes.dtype)
    write_t5_tokenizer(path / "tokenizer_3", t5.vocab_size)
