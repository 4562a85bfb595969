"""Flux (FLUX.1-dev / schnell) with XLabs' IP-Adapter: a transformer family behind `ModelFamily`.

The XLabs checkpoint (`ip_adapter_proj_model.*` + `double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`)
turns CLIP ViT-L/14's pooled `image_embeds` into 4 tokens and adds an IP attention to each of
the 19 double-stream blocks (the IP layers, in block order). diffusers loads it with
`FluxPipeline.load_ip_adapter`; here the stock processors become `flux_attention`'s batched ones.

What differs from the UNet families:
- `guidance_scale` is distilled guidance, an input of the transformer, so it is per row: rows
  with different values share a call (`group_key` leaves it out; the transformer's pre-hook
  feeds each row its own value). A negative prompt is used only with true CFG
  (`true_cfg_scale` > 1: diffusers' second transformer pass per step, fed the negative prompt
  and the negative image embeddings); rows with true CFG share a call whatever their scales
  (`RowScales`), and never share one with rows without it.
- per-block scales are one value per double block, `{"blocks": [19 values]}` (what
  `set_ip_adapter_scale` takes as a list) or `{"blocks": 0.5}`; the InstantStyle presets name
  UNet blocks and do not apply.
- img2img and inpaint run on `FluxImg2ImgPipeline` / `FluxInpaintPipeline`, ControlNet rows on
  `FluxControlNetPipeline` (`from_pipe`, as for the UNet families; the ControlNet gets each row's
  guidance too); the flow's LoRAs load with `FluxPipeline.load_lora_weights` (loras.py). Video
  and region masks are not supported.
- the pipeline is given each row's embeddings through `ip_adapter_image_embeds` and its own
  `prepare_ip_adapter_image_embeds` is bypassed (it would repeat them once per prompt).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ipa_ops.generate import flux_attention
from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.ip_state import IPBatchState

_K = "double_blocks.{}.processor.ip_adapter_double_stream_k_proj.weight"


class _NoPresets(dict):
    """No InstantStyle blocks in a transformer family: a preset is refused by name, with what to write instead."""

    def __init__(self, blocks: str):
        super().__init__()
        self.blocks = blocks  # e.g. "Flux has 19 double blocks"

    def __missing__(self, key: str) -> Any:
        raise ValueError(
            f"preset {key!r} names UNet blocks; {self.blocks}: give per-block scales as "
            f'{{"layers": {{"blocks": [one value per block]}}}}'
        )


def block_scales(model: str, block: str, blocks: Mapping[str, Any], layer_names: Sequence[str]) -> list[float]:
    """`{"blocks": v}` or `{"blocks": [one value per block]}` as one value per IP layer (one per block)."""
    if set(blocks) != {"blocks"}:
        raise ValueError(
            f"layers: {model} has no {'/'.join(sorted(set(blocks) - {'blocks'}))} blocks; give "
            f'{{"blocks": [{len(layer_names)} values]}} (one per {block} block) or {{"blocks": value}}'
        )
    values = blocks["blocks"]
    if not isinstance(values, list):
        return [float(values)] * len(layer_names)
    if len(values) != len(layer_names):
        raise ValueError(f"layers.blocks: {model} has {len(layer_names)} {block} blocks, got {len(values)} values")
    return [float(v) for v in values]


def transformer_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "transformer" / "config.json").read_text())


def xlabs_adapter_facts(shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
    """Read XLabs' layout the way diffusers' Flux loader does (4 tokens; 16 when proj has 65536 rows)."""
    proj = shapes.get("ip_adapter_proj_model.proj.weight")
    layers = sum(1 for k in shapes if k.startswith("double_blocks.") and k.endswith("_k_proj.weight"))
    if proj is None or not layers or _K.format(0) not in shapes:
        return None
    tokens = 16 if proj[0] == 65536 else 4
    joint = shapes[_K.format(0)][1]
    return AdapterFacts("pooled", joint, layers, proj[1], 0, tokens, family="flux")


class FluxFamily:
    """FluxPipeline with XLabs IP-Adapters (see module doc)."""

    name = "flux"
    presets: Mapping[str, Mapping[str, Any]] = _NoPresets("Flux has 19 double blocks")

    def claims(self, folder: Path) -> bool:
        config = folder / "transformer" / "config.json"
        return config.is_file() and transformer_config(folder).get("_class_name") == "FluxTransformer2DModel"

    def ip_dims(self, folder: Path) -> tuple[int, int]:
        cfg = transformer_config(folder)
        return int(cfg["joint_attention_dim"]), int(cfg["num_layers"])

    def adapter_facts(self, shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
        return xlabs_adapter_facts(shapes)

    def load(self, folder: Path, dtype: torch.dtype, variant: str | None) -> Any:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, variant=variant)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_adapters(self, pipe: Any, files: Sequence[Path]) -> None:
        # no image encoder: ipa feeds stored embeddings; strict loading, so a wrong key fails here
        pipe.load_ip_adapter(
            [str(f.parent) for f in files],
            weight_name=[f.name for f in files],
            subfolder=[""] * len(files),
            image_encoder_pretrained_model_name_or_path=None,
            low_cpu_mem_usage=False,
        )

    def cross_attention_dim(self, pipe: Any) -> int:
        return pipe.transformer.config.joint_attention_dim

    def install_attention(self, pipe: Any) -> list[str]:
        return flux_attention.install(pipe.transformer)

    def bind_attention(self, pipe: Any, state: IPBatchState | None) -> None:
        flux_attention.bind(pipe.transformer, state)

    def compile(self, pipe: Any, how: str, mode: str, **options: Any) -> None:
        options = {"fullgraph": True, "dynamic": False, "mode": None if mode == "default" else mode, **options}
        if how == "whole":
            pipe.transformer.forward = torch.compile(pipe.transformer.forward, **options)
        else:
            pipe.transformer.compile_repeated_blocks(**options)

    def dtype(self, pipe: Any) -> torch.dtype:
        return pipe.transformer.dtype

    def uses_cfg(self, pipe: Any, guidance_scale: float) -> bool:
        return False  # distilled guidance is an input of the one pass

    def group_key(self, row: Any) -> tuple:
        """The row's group key without its guidance (each row gets its own value), split by true CFG on / off."""
        key = list(row.group_key())
        key[6] = row.true_cfg_scale is not None  # RowRequest.group_key's guidance_scale
        return tuple(key)

    def call_kwargs(self, pipe: Any, rows: Sequence[Any]) -> dict[str, Any]:
        """Per-row distilled guidance (for the transformer's pre-hook; schnell has none) and true CFG."""
        for r in rows:
            if bool(r.negative_prompt) != (r.true_cfg_scale is not None):
                raise ValueError(
                    f"row {r.id}: on Flux a negative_prompt is used only with true CFG: set both "
                    f"negative_prompt and true_cfg_scale (> 1), or neither"
                )
        out = transformer_task_kwargs("Flux", rows)
        guidance = torch.tensor([float(r.guidance_scale) for r in rows], dtype=torch.float32)
        flux_attention.set_guidance(pipe.transformer, guidance)
        if getattr(pipe, "controlnet", None) is not None:  # FluxControlNetModel reads the guidance too
            flux_attention.set_guidance(pipe.controlnet, guidance)
        if rows[0].true_cfg_scale is not None:
            out["true_cfg_scale"] = RowScales([float(r.true_cfg_scale) for r in rows])
            out["negative_prompt"] = [r.negative_prompt for r in rows]
        return out

    def prompt_kwargs(self, prompts: list[str], negatives: list[str], do_cfg: bool) -> dict[str, Any]:
        return {"prompt": prompts}

    def ip_call(
        self, pipe: Any, positives: list[torch.Tensor], negatives: list[torch.Tensor], do_cfg: bool
    ) -> dict[str, Any]:
        # [rows, n, D] per adapter, through unchanged; negatives given so no black image is encoded
        pipe.prepare_ip_adapter_image_embeds = _given_embeds
        return {"ip_adapter_image_embeds": positives, "negative_ip_adapter_image_embeds": negatives}

    def end_call(self, pipe: Any) -> None:
        pipe.__dict__.pop("prepare_ip_adapter_image_embeds", None)
        flux_attention.set_guidance(pipe.transformer, None)
        if getattr(pipe, "controlnet", None) is not None:
            flux_attention.set_guidance(pipe.controlnet, None)

    def expand_layers(self, pipe: Any, blocks: Mapping[str, Any], layer_names: Sequence[str]) -> list[float]:
        """`{"blocks": v}` or `{"blocks": [one value per double block]}`, as set_ip_adapter_scale reads a list."""
        return block_scales("Flux", "double", blocks, layer_names)


def transformer_task_kwargs(model: str, rows: Sequence[Any]) -> dict[str, Any]:
    """What a transformer family's call adds per task; region masks are refused in one line (see below).

    The img2img pipelines of Flux and SD3.5 default to 1024 px (`default_sample_size`), not the
    init image's size, so they are given the row's (inpaint gets it from tasks.py). Neither
    family's IP attention has a region-mask path in diffusers (Flux's accepts `ip_adapter_masks`
    and ignores them; SD3's has no such argument), so there is no reference to match: a row with
    masks fails alone rather than being run without them.
    """
    for r in rows:
        masked = [x.alias for x in r.adapters if x.masks is not None]
        if masked:
            raise ValueError(
                f"row {r.id}: adapters.{masked[0]}: region masks are not supported on {model} (diffusers' IP "
                f"attention for {model} has no mask); drop the row's masks or run it on an SD1.5/SDXL model"
            )
    return {"height": rows[0].height, "width": rows[0].width} if rows[0].task == "img2img" else {}


class RowScales(float):
    """`true_cfg_scale` per row: FluxPipeline tests it against 1 and multiplies the noise difference by it.

    As a number it is the largest row scale (every row's is > 1, so the second pass runs); multiplied
    with the [rows, ...] noise difference it scales each row by its own value.
    """

    def __new__(cls, values: Sequence[float]) -> RowScales:
        scales = super().__new__(cls, max(values))
        scales.values = torch.tensor(values, dtype=torch.float32)
        return scales

    values: torch.Tensor

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            per_row = self.values.to(other.device, other.dtype).repeat(other.shape[0] // len(self.values))
            return per_row.view(-1, *([1] * (other.ndim - 1))) * other
        return float(self) * other

    __rmul__ = __mul__


def _given_embeds(ip_adapter_image: Any, ip_adapter_image_embeds: list[torch.Tensor], device: Any, *_: Any) -> list:
    """Stands in for `prepare_ip_adapter_image_embeds`: the per-row embeddings as given, on the device."""
    return [e.to(device) for e in ip_adapter_image_embeds]


FAMILY = FluxFamily()
