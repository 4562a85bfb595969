"""Store, outputs, manifests and the run ledger on `s3://`, against a real S3 API (moto's server on loopback).

S3 has no rename, so an object is committed by one PUT: these tests check that a reader polling a
key while it is rewritten only ever sees whole objects, never a temp name, and that results parts,
done keys, store parts and ledger records behave as on local disk.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ipa_ops.flow.spec import load_flow
from ipa_ops.manifest.reading import read_manifest
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import inputs_seen, read_ledger, recording
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ipa-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """An S3-compatible server on 127.0.0.1; AWS_* point at it only while this module runs."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # no client made for another endpoint is reused
        fs = s3fs.S3FileSystem()
        fs.makedirs(BUCKET, exist_ok=True)  # moto keeps one state per process: another module may have made it
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def _result(key: str, uri: str, status: str = "ok") -> dict[str, Any]:
    t = datetime.now(UTC)
    return {"id": f"row-{key[:4]}", "row_key": key, "status": status, "outputs": [uri] if uri else [], "seed": 1,
            "started_at": t, "finished_at": t, "seconds": 0.1, "worker": "test"}  # fmt: skip


def test_a_reader_never_sees_a_partial_object(s3: Any) -> None:
    out = OutputDir(f"s3://{BUCKET}/atomic")
    assert not out.local  # the object-store branch: one PUT, no temp file and rename
    path = out.image_path("ab" * 10)
    size = 6 << 20  # big enough that a non-atomic writer would be caught mid-way
    versions = {bytes([v]) * size for v in range(1, 6)}
    seen: list[int] = []
    bad: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            folder = f"{BUCKET}/atomic/images/ab"  # the fan-out folder of the key written
            names = s3.ls(folder, refresh=True) if s3.exists(folder) else []
            bad.extend(n for n in names if not re.search(r"/images/ab/[0-9a-f]{20}\.png$", n))  # no temp objects
            try:
                data = s3.cat_file(path)
            except FileNotFoundError:
                continue
            if data not in versions:
                bad.append(f"partial read: {len(data)} bytes")
            seen.append(data[0])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for value in sorted(versions):
            out.write_bytes_atomic(path, value)
        out.write_bytes_atomic(
            out.path("images", "cd" * 10 + ".png"), lambda f: f.write(b"\x89PNG written by a callable")
        )
    finally:
        done.set()
        reader.join()
    s3.invalidate_cache()  # the reader's listings are cached in this process; the objects are the truth
    assert not bad[:1], bad[:3]
    assert seen and s3.cat_file(path) == bytes([5]) * size
    assert s3.cat_file(out.path("images", "cd" * 10 + ".png")) == b"\x89PNG written by a callable"


def test_results_parts_and_done_keys_on_s3(s3: Any) -> None:
    out = OutputDir(f"s3://{BUCKET}/out")
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(3)]
    for key in keys:
        out.write_bytes_atomic(out.image_path(key), b"png")
    out.append_results([_result(k, out.image_path(k)) for k in keys[:2]])
    out.append_results([_result(keys[2], out.image_path(keys[2]))])
    assert len(s3.glob(f"{BUCKET}/out/results/part-*.parquet")) == 2
    assert len(out.read_results()) == 3 and out.done_keys() == set(keys)
    s3.rm(out.image_path(keys[0]))  # a user deletes an image they dislike: that row is not done any more
    out.append_results([_result(keys[1], "", status="error")])  # the latest row of a key decides
    assert out.done_keys() == {keys[2]}
    out.write_run_json({"counts": {"ok": 3}})
    assert out.read_run_json() == {"counts": {"ok": 3}}


def test_embedding_store_on_s3(s3: Any) -> None:
    store = EmbeddingStore(f"s3://{BUCKET}/store")
    enc = "vit-h@0123456789abcdef"
    rows = []
    for i in range(3):
        sha = hashlib.sha256(f"img{i}".encode()).hexdigest()
        rows.append({"key": content_key(sha, enc), "image_sha256": sha, "source_uri": f"s3://x/{i}.png",
                     "encoder": enc, "kind": "clip", "status": "ok", "error": "", "notes": "", "created_at": now(),
                     "image_embeds": np.full(8, i, np.float32)})  # fmt: skip
    part = store.append(build_table(rows, {"image_embeds": 8}))
    assert part.startswith(f"s3://{BUCKET}/store/") and part.endswith(".parquet")
    fresh = EmbeddingStore(f"s3://{BUCKET}/store")  # another reader lists what was committed
    assert fresh.keys() == {r["key"] for r in rows}
    assert float(fresh.get([rows[2]["key"]])[0][0]) == 2.0
    assert fresh.stats()["temp_files"] == 0 and not s3.glob(f"{BUCKET}/store/*/.*")


def test_partitioned_manifest_and_ledger_on_s3(s3: Any) -> None:
    for day, ids in (("2026-11-23", ["a", "b"]), ("2026-11-24", ["c"])):
        frame = pd.DataFrame({"id": ids, "prompt": [f"prompt {i}" for i in ids], "seed": [1] * len(ids)})
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        s3.pipe_file(f"{BUCKET}/manifests/date={day}/part-0.csv", buf.getvalue().encode())
    manifest = f"s3://{BUCKET}/manifests/date=*/"
    df = read_manifest(manifest)
    assert list(df["id"]) == ["a", "b", "c"] and list(df["date"]) == ["2026-11-23", "2026-11-23", "2026-11-24"]
    seen = inputs_seen(manifest)
    assert [s["uri"] for s in seen] == [
        f"s3://{BUCKET}/manifests/date={d}/part-0.csv" for d in ("2026-11-23", "2026-11-24")
    ]
    assert all(s["etag"] and s["size"] > 0 and len(s["sha256"]) == 64 for s in seen)

    output = f"s3://{BUCKET}/runs/nightly"
    flow = load_flow(
        REPO / "flows" / "quickstart.yaml", [f"stages.generate.manifest={manifest}", f"stages.generate.output={output}"]
    )
    results: dict[str, Any] = {}
    with recording(flow, ["generate"], results) as record:
        assert record is not None and read_ledger(output)[0]["status"] == "running"  # visible while it runs
        results["generate"] = {"ok": 3, "error": 0, "skipped": 0}
    (entry,) = read_ledger(output)
    assert entry["status"] == "ok" and entry["counts"]["generate"]["ok"] == 3 and len(entry["inputs"]) == 2
    assert s3.glob(f"{BUCKET}/runs/nightly/runs/*.json") and not s3.glob(f"{BUCKET}/runs/nightly/runs/.*")
