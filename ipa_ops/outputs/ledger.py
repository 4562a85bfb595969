"""The run ledger: one record per run of a flow, kept next to its outputs.

    <output>/runs/<started>-<run_id>.json     one JSON object per run (status, inputs, counts, timings)

Scheduled runs answer "what did last night's run see and do?" from here. A record is a file of its
own, written whole (temp + rename locally, one PUT on object stores), so concurrent runs never lose
each other's records the way appending to one shared file on S3 would; `read_ledger` lists them
in start order, and `duckdb`'s `read_json('<output>/runs/*.json')` reads them without ipa.

A record is written when the run starts (status `running`) and rewritten when it ends: `ok`
(every row fine), `partial` (some rows failed; see results/), `stopped` (SIGTERM or Ctrl-C: it
committed what was in flight and ended early; a rerun continues) or `failed` (the run raised). A record
left `running` after its run is gone marks a run that was killed. `faults` holds one line per stage
that lost Ray nodes or actors on the way and made their rows again (stages/recovery.py); the
numbers are in that stage's `counts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from ipa_ops.canonical import canonical_json
from ipa_ops.errors import RunStopped, UserError
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs.folder import OutputDir, versions
from ipa_ops.outputs.ledger_health import read_record
from ipa_ops.storage.full import DiskFull

LEDGER_DIR = "runs"
RUN_ID_ENV = "IPA_RUN_ID"  # names a run explicitly; a Ray job's records carry its submission id by default
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
HASH_LIMIT = 256 << 20  # manifest files up to this size are hashed, so reruns can tell changed inputs


def flow_hash(flow: Flow, use_env: bool = True) -> str:
    """Hash of what a flow computes (models, stages, mirror in force), not where or when it runs.

    `ray` (the cluster address) and `schedule` are left out: moving a flow to another cluster or
    changing its cron does not make it a different flow. Only values that differ from the schema's
    defaults count, so a new optional flow field in a later ipa leaves existing hashes alone.
    `use_env=False` ignores IPA_MIRROR, for renderings that must not depend on the machine.
    """
    leave_out = {"ray": True, "schedule": True, "stages": {"generate": {"lease", "stop_grace_s"}}}  # how, not what
    data = flow.model_dump(mode="json", exclude=leave_out, exclude_defaults=True)
    data["mirror"] = flow.mirror_root() if use_env else flow.mirror
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:12]


def new_run_id() -> str:
    """`IPA_RUN_ID` if set; inside a Ray job, its submission id; else a time-ordered random id."""
    given = os.environ.get(RUN_ID_ENV, "").strip() or _ray_submission_id()
    return _SAFE.sub("-", given) if given else f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _ray_submission_id() -> str:
    """The Ray Jobs submission id of this driver (Ray passes the job's config to it in this variable)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return ""
    return str((config.get("metadata") or {}).get("job_submission_id") or "")


def inputs_seen(manifest: str) -> list[dict[str, Any]]:
    """The manifest files a run reads (a file, a glob or a partitioned folder) with size and mtime/ETag."""
    from ipa_ops.manifest.reading import _discover  # the same discovery read_manifest uses

    fs, files = _discover(manifest)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    seen = []
    for path, partitions in files:
        info = fs.info(path)
        modified = info.get("mtime", info.get("LastModified", info.get("created")))
        if isinstance(modified, int | float):
            modified = datetime.fromtimestamp(modified, UTC)
        seen.append(
            {
                "uri": path if protocol in ("file", "local") else f"{protocol}://{path}",
                "size": int(info.get("size") or 0),
                "modified": modified.isoformat() if isinstance(modified, datetime) else modified,
                "etag": str(info.get("ETag") or info.get("etag") or "").strip('"'),
                "sha256": _sha256(fs, path) if int(info.get("size") or 0) <= HASH_LIMIT else None,
                "partitions": partitions,
            }
        )
    return seen


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunRecord:
    """One run's ledger entry; `start` writes it as `running`, `finish` rewrites it with the outcome."""

    def __init__(self, flow: Flow, stages: list[str], output: str, manifest: str):
        self.out = OutputDir(output)
        self.started = datetime.now(UTC)
        self._t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "run_id": new_run_id(),
            "flow": flow.name,
            "flow_hash": flow_hash(flow),
            "status": "running",
            "started_at": self.started.isoformat(),
            "finished_at": None,
            "seconds": None,
            "stages": stages,
            "manifest": manifest,
            "output": output,
            "inputs": [],
            "counts": {},
            "faults": [],
            "error": "",
            "host": socket.gethostname(),
            "versions": versions(),
        }
        name = f"{self.started:%Y%m%dT%H%M%S%fZ}-{self.data['run_id']}.json"
        self.path = self.out.path(LEDGER_DIR, name)

    def start(self) -> None:
        try:
            self.data["inputs"] = inputs_seen(self.data["manifest"]) if self.data["manifest"] else []
        except (UserError, OSError) as exc:  # the run itself reports a missing manifest
            self.data["error"] = _one_line(exc)
        self._write()

    def finish(self, results: dict[str, Any], error: BaseException | None = None) -> dict[str, Any]:
        self.data["counts"] = json.loads(json.dumps(results, default=str))
        self.data["faults"] = [str(r["faults"]["message"]) for r in results.values()
                               if isinstance(r, dict) and isinstance(r.get("faults"), dict)]  # fmt: skip
        self.data["finished_at"] = datetime.now(UTC).isoformat()
        self.data["seconds"] = round(time.perf_counter() - self._t0, 3)
        if isinstance(error, RunStopped):
            self.data["status"], self.data["error"] = "stopped", _one_line(error)
        elif error is not None:
            self.data["status"], self.data["error"] = "failed", _one_line(error)
        else:
            failed_rows = int(results.get("generate", {}).get("error", 0) or 0)
            self.data["status"] = "partial" if failed_rows else "ok"
            self.data["error"] = f"{failed_rows} row(s) failed; see results/" if failed_rows else ""
        self._write()
        return self.data

    def _write(self) -> None:
        text = json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n"
        try:
            self.out.write_bytes_atomic(self.path, text.encode())
        except DiskFull:
            if not self.out.local or not self.data["finished_at"]:
                raise
            # the outcome of a run that stopped on a full disk: rewritten in place, in the blocks the
            # `running` record already holds (a cut record would be quarantined, never misread)
            with open(self.out._inside(self.path), "r+b") as f:
                f.write(text.encode())
                f.truncate()


@contextlib.contextmanager
def recording(flow: Flow, stages: list[str], results: dict[str, Any]) -> Iterator[RunRecord | None]:
    """Record a run in the ledger of the output it writes; `results` is read when the block ends.

    That is the generate stage's output, or for a score-only run the score stage's (no manifest);
    an extract-only run has no output root and is not recorded.
    """
    stage, score = flow.stages.generate, flow.stages.score
    if "generate" in stages and stage is not None:
        output, manifest = stage.output, stage.manifest
    elif "score" in stages and score is not None and (score.output or stage is not None):
        output, manifest = score.output or (stage.output if stage is not None else ""), ""
    else:
        yield None
        return
    record = RunRecord(flow, stages, output, manifest)
    record.start()
    try:
        yield record
    except BaseException as exc:
        with contextlib.suppress(Exception):  # a failing ledger write must not hide the run's own error
            record.finish(results, exc)
        raise
    record.finish(results)


def read_ledger(output: str) -> list[dict[str, Any]]:
    """Every run record under `<output>/runs/`, oldest first."""
    out = OutputDir(output)
    folder = posixpath.join(out.root, LEDGER_DIR)
    try:
        paths = sorted(out.fs.glob(posixpath.join(folder, "*.json")))
    except FileNotFoundError:
        paths = []
    records = []
    for path in paths:
        record = read_record(out.fs, path, out.root)  # None: unreadable or foreign, moved aside
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: (str(r.get("started_at")), str(r.get("run_id"))))


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
