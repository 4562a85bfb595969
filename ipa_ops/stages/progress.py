"""Progress a person can read during a long run: rows done / to do, rows/s, ETA, errors, per stage.

Ray Data's own bars are off (they are per operator and per block, and garble job logs), so the
driver, which sees every finished batch anyway, reports for the stage as a whole, on stderr:

    generate: 1200/20000 rows (6%) | ok 1195 | errors 5 | 3.1 rows/s | ETA 1h30m

On a terminal the line is redrawn in place a few times a second; otherwise (a job log, a pipe) a
plain line is printed every `IPA_PROGRESS_SECONDS` seconds (default 30) and once at the end, so
logs stay readable and grep-able.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

SECONDS_ENV = "IPA_PROGRESS_SECONDS"
TTY_SECONDS = 0.5
LOG_SECONDS = 30.0


def duration(seconds: float) -> str:
    """`1h30m`, `4m05s`, `12s`: short enough for one line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts for one stage; prints when enough time passed since the last line, and on `close`."""

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "rows",
        stream: TextIO | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.unit = stage, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if every is None:
            every = TTY_SECONDS if self.tty else float(os.environ.get(SECONDS_ENV) or LOG_SECONDS)
        self.every, self.clock = every, clock
        self.ok = self.errors = 0
        self.started = self.last = clock()
        self.printed_at: int | None = None  # rows done when the last line was printed

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def update(self, ok: int = 0, errors: int = 0) -> None:
        self.ok += ok
        self.errors += errors
        if self.clock() - self.last >= self.every:
            self._print()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        text = f"{self.stage}: {self.done}/{self.total} {self.unit}{share} | ok {self.ok} | errors {self.errors}"
        text += f" | {rate:.2f} {self.unit}/s"
        left = self.total - self.done
        if left > 0 and self.done:
            text += f" | ETA {duration(left / rate)}"
        elif left <= 0:
            text += f" | took {duration(elapsed)}"
        return text

    def close(self) -> None:
        """The final line (so every run's log says how far each stage got), unless the last line said it."""
        if self.printed_at != self.done:
            self._print(final=True)
        elif self.tty:
            self.stream.write("\n")

    def _print(self, final: bool = False) -> None:
        self.last = self.clock()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.printed_at = self.done
