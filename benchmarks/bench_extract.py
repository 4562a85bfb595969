"""Extract-stage throughput against a plain single-process transformers loop, same images and encoder.

    python benchmarks/bench_extract.py --encoder tiny --images 2048 --batch-size 16 --repeat 2
    python benchmarks/bench_extract.py --encoder small --images 512 --batch-size 16

Both sides read the same PNG files, preprocess with the encoder's CLIPImageProcessor and run
CLIPVisionModelWithProjection in fp32 on CPU, with the same batch size. Each side is a fresh
Python process timed from launch to exit, so each pays its own imports (torch, transformers) and
model loading: the loop in its one process, the stage in its driver and its actor. A Ray head is
started before timing (`ray start --head`), as a cluster is up already in production; the stage
connects to it, runs its pipeline (hash, claim, decode, encode, write Parquet) and exits. The
stage gets one actor holding every core (`--actors` to change). `tiny` is the tiny zoo's
ViT-H-shaped encoder; `small` is a ViT-S/16-sized encoder (12 layers, width 384) built here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path(os.environ.get("IPA_BENCH_CACHE", Path(tempfile.gettempdir()) / "ipa-bench"))


def encoder_folder(kind: str) -> Path:
    """The encoder to benchmark, built once into the cache."""
    if kind == "tiny":
        from ipa_ops.zoo import build_zoo

        return Path(build_zoo(CACHE / "zoo", size="tiny")) / "h94/IP-Adapter/models/image_encoder"
    folder = CACHE / "vit-s16"
    if not (folder / "config.json").is_file():
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(0)
        config = CLIPVisionConfig(
            hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
            image_size=224, patch_size=16, projection_dim=512, hidden_act="gelu",
        )  # fmt: skip
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"ref{i:05d}.png"
        if not path.exists():
            base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)  # blocky, so PNGs stay small
            Image.fromarray(base).resize((size, size + 8 * (i % 5)), Image.Resampling.NEAREST).save(path)
        paths.append(path)
    return paths


def plain_loop(folder: Path, paths: list[Path], batch_size: int) -> float:
    """What a user would write without the stage: open, preprocess, encode, batch after batch.

    Runs in a fresh interpreter (see `child`); returns seconds after the first batch (steady state).
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder) if (folder / "preprocessor_config.json").is_file() else None
    if processor is None:
        size = model.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    out, first = [], 0.0
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
            pixels = processor(images, return_tensors="pt").pixel_values
            out.append(model(pixels).image_embeds.numpy())
            first = first or time.perf_counter()
    assert sum(len(o) for o in out) == len(paths)
    return time.perf_counter() - first


def stage_run(folder: Path, images: Path, store: Path, batch_size: int, actors: int, num_cpus: float) -> float:
    """The extract stage as `ipa run --stage extract` runs it, against the running cluster (RAY_ADDRESS).

    Runs in a fresh interpreter (see `child`); returns seconds per image after the first batch.
    """
    from ipa_ops.flow.spec import parse_flow
    from ipa_ops.stages.extract import run_extract

    flow = parse_flow({
        "name": "bench", "encoders": {"enc": {"type": "clip", "source": str(folder)}},
        "stages": {"extract": {"images": str(images), "encoders": ["enc"], "store": str(store),
                               "resources": {"actors": actors, "num_cpus": num_cpus, "batch_size": batch_size}}},
    })  # fmt: skip
    assert flow.stages.extract is not None
    firsts: list[tuple[float, int]] = []

    def on_batch(n: int) -> None:
        if not firsts:
            firsts.append((time.perf_counter(), n))

    counts = run_extract(flow, flow.stages.extract, commit_rows=1024, on_batch=on_batch)
    end = time.perf_counter()
    n = len(list(images.glob("*.png")))
    assert counts["enc"]["new"] == n, counts
    return (end - firsts[0][0]) / (n - firsts[0][1])


def timed_child(*args: str) -> tuple[float, float]:
    """Run this script as `--child ...` in a fresh interpreter: (wall seconds launch to exit, its figure)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return wall, float(out.stdout.strip().splitlines()[-1])


def child(argv: list[str]) -> None:
    """Entry of the timed processes: `loop FOLDER IMAGES BATCH`, `stage FOLDER IMAGES BATCH STORE ACTORS CPUS`."""
    kind, folder, images, batch = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    if kind == "loop":
        print(plain_loop(folder, sorted(images.glob("*.png")), batch))
    else:
        print(stage_run(folder, images, Path(argv[4]), batch, int(argv[5]), float(argv[6])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1, help="actors in the pool; each gets CPUs / actors cores")
    parser.add_argument("--repeat", type=int, default=1, help="alternate loop and stage this many times; best of")
    args = parser.parse_args()

    folder = encoder_folder(args.encoder)
    images = CACHE / f"images-{args.image_size}-{args.images}"
    paths = make_images(images, args.images, args.image_size)
    work = Path(tempfile.mkdtemp(prefix="ipa-bench-"))
    cpus = os.cpu_count() or 1
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false"],
                   check=True, capture_output=True)  # fmt: skip
    os.environ["RAY_ADDRESS"] = "auto"
    n, b, loops, stages = len(paths), args.batch_size, [], []
    try:
        for i in range(args.repeat):  # alternate, so background load hits both sides alike
            loops.append(timed_child("loop", str(folder), str(images), str(b)))
            store = str(work / f"store{i}")
            stages.append(timed_child("stage", str(folder), str(images), str(b), store, str(args.actors),
                                      str(cpus / args.actors)))  # fmt: skip
    finally:
        subprocess.run([ray_bin, "stop"], capture_output=True)
    loop_s, loop_steady = min(w for w, _ in loops), min(s for _, s in loops)
    stage_s, stage_steady = min(w for w, _ in stages), min(s for _, s in stages)
    print(f"machine: {cpus} CPUs, GPU: {torch.cuda.is_available()}; load average {os.getloadavg()[0]:.1f}")
    print(f"encoder {args.encoder} ({folder}), {n} images of {args.image_size}px, batch size {b}")
    print(f"best of {args.repeat}; end to end = a fresh process from launch to exit (imports, model loading, "
          "and for the stage connecting to the running Ray cluster and starting its actor pool)")  # fmt: skip
    print(f"plain transformers loop : {n / loop_s:8.1f} images/s end to end ({loop_s:.1f} s), "
          f"{(n - b) / loop_steady:8.1f} images/s after the first batch")  # fmt: skip
    print(f"extract stage ({args.actors} actor x {cpus / args.actors:g} CPUs): {n / stage_s:8.1f} images/s end to end "
          f"({stage_s:.1f} s), {1 / stage_steady:8.1f} images/s after the first batch")  # fmt: skip
    print(f"ratio stage / loop      : {loop_s / stage_s:8.2f} end to end, "
          f"{loop_steady / (n - b) / stage_steady:8.2f} after the first batch")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
