"""SD3.5 (Large) with InstantX's IP-Adapter: a transformer family behind `ModelFamily`.

InstantX's checkpoint (`families/sd3_layout.py`) turns SigLIP's penultimate hidden states and the
timestep into 64 tokens (`IPAdapterTimeImageProjection`, so they change every step) and adds an
IP attention to each of the 38 joint blocks. diffusers loads it with
`StableDiffusion3Pipeline.load_ip_adapter` (one adapter per pipeline); here the stock processors
become `sd3_attention`'s batched ones. The call is the UNet families' in shape: classifier-free
guidance batches `[negative; positive]` (negative image: zeros, as diffusers), and per-row
embeddings go in through `ip_adapter_image_embeds` with the pipeline's own preparation bypassed.
Per-block scales are `{"blocks": [one value per joint block]}` or `{"blocks": v}`; one reference
image per row (diffusers' projection takes one image's tokens), several only when combined; one
adapter per flow (`ipa validate` refuses a second). img2img and inpaint run on diffusers'
`StableDiffusion3Img2ImgPipeline` / `StableDiffusion3InpaintPipeline` (both take IP-Adapter
embeddings), made with `from_pipe`; the flow's LoRAs load with `load_lora_weights` (loras.py).
ControlNet rows run on `StableDiffusion3ControlNetPipeline` (`from_pipe` with an `SD3ControlNetModel`;
it takes IP-Adapter embeddings too); its control latents are seeded per row (`seed_control_latents`).
Region masks are refused (`flux.transformer_task_kwargs`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ipa_ops.generate import sd3_attention
from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.families.base import ClassifierFreeGuidance
from ipa_ops.generate.families.flux import FluxFamily, _NoPresets, block_scales, transformer_task_kwargs
from ipa_ops.generate.families.sd3_layout import instantx_adapter_facts
from ipa_ops.generate.ip_state import IPBatchState


def transformer_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "transformer" / "config.json").read_text())


class SD3Family(ClassifierFreeGuidance):
    """StableDiffusion3Pipeline with InstantX's IP-Adapter (see module doc)."""

    guidance_note = "SD3.5 uses guidance_scale"

    name = "sd3"
    presets: Mapping[str, Mapping[str, Any]] = _NoPresets("SD3.5 has joint blocks (38 in Large)")

    def claims(self, folder: Path) -> bool:
        config = folder / "transformer" / "config.json"
        return config.is_file() and transformer_config(folder).get("_class_name") == "SD3Transformer2DModel"

    def ip_dims(self, folder: Path) -> tuple[int, int]:
        cfg = transformer_config(folder)
        return int(cfg["attention_head_dim"]) * int(cfg["num_attention_heads"]), int(cfg["num_layers"])

    def adapter_facts(self, shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
        return instantx_adapter_facts(shapes)

    def load(self, folder: Path, dtype: torch.dtype, variant: str | None) -> Any:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, variant=variant)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_adapters(self, pipe: Any, files: Sequence[Path]) -> None:
        if len(files) > 1:
            raise ValueError(f"SD3.5 takes one IP-Adapter per pipeline (diffusers' loader); got {len(files)}")
        # subfolder "" (None crashes on a slash-free folder); strict loading: a wrong key fails here, not later
        pipe.load_ip_adapter(str(files[0].parent), weight_name=files[0].name, subfolder="", image_encoder_folder=None,
                             low_cpu_mem_usage=False)  # fmt: skip

    def cross_attention_dim(self, pipe: Any) -> int:
        cfg = pipe.transformer.config
        return cfg.attention_head_dim * cfg.num_attention_heads

    def install_attention(self, pipe: Any) -> list[str]:
        return sd3_attention.install(pipe.transformer)

    def bind_attention(self, pipe: Any, state: IPBatchState | None) -> None:
        if state is not None:
            state.cache_kv = False  # the IP tokens depend on the timestep
        sd3_attention.bind(pipe.transformer, state)

    def compile(self, pipe: Any, how: str, mode: str, **options: Any) -> None:
        FluxFamily.compile(self, pipe, how, mode, **options)  # type: ignore[arg-type]

    def dtype(self, pipe: Any) -> torch.dtype:
        return pipe.transformer.dtype

    def uses_cfg(self, pipe: Any, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def call_kwargs(self, pipe: Any, rows: Sequence[Any]) -> dict[str, Any]:
        out = {**super().call_kwargs(pipe, rows), **transformer_task_kwargs("SD3.5", rows)}
        if rows[0].task == "controlnet":
            seed_control_latents(pipe.vae, [int(r.seed) for r in rows])
        return out

    def ip_call(
        self, pipe: Any, positives: list[torch.Tensor], negatives: list[torch.Tensor], do_cfg: bool
    ) -> dict[str, Any]:
        (pos,), (neg,) = positives, negatives  # one adapter: [rows, n, T, D]
        if pos.shape[1] != 1:
            raise ValueError("SD3.5's IP-Adapter takes one image per row; combine several (e.g. combine: average)")
        embeds = torch.cat([neg[:, 0], pos[:, 0]]) if do_cfg else pos[:, 0]
        pipe.prepare_ip_adapter_image_embeds = lambda *args, **kwargs: embeds.to(kwargs.get("device", args[2]))
        return {"ip_adapter_image_embeds": embeds}

    def end_call(self, pipe: Any) -> None:
        pipe.__dict__.pop("prepare_ip_adapter_image_embeds", None)
        pipe.vae.__dict__.pop("encode", None)  # (seed_control_latents), if the call never encoded

    def expand_layers(self, pipe: Any, blocks: Mapping[str, Any], layer_names: Sequence[str]) -> list[float]:
        return block_scales("SD3.5", "joint", blocks, layer_names)


def seed_control_latents(vae: Any, seeds: list[int]) -> None:
    """Make the VAE's next `encode` (the ControlNet pipeline's, of the control images) sample per row.

    `StableDiffusion3ControlNetPipeline` samples the control image's latents with
    `vae.encode(image).latent_dist.sample()`: no generator, so torch's global RNG, drawn once for
    the whole batch. A row would then depend on the rows beside it and on whatever ran before. Here
    each row's draw is the one `torch.manual_seed(row.seed)` before a call of that row alone gives
    (the pipeline draws nothing else from the global RNG before it), so a row equals that call
    and its own run in any batch. One-shot: the first `encode` removes it (`end_call` too), and a
    `sample(generator)` (img2img's, inpaint's) is left as diffusers draws it.
    """
    stock = type(vae).encode

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        vae.__dict__.pop("encode", None)
        out = stock(vae, x, return_dict=return_dict)
        if return_dict:
            posterior = out.latent_dist
            posterior.sample = functools.partial(_row_seeded_sample, posterior, posterior.sample, seeds)
        return out

    vae.encode = encode


def _row_seeded_sample(posterior: Any, stock: Any, seeds: list[int], generator: Any = None) -> torch.Tensor:
    """`DiagonalGaussianDistribution.sample`, each row's noise drawn from its own seed (`seed_control_latents`)."""
    if generator is not None:
        return stock(generator)
    rows, mean = len(seeds), posterior.mean
    noise = torch.empty_like(mean)  # [copies x rows]: CFG's [negative; positive], rows in order in each
    for b, seed in enumerate(seeds):
        draw = torch.Generator(mean.device).manual_seed(seed)
        noise[b::rows] = torch.randn((mean.shape[0] // rows, *mean.shape[1:]), generator=draw,
                                     device=mean.device, dtype=mean.dtype)  # fmt: skip
    return mean + posterior.std * noise


FAMILY = SD3Family()
