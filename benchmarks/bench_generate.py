"""Side-by-side generation throughput: the plain diffusers loop vs ipa, in one run.

One manifest (heterogeneous by default: a different reference per row, three schedules, masks on
a third of the rows, two adapters on a quarter; `--uniform-work`: rows that differ only by prompt,
seed, reference and scalar scale) is rendered by the ways of generate_ways.py:

  (a) the loop a user writes today: one `pipe(...)` per row, `set_ip_adapter_scale`,
      `ip_adapter_image_embeds`, masks through `cross_attention_kwargs`, the cutoff callback;
  (b) ipa's Generator with batch size 1;
  (c) ipa's Generator with mixed batches;
  (d) diffusers' own batched call at the same batch size, rows sharing one reference and scale:
      the best case diffusers can batch, so c/d says how far mixed batches are from the ceiling;
  (e) with `--compile regional|whole`: (c) with the UNet compiled (compile time printed apart).

It prints images/s and peak memory of each, the largest pixel difference of (b), (c), (e) against
(a), and ends with `ratios: b/a=<x> c/a=<y> c/d=<z>`. Every way loads the very same zoo files
(`IPA_MIRROR` is ignored); if any way's images differ from (a) beyond 1e-3 it exits 1 with no
`ratios:` line. With `--device cuda` it also prints the UNet's achieved TFLOP/s (counted with
torch.utils.flop_counter) against a measured bf16 matmul ceiling.
Runs without Ray: `python benchmarks/bench_generate.py --size small --device cpu`.
`--model flux|sd3` runs the same comparison on FLUX.1-dev + XLabs or SD3.5 + InstantX (benchmarks/flux_ways.py).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import AutoPipelineForText2Image  # noqa: E402
from generate_ways import MODELS, bench_flow, make_rows, run_diffusers_batched, run_ipa, run_plain  # noqa: E402

from ipa_ops.generate import memory  # noqa: E402
from ipa_ops.generate.generator import Generator  # noqa: E402
from ipa_ops.zoo import build_zoo  # noqa: E402

MAX_DIFF = 1e-3  # beyond this a way made other images, and its speed is not comparable


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
    parser.add_argument("--model", choices=[*sorted(MODELS), "flux", "sd3"], default="sd15",
                        help="sdxl: 1024x1024 at full size; flux / sd3: FLUX.1-dev + XLabs, SD3.5 + InstantX "
                             "(benchmarks/flux_ways.py)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the ways")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of every way first")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--uniform-work", action="store_true", help="rows differing only by prompt, seed, reference, "
                        "scalar scale: (c) and (d) do the same arithmetic, c/d is the cost of heterogeneity")
    parser.add_argument("--compile", choices=["regional", "whole"], default=None,
                        help="also run (e): (c) with the UNet compiled; its compile time is printed apart")
    parser.add_argument("--zoo", default=os.environ.get("IPA_BENCH_ZOO", str(Path.home() / ".cache" / "ipa")))
    args = parser.parse_args()  # fmt: skip
    if os.environ.pop("IPA_MIRROR", None) is not None:  # it would point ipa's ways at another zoo than (a)'s
        print("bench_generate: IPA_MIRROR ignored; every way loads the same zoo", flush=True)
    if args.model in ("flux", "sd3"):
        from flux_ways import main_flux

        main_flux(args)
        return
    full_res = MODELS[args.model]["full_resolution"]
    defaults = {"tiny": (16, 64, 4), "small": (16, 128, 8), "full": (64, full_res, 30)}[args.size]
    n, res, steps = args.rows or defaults[0], args.resolution or defaults[1], args.steps or defaults[2]
    if args.device == "cpu":  # a CPU Generator does this anyway; here before any way runs, for all of them alike
        print(f"bench_generate: glibc malloc thresholds fixed for every way: {memory.steady_host_allocator()}")
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
    rows = make_rows(pipe, n, res, steps, uniform=args.uniform_work)
    print(
        f"bench_generate: size={args.size} model={args.model} device={args.device} rows={n} {res}x{res} "
        f"steps={steps} batch={args.batch} uniform={args.uniform_work} compile={args.compile} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} zoo={zoo}",
        flush=True,
    )
    flow = bench_flow(zoo, model)
    one = Generator(flow, device=args.device, batch_size=1)
    mixed = Generator(flow, device=args.device, batch_size=args.batch)
    ways = {
        "(a) diffusers loop": lambda: run_plain(pipe, rows),
        "(b) ipa batch 1": lambda: run_ipa(one, rows),
        f"(c) ipa batch {args.batch}": lambda: run_ipa(mixed, rows),
        f"(d) diffusers batch {args.batch}, one shared reference and scale": lambda: run_diffusers_batched(
            pipe, rows, args.batch
        ),
    }
    if args.compile:
        compiled = Generator(bench_flow(zoo, model, args.compile), device=args.device, batch_size=args.batch)
        ways[f"(e) ipa batch {args.batch}, {args.compile} compiled"] = lambda: run_ipa(compiled, rows)
        start = time.perf_counter()
        ways[list(ways)[-1]]()  # the first pass compiles: timed apart from the steady rounds
        print(f"(e) compile + first pass: {time.perf_counter() - start:.1f}s", flush=True)
    for _ in range(args.warmup):  # untimed full passes: first calls of each row type cost far more
        for fn in ways.values():
            fn()
    seconds = dict.fromkeys(ways, 0.0)
    images: dict[str, list[np.ndarray]] = {}
    names = list(ways)
    for r in range(args.rounds):  # interleaved, rotating order: a busy machine slows every way alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            images[name], took = timed(name, args.device, ways[name], n)
            seconds[name] += took
    rate = {name[1]: n * args.rounds / seconds[name] for name in names}
    print(f"images/s over {args.rounds} rounds: " + " ".join(f"{k}={v:.3f}" for k, v in rate.items()))
    plain = images[names[0]]
    diffs = {}
    for name in names[1:]:
        if name.startswith("(d)"):
            continue  # (d) renders other conditioning (one shared reference): not comparable to (a)
        diffs[name[1]] = max(float(np.abs(x - y).max()) for x, y in zip(plain, images[name], strict=True))
    print("max |pixel| difference vs (a): " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    if args.device == "cuda":
        flops = unet_tflop_per_call(zoo / model["source"], res, args.batch)
        ceiling = bf16_ceiling(args.device)
        for way in ("c", "e"):
            if way in rate:
                achieved = flops * (n / args.batch * steps) * rate[way] / n
                share = 100 * achieved / ceiling
                print(f"UNet: {flops:.2f} TFLOP per batch-{args.batch} call; ({way}) achieved {achieved:.1f} "
                      f"TFLOP/s vs bf16 matmul ceiling {ceiling:.0f} TFLOP/s ({share:.0f}%)")  # fmt: skip
    wrong = {k: v for k, v in diffs.items() if v > MAX_DIFF}
    if wrong:  # ratios of ways that made different images would compare different work
        print(f"bench_generate: images differ from (a) beyond {MAX_DIFF}: {wrong}; no ratios", file=sys.stderr)
        sys.exit(1)
    a, b, c, d = rate["a"], rate["b"], rate["c"], rate["d"]
    extra = f" e/c={rate['e'] / c:.2f}" if "e" in rate else ""
    print(f"ratios: b/a={b / a:.2f} c/a={c / a:.2f} c/d={c / d:.2f}{extra}")


if __name__ == "__main__":
    main()
