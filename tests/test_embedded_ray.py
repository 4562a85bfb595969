"""Embedded means embedded: a flow without an address never joins the head `ray_current_cluster` names.

The fixture starts a real head (`ray start --head --block`) in its own process group, with Ray's
temp folder (RAY_TMPDIR) in a folder of its own, so the record it writes is seen only by the
processes these tests start, and kills exactly that group with SIGKILL, as a crash would: the
record then names a dead cluster. Other Ray instances on the machine are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import free_port, start_node, stop_group

from ipa_ops.stages.ray_address import RayUnreachable, init_address

REPO = Path(__file__).resolve().parents[1]
# what `ipa run` does with a flow whose ray.address is null: ray_session, then real Ray work
SESSION = textwrap.dedent(
    """
    import json, ray
    from ray._private.services import get_ray_address_from_environment
    from ipa_ops.flow.spec import parse_flow
    from ipa_ops.runner import ray_session

    discovered = get_ray_address_from_environment(None, None)  # what a bare ray.init() would join
    with ray_session(parse_flow({"name": "embedded", "ray": {"address": None}})):
        gcs = ray.get_runtime_context().gcs_address
        value = ray.get(ray.remote(lambda: 41 + 1).remote())
    print(json.dumps({"discovered": discovered, "gcs": gcs, "value": value}))
    """
)


def _env(temp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "RAY_TMPDIR": temp, "PYTHONPATH": str(REPO)}


@pytest.fixture
def ray_head() -> Iterator[tuple[str, str, subprocess.Popen]]:
    """(Ray temp root, GCS address, head process) of a live head; its whole process group is SIGKILLed after."""
    temp = tempfile.mkdtemp(prefix="ipa-rh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    args = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=1"]
    args += ["--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    args += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    record = Path(temp) / "ray" / "ray_current_cluster"
    written = lambda: record.is_file() and bool(record.read_text().strip())  # noqa: E731
    try:
        head = start_node(args, Path(temp) / "head.log", _env(temp), written)
        try:
            yield temp, record.read_text().strip(), head
        finally:
            stop_group(head, term_grace=0)  # SIGKILL, as a crash would
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _embedded_session(temp: str) -> dict:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", SESSION], env=_env(temp), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 90  # the bug: a stale record made the run retry the GCS for minutes
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_embedded_run_neither_joins_a_live_head_nor_waits_for_a_dead_one(
    ray_head: tuple[str, str, subprocess.Popen],
) -> None:
    temp, head_gcs, head = ray_head
    live = _embedded_session(temp)
    assert live["discovered"] == head_gcs  # a bare ray.init() would have joined the head...
    assert live["gcs"] != head_gcs and live["value"] == 42  # ...the embedded run started its own Ray

    stop_group(head, term_grace=0)  # as a crash or a killed container leaves it: the record still names the head
    assert (Path(temp) / "ray" / "ray_current_cluster").read_text().strip() == head_gcs
    dead = _embedded_session(temp)
    assert dead["discovered"] == head_gcs
    assert dead["gcs"] != head_gcs and dead["value"] == 42


def test_a_dead_flow_address_fails_fast_in_one_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ipa_ops.cli", "run", str(REPO / "flows" / "quickstart.yaml"), "--stage", "extract"]
        + ["--set", f"ray.address={address}", "--set", f"stages.extract.store={tmp_path / 'store'}"],
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert time.monotonic() - started < 30
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "ray.address" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_ray_address_from_the_environment_is_probed_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(RayUnreachable, match=rf"^RAY_ADDRESS {address}: no Ray cluster answers"):
        init_address(None)
    with socket.socket() as server:  # something answers there: the address is used as given
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", live)
        assert init_address(None) == live
    monkeypatch.delenv("RAY_ADDRESS")
    assert init_address(None) == "local"  # embedded: a fresh local instance, whatever the temp folder says
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert init_address(None) is None  # inside a submitted job: Ray joins the job's own cluster
