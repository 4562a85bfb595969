"""``latent-consistency/lcm-lora-sdv1-5``: the LCM-LoRA for SD1.5 as ``pytorch_lora_weights.safetensors``.

The file holds UNet LoRA pairs only (no text encoder), in kohya-style names built from the
diffusers module path: ``lora_unet_<path with _ for .>.lora_down.weight`` / ``.lora_up.weight``
and a scalar ``.alpha``. diffusers' ``load_lora_weights`` recognises that naming, converts it
(``lora_conversion_utils``) and injects a PEFT adapter, so loading the zoo file exercises the same
conversion as the real one. The targets are those of LCM-LoRA distillation: the attention
projections, the transformer feed-forward and in/out projections, and the ResNet convolutions,
shortcuts, resampler convolutions and time-embedding projections. Linear layers get
``[r, in]`` / ``[out, r]`` pairs; a k x k convolution gets ``[r, in, k, k]`` / ``[out, r, 1, 1]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import generator, save_safetensors, torch_dtype
from .sd import sd15_unet_config, unet_from_config
from .sizes import ZooSizes

if TYPE_CHECKING:
    import torch

LCM_LORA_SD15 = "latent-consistency/lcm-lora-sdv1-5"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def lora_state_dict(unet_config: dict, rank: int, dtype: str, name: str) -> dict[str, torch.Tensor]:
    """Seeded kohya-style LoRA tensors for every target module of a UNet built on the meta device."""
    import torch

    unet = unet_from_config(unet_config, meta=True)
    gen = generator(name)
    out: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        if not any(path == t or path.endswith("." + t) for t in TARGETS):
            continue
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        else:
            continue
        key = "lora_unet_" + path.replace(".", "_")
        fan_in = torch.Size(down_shape[1:]).numel()
        out[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=gen) / fan_in**0.5
        out[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.5 / rank**0.5
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return {k: v.to(torch_dtype(dtype)) for k, v in sorted(out.items())}


def build_lcm_lora_sd15(path: Path, sizes: ZooSizes) -> None:
    """The LCM-LoRA repository root: ``pytorch_lora_weights.safetensors`` for the SD1.5 UNet."""
    state = lora_state_dict(sd15_unet_config(sizes.sd15_unet), sizes.lcm_lora_rank, sizes.dtype, LCM_LORA_SD15)
    save_safetensors(path / WEIGHT_NAME, state)


def transformer_lora_state_dict(
    transformer: Any, rank: int, name: str, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
) -> dict[str, torch.Tensor]:
    """Seeded LoRA tensors for a Flux / SD3 transformer's attention projections, in PEFT naming
    (`<module>.lora_A.weight` [rank, in], `<module>.lora_B.weight` [out, rank]): what
    `save_lora_weights(transformer_lora_layers=...)` writes and `load_lora_weights` reads back.
    Both factors are random (a trained LoRA's B is not zero), so the LoRA changes the image."""
    import torch

    gen = generator(name)
    out: dict[str, torch.Tensor] = {}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(path.endswith(".attn." + t) for t in targets):
            fan_in, fan_out = module.in_features, module.out_features
            out[f"{path}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            out[f"{path}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.5 / rank**0.5
    return dict(sorted(out.items()))


def save_transformer_lora(pipeline_class: Any, folder: Path, transformer: Any, rank: int, name: str) -> Path:
    """`<folder>/pytorch_lora_weights.safetensors` through the pipeline class's own `save_lora_weights`."""
    state = transformer_lora_state_dict(transformer, rank, name)
    pipeline_class.save_lora_weights(str(folder), transformer_lora_layers=state, weight_name=WEIGHT_NAME)
    return folder / WEIGHT_NAME
