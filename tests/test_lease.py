"""One writer per output (`<output>/_lease.json`) and one commit at a time into a shared store.

Concurrent runs are real: a holder in another process (killed with SIGKILL for the stale case),
threads racing for one stale lease, two processes committing overlapping keys into one store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from test_s3 import BUCKET, s3  # noqa: F401 - the loopback moto server fixture

from ipa_ops.cli import main
from ipa_ops.flow.spec import load_flow
from ipa_ops.storage.lease import Lease, LeaseHeld, LeaseLost, LeaseSpec, output_lease
from ipa_ops.store.dataset import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "flows" / "quickstart.yaml")


def _stale(folder: Path, host: str = "elsewhere", expires_in: float = -5.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    held = {"owner": "flow nightly", "host": host, "pid": 4242, "token": "t0", "heartbeat_at": "earlier",
            "expires_epoch": time.time() + expires_in}  # fmt: skip
    (folder / "_lease.json").write_text(json.dumps(held))


def test_a_second_run_exits_at_once_naming_the_holder(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    with Lease(str(out), "flow nightly", ttl_s=30, run="r-first"):
        started = time.monotonic()
        code = main(["run", QUICKSTART, "--set", f"stages.generate.output={out}", "--stage", "generate"])
        assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"{out}: being written by flow nightly run r-first on {socket.gethostname()} (pid {os.getpid()})" in err[0]
    assert "stages.generate.lease.wait=true" in err[0]
    assert not (out / "runs").exists()  # the refused run wrote nothing, not even a ledger record
    assert not (out / "_lease.json").exists()  # the holder released it


def test_wait_queues_behind_the_holder_and_the_cli_reaches_the_option(tmp_path: Path) -> None:
    spec = load_flow(QUICKSTART, ["stages.generate.lease.wait=true", "stages.generate.lease.ttl_s=4"]).stages
    assert spec.generate is not None and spec.generate.lease.wait and spec.generate.lease.ttl_s == 4
    holder = Lease(str(tmp_path), "first", ttl_s=4).acquire()
    threading.Timer(1.5, holder.release).start()
    started = time.monotonic()
    with output_lease(str(tmp_path), spec.generate.lease, "second") as lease:
        assert time.monotonic() - started >= 1.0
        assert json.loads((tmp_path / "_lease.json").read_text())["token"] == lease.token
    timeout = spec.generate.lease.model_copy(update={"wait_timeout_s": 0.5})
    with Lease(str(tmp_path), "third", ttl_s=4), pytest.raises(LeaseHeld, match=r"\(waited 0.5 s\)"):
        with output_lease(str(tmp_path), timeout, "fourth"):
            pass


def test_the_heartbeat_keeps_a_live_lease(tmp_path: Path) -> None:
    with Lease(str(tmp_path), "first", ttl_s=1.0):
        time.sleep(2.5)  # well past one ttl: only the heartbeat keeps it alive
        held = json.loads((tmp_path / "_lease.json").read_text())
        assert held["expires_epoch"] > time.time()
        with pytest.raises(LeaseHeld, match="being written by first"):
            Lease(str(tmp_path), "second", ttl_s=1.0).acquire()


def test_a_killed_runs_lease_is_taken_over(tmp_path: Path, caplog: Any) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from ipa_ops.storage.lease import Lease
            Lease({str(tmp_path)!r}, "flow killed", ttl_s=300).acquire()
            print("held", flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"flow killed on .* \(pid {holder.pid}\)"):
            Lease(str(tmp_path), "second").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert json.loads((tmp_path / "_lease.json").read_text())["pid"] == holder.pid  # still there: a stale lease
    with caplog.at_level("WARNING", logger="ipa_ops.storage.lease"), Lease(str(tmp_path), "second") as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["token"] == lease.token
    assert any("took over the lease of flow killed" in r.getMessage() for r in caplog.records)

    _stale(tmp_path / "other", expires_in=60)  # another host, heartbeat recent: held
    with pytest.raises(LeaseHeld, match="flow nightly on elsewhere"):
        Lease(str(tmp_path / "other"), "me").acquire()
    _stale(tmp_path / "other", expires_in=-1)  # another host, expired: taken over
    with Lease(str(tmp_path / "other"), "me") as lease:
        assert json.loads((tmp_path / "other" / "_lease.json").read_text())["token"] == lease.token


def test_of_many_runs_finding_one_stale_lease_exactly_one_takes_it(tmp_path: Path) -> None:
    _stale(tmp_path)
    barrier, won, refused = threading.Barrier(6), [], []

    def run(i: int) -> None:
        lease = Lease(str(tmp_path), f"racer {i}", ttl_s=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 5
        assert json.loads((tmp_path / "_lease.json").read_text())["token"] == won[0].token
    finally:
        for lease in won:
            lease.release()


def test_a_run_whose_lease_is_taken_stops_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(LeaseLost, match="lost its lease \\(taken over by thief on elsewhere"):
        with output_lease(str(tmp_path), LeaseSpec(ttl_s=1), "first"):  # a heartbeat every 0.25 s
            held = {"owner": "thief", "host": "elsewhere", "pid": 1, "token": "other", "expires_epoch": time.time() + 9}
            (tmp_path / "_lease.json").write_text(json.dumps(held))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.05)  # the heartbeat thread interrupts this, as it would a run's main loop
    assert json.loads((tmp_path / "_lease.json").read_text())["token"] == "other"  # never removed by the loser


def test_lease_on_s3(s3: Any) -> None:  # noqa: F811 - the fixture imported above
    folder = f"s3://{BUCKET}/leased/out"
    with Lease(folder, "first", ttl_s=30) as first:
        assert json.loads(s3.cat_file(f"{BUCKET}/leased/out/_lease.json"))["token"] == first.token
        with pytest.raises(LeaseHeld, match=f"{folder}: being written by first"):
            Lease(folder, "second", ttl_s=30).acquire()
    assert not s3.exists(f"{BUCKET}/leased/out/_lease.json")
    held = {"owner": "gone", "host": "elsewhere", "pid": 1, "token": "t0", "expires_epoch": time.time() - 1}
    s3.pipe_file(f"{BUCKET}/leased/out/_lease.json", json.dumps(held).encode())
    with Lease(folder, "second", ttl_s=30) as second:
        assert json.loads(s3.cat_file(f"{BUCKET}/leased/out/_lease.json"))["token"] == second.token


COMMITTER = textwrap.dedent(
    """
    import hashlib, random, sys, time
    from pathlib import Path
    import numpy as np
    from ipa_ops.stages.extract_rows import Committer
    from ipa_ops.store.dataset import EmbeddingStore, content_key, now

    store_uri, go = sys.argv[1], Path(sys.argv[2])
    first, last, seed = map(int, sys.argv[3:6])
    enc = "vit-h@0123456789abcdef"
    store = EmbeddingStore(store_uri)
    committer = Committer(store, store.statuses(), rows=3, seconds=60)  # what both saw at start: nothing
    order = list(range(first, last))
    random.Random(seed).shuffle(order)
    (go.parent / f"ready-{seed}").touch()
    while not go.exists():
        time.sleep(0.01)
    for i in order:
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        committer.add({"key": content_key(sha, enc), "image_sha256": sha, "source_uri": f"/refs/{i}.png",
                       "encoder": enc, "kind": "clip", "status": "ok", "error": "", "notes": "", "created_at": now(),
                       "image_embeds": np.full(8, i, dtype=np.float32)})
    committer.flush()
    print(committer.parts)
    """
)


def test_two_concurrent_extracts_never_lose_or_duplicate_a_key(tmp_path: Path) -> None:
    uri, go = str(tmp_path / "store"), tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.Popen([sys.executable, "-c", COMMITTER, uri, str(go), first, last, seed], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for first, last, seed in (("0", "30", "1"), ("10", "40", "2"))
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start committing at once, each sure that the overlap 10..29 is its own to write
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-2000:]
    parts = sorted((tmp_path / "store").glob("*/part-*.parquet"))
    keys = [k for part in parts for k in pq.read_table(part, columns=["key"]).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == 40  # every key once: none lost, none written twice
    assert len(EmbeddingStore(uri).keys()) == 40
    assert not (tmp_path / "store" / "_commit.lease.json").exists()
