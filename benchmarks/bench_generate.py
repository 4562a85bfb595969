"""Side-by-side generation throughput: the plain diffusers loop vs ipa, in one run.

One heterogeneous manifest (a different reference per row, three schedules, masks on a third of
the rows, two adapters on a quarter) is rendered three ways:

  (a) the loop a user writes today: one `pipe(...)` per row, `set_ip_adapter_scale`,
      `ip_adapter_image_embeds`, masks through `cross_attention_kwargs`, the cutoff callback;
  (b) ipa's Generator with batch size 1;
  (c) ipa's Generator with mixed batches.

It prints images/s and peak memory of each, the largest pixel difference of (b) and (c) against
(a), and ends with `ratios: b/a=<x> c/a=<y>`. With `--device cuda` it also prints the UNet's
achieved TFLOP/s (counted with torch.utils.flop_counter) against a measured bf16 matmul ceiling.
Runs without Ray: `python benchmarks/bench_generate.py --size small --device cpu`.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoPipelineForText2Image  # noqa: E402
from diffusers.callbacks import IPAdapterScaleCutoffCallback  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ipa_ops.flow.schedules import parse_schedule  # noqa: E402
from ipa_ops.flow.spec import Flow  # noqa: E402
from ipa_ops.generate.conditioning import preprocess_masks  # noqa: E402
from ipa_ops.generate.families import family_of  # noqa: E402
from ipa_ops.generate.generator import AdapterInput, Generator, RowRequest  # noqa: E402
from ipa_ops.zoo import build_zoo  # noqa: E402

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


def _flow(zoo: Path, model: dict[str, Any]) -> Flow:
    enc = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}
    ad = {"source": "h94/IP-Adapter", "subfolder": model["subfolder"]}
    return Flow.model_validate(
        {
            "name": "bench",
            "mirror": str(zoo),
            "models": {"base": {"source": model["source"], "dtype": "float16"}},
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


def make_rows(pipe: Any, n: int, size: int, steps: int) -> list[dict[str, Any]]:
    """The heterogeneous manifest, with embeddings computed by diffusers itself."""
    masks = _masks(size)
    rows = []
    for i in range(n):
        refs = [_reference_image(i)] + ([_reference_image(1000 + i)] if i % 3 == 1 else [])
        second = i % 4 == 3
        embeds = pipe.prepare_ip_adapter_image_embeds([refs, [_reference_image(2000 + i)]], None, pipe.device, 1, True)
        rows.append(
            {
                "id": f"r{i}",
                "seed": i,
                "prompt": f"a painting of scene {i}",
                "size": size,
                "steps": steps,
                "schedule": 0.7 if i % 3 == 1 else SCHEDULES[(i // 3) % 3],
                "masks": masks if i % 3 == 1 else None,
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


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process high-water mark)"


def timed(name: str, device: str, fn: Any, n: int) -> tuple[list[np.ndarray], float]:
    """Run one way once; returns its images and the seconds it took."""
    _peak_reset(device)
    start = time.perf_counter()
    images = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{name}: {n / seconds:.3f} images/s ({seconds:.1f}s for {n} rows), peak {_peak(device)}", flush=True)
    return images, seconds


def unet_tflop_per_call(folder: Path, size: int, batch: int) -> float:
    """TFLOP of one CFG UNet call at this batch, counted with torch.utils.flop_counter on the meta
    device (no weights, no time). The IP-Adapter layers add a negligible share and are left out."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        cfg = unet.config
        b = 2 * batch
        kwargs: dict[str, Any] = {}
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(b, text_dim), "time_ids": torch.zeros(b, 6)}
        latents = torch.zeros(b, cfg.in_channels, size // 8, size // 8)
        text = torch.zeros(b, 77, cfg.cross_attention_dim)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(latents, 10, encoder_hidden_states=text, **kwargs)
    return counter.get_total_flops() / 1e12


def bf16_ceiling(device: str) -> float:
    """Measured bf16 matmul throughput in TFLOP/s (8192^3 products)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return reps * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="sdxl: 1024x1024 at full size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the three ways")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of all three ways first")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--zoo", default=os.environ.get("IPA_BENCH_ZOO", str(Path.home() / ".cache" / "ipa")))
    args = parser.parse_args()
    full_res = MODELS[args.model]["full_resolution"]
    defaults = {"tiny": (16, 64, 4), "small": (16, 128, 8), "full": (64, full_res, 30)}[args.size]
    n, res, steps = args.rows or defaults[0], args.resolution or defaults[1], args.steps or defaults[2]
    torch.manual_seed(0)
    zoo = Path(build_zoo(Path(args.zoo) / f"zoo-{args.size}", size=args.size))
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = MODELS[args.model]
    pipe = AutoPipelineForText2Image.from_pretrained(zoo / model["source"], dtype=dtype).to(args.device)
    pipe.load_ip_adapter(
        str(zoo / "h94/IP-Adapter"),
        subfolder=[model["subfolder"]] * 2,
        weight_name=model["weights"],
        image_encoder_folder="models/image_encoder",
    )
    pipe.set_progress_bar_config(disable=True)
    rows = make_rows(pipe, n, res, steps)
    print(
        f"bench_generate: size={args.size} device={args.device} rows={n} {res}x{res} steps={steps} "
        f"batch={args.batch} torch={torch.__version__} threads={torch.get_num_threads()}",
        flush=True,
    )
    flow = _flow(zoo, model)
    one = Generator(flow, device=args.device, batch_size=1)
    mixed = Generator(flow, device=args.device, batch_size=args.batch)
    for _ in range(args.warmup):  # untimed full passes: first calls of each row type cost far more
        run_plain(pipe, rows)
        run_ipa(one, rows)
        run_ipa(mixed, rows)
    ways = {
        "(a) diffusers loop": lambda: run_plain(pipe, rows),
        "(b) ipa batch 1": lambda: run_ipa(one, rows),
        f"(c) ipa batch {args.batch}": lambda: run_ipa(mixed, rows),
    }
    seconds = dict.fromkeys(ways, 0.0)
    images: dict[str, list[np.ndarray]] = {}
    names = list(ways)
    for r in range(args.rounds):  # interleaved, rotating order: a busy machine slows all three alike
        for name in names[r % 3 :] + names[: r % 3]:
            images[name], took = timed(name, args.device, ways[name], n)
            seconds[name] += took
    a, b, c = (n * args.rounds / seconds[name] for name in names)
    print(f"images/s over {args.rounds} rounds: a={a:.3f} b={b:.3f} c={c:.3f}")
    plain, single, batched = (images[name] for name in names)
    diff_b = max(float(np.abs(x - y).max()) for x, y in zip(plain, single, strict=True))
    diff_c = max(float(np.abs(x - y).max()) for x, y in zip(plain, batched, strict=True))
    print(f"max |pixel| difference vs (a): b={diff_b:.2e} c={diff_c:.2e}")
    if args.device == "cuda":
        flops = unet_tflop_per_call(zoo / model["source"], res, args.batch)
        ceiling = bf16_ceiling(args.device)
        achieved = flops * (n / args.batch * steps) * c / n
        print(
            f"UNet: {flops:.2f} TFLOP per batch-{args.batch} call; (c) achieved {achieved:.1f} TFLOP/s "
            f"vs bf16 matmul ceiling {ceiling:.0f} TFLOP/s ({100 * achieved / ceiling:.0f}%)"
        )
    print(f"ratios: b/a={b / a:.2f} c/a={c / a:.2f}")


if __name__ == "__main__":
    main()
