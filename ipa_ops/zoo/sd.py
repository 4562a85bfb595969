"""Stable Diffusion pipeline folders (SD1.5, SDXL base) in the exact diffusers layout.

Block types, layer counts and flags come from the real ``config.json`` files, widths from
``sizes.py``; so module paths such as ``down_blocks.2.attentions.1`` (what diffusers' layer
scales call ``down.block_2``) exist exactly as in the real models. The safety checker is left
out (``null`` in ``model_index.json``, ``requires_safety_checker: false``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clip import build_text_encoder, image_processor_config, write_tokenizer
from .common import save_pretrained, seed_for, write_json
from .sizes import UNetSizes, VaeSizes, ZooSizes

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

_SD15_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD15_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]


def _tuple_or_int(value: int | tuple[int, ...]) -> int | list[int]:
    return list(value) if isinstance(value, tuple) else value


def sd15_unet_config(u: UNetSizes) -> dict[str, Any]:
    """``unet/config.json`` of SD1.5 with the given widths."""
    return {
        "act_fn": "silu",
        "attention_head_dim": _tuple_or_int(u.attention_head_dim),
        "block_out_channels": list(u.block_out_channels),
        "center_input_sample": False,
        "cross_attention_dim": u.cross_attention_dim,
        "down_block_types": list(_SD15_DOWN),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": u.norm_num_groups,
        "out_channels": 4,
        "sample_size": u.sample_size,
        "up_block_types": list(_SD15_UP),
    }


def sdxl_unet_config(u: UNetSizes) -> dict[str, Any]:
    """``unet/config.json`` of SDXL base with the given widths."""
    return {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": u.addition_time_embed_dim,
        "attention_head_dim": _tuple_or_int(u.attention_head_dim),
        "block_out_channels": list(u.block_out_channels),
        "center_input_sample": False,
        "cross_attention_dim": u.cross_attention_dim,
        "down_block_types": list(_SDXL_DOWN),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": u.layers_per_block,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": u.norm_num_groups,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": u.projection_class_embeddings_input_dim,
        "sample_size": u.sample_size,
        "transformer_layers_per_block": _tuple_or_int(u.transformer_layers_per_block),
        "up_block_types": list(_SDXL_UP),
        "use_linear_projection": True,
    }


def vae_config(v: VaeSizes, sdxl: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "act_fn": "silu",
        "block_out_channels": list(v.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(v.block_out_channels),
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": v.layers_per_block,
        "norm_num_groups": v.norm_num_groups,
        "out_channels": 3,
        "sample_size": v.sample_size,
        "up_block_types": ["UpDecoderBlock2D"] * len(v.block_out_channels),
    }
    if sdxl:
        config.update(scaling_factor=0.13025, force_upcast=True)
    return config


def pndm_scheduler_config() -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of SD1.5."""
    return {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }


def euler_scheduler_config() -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of SDXL base."""
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    }


def sd15_model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def sdxl_model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def unet_from_config(config: dict[str, Any], meta: bool = False) -> Any:
    """A ``UNet2DConditionModel``; on the meta device (no memory, no init) when ``meta``."""
    import torch
    from diffusers import UNet2DConditionModel

    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**config)
    return UNet2DConditionModel(**config)


def _build_unet(path: Path, config: dict[str, Any], sizes: ZooSizes, name: str) -> None:
    import torch

    torch.manual_seed(seed_for(name))
    save_pretrained(unet_from_config(config), path, sizes.dtype)


def _build_vae(path: Path, config: dict[str, Any], sizes: ZooSizes, name: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed_for(name))
    save_pretrained(AutoencoderKL(**config), path, sizes.dtype)


def build_sd15(path: Path, sizes: ZooSizes) -> None:
    """The SD1.5 pipeline folder."""
    write_json(path / "model_index.json", sd15_model_index())
    _build_unet(path / "unet", sd15_unet_config(sizes.sd15_unet), sizes, f"{SD15_REPO}/unet")
    _build_vae(path / "vae", vae_config(sizes.sd15_vae), sizes, f"{SD15_REPO}/vae")
    build_text_encoder(
        path / "text_encoder", sizes.sd15_text, sizes, f"{SD15_REPO}/text_encoder", with_projection=False
    )
    write_tokenizer(path / "tokenizer", sizes)
    write_json(path / "scheduler" / "scheduler_config.json", pndm_scheduler_config())
    write_json(path / "feature_extractor" / "preprocessor_config.json", image_processor_config())


def build_sdxl(path: Path, sizes: ZooSizes) -> None:
    """The SDXL base pipeline folder (two text encoders, Euler scheduler, no refiner)."""
    write_json(path / "model_index.json", sdxl_model_index())
    _build_unet(path / "unet", sdxl_unet_config(sizes.sdxl_unet), sizes, f"{SDXL_REPO}/unet")
    _build_vae(path / "vae", vae_config(sizes.sdxl_vae, sdxl=True), sizes, f"{SDXL_REPO}/vae")
    build_text_encoder(
        path / "text_encoder", sizes.sdxl_text, sizes, f"{SDXL_REPO}/text_encoder", with_projection=False
    )
    build_text_encoder(
        path / "text_encoder_2", sizes.sdxl_text_2, sizes, f"{SDXL_REPO}/text_encoder_2", with_projection=True
    )
    write_tokenizer(path / "tokenizer", sizes)
    write_tokenizer(path / "tokenizer_2", sizes, pad_token="!")
    write_json(path / "scheduler" / "scheduler_config.json", euler_scheduler_config())


def configs(sizes: ZooSizes) -> dict[str, dict[str, Any]]:
    """Config dicts of the pipeline parts, for dry runs and tests."""
    return {
        "sd15/unet": sd15_unet_config(sizes.sd15_unet),
        "sd15/vae": vae_config(sizes.sd15_vae),
        "sd15/scheduler": pndm_scheduler_config(),
        "sd15/model_index": sd15_model_index(),
        "sdxl/unet": sdxl_unet_config(sizes.sdxl_unet),
        "sdxl/vae": vae_config(sizes.sdxl_vae, sdxl=True),
        "sdxl/scheduler": euler_scheduler_config(),
        "sdxl/model_index": sdxl_model_index(),
    }
