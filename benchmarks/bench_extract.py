"""Extract-stage throughput against a plain single-process transformers loop, same images and encoder.

    python benchmarks/bench_extract.py --encoder tiny --images 512 --batch-size 16
    python benchmarks/bench_extract.py --encoder small --images 128 --batch-size 16

Both sides read the same PNG files, preprocess with the encoder's CLIPImageProcessor and run
CLIPVisionModelWithProjection in fp32 on CPU (fp16 on GPU), with the same batch size; both
timings include loading the model. The stage also hashes, checks the store and writes Parquet.
Ray is started before timing (a cluster is up already in production). `tiny` is the tiny zoo's
ViT-H-shaped encoder; `small` is a ViT-S/16-sized encoder (12 layers, width 384) built here.
"""

from __future__ import annotations

import argparse
import os
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


def plain_loop(folder: Path, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """What a user would write without the stage: open, preprocess, encode, batch after batch.

    Returns (total seconds, seconds after the first batch): the second excludes model loading.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    start = time.perf_counter()
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
    end = time.perf_counter()
    assert sum(len(o) for o in out) == len(paths)
    return end - start, end - first


def stage_run(
    folder: Path, images: Path, store: Path, batch_size: int, actors: int, num_cpus: float
) -> tuple[float, float, int]:
    """Returns (total seconds, seconds after the first batch reached the driver, images in that batch)."""
    from ipa_ops.flow import parse_flow
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

    start = time.perf_counter()
    counts = run_extract(flow, flow.stages.extract, commit_rows=1024, on_batch=on_batch)
    end = time.perf_counter()
    assert counts["enc"]["new"] == len(list(images.glob("*.png"))), counts
    return end - start, end - firsts[0][0], firsts[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=0, help="actors in the pool (default: one per CPU)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate loop and stage this many times; best of")
    args = parser.parse_args()

    import ray

    from ipa_ops.stages.extract import ensure_ray

    folder = encoder_folder(args.encoder)
    images = CACHE / f"images-{args.image_size}-{args.images}"
    paths = make_images(images, args.images, args.image_size)
    work = Path(tempfile.mkdtemp(prefix="ipa-bench-"))
    ensure_ray(None)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = args.actors or cpus
    n, loops, stages = len(paths), [], []
    for i in range(args.repeat):  # alternate, so background load hits both sides alike
        loops.append(plain_loop(folder, paths, args.batch_size))
        stages.append(stage_run(folder, images, work / f"store{i}", args.batch_size, actors, 1.0))
    loop_s, loop_steady = min(t for t, _ in loops), min(s for _, s in loops)
    stage_s = min(t for t, _, _ in stages)
    stage_steady = min(s / (n - k) for _, s, k in stages)  # seconds per image after the first batch
    print(f"machine: {os.cpu_count()} CPUs, GPU: {torch.cuda.is_available()}; torch threads {torch.get_num_threads()}")
    print(f"encoder {args.encoder} ({folder}), {n} images of {args.image_size}px, batch size {args.batch_size}")
    print(f"best of {args.repeat}; end to end includes model loading (and Ray actor start-up for the stage)")
    print(f"plain transformers loop : {n / loop_s:8.1f} images/s end to end ({loop_s:.1f} s), "
          f"{(n - args.batch_size) / loop_steady:8.1f} images/s after the first batch")  # fmt: skip
    print(f"extract stage ({actors} actors): {n / stage_s:8.1f} images/s end to end ({stage_s:.1f} s), "
          f"{1 / stage_steady:8.1f} images/s after the first batch")  # fmt: skip
    print(f"ratio stage / loop      : {loop_s / stage_s:8.2f} end to end, "
          f"{loop_steady / (n - args.batch_size) / stage_steady:8.2f} after the first batch")  # fmt: skip


if __name__ == "__main__":
    main()
