"""The embedding store at SigLIP hidden-state size: write size, metadata load, one key and 100 keys.

    python benchmarks/bench_store.py --images 10000 --dir /tmp/ipa-store-bench
    python benchmarks/bench_store.py --images 1000 --group-mb 2   # another row-group size, for comparison

SD3.5's adapter reads SigLIP so400m's penultimate hidden states: 729 tokens x 1152 per image,
1.7 MB in fp16 (what a GPU extract stores), 3.4 MB in fp32 (a CPU extract). They go into the
store's ordinary `hidden_states` column (schema.py), as CLIP Plus hidden states do; this script
measures what that costs at 10^4 images. Rows are written the way the extract stage commits them
(`EmbeddingStore.append` of `build_table` parts of `--part-rows` rows, 256 as `run_extract`),
with seeded random fp16 values (worst case for zstd: trained features compress a little better).
Then a fresh reader (a new process's view) loads the metadata, reads one key's hidden states,
and 100 keys drawn at random, as `prepare` does for the rows of a generate batch. The files were
just written, so the OS page cache holds some of them: read times are best cases for a local disk.
The store folder is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipa_ops.store import dataset  # noqa: E402
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now  # noqa: E402

ENCODER = "siglip@0123456789abcdef"


def rows(start: int, count: int, tokens: int, width: int, dtype: str, rng: np.random.Generator) -> list[dict]:
    """Store rows of `count` fake images: a pooled vector and [tokens, width] hidden states each."""
    out = []
    for i in range(start, start + count):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        out.append({
            "key": content_key(sha, ENCODER), "image_sha256": sha, "source_uri": f"file:///refs/{i}.png",
            "encoder": ENCODER, "kind": "clip", "status": "ok", "error": "", "notes": "", "created_at": now(),
            "image_embeds": rng.standard_normal(width, dtype=np.float32),
            "hidden_states": rng.standard_normal((tokens, width), dtype=np.float32).astype(dtype),
            "hidden_shape": [tokens, width],
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=729, help="SigLIP so400m at 384 px: 27x27 patches")
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--part-rows", type=int, default=256, help="rows per committed part (run_extract's commit_rows)")
    ap.add_argument("--group-mb", type=float, default=None, help="row-group target in MB (the store's: 16)")
    ap.add_argument("--dir", default="/tmp/ipa-store-bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.group_mb is not None:
        dataset._GROUP_BYTES = int(args.group_mb * (1 << 20))
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    raw = args.tokens * args.width * np.dtype(args.dtype).itemsize
    print(f"{args.images} images, hidden states {args.tokens}x{args.width} {args.dtype}: {raw / 1e6:.2f} MB each raw")
    store = EmbeddingStore(str(root))
    write_s, keys = 0.0, []
    for start in range(0, args.images, args.part_rows):
        batch = rows(start, min(args.part_rows, args.images - start), args.tokens, args.width, args.dtype, rng)
        keys += [r["key"] for r in batch]
        t0 = time.perf_counter()
        dims = {"image_embeds": args.width, "hidden_states": args.tokens * args.width}
        store.append(build_table(batch, dims, hidden_dtype=args.dtype))
        write_s += time.perf_counter() - t0
    files = sorted(root.rglob("part-*.parquet"))
    size = sum(f.stat().st_size for f in files)
    print(f"write: {write_s:.1f} s (build_table + zstd + fsync), {len(files)} parts, {size / 1e9:.2f} GB on disk, "
          f"{size / args.images / 1e6:.2f} MB per image ({size / (raw * args.images):.3f} of raw)")  # fmt: skip

    import pyarrow as pa
    import torch  # loaded in every generate worker already: not part of a read

    pa.array(np.zeros(4, np.float16)).to_numpy()  # pyarrow's first float16 conversion costs ~1.5 s once
    del torch
    t0 = time.perf_counter()
    reader = EmbeddingStore(str(root))
    n_keys = len(reader.keys())
    meta_s = time.perf_counter() - t0
    part = next(iter(reader._parts.values()))
    per_group = int(part.starts[1] - part.starts[0]) if len(part.starts) > 1 else part.rows
    print(f"metadata: {meta_s:.2f} s for {n_keys} keys (hidden_states not read); {per_group} rows per row group")

    key = keys[len(keys) // 2]
    t0 = time.perf_counter()
    (one,) = reader.get([key], "hidden_states")
    one_s = time.perf_counter() - t0
    assert tuple(one.shape) == (args.tokens, args.width)
    picked = [keys[i] for i in rng.choice(len(keys), size=min(100, len(keys)), replace=False)]
    t0 = time.perf_counter()
    got = reader.get(picked, "hidden_states")
    many_s = time.perf_counter() - t0
    assert len(got) == len(picked)
    print(f"read: one key {one_s * 1e3:.0f} ms; 100 random keys {many_s:.2f} s ({many_s * 10:.0f} ms a key)")
    compare_encodings(next(iter(reader._parts)))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def compare_encodings(part_path: str, rounds: int = 3) -> None:
    """Decode time per row of the first row group's hidden states as the store's fixed-size list column
    and as a binary column of the same bytes (one row per group each, in memory, zstd), interleaved."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pq.ParquetFile(part_path).read_row_group(0, columns=["hidden_states"]).column(0).combine_chunks()
    flat = column.values.to_numpy().reshape(len(column), -1)
    tables = {
        "fixed_size_list": pa.table({"h": column}),
        "binary": pa.table({"h": pa.array([r.tobytes() for r in flat], pa.binary())}),
    }
    files = {}
    for name, table in tables.items():
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=1)
        files[name] = buf.getvalue()
    seconds = dict.fromkeys(files, 0.0)
    for _ in range(rounds):
        for name, data in files.items():
            pf = pq.ParquetFile(io.BytesIO(data))
            t0 = time.perf_counter()
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g).column(0).combine_chunks()
                values = col.values if name == "fixed_size_list" else col.buffers()[2]
                np.asarray(values if name == "binary" else values.to_numpy())
            seconds[name] += time.perf_counter() - t0
    per_row = {name: seconds[name] / (rounds * len(column)) for name in seconds}
    fsl, binary = per_row["fixed_size_list"], per_row["binary"]
    print(f"decode per row, {len(column)} rows x {rounds} interleaved rounds: fixed_size_list "
          f"{fsl * 1e3:.1f} ms, binary {binary * 1e3:.1f} ms ({fsl / binary:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
