"""A whole manifest planned on the driver: rows checked, adapters pre-flighted, every row keyed.

`plan_manifest` is what the generate stage and `ipa validate MANIFEST` share: it reads the
manifest, checks each row against the flow and the store, pre-flights the flow's adapters,
fingerprints the models, and turns each good row into a `RowPlan` (plan.py) or an error line.
No Ray here: the stage decides what of the plan is already done and runs the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.flow.spec import Flow
from ipa_ops.flow.stage_specs import GenerateStage
from ipa_ops.generate import faceid, loras, records, tasks
from ipa_ops.generate.plan import PlanError, RowPlan, plan_row
from ipa_ops.generate.plan_cache import PlanCache, context_hash, row_files, row_hash
from ipa_ops.generate.preflight import check_adapter, model_dims
from ipa_ops.manifest.checks import check_rows
from ipa_ops.manifest.reading import manifest_frame, read_records
from ipa_ops.manifest.rows import image_size
from ipa_ops.store.dataset import EmbeddingStore
from ipa_ops.store.encoders.ids import encoder_id
from ipa_ops.store.images import exists


def row_error(exc: BaseException, row_id: str) -> str:
    """One line for a row's error result, naming the row unless the message already does."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if text.startswith("row ") else f"row {row_id}: {text}"


def fingerprints(flow: Flow, stage: GenerateStage) -> dict[str, str]:
    mirror = flow.mirror_root()
    found = {}
    for alias, spec in flow.models.items():
        found[alias] = fingerprint(resolve(spec.source, spec.subfolder, None, mirror, f"model {alias!r}").folder)
    for alias, spec in flow.adapters.items():
        file = resolve(spec.source, spec.subfolder, spec.weight_name, mirror, f"adapter {alias!r}").file
        found[f"adapter:{alias}"] = fingerprint(file)
    return {**found, **loras.fingerprints(flow), **tasks.component_fingerprints(flow)}


def plan_manifest(flow: Flow, stage: GenerateStage, manifest: str | None = None) -> tuple[list[RowPlan], list[dict]]:
    """Check and plan every row; returns (plans, error results for rows that cannot run)."""
    planned = plan_rows(flow, stage, manifest)
    return planned.plans, planned.errors


@dataclass
class Planned:
    """A manifest planned: rows to consider, rows that cannot run, rows known done without planning."""

    plans: list[RowPlan]
    errors: list[dict]
    skipped: int = 0


def plan_rows(
    flow: Flow,
    stage: GenerateStage,
    manifest: str | None = None,
    reuse: bool = False,
    done: Callable[[set[str]], set[str]] | None = None,
) -> Planned:
    """Check and plan the rows of a manifest.

    With `reuse`, rows unchanged since an earlier run planned them (plan_cache.py) are not checked
    again: given `done` (the output's done-detection), those whose key is done are counted in
    `skipped` and the cache is rewritten for this manifest; without it (`ipa validate`) they count
    as rows that passed their checks before.
    """
    raw = read_records(manifest or stage.manifest)
    store = EmbeddingStore(stage.store) if stage.store else None
    prints = fingerprints(flow, stage)
    cache = PlanCache(stage.output, context_hash(flow, stage, prints)) if reuse else None
    known = cache.load() if cache is not None else {}
    hashes = [row_hash(r) for r in raw.records] if cache is not None else []
    matched = {i: known[h] for i, h in enumerate(hashes) if h in known}
    if matched:  # a repeated id is the row check's to report, even where each row is known
        ids = Counter(str(r.get("id")) for r in raw.records)
        matched = {i: k for i, k in matched.items() if ids[str(raw.records[i].get("id"))] == 1}
    if done is not None:
        finished = done(set(matched.values())) if matched else set()
        matched = {i: k for i, k in matched.items() if k in finished}
    positions = [i for i in range(len(raw.records)) if i not in matched]
    df = manifest_frame(raw, positions)
    usable = usable_keys(store)
    earlier = {str(raw.records[i].get("id")): i + 1 for i in matched}
    rows, problems = check_rows(
        df, flow, stage, exists=exists, store_has=usable.__contains__, image_size=image_size, earlier_ids=earlier
    )
    model = (stage.model, flow.models[stage.model])
    others = tuple((a, m) for a, m in flow.models.items() if a != stage.model)  # an adapter may fit any model
    facts, failed = {}, []
    for alias, spec in flow.adapters.items():
        found, issues = check_adapter(alias, spec, flow, model, others)
        if found is not None and not issues:
            facts[alias] = found
        failed += issues
    encoder_ids = {a: encoder_id(a, e, flow.mirror_root()) for a, e in flow.encoders.items()}
    dims, faces = {a: model_dims(flow, a) for a in flow.models}, faceid.FaceLookup(store)
    plans, errors, used = [], [], []
    by_row: dict[str, list[str]] = {}
    for problem in problems:  # one error result per row, its problems on one line
        by_row.setdefault(problem.row_id, []).append(str(problem))
    errors += [{"id": rid, "error": "; ".join(lines)} for rid, lines in by_row.items()]
    for row in rows:
        try:
            plans.append(plan_row(row, flow, stage, facts, encoder_ids, prints, usable, dims, faces))
            used.append(row)
        except faceid.RowSkipped as exc:  # its no-face fallback says skip: a `skipped` results row
            errors.append({"id": row.id, "error": row_error(exc, row.id), "status": "skipped"})
        except (PlanError, OSError, ValueError) as exc:
            errors.append({"id": row.id, "error": row_error(exc, row.id)})
    if plans:  # what every row of a model shares: model sources and hash, scheduler config, store
        shared = records.run_parts(flow, stage.store, {p.request["model"] for p in plans})
        for plan in plans:
            records.finish(plan.record, shared)
    if cache is not None and done is not None:
        at = {str(raw.records[i].get("id")): i for i in positions}
        entries = {hashes[i]: key for i, key in matched.items()}
        entries.update((hashes[at[p.id]], p.row_key) for p in plans if p.id in at)
        cache.save(entries, (f for row in used for f in row_files(row)))
    return Planned(plans, errors, len(matched))


def usable_keys(store: EmbeddingStore | None) -> set[str]:
    """Store keys whose embedding can condition a row (status ok)."""
    if store is None or not store.keys():
        return set()
    rows = store.rows(sorted(store.keys()))
    return set(rows.loc[rows["status"] == "ok", "key"])


def manifest_problems(flow: Flow, manifest: str) -> list[str]:
    """`ipa validate MANIFEST --flow FLOW`: every row problem, one line each."""
    if flow.stages.generate is None:
        return ["stages.generate: the flow has no generate stage to check a manifest against"]
    errors = plan_rows(flow, flow.stages.generate, manifest, reuse=True).errors
    return [e["error"] for e in errors if e.get("status") != "skipped"]
