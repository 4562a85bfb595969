"""`ipa doctor`: find the files that would trip a run, without changing anything; `fix` moves them aside.

A folder is looked at by every registered checker whose `detect` recognises it: an embedding
store (`<encoder id>/part-*.parquet`) or an output folder's ledger (`runs/*.json`). A checker is
two functions, so another kind of folder (results/, scores/) is one `register` call away:

    register("results", detect=lambda fs, root: ..., check=lambda fs, root: [Problem, ...])

`check` must only read. Problems that can be fixed (unreadable, foreign) are moved to
`<root>/_quarantine/` by `fix`, exactly as the readers do when they meet them; a part of a newer
schema is only reported.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from ipa_ops.outputs.ledger_health import check_record
from ipa_ops.storage.quarantine import QUARANTINE, Problem, quarantine
from ipa_ops.store.health import check_part

Detect = Callable[[Any, str], bool]
Check = Callable[[Any, str], tuple[int, list[Problem]]]  # (files checked, problems)


@dataclass(frozen=True)
class Checker:
    name: str
    detect: Detect
    check: Check


CHECKERS: dict[str, Checker] = {}


def register(name: str, detect: Detect, check: Check) -> None:
    """Add (or replace) the checker of one kind of folder."""
    CHECKERS[name] = Checker(name, detect, check)


@dataclass
class Report:
    uri: str
    kinds: dict[str, int]  # checker name -> files checked
    problems: list[Problem]


def _glob(fs: Any, pattern: str) -> list[str]:
    try:
        return sorted(fs.glob(pattern))
    except FileNotFoundError:
        return []


OUTPUT_FOLDERS = {"results", "scores", "images", "runs", "thumbs"}  # an output's own, never encoder folders


def _store_parts(fs: Any, root: str) -> list[str]:
    """Parts of encoder folders (`<encoder id>/part-*.parquet`), not an output's results/ or _quarantine/."""
    parts = _glob(fs, f"{root}/*/part-*.parquet")
    folders = [posixpath.basename(posixpath.dirname(p)) for p in parts]
    return [p for p, f in zip(parts, folders, strict=True) if not f.startswith("_") and f not in OUTPUT_FOLDERS]


def _check_store(fs: Any, root: str) -> tuple[int, list[Problem]]:
    parts = _store_parts(fs, root)
    return len(parts), [p for p in (check_part(fs, path, root) for path in parts) if p is not None]


def _check_ledger(fs: Any, root: str) -> tuple[int, list[Problem]]:
    records = _glob(fs, posixpath.join(root, "runs", "*.json"))
    return len(records), [p for _, p in (check_record(fs, path, root) for path in records) if p is not None]


register("store", lambda fs, root: bool(_store_parts(fs, root)), _check_store)
register("ledger", lambda fs, root: fs.isdir(posixpath.join(root, "runs")), _check_ledger)


def diagnose(uri: str) -> tuple[Any, Report]:
    """(filesystem, report) of every registered checker that recognises `uri`; reads only."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or "/"
    kinds: dict[str, int] = {}
    problems: list[Problem] = []
    for checker in CHECKERS.values():
        if checker.detect(fs, root):
            checked, found = checker.check(fs, root)
            kinds[checker.name] = checked
            problems += found
    return fs, Report(uri, kinds, problems)


def fix(fs: Any, problems: list[Problem]) -> dict[str, str]:
    """Quarantine every fixable problem; original path -> where it went."""
    return {p.path: quarantine(fs, p) for p in problems if p.fixable}


def shown(fs: Any, path: str) -> str:
    """A path as the user wrote it: with its protocol on object stores."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


__all__ = ["CHECKERS", "QUARANTINE", "Report", "diagnose", "fix", "register", "shown"]
