"""`ipa export` at 10^4 / 10^5 (/ 10^6) rows: does the driver's memory stay flat as rows grow?

    .venv/bin/python benchmarks/bench_export.py [--sizes 10000 100000] [--formats webdataset parquet imagefolder]
                                                 [--root DIR]

For each size it synthesises an output folder as `bench_outputs.py` does (1x1 PNGs under
`images/<k[:2]>/`, here hard links to a few PNG files so that 10^6 image files are cheap to lay
out; full results rows with provenance, compacted), then exports it in each format,
each export in a fresh process on its own embedded Ray, and reports that process's (the driver's)
peak RSS and the export's seconds. Beside it, in the same kind of fresh process, the peak RSS of
reading the whole results table into pandas (`OutputDir.read_results`): what a driver that held the
rows whole would need at least, before any image (up to `--whole-max` rows: at 10^6 that alone is
~2 GB).

Prints one `export: rows=<n> format=<f> seconds=<s> driver_rss_gb=<g>` line per export and one
`whole: rows=<n> read_results_rss_gb=<g>` line per size.

`--view-sizes 100000 1000000` measures the row selection alone (the driver's share of an export:
`results_view(...).select("status = 'ok'")` streamed to the end) on results parts of that many
rows without images (a 10^4-row compacted part copied with new keys), printing
`view: rows=<n> seconds=<s> rss_gb=<g> base_rss_gb=<g> rss_by_tenth_gb=[...]` (base: after imports,
before reading; by tenth: the RSS at that moment after each tenth of the rows has streamed out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_outputs import keys_for, peak_rss_gb, synthesise  # noqa: E402

from ipa_ops.outputs.folder import OutputDir  # noqa: E402


def measure(kind: str, uri: str, dest: str) -> dict:
    """One measurement in this (fresh) process: an export in format `kind`, or `whole`."""
    t0 = time.perf_counter()
    if kind == "view":
        from ipa_ops.outputs.view import results_view

        base = peak_rss_gb()
        rows, along = 0, []  # RSS now (not peak) after each tenth of the rows: flat, or growing?
        with results_view(uri) as view:
            total = sum(view.part_rows)
            for batch in view.select("status = 'ok'"):
                rows += batch.num_rows
                if rows * 10 // total > len(along):
                    along.append(round(rss_now_gb(), 3))
        return {
            "rows": rows,
            "seconds": round(time.perf_counter() - t0, 2),
            "rss_gb": round(peak_rss_gb(), 3),
            "base_gb": round(base, 3),
            "along": along,
        }
    if kind == "whole":
        rows = len(OutputDir(uri).read_results())
    else:
        import ray

        from ipa_ops.export.options import ExportOptions
        from ipa_ops.stages.export import run_export

        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = run_export(uri, dest, ExportOptions(format=kind))["rows"]  # type: ignore[arg-type]
        ray.shutdown()
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 2), "rss_gb": round(peak_rss_gb(), 3)}


def rss_now_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def _child(kind: str, uri: str, dest: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--uri", uri, "--dest", dest]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(n: int, root: Path, formats: list[str], whole_max: int) -> None:
    folder = root / f"out-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    synthesise(OutputDir(str(folder)), keys_for(n), link=True)
    print(f"synthesised: rows={n} seconds={time.perf_counter() - t0:.1f}", flush=True)
    if n <= whole_max:
        whole = _child("whole", str(folder), "")
        print(f"whole: rows={n} read_results_rss_gb={whole['rss_gb']}", flush=True)
    for fmt in formats:
        dest = root / f"export-{n}-{fmt}"
        shutil.rmtree(dest, ignore_errors=True)
        found = _child(fmt, str(folder), str(dest))
        assert found["rows"] == n, found
        print(f"export: rows={n} format={fmt} seconds={found['seconds']} driver_rss_gb={found['rss_gb']}", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def results_only(n: int, root: Path) -> Path:
    """Results parts of `n` rows (copies of one 10^4-row part, new keys), no images: view input."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from bench_outputs import _row

    folder = root / f"view-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    out = OutputDir(str(folder))
    template = min(n, 10_000)
    out.append_results([_row(i, k, out, "2025-01-01T00:00:00Z") for i, k in enumerate(keys_for(template))])
    (first,) = (folder / "results").glob("*.parquet")
    table = pq.read_table(first)
    first.unlink()
    for copy in range(n // template):
        keyed = pc.binary_join_element_wise(table.column("row_key"), pa.scalar(f"{copy:05x}"), "")
        part = table.set_column(table.schema.get_field_index("row_key"), "row_key", keyed)
        out.write_results_table(part, f"part-20250101T000000{copy:06d}Z-r{copy:05x}-c{copy:08x}.parquet")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--formats", nargs="+", default=["webdataset", "parquet", "imagefolder"])
    parser.add_argument("--view-sizes", type=int, nargs="*", default=[], help="row selection alone at these sizes")
    parser.add_argument("--whole-max", type=int, default=100_000, help="read the whole results only up to this size")
    parser.add_argument("--root", help="where to synthesise (default: a temp folder, removed after)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.uri, args.dest)))
        return 0
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-export-"))
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; root {root}", flush=True)
    try:
        for n in args.sizes:
            bench(n, root, args.formats, args.whole_max)
        for n in args.view_sizes:
            folder = results_only(n, root)
            found = _child("view", str(folder), "")
            assert found["rows"] == n, found
            print(f"view: rows={n} seconds={found['seconds']} rss_gb={found['rss_gb']} base_rss_gb={found['base_gb']} "
                  f"rss_by_tenth_gb={found['along']}", flush=True)  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
