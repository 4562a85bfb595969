"""A worker node dies mid-run: a real two-node Ray cluster on this machine, the worker killed, the run completes.

The head and a second node (`ray start --address`) each run in a process group of their own
(tests/ray_nodes.py), under Ray's token authentication with a token made for the test (so
`~/.ray/auth_token` and any other Ray on the machine play no part), in a temp folder of their own.
Each node advertises one `ipa_slot` resource and the stage's actors (generators, scorers) need one
each, so one runs on each node. Once the worker node's actor is working on a batch, the worker node
(its process group and every process its raylet started, the actor among them) is SIGKILLed, as a
lost machine would be. The run must finish on the head alone with every row exactly once `ok`
(generate) or every row's scores recorded once (score), and a ledger record saying what was lost.
tests/test_recovery.py checks the rounds themselves without a cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ray_nodes import free_port, node_processes, start_node, stop_group
from test_stop import REPO, _command, _env, _manifest, assert_everything_reads

from ipa_ops.cli import main
from ipa_ops.outputs import scores as score_parts
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import read_ledger
from ipa_ops.outputs.scores import read_records
from ipa_ops.store.dataset import EmbeddingStore

STARTED = "Ray runtime started."
ROWS = 24  # twelve batches of two: long enough for the worker's generator (a cold process) to get some
NODE = r"\S+ \(node [0-9a-f]{12}\)"  # how a lost node is named: its address and id
SCORED_FLOW = REPO / "flows" / "scored.yaml"
SLOT = "ipa_slot"  # the custom resource each node advertises once: one pinned actor per node
SCORERS = ("clip_t", "phash", "aesthetic", "nsfw")  # the scorers that need no references
SCORE_ROWS, SCORE_BATCH, SCORE_SIDE = 24, 2, 512  # twelve batches of two large images: the worker's scorer gets some
EXTRACT_IMAGES, EXTRACT_BATCH, EXTRACT_SIDE = 24, 2, 512  # the same for the worker's encoder


@dataclass
class TwoNodes:
    address: str
    env: dict[str, str]  # what every process of this cluster (the driver too) runs with
    head: subprocess.Popen
    worker: subprocess.Popen


@dataclass
class Killed:
    """A run whose worker node was killed mid-way: what it printed, and how much it had committed by then."""

    stdout: str
    stderr: str
    killed_with: int


def _node_env(temp: str, token: str) -> dict[str, str]:
    return _env() | {
        "RAY_TMPDIR": temp,  # Ray's temp root, and so its record of "the current cluster": ours alone
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,  # over ~/.ray/auth_token
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def _started(log: Path) -> bool:
    return log.is_file() and STARTED in log.read_text(errors="replace")


@pytest.fixture
def two_nodes() -> Iterator[TwoNodes]:
    temp = tempfile.mkdtemp(prefix="ipa-nl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = _node_env(temp, secrets.token_hex(16))
    head_env = env | {  # the GCS notices a dead node in ~3 s instead of ~30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", f'--resources={{"{SLOT}": 1}}']
    common += ["--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]
    head_args = ["start", "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}"]
    head_args += [f"--ray-client-server-port={free_port()}", *common]
    nodes: list[subprocess.Popen] = []
    try:
        head_log = Path(temp) / "head.log"
        nodes.append(start_node(head_args, head_log, head_env, lambda: _started(head_log)))
        common[-1] = f"--dashboard-agent-listen-port={free_port()}"
        worker_log = Path(temp) / "worker.log"
        worker_args = ["start", f"--address=127.0.0.1:{port}", *common]
        nodes.append(start_node(worker_args, worker_log, env, lambda: _started(worker_log)))
        yield TwoNodes(f"127.0.0.1:{port}", env, nodes[0], nodes[1])
    finally:
        for node in reversed(nodes):
            stop_group(node)
        shutil.rmtree(temp, ignore_errors=True)


def _busy_on(node: subprocess.Popen, actor: str) -> bool:
    """Whether an `actor` actor on the node is working on a batch now (Ray titles an actor's process after
    its class, `ray::MapWorker(MapBatches(GeneratorActor))`, with `.submit` while a batch runs)."""
    return any(f"{actor})).submit" in cmd for _, cmd in node_processes(node.pid))


def _run_killing_the_worker(nodes: TwoNodes, command: list[str], actor: str, back: Callable[[], int]) -> Killed:
    """`command` on the cluster; once the worker node's `actor` is busy, the worker node SIGKILLed (as a machine
    that is gone), and the run waited for. `back()` counts what the run had committed at the kill."""
    proc = subprocess.Popen(command, env=nodes.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            if _busy_on(nodes.worker, actor):
                break  # mid-run, with a batch in flight on the worker node
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before the node could be killed: {proc.communicate()}"
        assert _busy_on(nodes.worker, actor), f"worker's {actor} not busy: {node_processes(nodes.worker.pid)}"
        stop_group(nodes.worker, term_grace=0)
        killed_with = back()
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run did not finish after the node was killed:\n{stderr[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    return Killed(stdout, stderr, killed_with)


def _assert_one_node_lost(run: Killed, stage: str, total: int, out: Path, promise: str) -> dict[str, Any]:
    """The stage's summary, its `faults` naming the one node lost, the same line on stderr and in the ledger."""
    summary = json.loads(run.stdout.split(f"{stage}: ", 1)[1].splitlines()[0])
    faults = summary["faults"]
    assert len(faults["nodes_lost"]) == 1 and re.fullmatch(NODE, faults["nodes_lost"][0])
    assert faults["rounds"] >= 2 and 0 < faults["rows_resubmitted"][0] <= total - run.killed_with  # the lost batch too
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"{stage}: 1 Ray node(s) lost")]
    assert lines == [faults["message"]], run.stderr[-3000:]
    assert lines[0].endswith(promise)
    assert f"{stage}: lost a Ray worker (" in run.stderr
    (record,) = read_ledger(str(out))
    assert record["status"] == "ok" and record["faults"] == lines
    assert record["counts"][stage]["faults"]["nodes_lost"] == faults["nodes_lost"]
    assert not os.path.exists(out / "_lease.json")
    return summary


def test_a_worker_node_killed_mid_run_loses_no_row(
    two_nodes: TwoNodes, tmp_path: Path, zoo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path / "manifest.csv")
    pd.read_csv(manifest).head(ROWS).to_csv(manifest, index=False)
    out = tmp_path / "out"
    sets = [f"ray.address={two_nodes.address}", "stages.generate.resources.actors=2",
            "stages.generate.resources.num_cpus=0.5", "stages.generate.resources.torch_threads=1",
            f"stages.generate.resources.custom_resources={{{SLOT}: 1}}",
            "stages.generate.defaults.steps=12"]  # fmt: skip  # slow enough rows: the worker gets some
    run = _run_killing_the_worker(two_nodes, _command(tmp_path, zoo_dir, *sets), "GeneratorActor",
                                  lambda: len(OutputDir(str(out)).read_results()))  # fmt: skip
    assert run.killed_with < ROWS
    results = assert_everything_reads(out)
    assert sorted(results["id"]) == [f"r{i:02d}" for i in range(ROWS)]  # every row exactly once
    assert set(results["status"]) == {"ok"}
    gen = _assert_one_node_lost(run, "generate", ROWS, out, "every row is in the results once")
    assert gen["ok"] == ROWS
    assert main(["runs", "ls", str(out)]) == 0  # what a person looks at first
    assert capsys.readouterr().out.rstrip().endswith(gen["faults"]["message"])


def _scorable_output(out: Path, rows: int, side: int) -> list[str]:
    """An output of `rows` ok rows, each a `side`-pixel PNG of seeded noise (made here, not generated, so
    the test pays only for scoring, and large enough that a batch takes a while): their row keys."""
    folder, rng = OutputDir(str(out)), np.random.default_rng(0)
    made = []
    for i in range(rows):
        key = hashlib.sha256(f"r{i:02d}".encode()).hexdigest()[:20]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
        made.append({"id": f"r{i:02d}", "row_key": key, "status": "ok", "prompt": f"picture {i}", "seed": i,
                     "outputs": [folder.write_bytes_atomic(folder.image_path(key), buf.getvalue())],
                     "finished_at": pd.Timestamp.now(tz="UTC")})  # fmt: skip
    folder.append_results(made)
    return [r["row_key"] for r in made]


def _score_sets(zoo: Path, out: Path, *extra: str) -> list[str]:
    """flows/scored.yaml's score stage on `out`, with the scorers that need no references; a part per batch."""
    return [f"mirror={zoo}", f"stages.generate.output={out}", f"stages.score.output={out}",
            f"stages.score.scorers={{{', '.join(f'{s}: {{}}' for s in SCORERS)}}}",
            f"stages.score.resources.batch_size={SCORE_BATCH}", "stages.score.commit_rows=1", *extra]  # fmt: skip


def _score_command(zoo: Path, out: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "ipa_ops.cli", "run", str(SCORED_FLOW), "--stage", "score"]
    return argv + [a for s in _score_sets(zoo, out, *extra) for a in ("--set", s)]


def _assert_scored_once(out: Path, keys: list[str]) -> None:
    """Every row has one record per metric of every scorer in the parts as written (`read_records` would hide
    a duplicate: it keeps the latest), and no error."""
    records = pd.concat([pd.read_parquet(p) for p in sorted((out / "scores").glob("part-*.parquet"))])
    assert set(records["row_key"]) == set(keys) and score_parts.ERROR not in set(records["metric"])
    assert set(records["name"]) == set(SCORERS)
    per_row = records.groupby(["row_key", "metric"]).size()
    assert set(per_row) == {1}, per_row[per_row > 1]  # each score record written once
    assert len(per_row) == len(keys) * records["metric"].nunique()


def test_a_worker_node_killed_mid_score_scores_every_row_once(
    two_nodes: TwoNodes, tmp_path: Path, scorer_zoo: Path
) -> None:
    out = tmp_path / "out"
    keys = _scorable_output(out, SCORE_ROWS, SCORE_SIDE)
    sets = [f"ray.address={two_nodes.address}", "stages.score.resources.actors=2",
            "stages.score.resources.num_cpus=0.5",
            f"stages.score.resources.custom_resources={{{SLOT}: 1}}"]  # fmt: skip
    run = _run_killing_the_worker(two_nodes, _score_command(scorer_zoo, out, *sets), "ScorerActor",
                                  lambda: read_records(str(out))["row_key"].nunique())  # fmt: skip
    assert run.killed_with < SCORE_ROWS
    _assert_scored_once(out, keys)
    summary = _assert_one_node_lost(run, "score", SCORE_ROWS, out, "every row is scored once")
    assert summary["scored_rows"] == SCORE_ROWS and summary["errors"] == 0
    assert summary["scored"] == dict.fromkeys(SCORERS, SCORE_ROWS)


def _images(folder: Path, count: int, side: int) -> list[Path]:
    """The repository's reference images (the manifest's rows use them) and `count` `side`-pixel noise images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for ref in sorted((REPO / "data" / "refs").glob("*.png")):
        shutil.copy(ref, folder / ref.name)
    for i in range(count):
        noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"noise-{i:02d}.png", compress_level=1)
    return sorted(folder.glob("*.png"))


def _assert_stored_once(store_dir: Path, images: list[Path]) -> None:
    """Each image's embedding in the store's parts as written exactly once (and the unconditional row), readable."""
    parts = [p for p in store_dir.rglob("part-*.parquet") if "_quarantine" not in p.parts]
    written = pd.concat([pd.read_parquet(p, columns=["key", "image_sha256", "status"]) for p in parts])
    assert written["key"].is_unique, written[written["key"].duplicated(keep=False)]
    images_written = written[~written["key"].str.startswith("uncond/")]
    assert set(images_written["status"]) == {"ok"} and len(written) == len(images) + 1
    assert set(images_written["image_sha256"]) == {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    vectors = EmbeddingStore(str(store_dir)).get(list(written["key"]))
    assert all(bool(v.isfinite().all()) and v.numel() > 0 for v in vectors)


def test_a_worker_node_killed_mid_extract_stores_every_embedding_once(
    two_nodes: TwoNodes, tmp_path: Path, zoo_dir: Path
) -> None:
    manifest = _manifest(tmp_path / "manifest.csv")
    pd.read_csv(manifest).head(2).to_csv(manifest, index=False)  # a short generate after: the ledger record
    images = _images(tmp_path / "images", EXTRACT_IMAGES, EXTRACT_SIDE)
    sets = [f"ray.address={two_nodes.address}", f"stages.extract.images={tmp_path / 'images'}",
            "stages.extract.resources.actors=2", "stages.extract.resources.num_cpus=0.5",
            f"stages.extract.resources.batch_size={EXTRACT_BATCH}",
            f"stages.extract.resources.custom_resources={{{SLOT}: 1}}",
            "stages.generate.resources.num_cpus=0.5"]  # fmt: skip  # generate fits the head left
    store = tmp_path / "store"
    run = _run_killing_the_worker(two_nodes, _command(tmp_path, zoo_dir, *sets), "EncodeActor",
                                  lambda: len(EmbeddingStore(str(store)).keys()) if store.exists() else 0)  # fmt: skip
    _assert_stored_once(store, images)
    summary = _assert_one_node_lost(run, "extract", len(images), tmp_path / "out",
                                    "every embedding is in the store once")  # fmt: skip
    assert summary["vit-h"] == {"new": len(images), "stored": 0, "failed": 0, "no_face": 0}  # each counted once
    gen = json.loads(run.stdout.split("generate: ", 1)[1].splitlines()[0])
    assert gen["ok"] == 2 and "faults" not in gen  # the run went on, on the head alone
