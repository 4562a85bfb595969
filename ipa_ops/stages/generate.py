"""The generate stage on Ray Data: manifest rows -> images, results, run.json, report.html.

    manifest ─► check + plan (driver: row keys, skip done) ─► prepare (CPU tasks: embeddings,
    masks, init images) ─► GeneratorActor pool (models only) ─► encode PNG + commit (CPU tasks)
    ─► results parts (driver: buffered, committed every N rows or T seconds, merged at the end)

A bad row becomes an `error` results row and the others go on. Results are buffered on the driver
and committed as a part every `commit_rows` rows or `commit_seconds` seconds (results_writer.py),
and on exit; a crash loses only rows whose results were not yet committed; their keys are not
done, so the next run makes them again. At the end the run's parts are merged into one.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import ray

from ipa_ops.flow.spec import Flow
from ipa_ops.flow.stage_specs import GenerateResources, GenerateStage
from ipa_ops.generate import payload, records
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_rows, row_error
from ipa_ops.generate.plan import RowPlan
from ipa_ops.generate.prepare import prepare
from ipa_ops.outputs.files import write_outputs
from ipa_ops.outputs.folder import OutputDir, versions
from ipa_ops.outputs.results_writer import ResultsWriter
from ipa_ops.outputs.thumbs import write_thumbnail
from ipa_ops.records.schema import to_columns
from ipa_ops.report.build import build_report
from ipa_ops.stages import custom_resources, gpus_per_actor, recovery, stopping
from ipa_ops.stages.progress import Progress
from ipa_ops.store.dataset import EmbeddingStore


def _now() -> datetime:
    return datetime.now(UTC)


class PrepareRows:
    """CPU stage: plans in, serialized RowRequests out (errors become error rows)."""

    def __init__(self, store_uri: str | None):
        self.store = EmbeddingStore(store_uri) if store_uri else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"plan": [], "payload": [], "error": []}
        for text in batch["plan"]:
            plan = RowPlan.from_json(str(text))
            try:
                data, error = payload.to_bytes(prepare(plan, self.store)), ""
            except Exception as exc:  # noqa: BLE001 - one unreadable input fails its row only
                data, error = b"", row_error(exc, plan.id)
            out["plan"].append(text)
            out["payload"].append(data)
            out["error"].append(error)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


class GeneratorActor:
    """GPU stage: keeps the Generator (and its loaded pipelines) alive across batches."""

    def __init__(self, flow_json: str, batch_size: int, torch_threads: int = 0):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.generator = Generator(Flow.model_validate_json(flow_json), batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        errors = list(batch["error"])
        todo = [i for i, e in enumerate(errors) if not e]
        started = _now().isoformat()
        outputs = self.generator.generate([payload.from_bytes(batch["payload"][i]) for i in todo])
        images: list[Any] = [None] * len(errors)
        seconds, hashes = [0.0] * len(errors), ["{}"] * len(errors)
        runs, mates = ["{}"] * len(errors), ["[]"] * len(errors)
        plans = [RowPlan.from_json(str(batch["plan"][i])) for i in todo]
        for k, (i, out) in enumerate(zip(todo, outputs, strict=True)):
            errors[i] = out.error
            seconds[i] = out.seconds
            hashes[i] = json.dumps(out.schedule_hashes)
            if out.image is not None:
                images[i] = (np.clip(out.image, 0, 1) * 255).round().astype(np.uint8)
                runs[i], mates[i] = _call_of(k, plans, outputs, self.generator.device)
        return {
            "plan": batch["plan"],
            "image": np.array([_npy(im) for im in images], dtype=object),
            "error": np.array(errors, dtype=object),
            "seconds": np.array(seconds),
            "schedule_hashes": np.array(hashes, dtype=object),
            "worker": np.array([self.generator.worker] * len(errors), dtype=object),
            "started_at": np.array([started] * len(errors), dtype=object),
            "run": np.array(runs, dtype=object),
            "mates": np.array(mates, dtype=object),
        }


def _call_of(k: int, plans: list[RowPlan], outputs: list[Any], device: str) -> tuple[str, str]:
    """Row k's pipeline call (row keys in call order, torch threads, device) and its batchmates' records, as JSON."""
    call = outputs[k].batch
    run = {"row_keys": [plans[j].row_key for j in call], "torch_threads": outputs[k].torch_threads, "device": device}
    mates = [records.with_run(plans[j].record, outputs[j].schedule_hashes, None) for j in call if j != k]
    return json.dumps(run), json.dumps(mates)


def _npy(image: np.ndarray | None) -> bytes:
    if image is None:
        return b""
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    return buf.getvalue()


class CommitImages:
    """CPU stage: encode and write each row's files atomically: images/<k[:2]>/<row_key>.png, or for
    a video images/<k[:2]>/<row_key>.gif and its frames (outputs/files.py); `output` is their JSON list.
    With `metadata` each file carries the row's record (records/metadata.py)."""

    def __init__(self, output_uri: str, metadata: bool = True):
        self.out = OutputDir(output_uri)
        self.metadata = metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        written = []
        rows = zip(batch["plan"], batch["image"], batch["error"], batch["schedule_hashes"], batch["run"], strict=True)
        for i, (text, data, error, hashes, run) in enumerate(rows):
            plan = RowPlan.from_json(str(text))
            if error or not data:
                written.append("[]")
                continue
            array = np.load(io.BytesIO(data), allow_pickle=False)
            record = None
            if self.metadata and plan.record:
                made = records.with_run(plan.record, json.loads(str(hashes)), json.loads(str(run)))
                record = records.for_image(made, json.loads(str(batch["mates"][i])))
            written.append(json.dumps(write_outputs(self.out, plan.row_key, array, record)))
            write_thumbnail(self.out, plan.row_key, array)  # made once, here; the report only links it
        return {**{k: batch[k] for k in batch if k != "image"}, "output": np.array(written, dtype=object)}


def _result(
    plan: RowPlan, status: str, error: str = "", outputs: list[str] | None = None, extra: dict | None = None
) -> dict:
    extra = extra or {}
    row = {
        "id": plan.id,
        "row_key": plan.row_key,
        "status": status,
        "error": error,
        "outputs": list(outputs or []),
        "seed": plan.request["seed"],
        "started_at": extra.get("started_at") or _now().isoformat(),
        "finished_at": _now().isoformat(),
        "seconds": float(extra.get("seconds", 0.0)),
        "worker": extra.get("worker", ""),
        "provenance": {**plan.provenance, "schedule_hashes": json.loads(extra.get("schedule_hashes", "{}"))},
        **plan.report,
    }
    if plan.record:  # the complete effective request, as record columns (records/schema.py)
        made = records.with_run(plan.record, row["provenance"]["schedule_hashes"], json.loads(extra.get("run") or "{}"))
        row.update(to_columns(made))
    return row


def run_generate(flow: Flow, stage: GenerateStage, actor_cls: type = GeneratorActor) -> dict[str, Any]:
    """Generate every row whose key is not done yet; returns counts and throughput."""
    start = time.perf_counter()
    out = OutputDir(stage.output)
    planned = plan_rows(flow, stage, reuse=True, done=out.done_keys)  # known done rows: not planned again
    plans, bad = planned.plans, planned.errors
    done = out.done_keys({p.row_key for p in plans})  # only the planned keys are looked up
    todo = [p for p in plans if p.row_key not in done]
    skipped = planned.skipped + len(plans) - len(todo)
    writer = ResultsWriter(out, stage.commit_rows, stage.commit_seconds)
    try:
        counts = _generate(flow, stage, todo, bad, skipped, writer, actor_cls)
    except BaseException:
        writer.close(compact=False)  # what finished is kept; the rest is made again next run
        raise
    writer.close()
    elapsed = time.perf_counter() - start
    summary = {
        **counts,
        "rows": planned.skipped + len(plans) + len(bad),
        "seconds": round(elapsed, 3),
        "images_per_second": round(counts["ok"] / elapsed, 3) if elapsed else 0.0,
    }
    out.write_run_json(
        {
            "flow": json.loads(flow.model_dump_json()),
            "counts": summary,
            "versions": versions(),
            "finished_at": _now().isoformat(),
        }
    )
    build_report(stage.output, groups=[writer.run_tag])  # this run's pages and the index
    return summary


def _generate(
    flow: Flow,
    stage: GenerateStage,
    todo: list[RowPlan],
    bad: list[dict],
    skipped: int,
    writer: ResultsWriter,
    actor_cls: type,
) -> dict[str, Any]:
    """Run the pipeline over `todo`, handing every finished row to `writer`; returns the counts (and faults)."""
    failed_rows = [{"id": e["id"], "row_key": "", "status": e.get("status", "error"), "error": e["error"]} for e in bad]
    writer.add([_bare_error(r) for r in failed_rows])
    n_failed = sum(r["status"] == "error" for r in failed_rows)
    counts = {"ok": 0, "error": n_failed, "skipped": skipped + len(failed_rows) - n_failed}
    seen: set[str] = set()
    todo = [p for p in todo if not (p.row_key in seen or seen.add(p.row_key))]  # duplicates made once
    progress = Progress("generate", len(todo))
    progress.stream.write(
        f"generate: {len(todo)} row(s) to make, {skipped} already done, {n_failed} failed their checks\n"
    )
    todo.sort(key=lambda p: json.dumps(p.group_key(), default=str))
    by_id = {p.row_key: p for p in todo}

    def consume(batch: dict[str, Any]) -> list[str]:
        rows = []
        for i in range(len(batch["plan"])):
            plan = by_id[RowPlan.from_json(str(batch["plan"][i])).row_key]
            error = str(batch["error"][i])
            extra = {k: batch[k][i] for k in ("seconds", "worker", "schedule_hashes", "started_at", "run")}
            status = "error" if error else "ok"
            counts[status] += 1
            rows.append(_result(plan, status, error, json.loads(str(batch["output"][i]) or "[]"), extra))
        writer.add(rows)
        progress.update(ok=sum(r["status"] == "ok" for r in rows), errors=sum(r["status"] == "error" for r in rows))
        return [r["row_key"] for r in rows]

    def batches(rows: list[RowPlan], first: bool) -> Any:
        ds = _pipeline(flow, stage, rows, actor_cls, first)
        return ds.iter_batches(batch_size=stage.resources.batch_size, batch_format="numpy")

    if not todo:
        progress.close()
        return counts
    rounds = recovery.Rounds("generate", progress.stream)  # a lost node or actor: the rows not yet back go again
    rounds.run(todo, lambda p: p.row_key, batches, consume)
    progress.close()
    if rounds.redone_keys:  # a writer killed mid-write leaves a hidden temp file; these rows are all done now
        OutputDir(stage.output).remove_orphan_temps(rounds.redone_keys)
    faults = rounds.report()
    if faults:
        counts["faults"] = faults  # into the summary and so the ledger record
    return counts


def _pipeline(flow: Flow, stage: GenerateStage, todo: list[RowPlan], actor_cls: type, first: bool) -> ray.data.Dataset:
    """prepare -> generator pool -> commit over `todo`; pools of the asked size at first, elastic after a loss.

    No pool restarts its actors (`max_restarts=0`): a dead one fails its batch and `recovery.Rounds`
    starts the rows not yet back again, rather than waiting on a restart that may never fit.
    """
    with recovery.no_restarts_warning():
        return _stages(flow, stage, todo, actor_cls, first)


def _stages(flow: Flow, stage: GenerateStage, todo: list[RowPlan], actor_cls: type, first: bool) -> ray.data.Dataset:
    res = stage.resources
    ds = ray.data.from_items([{"plan": p.to_json()} for p in todo], override_num_blocks=max(1, len(todo) // 4))
    ds = ds.map_batches(
        PrepareRows, fn_constructor_args=(stage.store,), batch_size=res.batch_size, compute=recovery.pool(1, first),
        num_cpus=1, max_restarts=0,
    )  # fmt: skip
    ds = ds.map_batches(
        stopping.guarded(actor_cls),  # after SIGTERM / Ctrl-C, batches not yet started pass on empty
        fn_constructor_args=(flow.model_dump_json(), res.batch_size, torch_threads(res)),
        batch_size=res.batch_size,
        compute=recovery.pool(res.actors, first),
        num_gpus=gpus_per_actor(res.num_gpus),
        num_cpus=res.num_cpus,
        max_restarts=0,
        **custom_resources(res.custom_resources),
    )
    return ds.map_batches(
        CommitImages,
        fn_constructor_args=(stage.output, flow.metadata),
        batch_size=res.batch_size,
        compute=recovery.pool(1, first),
        num_cpus=0.5,
        max_restarts=0,
    )


def torch_threads(res: GenerateResources) -> int:
    """Threads for each generator actor's torch: as set; on a CPU-only cluster its cores shared by the actors."""
    if res.torch_threads:
        return res.torch_threads
    if gpus_per_actor(res.num_gpus) > 0:
        return 0  # leave the GPU actor's CPU threads to Ray
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // res.actors)


def _bare_error(r: dict) -> dict:
    return {
        **r,
        "outputs": [],
        "seed": 0,
        "started_at": _now().isoformat(),
        "finished_at": _now().isoformat(),
        "seconds": 0.0,
        "worker": "",
        "provenance": {},
    }
