"""Score-stage throughput next to a plain loop over the same images with the same models.

    python benchmarks/bench_scores.py --images 64 --batch-size 16 --repeat 2

One output folder of `--images` PNGs (seeded, 256 px) with ok results rows is made once; then, in
one process and interleaved per repeat:

- stage:   `run_score` on an embedded Ray (scores/ removed first): the actor pool reads and
           decodes the PNGs and runs every scorer on batches of `--batch-size`, committing parts
           (its own `seconds`: from reading the results to the last part and `dup_of`, without
           the report it rebuilds afterwards);
- loop:    what a script would do: load the same scorers' models once, then per image read and
           decode the PNG and call each model on that one image (batch 1), no Ray;
- batched: the same in-process loop with batches of `--batch-size` (what the actor does, without Ray).

All sides load their models inside the timed region (the stage's actor does so too; the in-process
sides run once untimed first, so they do not pay the driver's first imports), and score
clip_t, clip_i, phash, aesthetic and nsfw on the same device: CPU fp32 unless `--gpu`, torch with
`--threads` threads (the stage's actor gets the same through `resources.num_cpus`). Every side's
numbers are checked equal to the stage's, so the comparison is between like results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("IPA_BENCH_CACHE", Path(tempfile.gettempdir()) / "ipa-bench"))
SCORERS = ("clip_t", "clip_i", "phash", "aesthetic", "nsfw")


def make_output(root: Path, n: int, size: int = 256) -> Path:
    """An output folder with `n` images and their ok results rows (each referencing one repo image)."""
    from ipa_ops.outputs.folder import OutputDir

    out = OutputDir(str(root))
    rng = np.random.default_rng(0)
    refs = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
    rows = []
    for i in range(n):
        key = f"{i:020x}"
        base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        path = out.write_bytes_atomic(out.image_path(key), buf.getvalue())
        rows.append({"id": f"b{i}", "row_key": key, "status": "ok", "outputs": [path], "seed": i,
                     "prompt": f"a photo number {i} of a red car", "references": [refs[i % 4]],
                     "finished_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=i)})  # fmt: skip
    out.append_results(rows)
    return root


def make_flow(zoo: Path, output: Path, batch_size: int, threads: int, gpu: bool):
    from ipa_ops.flow.spec import parse_flow

    return parse_flow({
        "name": "bench-scores", "mirror": str(zoo),
        "encoders": {"vit-h": {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"}},
        "stages": {"score": {"output": str(output), "scorers": {name: {} for name in SCORERS},
                             "resources": {"batch_size": batch_size, "num_cpus": threads, "num_gpus": int(gpu)}}},
    })  # fmt: skip


def in_process(flow, output: Path, batch: int, gpu: bool) -> tuple[float, dict]:
    """Load the scorers, then score every image `batch` at a time; seconds and row_key -> metrics."""
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.scores import ScoreContext, ScoreItem, build_scorers
    from ipa_ops.store.images import decode_image

    started = time.perf_counter()
    scorers = build_scorers(ScoreContext(flow, gpu=gpu), flow.stages.score.scorers)
    for scorer in scorers:
        scorer.ensure_loaded()
    out = OutputDir(str(output))
    rows = out.read_results()
    found: dict[str, dict] = {}
    for start in range(0, len(rows), batch):
        items = []
        for r in rows.iloc[start : start + batch].itertuples():
            image = decode_image(Path(r.outputs[0]).read_bytes(), r.outputs[0]).image
            items.append(ScoreItem(r.row_key, r.id, r.prompt, image, list(r.references)))
        for scorer in scorers:
            for item, values in zip(items, scorer.score(items), strict=True):
                found.setdefault(item.row_key, {}).update(values)
    return time.perf_counter() - started, found


def stage(flow, output: Path) -> tuple[float, pd.DataFrame]:
    from ipa_ops.outputs.scores import scores_table
    from ipa_ops.stages.score import run_score

    shutil.rmtree(output / "scores", ignore_errors=True)
    found = run_score(flow, flow.stages.score)  # its `seconds` leave out the report it rebuilds after scoring
    return found["seconds"], scores_table(str(output)).set_index("row_key")


def check(table: pd.DataFrame, found: dict, label: str) -> None:
    """The side's scores equal the stage's (the same models on the same decoded PNGs)."""
    for key, values in found.items():
        for metric, value in values.items():
            want = table.loc[key, metric]
            same = value == want if isinstance(value, str) else abs(float(value) - float(want)) < 1e-4
            if not same:
                raise AssertionError(f"{label}: {key} {metric} = {value}, the stage gave {want}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(CACHE / "zoo"), help="zoo root (built with the scorer models if needed)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import ray
    import torch

    from ipa_ops.zoo import build_zoo, is_built

    zoo = Path(args.zoo)
    if not (is_built(zoo, "tiny") and is_built(zoo, "tiny", "scorers-")):
        build_zoo(zoo, size="tiny", scorers=True)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ipa-bench-scores-"))
    output = make_output(work / "out", args.images)
    flow = make_flow(zoo, output, args.batch_size, args.threads, args.gpu)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    in_process(flow, output, args.batch_size, args.gpu)  # untimed: the driver's first imports and model loads
    times: dict[str, list[float]] = {"stage": [], "loop": [], "batched": []}
    for _ in range(args.repeat):
        seconds, table = stage(flow, output)
        times["stage"].append(seconds)
        for label, batch in (("loop", 1), ("batched", args.batch_size)):
            seconds, found = in_process(flow, output, batch, args.gpu)
            check(table, found, label)
            times[label].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: args.images / v for k, v in best.items()}
    print(json.dumps({
        "images": args.images, "batch_size": args.batch_size, "threads": args.threads, "gpu": args.gpu,
        "scorers": list(SCORERS), "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "images_per_second": {k: round(v, 2) for k, v in rate.items()},
        "stage_vs_loop": round(rate["stage"] / rate["loop"], 2),
        "batched_vs_loop": round(rate["batched"] / rate["loop"], 2),
    }, indent=2))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
