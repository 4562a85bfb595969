"""`bench_generate.py --model flux|sd3`: the diffusers loop vs ipa on FLUX.1-dev + XLabs, or SD3.5 + InstantX.

Rows differ in reference, scale and (Flux) distilled guidance; SD3.5 rows share one CFG scale, which
is per call in diffusers and in ipa. The ways:
  (a) the loop a user writes: one `pipe(...)` per row, `set_ip_adapter_scale`, the row's embedding
      (Flux: CLIP-L pooled; SD3.5: SigLIP hidden states) as `ip_adapter_image_embeds`, zeros as the negative;
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
from ipa_ops.store.encoders.siglip import vision_encoder
from ipa_ops.zoo import build_family_zoo
from ipa_ops.zoo.flux import CLIP_L_REPO, FLUX_REPO, XLABS_REPO, XLABS_WEIGHT
from ipa_ops.zoo.sd3 import INSTANTX_REPO, INSTANTX_WEIGHT, SD35_REPO, SIGLIP_REPO

# what differs between the two: repositories, the pipeline, the embedding field, guidance per row
SETUPS: dict[str, dict[str, Any]] = {
    "flux": {"model": FLUX_REPO, "adapter": XLABS_REPO, "weight": XLABS_WEIGHT, "encoder": CLIP_L_REPO,
             "field": "image_embeds", "guidance": [2.0, 3.5, 5.0]},
    "sd3": {"model": SD35_REPO, "adapter": INSTANTX_REPO, "weight": INSTANTX_WEIGHT, "encoder": SIGLIP_REPO,
            "field": "hidden_states", "guidance": [5.0]},
}  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
MAX_DIFF = 1e-3


def _rows(n: int, res: int, steps: int, embeds: list[torch.Tensor], setup: dict[str, Any]) -> list[RowRequest]:
    rows, guidance = [], setup["guidance"]
    for i in range(n):
        emb = embeds[i % len(embeds)][None]
        adapter = AdapterInput("ip", emb, torch.zeros_like(emb), parse_schedule([0.4, 0.7, 1.0][i % 3]))
        rows.append(RowRequest(id=f"f{i}", prompt=f"a photo number {i}", seed=i, model="base", width=res,
                               height=res, steps=steps, guidance_scale=guidance[i % len(guidance)],
                               adapters=[adapter]))  # fmt: skip
    return rows


def _embeds(name: str, given: list[torch.Tensor], negatives: list[torch.Tensor]) -> dict[str, Any]:
    """The documented precomputed-embeddings arguments: Flux a list per adapter, SD3.5 `[negative; positive]`."""
    if name == "flux":
        return {"ip_adapter_image_embeds": [torch.stack(given)[:, None]],
                "negative_ip_adapter_image_embeds": [torch.stack(negatives)[:, None]]}  # fmt: skip
    return {"ip_adapter_image_embeds": torch.cat([torch.stack(negatives), torch.stack(given)])}


def _plain(name: str, pipe: Any, rows: list[RowRequest]) -> list[np.ndarray]:
    out = []
    for row in rows:
        x = row.adapters[0]
        pipe.set_ip_adapter_scale(x.schedule.value)
        seeded = torch.Generator("cpu").manual_seed(row.seed)
        out.append(pipe(row.prompt, **_embeds(name, [x.embeds[0]], [x.negative[0]]), num_inference_steps=row.steps,
                        guidance_scale=row.guidance_scale, width=row.width, height=row.height,
                        generator=seeded, output_type="np").images[0])  # fmt: skip
    return out


def _shared(name: str, pipe: Any, rows: list[RowRequest], batch: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    first = rows[0].adapters[0]
    pipe.set_ip_adapter_scale(first.schedule.value)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        out += list(pipe([r.prompt for r in chunk], **_embeds(name, [first.embeds[0]], [first.negative[0]]),
                         num_inference_steps=chunk[0].steps, guidance_scale=chunk[0].guidance_scale,
                         width=chunk[0].width, height=chunk[0].height,
                         generator=[torch.Generator("cpu").manual_seed(r.seed) for r in chunk],
                         output_type="np").images)  # fmt: skip
    return out


def _ipa(generator: Generator, rows: list[RowRequest]) -> list[np.ndarray]:
    outs = generator.generate(rows)
    bad = [o.error for o in outs if o.error]
    if bad:
        raise RuntimeError(bad[0])
    return [o.image for o in outs]  # type: ignore[misc]


def _pipeline(name: str, zoo: Path, dtype: torch.dtype) -> Any:
    """The documented set-up, without an image encoder (the ways are fed precomputed embeddings)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    setup = SETUPS[name]
    if name == "flux":
        pipe = FluxPipeline.from_pretrained(zoo / setup["model"], dtype=dtype)
        pipe.load_ip_adapter(str(zoo / setup["adapter"]), weight_name=setup["weight"],
                             image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)  # fmt: skip
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(zoo / setup["model"], dtype=dtype)
        pipe.load_ip_adapter(str(zoo / setup["adapter"]), weight_name=setup["weight"], subfolder="",
                             image_encoder_folder=None, low_cpu_mem_usage=False)  # fmt: skip
    return pipe


def main_flux(args: Any) -> None:
    name, setup = args.model, SETUPS[args.model]
    defaults = {"tiny": (16, 64, 4), "small": (16, 128, 8), "full": (32, 1024, 28)}[args.size]
    n, res, steps = args.rows or defaults[0], args.resolution or defaults[1], args.steps or defaults[2]
    zoo_root = Path(args.zoo) / f"zoo-{name}-{args.size}"
    if args.size != "full":
        build_family_zoo(zoo_root, ("flux", "sd3"), size=args.size)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = _pipeline(name, zoo_root, dtype)
    pipe.to(args.device).set_progress_bar_config(disable=True)
    encoder = vision_encoder(zoo_root / setup["encoder"], name == "sd3", "center", gpu=args.device == "cuda")
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(4)]
    embeds = [torch.as_tensor(e[setup["field"]]) for e in encoder.encode(refs)]
    rows = _rows(n, res, steps, embeds, setup)
    print(f"bench_generate: size={args.size} model={name} device={args.device} rows={n} {res}x{res} steps={steps} "
          f"batch={args.batch} torch={torch.__version__} threads={torch.get_num_threads()} zoo={zoo_root}",
          flush=True)  # fmt: skip
    flow = parse_flow({
        "name": f"bench-{name}", "mirror": str(zoo_root),
        "models": {"base": {"source": setup["model"], "dtype": "bfloat16"}},
        "encoders": {"enc": {"type": "clip", "source": setup["encoder"], "hidden_states": name == "sd3"}},
        "adapters": {"ip": {"source": setup["adapter"], "weight_name": setup["weight"], "encoder": "enc"}},
        "stages": {"generate": {"manifest": "unused.csv", "model": "base", "store": "unused", "output": "unused"}},
    })  # fmt: skip
    one = Generator(flow, device=args.device, batch_size=1)
    mixed = Generator(flow, device=args.device, batch_size=args.batch)
    ways = {
        "(a) diffusers loop": lambda: _plain(name, pipe, rows),
        "(b) ipa batch 1": lambda: _ipa(one, rows),
        f"(c) ipa batch {args.batch}": lambda: _ipa(mixed, rows),
        f"(d) diffusers batch {args.batch}, one shared reference, scale and guidance": lambda: _shared(
            name, pipe, rows, args.batch
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
