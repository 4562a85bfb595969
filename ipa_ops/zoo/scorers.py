"""The score stage's models in their real layouts: OpenAI CLIP ViT-L/14 (both towers), the Stable
Diffusion safety checker and the LAION aesthetic predictor head.

    openai/clip-vit-large-patch14                        CLIPModel: config.json, model.safetensors,
                                                         tokenizer files, preprocessor_config.json
    CompVis/stable-diffusion-safety-checker              StableDiffusionSafetyChecker (a CLIPConfig
                                                         model) and its preprocessor_config.json
    christophschuhmann/improved-aesthetic-predictor      sac+logos+ava1-l14-linearMSE.pth: the MLP's
                                                         torch state dict (layers.0/2/4/6/7)

The aesthetic head's input is ViT-L/14's projection width (768 at full size), its hidden widths
are the published 1024, 128, 64, 16 at every size. The safety checker's concept embeddings are
seeded random vectors and its thresholds sit near the cosines random vectors give at tiny sizes,
so some zoo images are flagged and others not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clip import image_processor_config, text_config, vision_config
from .common import generator, save_pretrained, save_torch, seed_for, write_json
from .sizes import ZooSizes

CLIP_L = "openai/clip-vit-large-patch14"
SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"
AESTHETIC = "christophschuhmann/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)  # Linear layers of the published MLP, Dropouts between the first four
AESTHETIC_LINEAR_INDEX = (0, 2, 4, 6, 7)  # their indices in its nn.Sequential: the state-dict key prefixes


def _clip_l_config(sizes: ZooSizes) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=text_config(sizes.sd15_text, sizes),
        vision_config=vision_config(sizes.vit_l),
        projection_dim=sizes.vit_l.projection_dim,
        logit_scale_init_value=2.6592,
    )


def build_clip_l(path: Path, sizes: ZooSizes) -> None:
    """``openai/clip-vit-large-patch14``: the full CLIPModel (text and vision towers). One repository
    serves the score stage and Flux's IP-Adapter image encoder, so it is built by one builder."""
    from .flux import build_clip_l as build

    build(path, sizes)


def clip_l_width(sizes: ZooSizes) -> int:
    """The width of that model's image embeddings (what the aesthetic head reads)."""
    from .flux import flux_sizes

    return flux_sizes(sizes).clip_l_vision.projection_dim


def build_safety_checker(path: Path, sizes: ZooSizes) -> None:
    """``CompVis/stable-diffusion-safety-checker`` as diffusers' StableDiffusionSafetyChecker saves it."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed_for(SAFETY_CHECKER))
    model = StableDiffusionSafetyChecker(_clip_l_config(sizes))
    gen = generator(f"{SAFETY_CHECKER}/concepts")
    dim = sizes.vit_l.projection_dim
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(sizes.nsfw_concepts, dim, generator=gen))
        model.special_care_embeds.copy_(torch.randn(sizes.nsfw_special, dim, generator=gen))
        model.concept_embeds_weights.copy_(0.28 + 0.04 * torch.rand(sizes.nsfw_concepts, generator=gen))
        model.special_care_embeds_weights.copy_(0.35 + 0.05 * torch.rand(sizes.nsfw_special, generator=gen))
    save_pretrained(model, path, sizes.dtype)
    write_json(path / "preprocessor_config.json", image_processor_config(sizes.vit_l.image_size))


def aesthetic_state_dict(sizes: ZooSizes) -> dict[str, Any]:
    """The head's tensors under the published key names, seeded."""
    import torch

    gen = generator(f"{AESTHETIC}/{AESTHETIC_FILE}")
    state: dict[str, Any] = {}
    width = clip_l_width(sizes)
    for index, out in zip(AESTHETIC_LINEAR_INDEX, AESTHETIC_WIDTHS, strict=True):
        bound = 1.0 / width**0.5  # nn.Linear's default init range
        state[f"layers.{index}.weight"] = (torch.rand(out, width, generator=gen) * 2 - 1) * bound
        state[f"layers.{index}.bias"] = (torch.rand(out, generator=gen) * 2 - 1) * bound
        width = out
    return state


def build_aesthetic(path: Path, sizes: ZooSizes) -> None:
    """The improved-aesthetic-predictor repository's weight file (a plain state dict, weights_only loadable)."""
    save_torch(path / AESTHETIC_FILE, aesthetic_state_dict(sizes))
