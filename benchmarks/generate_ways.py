"""The ways bench_generate.py compares, one function each, over one manifest of rows.

  (a) `run_plain`: the loop a user writes today, one `pipe(...)` per row;
  (b)/(c) `run_ipa`: ipa's Generator at batch size 1 / with mixed batches;
  (d) `run_diffusers_batched`: diffusers' own batched call, rows sharing one reference and scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.callbacks import IPAdapterScaleCutoffCallback
from PIL import Image, ImageDraw

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.conditioning import preprocess_masks
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.families import family_of
from ipa_ops.generate.generator import Generator

# per base model: pipeline, adapter subfolder, (pooled adapter, Plus adapter), default size
MODELS: dict[str, dict[str, Any]] = {
    "sd15": {
        "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "subfolder": "models",
        "weights": ["ip-adapter_sd15.bin", "ip-adapter-plus_sd15.safetensors"],
        "full_resolution": 512,
    },
    "sdxl": {
        "source": "stabilityai/stable-diffusion-xl-base-1.0",
        "subfolder": "sdxl_models",
        "weights": ["ip-adapter_sdxl_vit-h.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"],
        "full_resolution": 1024,
    },
}
SCHEDULES: list[Any] = [0.6, {"preset": "style"}, {"value": 0.8, "end": 0.6}]


def bench_flow(zoo: Path, model: dict[str, Any], compile: str | None = None) -> Flow:
    enc = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}
    ad = {"source": "h94/IP-Adapter", "subfolder": model["subfolder"]}
    return Flow.model_validate(
        {
            "name": "bench",
            "mirror": str(zoo),
            "models": {"base": {"source": model["source"], "dtype": "float16", "compile": compile or False}},
            "encoders": {"vit-h": enc, "vit-h-hs": {**enc, "hidden_states": True}},
            "adapters": {
                "style": {**ad, "weight_name": model["weights"][0], "encoder": "vit-h"},
                "plus": {**ad, "weight_name": model["weights"][1], "encoder": "vit-h-hs"},
            },
        }
    )


def _reference_image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y, r = (int(v) for v in rng.integers(20, 200, 3))
        draw.ellipse(
            [x - r // 3, y - r // 3, x + r // 3, y + r // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return img


def _masks(size: int) -> torch.Tensor:
    left, right = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    ImageDraw.Draw(left).rectangle([0, 0, size // 2 - 1, size], fill=255)
    ImageDraw.Draw(right).rectangle([size // 2, 0, size, size], fill=255)
    return preprocess_masks([left, right], size, size)


def make_rows(pipe: Any, n: int, size: int, steps: int, uniform: bool = False) -> list[dict[str, Any]]:
    """The heterogeneous manifest, with embeddings computed by diffusers itself.

    `uniform`: rows that differ only by prompt, seed, reference and a scalar scale (one adapter, one
    image, no masks), so ipa's mixed batch does the same arithmetic as diffusers' batched call (d).
    """
    masks = _masks(size)
    rows = []
    for i in range(n):
        refs = [_reference_image(i)] + ([_reference_image(1000 + i)] if i % 3 == 1 and not uniform else [])
        second = i % 4 == 3 and not uniform
        embeds = pipe.prepare_ip_adapter_image_embeds([refs, [_reference_image(2000 + i)]], None, pipe.device, 1, True)
        rows.append(
            {
                "id": f"r{i}",
                "seed": i,
                "prompt": f"a painting of scene {i}",
                "size": size,
                "steps": steps,
                "schedule": 0.4 + 0.1 * (i % 5) if uniform else 0.7 if i % 3 == 1 else SCHEDULES[(i // 3) % 3],
                "masks": masks if i % 3 == 1 and not uniform else None,
                "embeds": embeds,
                "second": second,
            }
        )
    return rows


def _adapter_inputs(row: dict[str, Any]) -> list[AdapterInput]:
    neg, pos = row["embeds"][0].chunk(2)
    inputs = [AdapterInput("style", pos[0], neg[0], parse_schedule(row["schedule"]), row["masks"])]
    if row["second"]:
        neg2, pos2 = row["embeds"][1].chunk(2)
        inputs.append(AdapterInput("plus", pos2[0], neg2[0], parse_schedule(0.3)))
    return inputs


class CutoffFirstAdapter(IPAdapterScaleCutoffCallback):
    """diffusers' cutoff callback sets one scale, which `set_ip_adapter_scale` refuses when two
    adapters are loaded; a user of two adapters writes this variant (it keeps the second's scale)."""

    def __init__(self, cutoff_step_ratio: float, other: float):
        super().__init__(cutoff_step_ratio=cutoff_step_ratio)
        self.other = other

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
            pipeline.set_ip_adapter_scale([0.0, self.other])
        return callback_kwargs


def run_plain(pipe: Any, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """(a) one diffusers call per row, as documented."""
    images = []
    for row in rows:
        spec = parse_schedule(row["schedule"])
        presets = family_of(Path(pipe.config._name_or_path)).presets
        scale: Any = presets[spec.preset] if spec.preset else spec.value
        if row["masks"] is not None:
            scale = [spec.value, spec.value]
        pipe.set_ip_adapter_scale([scale, 0.3 if row["second"] else 0.0])
        embeds = [row["embeds"][0], row["embeds"][1] if row["second"] else torch.zeros_like(row["embeds"][1])]
        kwargs: dict[str, Any] = {}
        if spec.end < 1:
            kwargs["callback_on_step_end"] = CutoffFirstAdapter(spec.end, 0.3 if row["second"] else 0.0)
        if row["masks"] is not None:
            m = row["masks"]
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [m.reshape(1, *m.shape), None]}
        out = pipe(
            prompt=row["prompt"],
            num_inference_steps=row["steps"],
            guidance_scale=7.5,
            height=row["size"],
            width=row["size"],
            generator=torch.Generator("cpu").manual_seed(row["seed"]),
            ip_adapter_image_embeds=embeds,
            output_type="np",
            **kwargs,
        )
        images.append(out.images[0])
    return images


def run_ipa(gen: Generator, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """(b)/(c): the same rows through ipa's Generator."""
    requests = [
        RowRequest(
            id=r["id"],
            prompt=r["prompt"],
            seed=r["seed"],
            model="base",
            width=r["size"],
            height=r["size"],
            steps=r["steps"],
            guidance_scale=7.5,
            adapters=_adapter_inputs(r),
        )
        for r in rows
    ]
    outs = gen.generate(requests)
    for o in outs:
        if o.error:
            raise RuntimeError(f"{o.id}: {o.error}")
    return [o.image for o in outs]  # type: ignore[misc]




def run_diffusers_batched(pipe: Any, rows: list[dict[str, Any]], batch: int) -> list[np.ndarray]:
    """(d) diffusers' own batched call: `batch` prompts per call sharing the batch's first reference and
    scale (the best case diffusers can batch: its scale is pipeline-global and it repeats one reference)."""
    images = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        first = chunk[0]
        pipe.set_ip_adapter_scale([parse_schedule(first["schedule"]).value, 0.0])
        embeds = [first["embeds"][0][:, :1], torch.zeros_like(first["embeds"][1])]  # one image, as uniform rows
        out = pipe(
            prompt=[r["prompt"] for r in chunk],
            num_inference_steps=first["steps"],
            guidance_scale=7.5,
            height=first["size"],
            width=first["size"],
            generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk],
            ip_adapter_image_embeds=embeds,
            output_type="np",
        )
        images.extend(out.images)
    return images
