"""Dimension tables of the zoo: the one place for every architecture number.

Two tables exist. ``FULL`` carries the real architecture sizes of the Hugging Face repositories
(SD1.5, SDXL base, OpenCLIP ViT-H/14 and ViT-bigG/14, h94's IP-Adapter projections) so a full
mirror behaves like the real one on a GPU. ``TINY`` keeps every *structural* fact of ``FULL``
(block types, layer counts that shape key names, token counts, which dimension feeds which) and
shrinks only widths, so key names and the consistency rules between repos stay exactly as in
reality: a ViT-H adapter's projection input is ViT-H's ``projection_dim``, which differs from
bigG's, so a mismatch fails with the tiny zoo as it does with real weights.

Other modules read the numbers from here (e.g. ``TINY.sd15_unet.cross_attention_dim``) instead
of hard-coding them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Size = Literal["tiny", "small", "full"]


@dataclass(frozen=True)
class UNetSizes:
    """Widths of a ``UNet2DConditionModel``; block types are fixed per family in ``sd.py``."""

    block_out_channels: tuple[int, ...]
    attention_head_dim: int | tuple[int, ...]
    cross_attention_dim: int
    norm_num_groups: int
    sample_size: int
    layers_per_block: int = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    addition_time_embed_dim: int | None = None  # SDXL micro-conditioning
    projection_class_embeddings_input_dim: int | None = None


@dataclass(frozen=True)
class VaeSizes:
    block_out_channels: tuple[int, ...]
    norm_num_groups: int
    sample_size: int
    layers_per_block: int = 2


@dataclass(frozen=True)
class TextSizes:
    """A CLIP text tower; ``vocab_size`` follows the zoo tokenizer unless given."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class VisionSizes:
    """A CLIP vision tower; ``image_size // patch_size`` squared plus one is the token count."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ResamplerSizes:
    """IP-Adapter Plus resampler. diffusers derives heads as ``to_q.out // 64`` and depth is 4."""

    hidden_dims: int
    heads: int
    num_queries: int = 16
    depth: int = 4
    dim_head: int = 64
    ff_mult: int = 4


@dataclass(frozen=True)
class ZooSizes:
    name: Size
    dtype: Literal["float32", "float16"]
    vocab_size: int  # CLIP BPE vocabulary: 512 byte tokens + merges + 2 specials
    sd15_unet: UNetSizes
    sd15_vae: VaeSizes
    sd15_text: TextSizes  # OpenAI CLIP ViT-L/14 text tower
    vit_h: VisionSizes  # h94/IP-Adapter models/image_encoder, laion CLIP-ViT-H-14 vision tower
    vit_h_text: TextSizes  # laion CLIP-ViT-H-14 text tower
    bigg: VisionSizes  # h94/IP-Adapter sdxl_models/image_encoder
    sdxl_unet: UNetSizes
    sdxl_vae: VaeSizes
    sdxl_text: TextSizes  # text_encoder (CLIP ViT-L)
    sdxl_text_2: TextSizes  # text_encoder_2 (OpenCLIP bigG, with projection)
    plus_sd15: ResamplerSizes
    plus_sdxl: ResamplerSizes
    # h94/IP-Adapter-FaceID: ID embedding width (InsightFace ArcFace: 512), the LoRA rank baked into
    # the FaceID checkpoints, and the face-perceiver resampler of FaceID-Plus (width = its embed dims)
    face_id_dim: int = 512
    faceid_lora_rank: int = 128
    faceid_plus: ResamplerSizes = ResamplerSizes(hidden_dims=768, heads=12, num_queries=4)
    # ControlNet conditioning embedding (one stride-2 conv per step: 4 entries = the VAE's 8x),
    # AnimateDiff motion modules (guoyww v1-5-2) and the LCM-LoRA rank (latent-consistency, SD1.5)
    controlnet_cond_channels: tuple[int, ...] = (16, 32, 96, 256)
    motion_heads: int = 8
    motion_norm_groups: int = 32
    motion_max_seq_length: int = 32
    lcm_lora_rank: int = 64
    # openai/clip-vit-large-patch14 vision tower (its text tower is sd15_text): the scorers' CLIP, the
    # safety checker's encoder and the LAION aesthetic head's input (projection_dim wide)
    vit_l: VisionSizes = VisionSizes(1024, 4096, 24, 16, projection_dim=768, hidden_act="quick_gelu")
    nsfw_concepts: int = 17  # StableDiffusionSafetyChecker: concept and special-care embeddings
    nsfw_special: int = 3

    @property
    def ip_tokens(self) -> dict[str, int]:
        """Image tokens each adapter kind appends to the cross-attention context."""
        return {
            "base": 4,
            "light": 4,
            "plus": self.plus_sd15.num_queries,
            "plus-face": self.plus_sd15.num_queries,
            "full-face": self.vit_h.num_tokens,
        }


FULL = ZooSizes(
    name="full",
    dtype="float16",
    vocab_size=49408,
    sd15_unet=UNetSizes(
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
        sample_size=64,
    ),
    sd15_vae=VaeSizes(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512),
    sd15_text=TextSizes(768, 3072, 12, 12, projection_dim=768),
    vit_h=VisionSizes(1280, 5120, 32, 16, projection_dim=1024),
    vit_h_text=TextSizes(1024, 4096, 24, 16, projection_dim=1024, hidden_act="gelu"),
    bigg=VisionSizes(1664, 8192, 48, 16, projection_dim=1280),
    sdxl_unet=UNetSizes(
        block_out_channels=(320, 640, 1280),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        norm_num_groups=32,
        sample_size=128,
        transformer_layers_per_block=(1, 2, 10),
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    sdxl_vae=VaeSizes(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024),
    sdxl_text=TextSizes(768, 3072, 12, 12, projection_dim=768),
    sdxl_text_2=TextSizes(1280, 5120, 32, 20, projection_dim=1280, hidden_act="gelu"),
    plus_sd15=ResamplerSizes(hidden_dims=768, heads=12),
    plus_sdxl=ResamplerSizes(hidden_dims=1280, heads=20),
)

TINY = ZooSizes(
    name="tiny",
    dtype="float32",
    vocab_size=512 + 256 + 2,
    sd15_unet=UNetSizes(
        block_out_channels=(16, 32, 64, 64),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    ),
    sd15_vae=VaeSizes(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=64),
    sd15_text=TextSizes(32, 64, 2, 2, projection_dim=32),
    vit_h=VisionSizes(48, 96, 3, 4, projection_dim=24),
    vit_h_text=TextSizes(40, 80, 2, 2, projection_dim=24, hidden_act="gelu"),
    bigg=VisionSizes(64, 128, 3, 4, projection_dim=40),
    sdxl_unet=UNetSizes(
        block_out_channels=(16, 32, 64),
        attention_head_dim=(1, 2, 4),
        cross_attention_dim=64,
        norm_num_groups=8,
        sample_size=8,
        transformer_layers_per_block=(1, 2, 2),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
    sdxl_vae=VaeSizes(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=64),
    sdxl_text=TextSizes(32, 64, 2, 2, projection_dim=32),
    sdxl_text_2=TextSizes(32, 64, 2, 2, projection_dim=32, hidden_act="gelu"),
    plus_sd15=ResamplerSizes(hidden_dims=32, heads=1),
    plus_sdxl=ResamplerSizes(hidden_dims=48, heads=1),
    faceid_lora_rank=4,
    faceid_plus=ResamplerSizes(hidden_dims=32, heads=1, num_queries=4),
    controlnet_cond_channels=(4, 8, 8, 16),
    motion_heads=2,
    motion_norm_groups=8,
    lcm_lora_rank=4,
    vit_l=VisionSizes(32, 64, 2, 2, projection_dim=32, hidden_act="quick_gelu"),
)

# SMALL: the tiny zoo with a wider SD1.5 UNet and text encoder, so UNet compute dominates a CPU
# benchmark the way it does on a GPU at full size (encoders and SDXL stay tiny).
SMALL = replace(
    TINY,
    name="small",
    sd15_unet=UNetSizes(
        block_out_channels=(64, 128, 256, 256),
        attention_head_dim=8,
        cross_attention_dim=128,
        norm_num_groups=32,
        sample_size=16,
    ),
    sd15_text=TextSizes(128, 512, 2, 4, projection_dim=128),
)

SIZES: dict[str, ZooSizes] = {"tiny": TINY, "small": SMALL, "full": FULL}


def get_sizes(size: str) -> ZooSizes:
    """The table for ``size``; a clear error for anything else."""
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(SIZES)}") from None
