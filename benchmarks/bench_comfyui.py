"""What ComfyUI's controls cost in mixed batches: bench_generate's manifest with and without them.

  (a) the plain diffusers loop over the rows (`generate_ways.run_plain`), without the controls;
  (c) ipa's mixed batches of the same rows;
  (k) ipa's mixed batches of the same rows with ComfyUI controls added round-robin: weight types
      (ease in, style transfer precise, composition precise), embeds scalings (K+V,
      K+mean(V) w/ C penalty) and a start_at / end_at window.

The ways run interleaved in one process; it ends with `ratios: c/a=<x> k/a=<y> k/c=<z>`. (k)
makes other images than (a) on purpose, so no pixel check applies to it.
Runs without Ray: `python benchmarks/bench_comfyui.py --size small --device cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import AutoPipelineForText2Image  # noqa: E402
from generate_ways import MODELS, bench_flow, make_rows, run_plain  # noqa: E402

from ipa_ops.flow.schedules import parse_schedule  # noqa: E402
from ipa_ops.generate.contract import AdapterInput, RowRequest  # noqa: E402
from ipa_ops.generate.generator import Generator  # noqa: E402
from ipa_ops.zoo import build_zoo  # noqa: E402

# (scale spec, embeds scaling) added to the rows' first adapter, round-robin; None: the row as it is
CONTROLS: list[tuple[Any, str] | None] = [
    ({"weight_type": "ease in", "value": 0.8}, "V only"),
    ({"weight_type": "style transfer precise", "value": 0.8, "style_boost": 1.2}, "V only"),
    ({"weight_type": "composition precise", "value": 0.7, "composition_boost": 0.3}, "V only"),
    (0.7, "K+V"),
    (0.9, "K+mean(V) w/ C penalty"),
    ({"value": 0.8, "start_at": 0.2, "end_at": 0.8}, "V only"),
    None,
]


def requests(rows: list[dict[str, Any]], controls: bool) -> list[RowRequest]:
    out = []
    for i, r in enumerate(rows):
        neg, pos = r["embeds"][0].chunk(2)
        first = AdapterInput("style", pos[0], neg[0], parse_schedule(r["schedule"]), r["masks"])
        control = CONTROLS[i % len(CONTROLS)] if controls else None
        if control is not None:
            first = dataclasses.replace(first, schedule=parse_schedule(control[0]), embeds_scaling=control[1])
        adapters = [first]
        if r["second"]:
            neg2, pos2 = r["embeds"][1].chunk(2)
            adapters.append(AdapterInput("plus", pos2[0], neg2[0], parse_schedule(0.3)))
        size = r["size"]
        out.append(RowRequest(id=r["id"], prompt=r["prompt"], seed=r["seed"], model="base", width=size,
                              height=size, steps=r["steps"], guidance_scale=7.5, adapters=adapters))  # fmt: skip
    return out


def run(gen: Generator, reqs: list[RowRequest]) -> list[np.ndarray]:
    outs = gen.generate(reqs)
    for o in outs:
        if o.error:
            raise RuntimeError(f"{o.id}: {o.error}")
    return [o.image for o in outs]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--zoo", default=os.environ.get("IPA_BENCH_ZOO", str(Path.home() / ".cache" / "ipa")))
    args = parser.parse_args()
    os.environ.pop("IPA_MIRROR", None)
    res, steps = {"tiny": (64, 4), "small": (128, 8), "full": (512, 30)}[args.size]
    torch.manual_seed(0)
    zoo = Path(build_zoo(Path(args.zoo) / f"zoo-{args.size}", size=args.size))
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = MODELS["sd15"]
    pipe = AutoPipelineForText2Image.from_pretrained(zoo / model["source"], dtype=dtype).to(args.device)
    pipe.load_ip_adapter(str(zoo / "h94/IP-Adapter"), subfolder=[model["subfolder"]] * 2,
                         weight_name=model["weights"], image_encoder_folder="models/image_encoder")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    rows = make_rows(pipe, args.rows, res, steps)
    gen = Generator(bench_flow(zoo, model), device=args.device, batch_size=args.batch)
    plain, with_controls = requests(rows, False), requests(rows, True)
    ways = {"a": lambda: run_plain(pipe, rows), "c": lambda: run(gen, plain), "k": lambda: run(gen, with_controls)}
    for fn in ways.values():  # warm-up: loads, first-call costs
        fn()
    seconds = dict.fromkeys(ways, 0.0)
    for _ in range(args.rounds):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
    for name, total in seconds.items():
        print(f"({name}): {args.rows * args.rounds / total:.3f} images/s", flush=True)
    a, c, k = seconds["a"], seconds["c"], seconds["k"]
    print(f"ratios: c/a={a / c:.3f} k/a={a / k:.3f} k/c={c / k:.3f}")


if __name__ == "__main__":
    main()
