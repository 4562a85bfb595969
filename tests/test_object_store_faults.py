"""Object-store faults (503 SlowDown, dropped connections, uploads cut mid-way, slow replies) from a
fault-injecting proxy of our own in front of moto's S3 server, all on loopback: reads and writes
retry with backoff, every commit stays whole, and a run through the faults makes every row once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faulty_proxy import FaultyProxy

from ipa_ops.outputs.folder import OutputDir
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ipa-faults"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()


def _env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


@pytest.fixture
def s3_through(moto_port: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A function (faults) -> FaultyProxy, with AWS_* pointing at that proxy for this test."""
    import s3fs

    proxies: list[FaultyProxy] = []

    def through(faults: dict[str, dict[int, str]]) -> FaultyProxy:
        proxy = FaultyProxy(("127.0.0.1", moto_port), faults).__enter__()
        proxies.append(proxy)
        for key, value in _env(proxy.url).items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    try:
        yield through
    finally:
        for proxy in proxies:
            proxy.__exit__(None, None, None)
        s3fs.S3FileSystem.clear_instance_cache()


def _bucket(moto_port: int) -> None:
    import s3fs

    direct = {"endpoint_url": f"http://127.0.0.1:{moto_port}"}
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs=direct, skip_instance_cache=True)
    fs.makedirs(BUCKET, exist_ok=True)


def test_outputs_and_store_commit_whole_through_faults(moto_port: int, s3_through: Any) -> None:
    faults = {"PUT": {1: "503", 2: "cut", 4: "drop", 6: "slow"}, "GET": {1: "drop", 2: "503"}, "HEAD": {2: "503"}}
    proxy = s3_through(faults)
    _bucket(moto_port)
    out = OutputDir(f"s3://{BUCKET}/out")
    rows = [{"id": f"r{i}", "row_key": f"{i:020x}", "status": "ok", "outputs": [], "seed": i} for i in range(20)]
    for start in (0, 10):
        out.append_results(rows[start : start + 10])
    for i in range(4):
        out.write_bytes_atomic(out.image_path(f"{i:020x}"), bytes([i]) * 50_000)
    store = EmbeddingStore(f"s3://{BUCKET}/store")
    enc = "vit-h@0123456789abcdef"
    entries = [
        {"key": content_key(f"{i:064x}", enc), "image_sha256": f"{i:064x}", "source_uri": f"s3://x/{i}.png",
         "encoder": enc, "kind": "clip", "status": "ok", "error": "", "notes": "", "created_at": now(),
         "image_embeds": np.full(8, i, np.float32)}
        for i in range(3)
    ]  # fmt: skip
    store.append(build_table(entries, {"image_embeds": 8}))
    keys = {e["key"] for e in entries}

    assert sorted(out.read_results()["id"]) == sorted(r["id"] for r in rows)  # each row once
    images = {out.read_bytes(out.image_path(f"{i:020x}")) for i in range(4)}
    assert images == {bytes([i]) * 50_000 for i in range(4)}
    assert EmbeddingStore(f"s3://{BUCKET}/store").keys() == keys
    listed = [p for p in out.fs.find(f"{BUCKET}/out") if ".tmp" in p]
    assert listed == []  # no temp or half object under any name
    assert proxy.kinds() == {"503", "cut", "drop", "slow"}, proxy.injected


def test_a_run_through_faults_makes_every_row_once(
    moto_port: int, zoo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in _env(f"http://127.0.0.1:{moto_port}").items():
        monkeypatch.setenv(key, value)
    _bucket(moto_port)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"f{i}", "prompt": f"p {i}", "seed": i}) + "\n" for i in range(6)))
    faults = {"PUT": {2: "503", 3: "cut", 5: "drop", 8: "slow"}, "GET": {2: "503", 3: "drop"}, "HEAD": {3: "503"}}
    with FaultyProxy(("127.0.0.1", moto_port), faults) as proxy:
        env = {**os.environ, **_env(proxy.url), "IPA_PROGRESS_SECONDS": "0"}
        env.pop("IPA_MIRROR", None)
        cmd = [
            sys.executable, "-m", "ipa_ops.cli", "run", str(REPO / "flows" / "quickstart.yaml"), "--stage", "generate",
            "--set", f"mirror={zoo_dir}", "--set", f"stages.generate.manifest={manifest}",
            "--set", f"stages.generate.output=s3://{BUCKET}/run", "--set", "stages.generate.store=null",
            "--set", "stages.generate.defaults.width=64", "--set", "stages.generate.defaults.height=64",
            "--set", "stages.generate.defaults.steps=2", "--set", "stages.generate.commit_rows=2",
        ]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.kinds() == {"503", "cut", "drop", "slow"}, proxy.injected
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _env(f"http://127.0.0.1:{moto_port}").items():
            mp.setenv(key, value)
        out = OutputDir(f"s3://{BUCKET}/run")
        results = out.read_results()
        assert sorted(results["id"]) == [f"f{i}" for i in range(6)] and set(results["status"]) == {"ok"}
        assert out.done_keys(set(results["row_key"])) == set(results["row_key"])  # every image there
        assert not [p for p in out.fs.find(f"{BUCKET}/run") if ".tmp" in p]
        s3fs.S3FileSystem.clear_instance_cache()
