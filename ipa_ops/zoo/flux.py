"""Flux in the zoo: FLUX.1-dev (and schnell's differences), XLabs' IP-Adapter and OpenAI's CLIP ViT-L/14.

Configs follow the real hub files; `FLUX_SIZES` shrinks widths only. The tiny transformer keeps
the 19 double-stream blocks (the XLabs checkpoint has one K/V pair per double block, and the
per-block presets address them), 16 latent channels and the packed 2x2 patches; it has 2 of
the 38 single-stream blocks (they carry no IP layers). The T5 tokenizer is a small Unigram
vocabulary written with `tokenizers` as `tokenizer.json` (transformers reads it without
sentencepiece); CLIP-L is a whole `CLIPModel` folder, `projection_dim` also inside
`vision_config`, so `CLIPVisionModelWithProjection.from_pretrained` reads the real width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clip import build_text_encoder, image_processor_config, text_config, vision_config, write_tokenizer
from .common import save_pretrained, save_safetensors, seed_for, write_json, write_text
from .sizes import TextSizes, VisionSizes, ZooSizes

FLUX_REPO = "black-forest-labs/FLUX.1-dev"
XLABS_REPO = "XLabs-AI/flux-ip-adapter"
CLIP_L_REPO = "openai/clip-vit-large-patch14"
XLABS_WEIGHT = "ip_adapter.safetensors"
IP_TOKENS = 4  # XLabs' ImageProjModel: pooled CLIP-L embedding -> 4 tokens


@dataclass(frozen=True)
class T5Sizes:
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    vocab_size: int = 32128


@dataclass(frozen=True)
class FluxSizes:
    """Widths of the Flux transformer and what feeds it (text towers, VAE, CLIP-L vision)."""

    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    num_single_layers: int
    t5: T5Sizes
    clip_l_text: TextSizes
    clip_l_vision: VisionSizes
    vae_block_out_channels: tuple[int, ...]
    vae_norm_num_groups: int
    num_layers: int = 19
    latent_channels: int = 16

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


FLUX_FULL = FluxSizes(
    num_attention_heads=24,
    attention_head_dim=128,
    axes_dims_rope=(16, 56, 56),
    num_single_layers=38,
    t5=T5Sizes(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24),
    clip_l_text=TextSizes(768, 3072, 12, 12, projection_dim=768),
    clip_l_vision=VisionSizes(1024, 4096, 24, 16, projection_dim=768),
    vae_block_out_channels=(128, 256, 512, 512),
    vae_norm_num_groups=32,
)

FLUX_TINY = FluxSizes(
    num_attention_heads=2,
    attention_head_dim=8,
    axes_dims_rope=(2, 2, 4),
    num_single_layers=2,
    t5=T5Sizes(d_model=24, d_ff=48, d_kv=12, num_heads=2, num_layers=2, vocab_size=128),
    clip_l_text=TextSizes(32, 64, 2, 2, projection_dim=28),
    clip_l_vision=VisionSizes(32, 64, 2, 2, projection_dim=28),
    vae_block_out_channels=(8, 16, 16, 16),
    vae_norm_num_groups=4,
)

# small: a wider transformer so its compute dominates a CPU benchmark (text towers stay tiny)
FLUX_SMALL = FluxSizes(
    num_attention_heads=4,
    attention_head_dim=32,
    axes_dims_rope=(8, 12, 12),
    num_single_layers=4,
    t5=FLUX_TINY.t5,
    clip_l_text=FLUX_TINY.clip_l_text,
    clip_l_vision=FLUX_TINY.clip_l_vision,
    vae_block_out_channels=FLUX_TINY.vae_block_out_channels,
    vae_norm_num_groups=FLUX_TINY.vae_norm_num_groups,
)

FLUX_SIZES = {"tiny": FLUX_TINY, "small": FLUX_SMALL, "full": FLUX_FULL}

_T5_WORDS = (
    "a photo of cat dog sitting on the chair in garden portrait woman with red hair high quality detailed "
    "painting mountain landscape at sunset astronaut riding horse moon best masterpiece running beach oil "
    "watercolor digital art city street night neon lights bowl fruit wooden table anime style cinematic"
).split()


def flux_sizes(sizes: ZooSizes) -> FluxSizes:
    return FLUX_SIZES[sizes.name]


def transformer_config(f: FluxSizes, guidance_embeds: bool = True) -> dict[str, Any]:
    """`transformer/config.json` of FLUX.1-dev (schnell: `guidance_embeds` false)."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": f.attention_head_dim,
        "axes_dims_rope": list(f.axes_dims_rope),
        "guidance_embeds": guidance_embeds,
        "in_channels": 4 * f.latent_channels,
        "joint_attention_dim": f.t5.d_model,
        "num_attention_heads": f.num_attention_heads,
        "num_layers": f.num_layers,
        "num_single_layers": f.num_single_layers,
        "patch_size": 1,
        "pooled_projection_dim": f.clip_l_text.hidden_size,
    }


def vae_config(f: FluxSizes) -> dict[str, Any]:
    blocks = len(f.vae_block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(f.vae_block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": f.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": f.vae_norm_num_groups,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


def scheduler_config(schnell: bool = False) -> dict[str, Any]:
    """`scheduler/scheduler_config.json`: dev shifts with the resolution, schnell does not."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0 if schnell else 3.0,
        "use_dynamic_shifting": not schnell,
    }


def model_index() -> dict[str, Any]:
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def t5_config(t: T5Sizes) -> dict[str, Any]:
    """google/t5-v1_1-xxl's encoder config, as FLUX.1-dev's `text_encoder_2/config.json`."""
    return {
        "architectures": ["T5EncoderModel"],
        "d_ff": t.d_ff,
        "d_kv": t.d_kv,
        "d_model": t.d_model,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": t.num_layers,
        "num_heads": t.num_heads,
        "num_layers": t.num_layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "vocab_size": t.vocab_size,
    }


def write_t5_tokenizer(path: Path, vocab_size: int) -> None:
    """A T5 Unigram tokenizer (`<pad>`, `</s>`, `<unk>`, then `▁`-prefixed words and letters)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>"]
    for piece in [f"▁{w}" for w in _T5_WORDS] + [f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
        "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    ):
        if piece not in pieces:
            pieces.append(piece)
    pieces = pieces[:vocab_size]
    vocab = [(p, 0.0 if i < 3 else -1.0 - len(p) / 10) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" {2,}", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    path.mkdir(parents=True, exist_ok=True)
    write_text(path / "tokenizer.json", json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n")
    write_json(path / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    write_json(
        path / "tokenizer_config.json",
        {
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": 0,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )


def build_flux(path: Path, sizes: ZooSizes, schnell: bool = False) -> None:
    """The FLUX.1-dev pipeline folder (schnell: no guidance embedding, no dynamic shift)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    f = flux_sizes(sizes)
    write_json(path / "model_index.json", model_index())
    write_json(path / "scheduler" / "scheduler_config.json", scheduler_config(schnell))
    torch.manual_seed(seed_for(f"{FLUX_REPO}/transformer"))
    transformer = FluxTransformer2DModel(**_init_args(transformer_config(f, guidance_embeds=not schnell)))
    save_pretrained(transformer, path / "transformer", sizes.dtype)
    torch.manual_seed(seed_for(f"{FLUX_REPO}/vae"))
    save_pretrained(AutoencoderKL(**_init_args(vae_config(f))), path / "vae", sizes.dtype)
    build_text_encoder(path / "text_encoder", f.clip_l_text, sizes, f"{FLUX_REPO}/text_encoder", with_projection=False)
    write_tokenizer(path / "tokenizer", sizes)
    torch.manual_seed(seed_for(f"{FLUX_REPO}/text_encoder_2"))
    save_pretrained(T5EncoderModel(T5Config(**t5_config(f.t5))), path / "text_encoder_2", sizes.dtype)
    write_t5_tokenizer(path / "tokenizer_2", f.t5.vocab_size)


def _init_args(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def xlabs_state_dict(f: FluxSizes, dtype: Any, seed_name: str = XLABS_REPO) -> dict[str, Any]:
    """XLabs' `ip_adapter.safetensors` keys: the image projection and K/V per double-stream block."""
    import torch

    g = torch.Generator().manual_seed(seed_for(seed_name))

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)

    def bias(n: int) -> torch.Tensor:
        return (torch.randn(n, generator=g) * 0.02).to(dtype)

    joint, image = f.t5.d_model, f.clip_l_vision.projection_dim
    out = {
        "ip_adapter_proj_model.proj.weight": linear(IP_TOKENS * joint, image),
        "ip_adapter_proj_model.proj.bias": bias(IP_TOKENS * joint),
        "ip_adapter_proj_model.norm.weight": torch.ones(joint, dtype=dtype),
        "ip_adapter_proj_model.norm.bias": torch.zeros(joint, dtype=dtype),
    }
    for i in range(f.num_layers):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            out[f"{prefix}.weight"] = linear(f.inner_dim, joint)
            out[f"{prefix}.bias"] = bias(f.inner_dim)
    return out


def build_xlabs(path: Path, sizes: ZooSizes) -> None:
    """`XLabs-AI/flux-ip-adapter`: `ip_adapter.safetensors` at the repository root."""
    from .common import torch_dtype

    save_safetensors(path / XLABS_WEIGHT, xlabs_state_dict(flux_sizes(sizes), torch_dtype(sizes.dtype)))


def clip_l_config(f: FluxSizes, sizes: ZooSizes) -> dict[str, Any]:
    vision = vision_config(f.clip_l_vision)
    vision["hidden_act"] = "quick_gelu"
    return {
        "text_config": text_config(f.clip_l_text, sizes),
        "vision_config": vision,  # projection_dim inside too: CLIPVisionModelWithProjection reads it there
        "projection_dim": f.clip_l_vision.projection_dim,
        "logit_scale_init_value": 2.6592,
    }


def build_clip_l(path: Path, sizes: ZooSizes) -> None:
    """`openai/clip-vit-large-patch14`: a whole CLIPModel, its tokenizer and preprocessor config."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    f = flux_sizes(sizes)
    torch.manual_seed(seed_for(CLIP_L_REPO))
    save_pretrained(CLIPModel(CLIPConfig(**clip_l_config(f, sizes))), path, sizes.dtype)
    write_tokenizer(path, sizes)
    write_json(path / "preprocessor_config.json", image_processor_config(f.clip_l_vision.image_size))


def configs(sizes: ZooSizes) -> dict[str, dict[str, Any]]:
    """Config dicts of the Flux repositories, for dry runs (`full` builds nothing)."""
    f = flux_sizes(sizes)
    return {
        "flux-dev/transformer": transformer_config(f),
        "flux-schnell/transformer": transformer_config(f, guidance_embeds=False),
        "flux/vae": vae_config(f),
        "flux/text_encoder_2": t5_config(f.t5),
        "flux-dev/scheduler": scheduler_config(),
        "flux-schnell/scheduler": scheduler_config(schnell=True),
        "clip-l": clip_l_config(f, sizes),
    }


def xlabs_shapes(sizes: ZooSizes) -> dict[str, list[int]]:
    """The XLabs checkpoint's tensor shapes at this size, without allocating weights."""
    f = flux_sizes(sizes)
    joint, image = f.t5.d_model, f.clip_l_vision.projection_dim
    out = {
        "ip_adapter_proj_model.proj.weight": [IP_TOKENS * joint, image],
        "ip_adapter_proj_model.proj.bias": [IP_TOKENS * joint],
        "ip_adapter_proj_model.norm.weight": [joint],
        "ip_adapter_proj_model.norm.bias": [joint],
    }
    for i in range(f.num_layers):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            out[f"{prefix}.weight"] = [f.inner_dim, joint]
            out[f"{prefix}.bias"] = [f.inner_dim]
    return out
