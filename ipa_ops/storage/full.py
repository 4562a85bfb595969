"""A full disk (ENOSPC, or a quota: EDQUOT) as one line naming the file, wherever the write happened.

A write that fails for lack of space must not leave a partial file under its final name (every
writer here writes a temp name and renames, removing the temp on failure) and must not be
reported as a Ray traceback three processes away from the disk. Writers turn the OSError into
`DiskFull` naming the final path; the runner finds it in whatever chain of Ray errors carried it
(`find_disk_full`) and stops the run with that line. Rows committed before stay committed; the
rows in flight are not done and are made again by the rerun once space is freed.
"""

from __future__ import annotations

import errno
import re

from ipa_ops.errors import UserError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_REMOTE = re.compile(r"^(?:\S+\.)?DiskFull: (.+)$", re.MULTILINE)


class DiskFull(UserError):
    """No space (or no quota) left where the run writes."""


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def disk_full(path: str, exc: OSError) -> DiskFull:
    """The one-line error for a write of `path` that failed for lack of space."""
    name = errno.errorcode.get(exc.errno or 0, "ENOSPC")
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return DiskFull(
        f"{path}: {what} ({name}); the run stopped and nothing was written under this name; "
        "the rows it had committed are kept: free space and rerun to make the rest"
    )


def find_disk_full(exc: BaseException) -> DiskFull | None:
    """The DiskFull (or a bare full-disk OSError) anywhere in `exc`'s chain of causes, Ray's included."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DiskFull):
            return DiskFull(str(current).splitlines()[0] if str(current) else "no space left on device")
        if is_full(current):
            assert isinstance(current, OSError)
            return disk_full(str(current.filename or "a file"), current)
        named = _named_in_text(current)
        if named is not None:
            return named
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError keeps the remote error here
        todo += [current.__cause__, current.__context__, cause if isinstance(cause, BaseException) else None]
    return None


def _named_in_text(exc: BaseException) -> DiskFull | None:
    """A DiskFull raised in a Ray worker: the driver gets its traceback as text, not the object
    (Ray Data's UserCodeException does not carry its causes across processes)."""
    text = str(getattr(exc, "traceback_str", "") or "") + "\n" + str(exc)
    found = _REMOTE.findall(text)
    return DiskFull(found[-1].strip()) if found else None
