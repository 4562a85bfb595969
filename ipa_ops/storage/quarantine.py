"""Moving unreadable or foreign files aside, so one bad file never stops every later run.

A full disk, an interrupted copy or a stray file leaves a part that does not read (`Parquet magic
bytes not found in footer`) or is not ours at all. Readers of the store and the ledger call
`quarantine` for such a file: it moves it to `<root>/_quarantine/<its path under root>`, writes
`<that>.reason.json` next to it (why, when, by whom, from where), and logs one line naming it.
The rows it held are then simply missing, so the next run makes them again. Nothing is deleted:
a person can inspect the file and move it back.

Only definite corruption counts (`is_corrupt`), and a file is re-read whole before it is moved
(`read_checked`, `confirmed_unreadable`), so a transient read error from an object store never
quarantines a good file. A part written by a newer ipa is not corrupt: readers refuse it (a
`UserError` such as `NewerSchema`) and leave it. Every reader (store parts, ledger records, results
and scores parts) reads through `read_checked` and moves files with `set_aside`: one way, one
`_quarantine/` layout, one line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa

from ipa_ops.errors import UserError

log = logging.getLogger("ipa_ops.storage.quarantine")
QUARANTINE = "_quarantine"
T = TypeVar("T")


class NewerSchema(UserError):
    """A file written by a newer ipa (or another tool's newer format): refused, never moved or overwritten."""


@dataclass(frozen=True)
class Problem:
    """One bad file: what is wrong (`unreadable`, `foreign`, `newer`) and the one-line reason."""

    path: str
    kind: str
    reason: str
    root: str  # the folder whose `_quarantine/` receives it

    @property
    def fixable(self) -> bool:
        """Unreadable and foreign files are moved aside; a newer schema needs a newer ipa, not a move."""
        return self.kind != "newer"

    def line(self) -> str:
        return f"{self.path}: {self.kind}: {self.reason}"


def is_corrupt(exc: BaseException) -> bool:
    """Errors that mean the bytes are bad, not that reading them failed for now (network, permissions)."""
    return isinstance(exc, pa.ArrowInvalid | json.JSONDecodeError | UnicodeDecodeError)


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def confirmed_unreadable(fs: Any, path: str, parse: Callable[[io.BytesIO], Any]) -> tuple[Any, BaseException | None]:
    """Re-read `path` whole (size checked against the listing) and parse it again.

    Returns (parsed, None) when the second read works (the first failure was transient), or
    (None, error) when the bytes themselves are bad. Errors that are not corruption propagate.
    """
    data = fs.cat_file(path)
    expected = fs.info(path).get("size")
    if expected is not None and len(data) != int(expected):
        raise OSError(f"{path}: read {len(data)} of {expected} bytes; try again")
    try:
        return parse(io.BytesIO(data)), None
    except (pa.ArrowException, ValueError) as exc:  # parsing bytes in memory: no I/O left to blame
        return None, exc


def read_checked(fs: Any, path: str, parse: Callable[[Any], T]) -> tuple[T | None, BaseException | None]:
    """`parse(the open file)`; when that fails as bad bytes would, the file is re-read whole and parsed again.

    Returns (parsed, None), or (None, the error) when the bytes themselves are bad. A file that is
    gone (FileNotFoundError), a refusal (`UserError`, e.g. a newer schema) and errors that are not
    about the bytes propagate.
    """
    try:
        with fs.open(path, "rb") as fh:
            return parse(fh), None
    except (FileNotFoundError, UserError):
        raise
    except Exception as exc:  # noqa: BLE001 - corruption is told apart from transient errors below
        if not (is_corrupt(exc) or isinstance(exc, OSError | pa.ArrowException | ValueError)):
            raise
    return confirmed_unreadable(fs, path, parse)


def set_aside(fs: Any, problem: Problem) -> str:
    """What readers do with a bad file: `quarantine` it; '' (and a line saying so) when it cannot be moved."""
    try:
        return quarantine(fs, problem)
    except OSError as exc:  # read-only storage: the file is skipped, not moved
        log.warning("%s: %s; skipped (could not move it aside: %s)", problem.path, problem.reason, one_line(exc))
        return ""


def quarantine(fs: Any, problem: Problem) -> str:
    """Move the problem's file to `<root>/_quarantine/...` with a reason file; returns the new path.

    A file another reader moved first is not an error: the new path is returned all the same.
    """
    if not problem.fixable:
        raise ValueError(f"{problem.path}: {problem.kind} files are never moved")
    root = problem.root.rstrip("/")
    relative = posixpath.relpath(problem.path, root) if problem.path.startswith(root + "/") else problem.path
    dest = posixpath.join(root, QUARANTINE, relative.lstrip("/"))
    reason = {
        "original": problem.path,
        "kind": problem.kind,
        "reason": problem.reason,
        "moved_at": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    fs.makedirs(posixpath.dirname(dest), exist_ok=True)
    fs.pipe_file(dest + ".reason.json", (json.dumps(reason, indent=2) + "\n").encode())
    try:
        fs.mv(problem.path, dest)
    except FileNotFoundError:
        if not fs.exists(dest):
            raise
    log.warning("%s: %s; moved to %s", problem.path, problem.reason, dest)
    return dest
