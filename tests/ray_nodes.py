"""Ray nodes a test starts itself: `ray start ... --block` in a process group of its own.

Each node runs as `python -m ray.scripts.scripts start ... --block` with `start_new_session=True`,
so the raylet, the GCS and every worker it spawns share one process group, and a test stops
exactly those processes by signalling that group and the node's descendants (the raylet starts
its worker processes in groups of their own): SIGTERM then SIGKILL, or SIGKILL at once, as a crash
would. Never `ray stop`: it would stop every other Ray on this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(args: list[str], log: Path, env: dict[str, str], ready: Callable[[], bool],
               timeout: float = 90) -> subprocess.Popen:  # fmt: skip
    """`ray <args> --block` in its own process group, once `ready()`; else the test fails with the log's tail."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        node = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", *args, "--block"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop_group signals exactly these processes
        )
    deadline = time.monotonic() + timeout
    while not ready():
        if node.poll() is not None or time.monotonic() > deadline:
            stop_group(node)
            tail = log.read_text(errors="replace")[-1500:]
            pytest.fail(f"ray {' '.join(args[:2])} did not come up (exit {node.poll()}):\n{tail}")
        time.sleep(0.5)
    return node


def stop_group(proc: subprocess.Popen, term_grace: float = 3.0) -> None:
    """SIGTERM every process of the node (its group, and the workers its raylet started in groups of their
    own), then SIGKILL what is left. `term_grace=0` kills at once, as a crash or a lost machine would.
    """
    workers = [pid for pid, _ in node_processes(proc.pid)]  # listed first: once the raylet is gone they are orphans
    steps = ((signal.SIGTERM, term_grace), (signal.SIGKILL, 10.0)) if term_grace else ((signal.SIGKILL, 10.0),)
    for sig, grace in steps:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while (group_alive(proc) or any(_alive(pid) for pid in workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
    proc.wait(timeout=10)


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of the node's group still runs (zombies left to an init that never reaps do not count)."""
    proc.poll()  # reap the direct child
    return any(pgrp == proc.pid for _, _, pgrp, _ in _processes())


def node_processes(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of the node started as `root`: its process group and all
    its descendants (Ray starts worker processes, actors included, in process groups of their own)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    mine = {pid for pid, _, pgrp, _ in table if pgrp == root}
    todo = [root, *mine]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in mine:
                mine.add(child)
                todo.append(child)
    return [(pid, cmd) for pid, _, _, cmd in table if pid in mine and pid != root]


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, process group, command line) of every live process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields: state, ppid, pgrp, ...
            if fields[0] == "Z":
                continue
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(stat.parent.name), int(fields[1]), int(fields[2]), cmd))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    return any(p == pid for p, _, _, _ in _processes())
