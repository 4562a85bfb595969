"""Output-side costs at 10^4 / 10^5 / 10^6 rows: rerun (done-detection + skip), report, compaction.

    .venv/bin/python benchmarks/bench_outputs.py [--sizes 10000 100000 1000000] [--root DIR]

For each size it synthesises an output folder in the layout a real run leaves: images as small
files under `images/<k[:2]>/`, results rows as the generate stage writes them (full rows with
provenance, committed through `ResultsWriter` every 5,000 rows, then compacted at the end of the
run, which is the compaction figure). Then, each in a fresh process so peak RSS is its own:

- done: `OutputDir.done_keys(planned keys)`, the done-detection a rerun does;
- rerun: what a rerun of the generate stage does before any work: plan the manifest (rows known
  from the earlier run's plan are recognised by their hash, generate/plan_cache.py), done-detection
  of the planned keys, and skipping every row (all done). The manifest has n text2img rows (id,
  prompt, negative prompt, seed, an `x_` column) on the tiny zoo's quickstart flow, and the output
  holds exactly their keys (the first, full plan is set-up, printed as `first_plan_s`);
- report: `build_report` after a second run added 1,000 rows, as that run's end does it (its own
  pages, with thumbnails made for its rows, and the index over every row); `index_kb` is the
  size of the index page it leaves.

Prints one `outputs: rows=<n> rerun_s=<x> report_s=<y> rss_gb=<z>` line per size (rss_gb: peak of
the rerun process), then one `detail:` line with the other figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from ipa_ops.outputs.folder import OutputDir  # noqa: E402
from ipa_ops.outputs.results_writer import ResultsWriter  # noqa: E402

PNG = bytes.fromhex(  # a valid 1x1 PNG: images are small files, as the issue asks
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0"
    "00000301010018dd8db00000000049454e44ae426082"
)
CHUNK = 5000
LINK_POOL = 64  # PNG files the linked images share (ext4 allows 65,000 links to one file)


def keys_for(n: int, salt: str = "") -> list[str]:
    """Row keys as planning hands them over (20 hex); made with a bare sha256, not timed."""
    return [hashlib.sha256(f"{salt}/{i}".encode()).hexdigest()[:20] for i in range(n)]


def synthesise(out: OutputDir, keys: list[str], when: str = "2025-01-01T00:00:00Z", link: bool = False) -> float:
    """Images and results of one run over `keys`; returns the seconds its end-of-run compaction took.

    `link`: the images are hard links to a few PNG files (a directory entry each, no inode or data
    block of its own), which makes 10^6 image files cheap to lay out.
    """
    root = Path(out.root)
    pool = [root / ".bench-pool" / f"{i:02d}.png" for i in range(LINK_POOL)] if link else []
    for path in pool:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
    for i, key in enumerate(keys):
        folder = root / "images" / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        if link:
            os.link(pool[i % LINK_POOL], folder / f"{key}.png")
            continue
        with open(folder / f"{key}.png", "wb") as f:
            f.write(PNG)
    writer = ResultsWriter(out, rows=CHUNK, seconds=1e9)
    for start in range(0, len(keys), CHUNK):
        writer.add([_row(i, key, out, when) for i, key in enumerate(keys[start : start + CHUNK], start)])
    writer.commit()
    began = time.perf_counter()
    writer.close()
    return time.perf_counter() - began


def _row(i: int, key: str, out: OutputDir, when: str) -> dict:
    refs = [f"data/refs/ref-{i % 4}.png"]
    return {
        "id": f"row-{i:07d}",
        "row_key": key,
        "status": "ok",
        "error": "",
        "outputs": [out.image_path(key)],
        "seed": i,
        "started_at": when,
        "finished_at": when,
        "seconds": 0.25,
        "worker": "bench:0:cpu",
        "prompt": f"a synthesised prompt number {i} with a few more words in it",
        "references": refs,
        "masks": [],
        "scale": "0.6",
        "provenance": {
            "model_fingerprint": "m" * 16,
            "adapter_fingerprints": {"style": "a" * 16},
            "embedding_keys": [f"{'e' * 64}/vit-h@{'f' * 12}"],
            "schedule_hash": "s" * 16,
            "request": {"prompt": f"prompt {i}", "seed": i, "steps": 30, "width": 512, "height": 512},
        },
    }


def bench_flow(manifest: Path, output: Path):  # -> Flow (imported lazily: the zoo is only built here)
    """The quickstart flow on the tiny zoo, over `manifest`, into `output`."""
    from ipa_ops.commands.core import cache_dir
    from ipa_ops.flow.spec import load_flow
    from ipa_ops.zoo import build_zoo

    zoo = build_zoo(cache_dir() / "zoo-tiny", size="tiny")
    return load_flow(
        REPO / "flows" / "quickstart.yaml",
        [f"mirror={zoo}", f"stages.generate.manifest={manifest}", f"stages.generate.output={output}"],
    )


def write_manifest(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "id": [f"row-{i:07d}" for i in range(n)],
                "prompt": [f"a synthesised prompt number {i} with a few more words in it" for i in range(n)],
                "negative_prompt": ["blurry, low quality"] * n,
                "seed": list(range(n)),
                "x_batch": [f"night-{i % 30}" for i in range(n)],
            }
        ),
        path,
    )


def first_plan(root: Path, folder: Path, n: int) -> tuple[list[str], float]:
    """The earlier run's full plan (set-up): the manifest's keys, and the seconds it took."""
    from ipa_ops.generate.manifest_plan import plan_rows

    write_manifest(root / f"manifest-{n}.parquet", n)
    flow = bench_flow(root / f"manifest-{n}.parquet", folder)
    t0 = time.perf_counter()
    planned = plan_rows(flow, flow.stages.generate, reuse=True, done=lambda keys: set())
    return [p.row_key for p in planned.plans], time.perf_counter() - t0


def measure(kind: str, uri: str, n: int) -> dict:
    """One measurement in this (fresh) process."""
    out = OutputDir(uri)
    if kind == "done":
        from ipa_ops.generate.manifest_plan import fingerprints, plan_rows
        from ipa_ops.generate.plan_cache import PlanCache, context_hash

        flow, stage = _flow_stage(uri, n)  # the keys are the input: read from the plan cache, not timed
        keys = set(PlanCache(uri, context_hash(flow, stage, fingerprints(flow, stage))).load().values())
        t0 = time.perf_counter()
        done = out.done_keys(keys)
        seconds = time.perf_counter() - t0
        assert len(done) == n, len(done)
    elif kind == "rerun":
        from ipa_ops.generate.manifest_plan import plan_rows

        flow, stage = _flow_stage(uri, n)
        t0 = time.perf_counter()
        planned = plan_rows(flow, stage, reuse=True, done=out.done_keys)  # as run_generate does
        done = out.done_keys({p.row_key for p in planned.plans})
        todo = [p for p in planned.plans if p.row_key not in done]  # the skip: what goes to generation
        seconds = time.perf_counter() - t0
        assert planned.skipped + len(done) == n and not todo and not planned.errors, (planned.skipped, len(todo))
    else:
        from ipa_ops.outputs.results_writer import group_parts
        from ipa_ops.report.build import build_report

        newest = max(group_parts(out).items(), key=lambda item: os.path.basename(item[1][0]))[0]
        t0 = time.perf_counter()
        index = build_report(uri, groups=[newest])
        seconds = time.perf_counter() - t0
        size = os.path.getsize(index) >> 10
        return {"seconds": round(seconds, 2), "rss_gb": round(peak_rss_gb(), 2), "index_kb": size}
    return {"seconds": round(seconds, 2), "rss_gb": round(peak_rss_gb(), 2)}


def first_pages(out: OutputDir) -> None:
    """The first run's page list, as its own end would have left it (so the index links its pages);
    its 1x1 images get no thumbnails here, so its pages themselves are not built (set-up, not timed)."""
    from ipa_ops.outputs.results_writer import group_parts
    from ipa_ops.report.pages import PAGE_ROWS, write_marker

    ((group, paths),) = group_parts(out).items()
    rows = pq.ParquetFile(paths[0]).metadata.num_rows
    marker = {"group": group, "parts": [os.path.basename(p) for p in paths], "rows": rows, "counts": {"ok": rows}}
    write_marker(out, group, {**marker, "pages": -(-rows // PAGE_ROWS), "first_finished": "2025-01-01T00:00:00+00:00"})


def _flow_stage(uri: str, n: int) -> tuple:
    flow = bench_flow(Path(uri).parent / f"manifest-{n}.parquet", Path(uri))
    return flow, flow.stages.generate


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a
    child of the (large, synthesising) parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(kind: str, uri: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--uri", uri, "--rows", str(n)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(n: int, root: Path) -> None:
    folder = root / f"out-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    out = OutputDir(str(folder))
    keys, plan_s = first_plan(root, folder, n)
    t0 = time.perf_counter()
    compact_s = synthesise(out, keys)
    synth_s = time.perf_counter() - t0 - compact_s
    parts = len(list((folder / "results").glob("part-*.parquet")))
    done = _child("done", str(folder), n)
    rerun = _child("rerun", str(folder), n)
    first_pages(out)
    synthesise(out, keys_for(1000, salt="second run"), when="2025-01-02T00:00:00Z")
    report = _child("report", str(folder), n)
    print(f"outputs: rows={n} rerun_s={rerun['seconds']} report_s={report['seconds']} rss_gb={rerun['rss_gb']}")
    print(
        f"detail: rows={n} done_s={done['seconds']} done_rss_gb={done['rss_gb']} compact_s={compact_s:.2f} "
        f"results_parts={parts} report_rss_gb={report['rss_gb']} index_kb={report['index_kb']} "
        f"first_plan_s={plan_s:.1f} synthesis_s={synth_s:.1f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--root", help="where to synthesise (default: a temp folder, removed after)")
    parser.add_argument("--measure", choices=["done", "rerun", "report"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.uri, args.rows)))
        return 0
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; root {root}", flush=True)
    try:
        for n in args.sizes:
            bench(n, root)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
