"""Is a ledger record (`<output>/runs/*.json`) whole and ours? Used by `read_ledger` and `ipa doctor`.

Records are written whole (temp + rename, or one PUT), so a record that does not parse was cut
by something else: a full disk during a copy, a sync tool, a person. It is `unreadable`; a JSON
value that is not a run record (no `run_id` / `status` / `started_at`) is `foreign`. Either is
moved to `<output>/_quarantine/runs/` with its reason, and the ledger reads on without it.
"""

from __future__ import annotations

import json
from typing import Any

from ipa_ops.storage.quarantine import Problem, one_line, read_checked, set_aside

REQUIRED = ("run_id", "status", "started_at")


def _parse(source: Any) -> dict[str, Any]:
    return json.loads(source.read().decode("utf-8"))


def record_problem(record: Any, path: str, root: str) -> Problem | None:
    if not isinstance(record, dict):
        return Problem(path, "foreign", f"not a run record (a JSON {type(record).__name__}, not an object)", root)
    absent = [k for k in REQUIRED if k not in record]
    if absent:
        return Problem(path, "foreign", f"not a run record (no {', '.join(absent)})", root)
    return None


def check_record(fs: Any, path: str, root: str) -> tuple[dict[str, Any] | None, Problem | None]:
    """(record, None), or (None, what is wrong with it). Transient read errors propagate."""
    record, error = read_checked(fs, path, _parse)
    if error is not None:
        return None, Problem(path, "unreadable", f"not a readable ledger record ({one_line(error)})", root)
    problem = record_problem(record, path, root)
    return (None, problem) if problem else (record, None)


def read_record(fs: Any, path: str, root: str) -> dict[str, Any] | None:
    """A record, or None after moving a bad one aside (one line logged; skipped if it cannot be moved)."""
    record, problem = check_record(fs, path, root)
    if problem is None:
        return record
    set_aside(fs, problem)
    return None
