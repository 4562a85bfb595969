"""One writer per output: a lease object `<output>/_lease.json`, kept alive by a heartbeat thread.

Two `ipa run` of one flow on one output (two cron hosts, a retried pod) would otherwise plan the
same rows and write each image twice. The first run creates the lease object exclusively (a hard
link of a whole temp file locally, an `If-None-Match: *` PUT on S3: whoever is second gets
FileExistsError); the holder rewrites it every `ttl_s / 4` seconds with a new expiry. A second
run either exits at once with one line naming the holder, or waits (`wait: true`).

A lease whose heartbeat stopped (its run was killed) is expired once `expires_at` passes, or at
once when its holder ran on this host and that process is gone. It is taken over by first
creating `_lease.json.takeover-<stale token>-<n>` exclusively, so of several runs that find the
same stale lease exactly one takes it. A holder that finds another token in the object, or that
could not refresh it for a whole ttl, has lost the lease and stops its run (KeyboardInterrupt in
the main thread, reported as LeaseLost). Expiry compares wall clocks across hosts: keep them in
sync (NTP) and `ttl_s` well above any skew.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from ipa_ops.errors import UserError

log = logging.getLogger("ipa_ops.storage.lease")
LEASE_NAME = "_lease.json"


class LeaseSpec(BaseModel):
    """`stages.generate.lease`: how a run shares its output folder with other runs."""

    model_config = ConfigDict(extra="forbid")
    wait: bool = Field(
        False,
        description="When another run holds the output: false exits at once with one line naming it; "
        "true waits until it finishes or its lease expires.",
    )
    ttl_s: float = Field(
        120.0,
        ge=1,
        description="Seconds a lease lives without a heartbeat (refreshed every ttl_s/4); a killed run's "
        "lease is taken over after this (at once on the same host when its process is gone).",
    )
    wait_timeout_s: float | None = Field(
        None, ge=0, description="With wait: give up after this many seconds (null: wait as long as it takes)."
    )


class LeaseHeld(UserError):
    """Another live run holds the lease."""


class LeaseLost(UserError):
    """This run's lease was taken over or could not be refreshed; it stopped writing."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - no such process, or psutil missing
        return None


class Lease:
    """The lease on one folder; `acquire` / `release`, or use it as a context manager."""

    def __init__(self, folder: str, owner: str, ttl_s: float = 120.0, name: str = LEASE_NAME, **info: Any):
        self.folder = folder.rstrip("/") or folder
        self.fs, root = fsspec.core.url_to_fs(self.folder)
        self.path = posixpath.join(root.rstrip("/"), name)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.owner, self.ttl_s, self.info = owner, float(ttl_s), info
        self.token = uuid.uuid4().hex
        self.lost: str = ""
        self.on_lost: Callable[[str], None] = lambda reason: _thread.interrupt_main()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired_at = 0.0

    # -- the object --------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        t = _now()
        pid = os.getpid()
        return {
            "owner": self.owner, "host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid),
            "token": self.token, "acquired_at": _iso(self._acquired_at or t), "heartbeat_at": _iso(t),
            "expires_at": _iso(t + self.ttl_s), "expires_epoch": t + self.ttl_s, "ttl_s": self.ttl_s, **self.info,
        }  # fmt: skip

    def read(self) -> dict[str, Any] | None:
        """The lease object as it is now (None when there is none); an unreadable one counts as expired."""
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            held = json.loads(data)
            if isinstance(held, dict) and "token" in held:
                return held
        except ValueError:
            pass
        return {"token": "unreadable-" + uuid.uuid5(uuid.NAMESPACE_URL, repr(data)).hex, "expires_epoch": 0.0}

    def _bytes(self) -> bytes:
        return (json.dumps(self.record(), indent=2, sort_keys=True) + "\n").encode()

    def _create(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` only if it does not exist; readers never see it half-written."""
        if not self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # atomic, and fails when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _overwrite(self, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(self.path, data)
            return
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- taking and keeping it ---------------------------------------------------------------
    def stale(self, held: dict[str, Any]) -> bool:
        """Expired, or held by a process of this host that is gone."""
        if float(held.get("expires_epoch") or 0.0) < _now():
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            started = _process_start(held["pid"])
            return started is None or (held.get("pid_started") is not None and started != held["pid_started"])
        return False

    def acquire(
        self, wait: bool = False, timeout_s: float | None = None, poll_s: float | None = None, quiet: bool = False
    ) -> Lease:
        """Take the lease, waiting for a live holder when `wait` (said once, unless `quiet`); else LeaseHeld."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poll = poll_s or min(5.0, max(0.2, self.ttl_s / 8))
        told = False
        while True:
            self._acquired_at = _now()
            if self._create(self.path, self._bytes()):
                break
            held = self.read()
            if held is None:
                continue  # released between the two calls
            if self.stale(held):
                if self._take_over(held):
                    log.warning("%s: took over the lease of %s (its heartbeat stopped)", self.folder, _who(held))
                    break
                continue
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                waited = "" if not wait else f" (waited {timeout_s:g} s)"
                raise LeaseHeld(f"{self.folder}: {describe(held)}{waited}; {_advice(wait)}")
            if not told and not quiet:
                log.warning("%s: waiting; it is %s", self.folder, describe(held))
                told = True
            time.sleep(poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.folder}", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, held: dict[str, Any]) -> bool:
        """Replace a stale lease; of all runs that found this same stale lease, exactly one wins."""
        for attempt in range(8):
            claim = f"{self.path}.takeover-{held['token']}-{attempt}"
            if self._create(claim, self._bytes()):
                now = self.read()
                if now is not None and now.get("token") != held["token"]:
                    return False  # renewed or released meanwhile: start over
                self._overwrite(self._bytes())
                return True
            try:  # a claimant that died before finishing: its claim expires like a lease
                other = json.loads(self.fs.cat_file(claim))
            except (FileNotFoundError, ValueError):
                continue
            if not self.stale(other):
                return False
        return False

    def _beat(self) -> None:
        interval = max(0.2, self.ttl_s / 4)
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                held = self.read()
                if held is None or held.get("token") != self.token:
                    self._lose(f"taken over by {_who(held)}" if held else "its lease object was removed")
                    return
                self._overwrite(self._bytes())
                last_ok = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - storage errors: retried until the ttl runs out
                if time.monotonic() - last_ok > self.ttl_s:
                    self._lose(f"could not refresh it for {self.ttl_s:g} s ({type(exc).__name__}: {exc})")
                    return

    def _lose(self, reason: str) -> None:
        self.lost = f"{self.folder}: this run lost its lease ({reason}); it stopped so as not to write with another run"
        log.error("%s", self.lost)
        self.on_lost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease object if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(Exception):
            held = self.read()
            if held is not None and held.get("token") == self.token:
                self.fs.rm_file(self.path)
        with contextlib.suppress(Exception):
            for claim in self.fs.glob(f"{self.path}.takeover-*"):
                self.fs.rm_file(claim)  # claims on leases replaced long ago; this run holds the current one

    def __enter__(self) -> Lease:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe(held: dict[str, Any]) -> str:
    beat = held.get("heartbeat_at")
    expires = float(held.get("expires_epoch") or 0.0) - _now()
    since = f", last heartbeat {beat}" if beat else ""
    return f"being written by {_who(held)}{since}, lease expires in {max(0, round(expires))} s"


def _who(held: dict[str, Any] | None) -> str:
    held = held or {}
    run = f" run {held['run']}" if held.get("run") else ""
    return f"{held.get('owner', '?')}{run} on {held.get('host', '?')} (pid {held.get('pid', '?')})"


def _advice(wait: bool) -> str:
    if wait:
        return "try again later, or raise stages.generate.lease.wait_timeout_s"
    return "run again when it is done, or set stages.generate.lease.wait=true to wait for it"


@contextlib.contextmanager
def output_lease(output: str, spec: LeaseSpec | None, owner: str, run: str = "") -> Iterator[Lease]:
    """Hold the lease on `output` for the block; a lost lease surfaces as LeaseLost, not KeyboardInterrupt."""
    spec = spec or LeaseSpec()
    lease = Lease(output, owner, spec.ttl_s, run=run).acquire(spec.wait, spec.wait_timeout_s)
    try:
        yield lease
    except KeyboardInterrupt:
        if lease.lost:
            raise LeaseLost(lease.lost) from None
        raise
    finally:
        lease.release()
