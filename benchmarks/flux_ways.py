"""`bench_generate.py --model flux`: the diffusers loop vs ipa on FLUX.1-dev with XLabs' IP-Adapter.

Rows differ in reference, scale and distilled guidance. The ways:
  (a) the loop a user writes: one `pipe(...)` per row, `set_ip_adapter_scale`, the row's CLIP-L
      embedding as `ip_adapter_image_embeds` (zeros as the negative, so nothing is re-encoded);
  (b) ipa's Generator with batch size 1;  (c) with mixed batches;
  (d) diffusers' batched call, rows sharing one reference, scale and guidance (its batch-safe case).
Prints images/s of each (interleaved rounds), the largest pixel difference of (b), (c) against (a)
and `ratios: b/a c/a c/d`; exits 1 without ratios if (b) or (c) made other images than (a).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import parse_flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator
from ipa_ops.store.encoders.clip import ClipEncoder
from ipa_ops.zoo import build_family_zoo
from ipa_ops.zoo.flux import CLIP_L_REPO, FLUX_REPO, XLABS_REPO, XLABS_WEIGHT

REPO = Path(__file__).resolve().parents[1]
MAX_DIFF = 1e-3


def _rows(n: int, res: int, steps: int, embeds: list[torch.Tensor]) -> list[RowRequest]:
    rows = []
    for i in range(n):
        emb = embeds[i % len(embeds)][None]
        adapter = AdapterInput("xlabs", emb, torch.zeros_like(emb), parse_schedule([0.4, 0.7, 1.0][i % 3]))
        rows.append(RowRequest(id=f"f{i}", prompt=f"a photo number {i}", seed=i, model="flux", width=res, height=res,
                               steps=steps, guidance_scale=[2.0, 3.5, 5.0][i % 3], adapters=[adapter]))  # fmt: skip
    return rows


def _plain(pipe: Any, rows: list[RowRequest]) -> list[np.ndarray]:
    out = []
    for row in rows:
        x = row.adapters[0]
        pipe.set_ip_adapter_scale(x.schedule.value)
        seeded = torch.Generator("cpu").manual_seed(row.seed)
        out.append(pipe(row.prompt, ip_adapter_image_embeds=[x.embeds[None]],
                        negative_ip_adapter_image_embeds=[x.negative[None]], num_inference_steps=row.steps,
                        guidance_scale=row.guidance_scale, width=row.width, height=row.height,
                        generator=seeded, output_type="np").images[0])  # fmt: skip
    return out


def _shared(pipe: Any, rows: list[RowRequest], batch: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    first = rows[0].adapters[0]
    pipe.set_ip_adapter_scale(first.schedule.value)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        out += list(pipe([r.prompt for r in chunk], ip_adapter_image_embeds=[first.embeds[None]],
                         negative_ip_adapter_image_embeds=[first.negative[None]], num_inference_steps=chunk[0].steps,
                         guidance_scale=chunk[0].guidance_scale, width=chunk[0].width, height=chunk[0].height,
                         generator=[torch.Generator("cpu").manual_seed(r.seed) for r in chunk],
                         output_type="np").images)  # fmt: skip
    return out


def _ipa(generator: Generator, rows: list[RowRequest]) -> list[np.ndarray]:
    outs = generator.generate(rows)
    bad = [o.error for o in outs if o.error]
    if bad:
        raise RuntimeError(bad[0])
    return [o.image for o in outs]  # type: ignore[misc]


def main_flux(args: Any) -> None:
    defaults = {"tiny": (16, 64, 4), "small": (16, 128, 8), "full": (32, 1024, 28)}[args.size]
    n, res, steps = args.rows or defaults[0], args.resolution or defaults[1], args.steps or defaults[2]
    zoo_root = Path(args.zoo) / f"zoo-flux-{args.size}"
    if args.size != "full":
        build_family_zoo(zoo_root, ("flux",), size=args.size)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(zoo_root / FLUX_REPO, dtype=dtype)
    pipe.load_ip_adapter(str(zoo_root / XLABS_REPO), weight_name=XLABS_WEIGHT,
                         image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)  # fmt: skip
    pipe.to(args.device).set_progress_bar_config(disable=True)
    encoder = ClipEncoder(zoo_root / CLIP_L_REPO, gpu=args.device == "cuda")
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(4)]
    embeds = [torch.as_tensor(e["image_embeds"]) for e in encoder.encode(refs)]
    rows = _rows(n, res, steps, embeds)
    print(f"bench_generate: size={args.size} model=flux device={args.device} rows={n} {res}x{res} steps={steps} "
          f"batch={args.batch} torch={torch.__version__} threads={torch.get_num_threads()} zoo={zoo_root}",
          flush=True)  # fmt: skip
    flow = parse_flow({
        "name": "bench-flux", "mirror": str(zoo_root), "models": {"flux": {"source": FLUX_REPO, "dtype": "bfloat16"}},
        "encoders": {"clip-l": {"type": "clip", "source": CLIP_L_REPO}},
        "adapters": {"xlabs": {"source": XLABS_REPO, "weight_name": XLABS_WEIGHT, "encoder": "clip-l"}},
        "stages": {"generate": {"manifest": "unused.csv", "model": "flux", "store": "unused", "output": "unused"}},
    })  # fmt: skip
    one = Generator(flow, device=args.device, batch_size=1)
    mixed = Generator(flow, device=args.device, batch_size=args.batch)
    ways = {
        "(a) diffusers loop": lambda: _plain(pipe, rows),
        "(b) ipa batch 1": lambda: _ipa(one, rows),
        f"(c) ipa batch {args.batch}": lambda: _ipa(mixed, rows),
        f"(d) diffusers batch {args.batch}, one shared reference, scale and guidance": lambda: _shared(
            pipe, rows, args.batch
        ),
    }
    for _ in range(args.warmup):
        for fn in ways.values():
            fn()
    names = list(ways)
    seconds = dict.fromkeys(names, 0.0)
    images: dict[str, list[np.ndarray]] = {}
    for r in range(args.rounds):  # interleaved, rotating order: a busy machine slows every way alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            images[name] = ways[name]()
            took = time.perf_counter() - start
            seconds[name] += took
            print(f"{name}: {n / took:.3f} images/s ({took:.1f}s for {n} rows)", flush=True)
    rate = {name[1]: n * args.rounds / seconds[name] for name in names}
    print(f"images/s over {args.rounds} rounds: " + " ".join(f"{k}={v:.3f}" for k, v in rate.items()))
    plain = images[names[0]]
    diffs = {name[1]: max(float(np.abs(x - y).max()) for x, y in zip(plain, images[name], strict=True))
             for name in names[1:3]}  # fmt: skip
    print("max |pixel| difference vs (a): " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    wrong = {k: v for k, v in diffs.items() if v > MAX_DIFF}
    if wrong:
        print(f"bench_generate: images differ from (a) beyond {MAX_DIFF}: {wrong}; no ratios", file=sys.stderr)
        sys.exit(1)
    a, b, c, d = rate["a"], rate["b"], rate["c"], rate["d"]
    print(f"ratios: b/a={b / a:.2f} c/a={c / a:.2f} c/d={c / d:.2f}")
