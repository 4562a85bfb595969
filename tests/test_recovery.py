"""Recovery rounds without a cluster: which failures start a new round, and that rows back are never redone.

The score stage's first dataset is made to fail after two batches (a lost actor, or a bug) with the
real scorer running in this process; `recovery.Rounds` is driven with plain generators; the extract
stage's claims and arrivals are checked directly. tests/test_node_loss.py kills real nodes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_node_loss import SCORED_FLOW, _assert_scored_once, _scorable_output, _score_sets

from ipa_ops.flow.spec import load_flow
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.scores import read_records


class _LosesItsActor:
    """Stands in for the scorer pool's dataset, with the real ScorerActor in this process, batch by batch: the
    first dataset fails after two batches, with `cause` (a lost actor, or a bug), as a dead node's would."""

    def __init__(self, actor: Any, rows: list[dict[str, Any]], first: bool, cause: BaseException) -> None:
        self.actor, self.rows, self.first, self.cause = actor, rows, first, cause

    def iter_batches(self, batch_size: int, batch_format: str) -> Iterator[dict[str, Any]]:
        for n, start in enumerate(range(0, len(self.rows), batch_size)):
            if self.first and n == 2:
                raise RuntimeError("the dataset stopped") from self.cause
            chunk = self.rows[start : start + batch_size]
            yield self.actor({k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]})


def _lose_an_actor(monkeypatch: pytest.MonkeyPatch, cause: BaseException) -> None:
    """The score stage's first dataset fails after two batches with `cause`; the later ones finish."""
    from ipa_ops.stages import score

    def pipeline(flow: Any, stage: Any, store: Any, output: str, rows: list, actor_cls: type, first: bool) -> Any:
        actor = actor_cls(flow.model_dump_json(), stage.model_dump_json(), store, output, False)
        return _LosesItsActor(actor, rows, first, cause)

    monkeypatch.setattr(score, "_pipeline", pipeline)


def _score(zoo: Path, out: Path) -> dict[str, Any]:
    from ipa_ops.stages.score import run_score

    flow = load_flow(SCORED_FLOW, _score_sets(zoo, out))
    assert flow.stages.score is not None
    return run_score(flow, flow.stages.score)


def test_score_rounds_score_only_the_rows_not_yet_back_and_keep_what_came_back(
    ray_local: None, tmp_path: Path, scorer_zoo: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ray.exceptions import ActorDiedError

    out = tmp_path / "lost" / "out"
    keys = _scorable_output(out, 7, 64)
    _lose_an_actor(monkeypatch, ActorDiedError())
    summary = _score(scorer_zoo, out)
    faults = summary["faults"]
    assert summary["scored_rows"] == 7 and faults["rounds"] == 2 and faults["rows_resubmitted"] == [3]
    assert faults["nodes_lost"] == [] and faults["message"].startswith("score: a Ray worker was lost; the rows not ")
    err = capsys.readouterr().err
    assert "score: lost a Ray worker (ActorDiedError" in err and "the 3 row(s) not yet back are scored again" in err
    assert err.rstrip().endswith(faults["message"]) and faults["message"].endswith("every row is scored once")
    _assert_scored_once(out, keys)

    out = tmp_path / "bug" / "out"  # not a lost worker: the stage fails, keeping the 4 rows it had back
    keys = _scorable_output(out, 7, 64)
    _lose_an_actor(monkeypatch, ValueError("a bug"))
    with pytest.raises(RuntimeError, match="the dataset stopped"):
        _score(scorer_zoo, out)
    assert read_records(str(out))["row_key"].nunique() == 4
    again = _score(scorer_zoo, out)  # 3 rows: one dataset of two batches, which does not fail
    assert again["scored_rows"] == 3 and "faults" not in again  # the next run scores only the rest
    _assert_scored_once(out, keys)


def test_extract_claims_are_idempotent_per_input_and_an_input_is_back_with_its_face_crops(ray_local: None) -> None:
    import pickle

    from ipa_ops.stages.extract_inputs import CROP_SUFFIX, Arrivals, claim, claims_on_driver_node

    claims = claims_on_driver_node({"stored"})
    assert claim(claims, ["stored", "k", "k"], ["a", "a", "b"]) == [False, True, False]  # b: a copy of a's image
    assert claim(claims, ["k", "k"], ["a", "b"]) == [True, False]  # a retried task or a new round asks again
    face = {"uri": "a", "origin": "", "state": "done", "encoder": "faces",
            "result": pickle.dumps([{"key": "f", "crop_sha256": "c" * 64}])}  # fmt: skip
    clip, crop = {**face, "encoder": "vit-h", "result": b""}, {**face, "uri": "a" + CROP_SUFFIX, "origin": "faces"}
    arrivals = Arrivals(encoders=2, crop_encoders=1)
    assert [arrivals.add(j) for j in (face, clip, crop)] == [None, None, "a"]  # back once its crop's job is
    arrivals = Arrivals(encoders=2, crop_encoders=1)
    assert [arrivals.add(j) for j in (crop, clip, face)] == [None, None, "a"]  # in any order
    arrivals.clear()
    no_face = {**face, "result": pickle.dumps([{"key": "f", "crop_sha256": None}])}
    assert [arrivals.add(j) for j in ({**clip, "uri": "b"}, {**no_face, "uri": "b"})] == [None, "b"]


def test_only_lost_workers_start_a_new_round_and_rows_back_are_never_made_again(ray_local: None) -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    from ipa_ops.stages.recovery import Rounds, lost_worker

    init_failed = ActorDiedError(RayTaskError("GeneratorActor.__init__", "trace", ValueError("no such model")))
    assert init_failed.actor_init_failed  # a generator whose __init__ raised: a bug, not a lost node
    wrapped = RayTaskError("f", "trace", ValueError("x"))
    wrapped.__cause__ = ActorDiedError()
    assert lost_worker(ActorDiedError()) is not None and lost_worker(wrapped) is not None
    assert lost_worker(init_failed) is None and lost_worker(ValueError("bug")) is None

    calls: list[list[int]] = []

    def batches(rows: list[int], first: bool) -> Iterator[list[int]]:
        calls.append(list(rows))
        yield rows[:3]
        if first:
            raise RuntimeError("the dataset stopped") from ActorDiedError()
        yield rows[3:]

    made: list[int] = []
    rounds = Rounds("generate", io.StringIO(), nodes_at_start={})
    rounds.run(list(range(8)), str, batches, lambda batch: (made.extend(batch), map(str, batch))[1])
    assert sorted(made) == list(range(8)) and calls == [list(range(8)), list(range(3, 8))]  # each row once
    faults = rounds.faults()
    assert faults is not None and faults["rounds"] == 2 and faults["rows_resubmitted"] == [5]
    assert faults["message"].startswith("generate: a Ray worker was lost; the rows not yet back (5) went to a new")
    assert rounds.redone_keys == {str(i) for i in range(3, 8)}
    assert "round 2 of at most 4" in rounds.stream.getvalue()

    def broken(rows: list[int], first: bool) -> Iterator[list[int]]:
        raise ValueError("a bug") from init_failed
        yield rows

    with pytest.raises(ValueError, match="a bug"):  # not a lost worker: no second round
        Rounds("generate", io.StringIO(), nodes_at_start={}).run([1], str, broken, lambda b: [])


def test_orphan_temp_files_of_finished_rows_are_removed(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    lost, other = "ab" + "0" * 18, "ab" + "1" * 18
    final = Path(out.write_bytes_atomic(out.image_path(lost), b"png"))
    left = [final.parent / f".{lost}.png.{'c' * 32}.tmp", tmp_path / "out" / "thumbs" / "ab" / f".{lost}.webp.d.tmp"]
    kept = final.parent / f".{other}.png.{'e' * 32}.tmp"  # another row's: a live writer may own it
    for path in [*left, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert out.remove_orphan_temps([lost]) == 2
    assert not any(p.exists() for p in left) and kept.exists() and final.read_bytes() == b"png"
