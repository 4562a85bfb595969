"""A polite stop: SIGTERM or Ctrl-C drains the batches in flight, commits them, then ends the run.

`ray job stop`, Kubernetes and a person at a terminal all ask a run to end with a signal, and a
nightly run killed outright loses every image it had generated but not yet recorded. So `ipa run`
installs `Stopper` (main thread only) for the run:

- the first SIGTERM / SIGINT sets a flag. Generator actors wrapped by `guarded` check it before
  each batch and, once it is set, pass an empty slice on (same columns, no rows): batches already
  being generated finish, are committed and recorded; the rest of the manifest is left for the
  next run. The runner then raises `RunStopped` (ledger status `stopped`, exit 128 + signal).
- if draining takes longer than the grace period (`stages.generate.stop_grace_s`, env
  `IPA_STOP_GRACE_S`), or a second signal comes, the run is interrupted at once; what was
  committed stays committed (every write is atomic), the rest is made again by the next run.

The flag lives in a tiny Ray actor so actors on any node see it; a watcher thread, not the signal
handler, talks to Ray (a handler runs between two bytecodes of whatever the main thread does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ipa_ops.errors import RunStopped, UserError

GRACE_ENV = "IPA_STOP_GRACE_S"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopper:
    """The stop state of one run: which signal asked, and the flag actor the generator actors read."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal: int | None = None  # the first stop signal, once one came
        self._requested = threading.Event()
        self._done = threading.Event()
        self._hard: BaseException | None = None
        self._flag: Any = None
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="ipa stop watcher", daemon=True)

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a stop request"

    def _handle(self, signum: int, frame: object) -> None:
        if self._hard is not None:  # the watcher's grace timeout, or a lost lease
            hard, self._hard = self._hard, None
            raise hard
        if self._requested.is_set():
            name = signal.Signals(signum).name
            raise RunStopped(
                f"stopped at once by a second {name}; rows not committed are made again by the next run", signum
            )
        self.signal = signum
        self._requested.set()

    def hard(self, exc: BaseException) -> None:
        """Interrupt the main thread now with `exc` (from any thread)."""
        self._hard = exc
        # a real signal to the main thread: it also wakes a sleep or a wait (interrupt_main would not)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    def _watch(self) -> None:
        while not self._requested.wait(0.5):
            if self._done.is_set():
                return
        self._set_flag()
        if not self._done.wait(self.grace_s):
            self.hard(
                RunStopped(
                    f"stopped by {self.signal_name()}: in-flight batches did not finish within the "
                    f"{self.grace_s:g} s grace period (stages.generate.stop_grace_s); what was committed is kept, "
                    "the rest is made again by the next run",
                    self.signal or signal.SIGTERM,
                )
            )

    def flag(self) -> Any:
        """The Ray actor holding the flag (made on first use, already set if a signal came first)."""
        import ray

        with self._lock:
            if self._flag is None:
                from ipa_ops.stages.recovery import on_driver_node

                # on the driver's node: losing another node must not lose the flag (stages/recovery.py)
                self._flag = ray.remote(num_cpus=0, scheduling_strategy=on_driver_node())(_StopFlag).remote()
                if self.requested:
                    self._flag.set.remote()
            return self._flag

    def _set_flag(self) -> None:
        with self._lock:
            if self._flag is not None:
                with contextlib.suppress(Exception):  # Ray already gone: nothing left to tell
                    self._flag.set.remote()


class _StopFlag:
    def __init__(self) -> None:
        self.stopping = False

    def set(self) -> None:
        self.stopping = True

    def is_set(self) -> bool:
        return self.stopping


_current: Stopper | None = None


def current() -> Stopper | None:
    """The stopper of the run in progress in this process, if `ipa run` installed one."""
    return _current


def grace_seconds(flow_value: float) -> float:
    """The grace period: env IPA_STOP_GRACE_S over the flow's value."""
    text = os.environ.get(GRACE_ENV, "").strip()
    if not text:
        return flow_value
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise UserError(f"{GRACE_ENV}={text!r}: not a number of seconds >= 0; unset it or give e.g. 30")
    return value


@contextlib.contextmanager
def stop_on_signals(grace_s: float) -> Iterator[Stopper | None]:
    """Handle SIGTERM/SIGINT politely for the block; does nothing outside the main thread."""
    global _current
    if threading.current_thread() is not threading.main_thread() or _current is not None:
        yield _current
        return
    stopper = Stopper(grace_s)
    previous = {s: signal.signal(s, stopper._handle) for s in SIGNALS}
    _current = stopper
    stopper._watcher.start()
    try:
        yield stopper
    finally:
        stopper._done.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
        _current = None
        stopper._watcher.join(timeout=2)


def guarded(actor_cls: type) -> type:
    """`actor_cls` whose batches become empty slices once a stop was asked (unchanged with no stopper)."""
    stopper = current()
    if stopper is None:
        return actor_cls
    flag = stopper.flag()

    class Guarded(actor_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: dict[str, Any]) -> Any:
            import ray

            if ray.get(flag.is_set.remote()):
                batch = {k: v[:0] for k, v in batch.items()}  # same columns, no rows: nothing new starts
            return super().__call__(batch)

    Guarded.__name__ = Guarded.__qualname__ = actor_cls.__name__
    return Guarded
