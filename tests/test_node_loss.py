"""A worker node dies mid-run: a real two-node Ray cluster on this machine, the worker killed, the run completes.

The head and a second node (`ray start --address`) each run in a process group of their own
(tests/ray_nodes.py), under Ray's token authentication with a token made for the test (so
`~/.ray/auth_token` and any other Ray on the machine play no part), in a temp folder of their own.
Each node advertises one `ipa_gen` resource and the generator actors need one each, so one
generator runs on each node. Once the worker node's generator is making a batch, the worker node
(its process group and every process its raylet started, the generator among them) is SIGKILLed,
as a lost machine would be. The run must finish on the head alone with every row exactly once
`ok`, every file readable, and a ledger record saying what was lost.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from ray_nodes import free_port, node_processes, start_node, stop_group
from test_stop import REPO, _command, _env, _manifest, assert_everything_reads

from ipa_ops.cli import main
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import read_ledger

STARTED = "Ray runtime started."
ROWS = 24  # twelve batches of two: long enough for the worker's generator (a cold process) to get some
NODE = r"\S+ \(node [0-9a-f]{12}\)"  # how a lost node is named: its address and id


@dataclass
class TwoNodes:
    address: str
    env: dict[str, str]  # what every process of this cluster (the driver too) runs with
    head: subprocess.Popen
    worker: subprocess.Popen


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
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", '--resources={"ipa_gen": 1}']
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


def _generating_on(node: subprocess.Popen) -> bool:
    """Whether a generator actor on the node is making a batch now (Ray titles an actor's process after its
    class, `ray::MapWorker(MapBatches(GeneratorActor))`, with `.submit` while a batch runs)."""
    return any("GeneratorActor)).submit" in cmd for _, cmd in node_processes(node.pid))


def test_a_worker_node_killed_mid_run_loses_no_row(
    two_nodes: TwoNodes, tmp_path: Path, zoo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path / "manifest.csv")
    pd.read_csv(manifest).head(ROWS).to_csv(manifest, index=False)
    out = tmp_path / "out"
    sets = [f"ray.address={two_nodes.address}", "stages.generate.resources.actors=2",
            "stages.generate.resources.num_cpus=0.5", "stages.generate.resources.torch_threads=1",
            "stages.generate.resources.custom_resources={ipa_gen: 1}",
            "stages.generate.defaults.steps=6"]  # fmt: skip  # slow enough rows: the worker gets some
    command = _command(tmp_path, zoo_dir, *sets)
    proc = subprocess.Popen(command, env=two_nodes.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            if _generating_on(two_nodes.worker):
                break  # mid-run, with a batch in flight on the worker node
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before the node could be killed: {proc.communicate()}"
        assert _generating_on(two_nodes.worker), f"worker not generating: {node_processes(two_nodes.worker.pid)}"
        stop_group(two_nodes.worker, term_grace=0)  # SIGKILL: as a machine that is gone
        killed_with = len(OutputDir(str(out)).read_results())  # rows committed before the kill
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
    assert killed_with < ROWS
    results = assert_everything_reads(out)
    assert sorted(results["id"]) == [f"r{i:02d}" for i in range(ROWS)]  # every row exactly once
    assert set(results["status"]) == {"ok"}

    gen = json.loads(stdout.split("generate: ", 1)[1].splitlines()[0])
    faults = gen["faults"]
    assert gen["ok"] == ROWS and len(faults["nodes_lost"]) == 1 and re.fullmatch(NODE, faults["nodes_lost"][0])
    assert faults["rounds"] >= 2 and 0 < faults["rows_resubmitted"][0] <= ROWS - killed_with  # the lost batch too
    lines = [line for line in stderr.splitlines() if line.startswith("generate: 1 Ray node(s) lost")]
    assert lines == [faults["message"]], stderr[-3000:]
    assert "every row is in the results once" in lines[0]
    (record,) = read_ledger(str(out))
    assert record["status"] == "ok" and record["faults"] == lines
    assert record["counts"]["generate"]["faults"]["nodes_lost"] == faults["nodes_lost"]
    assert not os.path.exists(out / "_lease.json")
    assert main(["runs", "ls", str(out)]) == 0  # what a person looks at first
    assert capsys.readouterr().out.rstrip().endswith(lines[0])


def test_only_lost_workers_start_a_new_round_and_rows_back_are_never_made_again(ray_local: None) -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    from ipa_ops.stages.recovery import Rounds, lost_worker

    init_failed = ActorDiedError(RayTaskError("GeneratorActor.__init__", "trace", ValueError("no such model")))
    assert init_failed.actor_init_failed  # a generator whose __init__ raised: a bug, not a lost node
    wrapped = RayTaskError("f", "trace", ValueError("x"))
    wrapped.__cause__ = ActorDiedError()
    assert lost_worker(ActorDiedError()) is not None and lost_worker(wrapped) is not None
    assert lost_worker(init_failed) is None and lost_worker(ValueError("bug")) is None

    calls: list[list[int]] = []

    def batches(rows: list[int], first: bool) -> Iterator[list[int]]:
        calls.append(list(rows))
        yield rows[:3]
        if first:
            raise RuntimeError("the dataset stopped") from ActorDiedError()
        yield rows[3:]

    made: list[int] = []
    rounds = Rounds("generate", io.StringIO(), nodes_at_start={})
    rounds.run(list(range(8)), str, batches, lambda batch: (made.extend(batch), map(str, batch))[1])
    assert sorted(made) == list(range(8)) and calls == [list(range(8)), list(range(3, 8))]  # each row once
    faults = rounds.faults()
    assert faults is not None and faults["rounds"] == 2 and faults["rows_resubmitted"] == [5]
    assert faults["message"].startswith("generate: a Ray worker was lost; the rows not yet back (5) went to a new")
    assert rounds.redone_keys == {str(i) for i in range(3, 8)}
    assert "round 2 of at most 4" in rounds.stream.getvalue()

    def broken(rows: list[int], first: bool) -> Iterator[list[int]]:
        raise ValueError("a bug") from init_failed
        yield rows

    with pytest.raises(ValueError, match="a bug"):  # not a lost worker: no second round
        Rounds("generate", io.StringIO(), nodes_at_start={}).run([1], str, broken, lambda b: [])


def test_orphan_temp_files_of_finished_rows_are_removed(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    lost, other = "ab" + "0" * 18, "ab" + "1" * 18
    final = Path(out.write_bytes_atomic(out.image_path(lost), b"png"))
    left = [final.parent / f".{lost}.png.{'c' * 32}.tmp", tmp_path / "out" / "thumbs" / "ab" / f".{lost}.webp.d.tmp"]
    kept = final.parent / f".{other}.png.{'e' * 32}.tmp"  # another row's: a live writer may own it
    for path in [*left, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert out.remove_orphan_temps([lost]) == 2
    assert not any(p.exists() for p in left) and kept.exists() and final.read_bytes() == b"png"
