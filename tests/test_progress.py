"""Progress lines: rows done / to do, rate, ETA and errors; redrawn on a terminal, periodic in logs."""

from __future__ import annotations

import io

from ipa_ops.stages.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_are_periodic_with_rate_and_eta() -> None:
    clock, log = Clock(), io.StringIO()
    progress = Progress("generate", 100, stream=log, every=30, clock=clock)
    clock.now = 10
    progress.update(ok=20)  # 10 s in: not yet time for a line
    assert log.getvalue() == ""
    clock.now = 40
    progress.update(ok=18, errors=2)
    assert log.getvalue() == "generate: 40/100 rows (40%) | ok 38 | errors 2 | 1.00 rows/s | ETA 1m00s\n"
    clock.now = 100
    progress.update(ok=60)
    progress.close()
    lines = log.getvalue().splitlines()
    assert lines[-1] == "generate: 100/100 rows (100%) | ok 98 | errors 2 | 1.00 rows/s | took 1m40s"
    assert all("\r" not in line for line in lines)


def test_terminal_line_is_redrawn_in_place() -> None:
    clock, tty = Clock(), Terminal()
    progress = Progress("extract", 10, unit="images", stream=tty, clock=clock)
    for _ in range(10):
        clock.now += 1
        progress.update(ok=1)
    progress.close()
    text = tty.getvalue()
    assert text.count("\r\x1b[2K") == 10 and text.endswith("took 10s\n") and text.count("\n") == 1
    assert "extract: 5/10 images (50%) | ok 5 | errors 0 | 1.00 images/s | ETA 5s" in text


def test_durations_read_short() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3600 * 5 + 125)] == ["0s", "59s", "1m01s", "5h02m"]


def test_the_last_line_is_not_repeated() -> None:
    clock, log = Clock(), io.StringIO()
    progress = Progress("generate", 4, stream=log, every=30, clock=clock)
    clock.now = 45
    progress.update(ok=4)  # due, and complete
    progress.close()
    assert log.getvalue() == "generate: 4/4 rows (100%) | ok 4 | errors 0 | 0.09 rows/s | took 45s\n"
