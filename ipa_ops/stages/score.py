"""The score stage on Ray Data: every done image of an output, measured by the flow's scorers.

    results (driver: latest ok rows whose files exist; which scorer ids each row still lacks)
    ─► ScorerActor pool (reads and decodes each PNG as written, runs each scorer on the batch;
       GPU when the cluster has one) ─► score records (driver: a part under <output>/scores/
       every `commit_rows` records and at the end) ─► dup_of (driver: phash against earlier rows)

Resumable: a (row key, scorer id) pair with a score is never scored again, so a rerun scores
nothing new and adding a scorer runs only that scorer. A row a scorer fails on gets an `error`
record (one line naming the row) and is tried again by the next run; the other rows go on.
A lost node or actor (stages/recovery.py): the rows not yet back are scored again on the nodes
left, and every row's records are written once; records that came back before any other failure
are still committed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import ray

from ipa_ops.flow.score_spec import ScoreStage
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs import scores as score_parts
from ipa_ops.outputs.done_index import latest_ok
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.report.build import build_report
from ipa_ops.scores import ScoreContext, ScoreItem, Scorer, build_scorers
from ipa_ops.scores.phash import find_duplicates
from ipa_ops.stages import custom_resources, gpus_per_actor, recovery, stopping
from ipa_ops.store.images import decode_image

ROW_COLUMNS = ["id", "row_key", "status", "finished_at", "outputs", "prompt", "references", "embedding_keys",
               "adapter_fingerprints"]  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat()


def record(item_key: str, row_id: str, scorer: Scorer, metric: str, value: Any) -> dict[str, Any]:
    """One score record; text metrics (hashes, row keys, errors) go to `text`, numbers to `value`."""
    text = metric in score_parts.TEXT_METRICS
    return {
        "row_key": item_key,
        "id": row_id,
        "scorer": scorer.id,
        "name": scorer.name,
        "metric": metric,
        "value": None if text or value is None else float(value),
        "text": (None if value is None else str(value)) if text else None,
        "scored_at": _now(),
    }


def image_entry(outputs: Any) -> str | None:
    """The file a row is scored on: its PNG (a video's first frame)."""
    return next((str(o) for o in (outputs if outputs is not None else []) if str(o).endswith(".png")), None)


class ScorerActor:
    """Keeps the scorers' models loaded across batches; one JSON list of records per row out."""

    def __init__(self, flow_json: str, stage_json: str, store: str | None, output: str, gpu: bool):
        stage = ScoreStage.model_validate_json(stage_json)
        self.ctx = ScoreContext(Flow.model_validate_json(flow_json), store, gpu)
        self.scorers = {s.id: s for s in build_scorers(self.ctx, stage.scorers)}
        self.out = OutputDir(output)

    def _item(self, batch: dict[str, np.ndarray], i: int) -> ScoreItem:
        uri = self.out.resolve(str(batch["image"][i]))
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
        return ScoreItem(
            row_key=str(batch["row_key"][i]),
            id=str(batch["id"][i]),
            prompt=str(batch["prompt"][i]),
            image=decode_image(data, uri).image,
            references=json.loads(str(batch["references"][i])),
            embedding_keys=json.loads(str(batch["embedding_keys"][i])),
            adapters=json.loads(str(batch["adapters"][i])),
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["row_key"])
        wanted = [set(json.loads(str(batch["scorers"][i]))) for i in range(n)]
        records: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        items: list[ScoreItem | None] = [None] * n
        for i in range(n):
            try:
                items[i] = self._item(batch, i)
            except Exception as exc:  # noqa: BLE001 - an unreadable image fails its row only
                for sid in wanted[i]:
                    records[i].append(self._error(batch, i, self.scorers[sid], exc))
        for sid, scorer in self.scorers.items():
            rows = [i for i in range(n) if items[i] is not None and sid in wanted[i]]
            if rows:
                self._run(scorer, rows, items, batch, records)
        return {"row_key": batch["row_key"], "records": np.array([json.dumps(r) for r in records], dtype=object)}

    def _run(self, scorer: Scorer, rows: list[int], items: list, batch: dict, records: list[list[dict]]) -> None:
        """The scorer on the whole batch; when that fails, row by row, so one bad row fails alone."""
        scorer.ensure_loaded()
        try:
            results: list[Any] = scorer.score([items[i] for i in rows])
        except Exception:  # noqa: BLE001 - find the row(s) at fault below
            results = []
            for i in rows:
                try:
                    results.append(scorer.score([items[i]])[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        for i, values in zip(rows, results, strict=True):
            if isinstance(values, Exception):
                records[i].append(self._error(batch, i, scorer, values))
                continue
            records[i].extend(record(str(batch["row_key"][i]), str(batch["id"][i]), scorer, m, v)
                              for m, v in values.items())  # fmt: skip

    @staticmethod
    def _error(batch: dict, i: int, scorer: Scorer, exc: BaseException) -> dict[str, Any]:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        line = f"row {batch['id'][i]}: {scorer.name}: {type(exc).__name__}: {text}"
        return record(str(batch["row_key"][i]), str(batch["id"][i]), scorer, score_parts.ERROR, line)


def _aliases(fingerprints: Any) -> list[str]:
    """The adapter aliases of a results row (its `adapter_fingerprints` JSON: alias -> fingerprint)."""
    try:
        found = json.loads(fingerprints) if isinstance(fingerprints, str) and fingerprints else {}
    except ValueError:
        return []
    return sorted(found) if isinstance(found, dict) else []


def scorable_rows(out: OutputDir) -> pd.DataFrame:
    """Latest ok results rows whose files exist, earliest finished first (the order `dup_of` reads)."""
    results = out.read_results(columns=ROW_COLUMNS)
    ok = latest_ok(results)
    if ok.empty:
        return ok
    done = out.done_keys(set(ok["row_key"].astype(str)))
    ok = ok[ok["row_key"].isin(done)].copy()
    ok["image"] = [image_entry(o) for o in ok["outputs"]]
    ok = ok[ok["image"].notna()]
    return ok.sort_values(["finished_at", "row_key"], kind="stable").reset_index(drop=True)


def run_score(flow: Flow, stage: ScoreStage, actor_cls: type = ScorerActor) -> dict[str, Any]:
    """Score every done row of the output that lacks a score of one of the flow's scorer ids."""
    start = time.perf_counter()
    gen = flow.stages.generate
    output = stage.output or (gen.output if gen else "")
    store = stage.store or (gen.store if gen else None)
    out = OutputDir(output)
    scorers = build_scorers(ScoreContext(flow, store), stage.scorers)  # ids: fails here when weights are missing
    rows = scorable_rows(out)
    existing = score_parts.read_records(out)
    done = {s.id: score_parts.scored_keys(existing, s.id, s.metrics[0]) for s in scorers}
    items = []
    for row in rows.itertuples(index=False):
        todo = [s.id for s in scorers if row.row_key not in done[s.id]]
        if todo:
            items.append({
                "row_key": row.row_key, "id": row.id, "prompt": row.prompt or "", "image": row.image,
                "references": json.dumps([str(r) for r in (row.references if row.references is not None else [])]),
                "embedding_keys": json.dumps([str(k) for k in (row.embedding_keys if row.embedding_keys is not None
                                                                else [])]),
                "adapters": json.dumps(_aliases(row.adapter_fingerprints)),
                "scorers": json.dumps(todo),
            })  # fmt: skip
    counts = {s.name: 0 for s in scorers}
    errors, faults = 0, None
    if items:
        errors, faults = _score(flow, stage, store, output, items, scorers, counts, out, actor_cls)
    dups = _dup_of(out, rows, [s for s in scorers if s.name == "phash"])
    elapsed = time.perf_counter() - start
    if items or dups:
        build_report(output, groups=[])  # index histograms, worst-first lists (timed apart: not scoring)
    report_seconds = time.perf_counter() - start - elapsed
    scored = len(items)
    return {
        "rows": len(rows),
        "scored_rows": scored,
        "scored": counts,
        "errors": errors,
        "dup_of": dups,
        "seconds": round(elapsed, 3),
        "images_per_second": round(scored / elapsed, 3) if elapsed and scored else 0.0,
        "report_seconds": round(report_seconds, 3),
        **({"faults": faults} if faults else {}),  # a lost node: into the summary and so the ledger record
    }


def _score(
    flow: Flow,
    stage: ScoreStage,
    store: str | None,
    output: str,
    items: list[dict[str, Any]],
    scorers: list[Scorer],
    counts: dict[str, int],
    out: OutputDir,
    actor_cls: type,
) -> tuple[int, dict[str, Any] | None]:
    """Run the scorer pool over `items`, committing records as they come; the rows that failed a scorer, and
    what was lost on the way (a lost node or actor: the rows not yet back are scored again on the nodes left)."""
    names = {s.id: s.name for s in scorers}
    buffer: list[dict[str, Any]] = []
    errors = 0

    def consume(batch: dict[str, np.ndarray]) -> list[str]:
        nonlocal errors
        for text in batch["records"]:
            recs = json.loads(str(text))
            failed = {r["scorer"] for r in recs if r["metric"] == score_parts.ERROR}
            errors += bool(failed)
            for sid in {r["scorer"] for r in recs} - failed:
                counts[names[sid]] += 1
            for r in recs:
                r["scored_at"] = datetime.fromisoformat(r["scored_at"])
            buffer.extend(recs)
        if len(buffer) >= stage.commit_rows:
            score_parts.write_score_part(out, buffer)
            buffer.clear()
        return [str(k) for k in batch["row_key"]]  # handed back once: never scored (nor written) again

    def batches(rows: list[dict[str, Any]], first: bool) -> Any:
        ds = _pipeline(flow, stage, store, output, rows, actor_cls, first)
        return ds.iter_batches(batch_size=stage.resources.batch_size, batch_format="numpy")

    rounds = recovery.Rounds("score", sys.stderr, redo="scored again", promise="every row is scored once")
    try:
        rounds.run(items, lambda item: item["row_key"], batches, consume)
    except BaseException:
        with contextlib.suppress(Exception):  # the stage's own error is the one to see
            score_parts.write_score_part(out, buffer)  # what came back is kept; the rest is scored next run
        raise
    score_parts.write_score_part(out, buffer)
    return errors, rounds.report()


def _pipeline(flow: Flow, stage: ScoreStage, store: str | None, output: str, items: list[dict[str, Any]],
              actor_cls: type, first: bool) -> ray.data.Dataset:  # fmt: skip
    """The scorer pool over `items`: of the asked size at first, elastic after a loss.

    No actor is restarted (`max_restarts=0`): a restart that needs the lost node's GPU or custom
    resource would wait forever; a dead actor fails its batch and `recovery.Rounds` goes on.
    """
    res = stage.resources
    gpus = gpus_per_actor(res.num_gpus)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // res.batch_size, 200)))
    with recovery.no_restarts_warning():
        return ds.map_batches(
            stopping.guarded(actor_cls),
            fn_constructor_args=(flow.model_dump_json(), stage.model_dump_json(), store, output, gpus > 0),
            batch_size=res.batch_size,
            compute=recovery.pool(res.actors, first),
            num_gpus=gpus,
            num_cpus=res.num_cpus,
            max_restarts=0,
            **custom_resources(res.custom_resources),
        )


def _dup_of(out: OutputDir, rows: pd.DataFrame, phash: list[Scorer]) -> int:
    """`dup_of` for every row with a phash and none yet, against the rows that finished before it."""
    written = 0
    if not phash or rows.empty:
        return 0
    records = score_parts.read_records(out)
    for scorer in phash:
        mine = records[records["scorer"] == scorer.id]
        hashes = dict(zip(mine.loc[mine["metric"] == "phash", "row_key"], mine.loc[mine["metric"] == "phash", "text"],
                          strict=True))  # fmt: skip
        have = set(mine.loc[mine["metric"] == "dup_of", "row_key"])
        ordered = [(k, hashes[k]) for k in rows["row_key"] if k in hashes]
        wanted = {k for k, _ in ordered if k not in have}
        if not wanted:
            continue
        found = find_duplicates(ordered, wanted, scorer.spec.max_distance)
        ids = dict(zip(rows["row_key"], rows["id"], strict=True))
        recs = [record(k, str(ids[k]), scorer, "dup_of", v) for k, v in found.items()]
        for r in recs:
            r["scored_at"] = datetime.fromisoformat(r["scored_at"])
        score_parts.write_score_part(out, recs)
        written += len(recs)
    return written

