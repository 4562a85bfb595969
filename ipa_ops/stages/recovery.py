"""A Ray node (or an actor's process) lost mid-stage: the rows not yet back are made again on what is left.

Left to itself, Ray Data restarts a dead actor wherever it fits and retries its batch there. That
is right for a crashed process on a live node, but when a node is gone for good, a restarted actor
that needs what only that node had (its GPU, a custom resource) waits for room that never comes,
and the batch queued on it waits with it: the run hangs. So the generate stage's pools run with
`max_restarts=0`: a dead actor fails its batch, the dataset stops, and the driver, which knows
every row it has been handed back, starts a new dataset over the rows still missing, on elastic
pools (1..actors) that start with what fits now. Rows already handed back are never made again,
so every row is in the results once. At most `MAX_ROUNDS` datasets run; a failure that is not a
lost node or process (a bug, a full disk, a stop) ends the stage as before.

The stage's summary (and so its ledger record) then carries `faults`: the nodes lost, the rounds
and the rows made again, and one line saying so.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray

MAX_ROUNDS = 4
ROUNDS_ENV = "IPA_MAX_ROUNDS"  # datasets one stage may start after losing workers (default MAX_ROUNDS)


def _lost_kinds() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.WorkerCrashedError,
            rex.LocalRayletDiedError)  # fmt: skip


def lost_worker(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says a node, an actor or its objects are gone; None for any other failure."""
    kinds, seen = _lost_kinds(), set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, kinds) and not getattr(err, "actor_init_failed", False):  # a failing __init__ is a bug
            return err
        todo += [err.__cause__, err.__context__, getattr(err, "cause", None)]  # RayTaskError keeps it in .cause
    return None


def alive_nodes() -> dict[str, str]:
    """Node id -> address of every node the cluster has alive now."""
    return {n["NodeID"]: str(n.get("NodeManagerAddress", "")) for n in ray.nodes() if n.get("Alive")}


def pool(actors: int, first: bool, **options: Any) -> ray.data.ActorPoolStrategy:
    """The first dataset's pool has the size asked for; later ones start with what fits (1..actors)."""
    sizes: dict[str, int] = {"size": actors} if first else {"min_size": 1, "max_size": actors}
    return ray.data.ActorPoolStrategy(**sizes, **options)


def on_driver_node() -> Any:
    """Where a run's shared little actors (the stop flag, extract's claims) live: losing another node keeps them."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@contextlib.contextmanager
def no_restarts_warning() -> Iterator[None]:
    """Quiet the one deprecation `max_restarts=0` costs: Ray 2.60 has no named `map_batches` parameter for
    it (its actor pool reads it from the remote args, and documents `map_batches(..., max_restarts=0)`)."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`ray_remote_args` is deprecated", RayDeprecationWarning)
        yield


def max_rounds() -> int:
    try:
        return max(1, int(os.environ.get(ROUNDS_ENV, MAX_ROUNDS)))
    except ValueError:
        return MAX_ROUNDS


@dataclass
class Rounds:
    """Datasets over the rows still missing, until all are back; what was lost on the way."""

    stage: str
    stream: TextIO
    nodes_at_start: dict[str, str] = field(default_factory=alive_nodes)
    rounds: int = 0
    resubmitted: list[int] = field(default_factory=list)  # rows not yet back, at each loss
    redone_keys: set[str] = field(default_factory=set)  # their keys: some were in flight when a worker was lost
    causes: list[str] = field(default_factory=list)
    unit: str = "row"  # what `rows` are, in the lines said
    redo: str = "made again"  # what happens to the rows not yet back, in the line said at each loss
    promise: str = "every row is in the results once"  # what still holds, in the faults message

    def run(self, rows: list[Any], key: Callable[[Any], str], batches: Callable[[list[Any], bool], Iterable[Any]],
            consume: Callable[[Any], Iterable[str]]) -> None:  # fmt: skip
        """`consume` each batch of `batches(rows left, first?)`; it returns the keys of the rows it was handed."""
        left, limit = list(rows), max_rounds()
        while left:
            self.rounds += 1
            done: set[str] = set()
            batch_iter = iter(batches(left, self.rounds == 1))
            try:
                for batch in batch_iter:
                    done.update(consume(batch))
                return
            except Exception as exc:
                cause = lost_worker(exc)
                left = [r for r in left if key(r) not in done]
                if cause is None or self.rounds >= limit or not left:
                    raise
                said = _one_line(cause)
                del exc, cause
            finally:  # a dataset the driver failed on stops at once; one that failed is done with
                getattr(batch_iter, "close", lambda: None)()
                del batch_iter
            # the failed dataset's actors go once nothing refers to them (Ray Data drops its references
            # and lets them finish their tasks); a cycle through the error's traceback, or its iterator,
            # could keep them, and what they hold (a GPU, a custom resource), alive: drop both first
            gc.collect()
            self.resubmitted.append(len(left))
            self.redone_keys.update(key(r) for r in left)
            self.causes.append(said)
            self.stream.write(
                f"{self.stage}: lost a Ray worker ({said}); the {len(left)} {self.unit}(s) not yet back "
                f"are {self.redo} on the nodes left (round {self.rounds + 1} of at most {limit})\n"
            )

    def nodes_lost(self) -> dict[str, str]:
        now = alive_nodes()
        return {n: a for n, a in self.nodes_at_start.items() if n not in now}

    def faults(self) -> dict[str, Any] | None:
        """What the stage lost, for its summary and the ledger; None when nothing was."""
        lost = self.nodes_lost()
        if not lost and self.rounds <= 1:
            return None
        names = [f"{address} (node {node[:12]})" for node, address in sorted(lost.items())]
        said = f"{len(lost)} Ray node(s) lost during the run: {', '.join(names)}" if lost else "a Ray worker was lost"
        again = ", ".join(map(str, self.resubmitted))
        line = (f"{self.stage}: {said}; the {self.unit}s not yet back ({again}) went to a new dataset on the nodes "
                f"left ({self.rounds} dataset round(s)); {self.promise}")  # fmt: skip
        return {"nodes_lost": names, "rounds": self.rounds, "rows_resubmitted": self.resubmitted,
                "causes": self.causes, "message": line}  # fmt: skip


    def report(self) -> dict[str, Any] | None:
        """`faults()`, its message also said once on the stream: what the stage's summary carries."""
        faults = self.faults()
        if faults:
            self.stream.write(faults["message"] + "\n")
        return faults


def _one_line(exc: BaseException) -> str:
    text = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__

