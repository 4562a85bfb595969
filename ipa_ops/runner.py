"""Compose a flow's stages and run them on Ray (embedded locally unless an address is given)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ipa_ops.errors import RunStopped, UserError
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs.ledger import RUN_ID_ENV, new_run_id, recording
from ipa_ops.stages.ray_address import JOB_ENV, init_address
from ipa_ops.stages.stopping import Stopper, grace_seconds, stop_on_signals
from ipa_ops.storage.full import find_disk_full
from ipa_ops.storage.lease import LeaseSpec, output_lease

STAGE_ORDER = ("extract", "generate", "score")


@contextlib.contextmanager
def ray_session(flow: Flow) -> Iterator[None]:
    """Use a running Ray, or start one (embedded when neither flow nor RAY_ADDRESS names a cluster)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = init_address(flow.ray.address)  # "local" when embedded: never a stale ray_current_cluster
    env: dict | None = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("IPA_", "HF_"))}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # inside a Ray job: its runtime_env already applies
        env = None
    ray.init(
        address=address,
        runtime_env=env,
        include_dashboard=False if address == "local" else None,
        log_to_driver=False,
        configure_logging=False,
    )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()


def run_flow(flow: Flow, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the named stages (default: every stage the flow defines), in pipeline order."""
    wanted = stages or [s for s in STAGE_ORDER if getattr(flow.stages, s) is not None]
    for name in wanted:
        if name not in STAGE_ORDER:
            raise UserError(f"--stage {name}: unknown stage; one of {', '.join(STAGE_ORDER)}")
        if getattr(flow.stages, name) is None:
            raise UserError(f"stages.{name}: this flow has no {name} stage; add it or pick another --stage")
    results: dict[str, Any] = {}
    grace = grace_seconds(flow.stages.generate.stop_grace_s if flow.stages.generate else 30.0)
    with _lease(flow, wanted) as lease, recording(flow, wanted, results), ray_session(flow):  # one record per run
        # after ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the process
        with stop_on_signals(grace) as stopper:
            if stopper is not None and lease is not None:  # a lost lease interrupts at once, not politely
                lease.on_lost = lambda reason: stopper.hard(KeyboardInterrupt())
            try:
                for name in wanted:
                    _stop_if_asked(stopper, results)
                    if name == "extract":
                        from ipa_ops.stages.extract import run_extract

                        results[name] = run_extract(flow, flow.stages.extract)
                    elif name == "generate":
                        from ipa_ops.stages.generate import run_generate

                        results[name] = run_generate(flow, flow.stages.generate)
                    else:
                        from ipa_ops.stages.score import run_score

                        results[name] = run_score(flow, flow.stages.score)
            except Exception as exc:
                full = find_disk_full(exc)  # ENOSPC in an actor reaches here wrapped in Ray's errors
                if full is None:
                    raise
                raise full from None
            _stop_if_asked(stopper, results)
    return results


def _stop_if_asked(stopper: Stopper | None, results: dict[str, Any]) -> None:
    """After a polite stop drained a stage, end the run (ledger `stopped`) instead of starting the next."""
    if stopper is None or not stopper.requested or stopper.signal is None:
        return
    gen = results.get("generate")
    done = ""
    if gen:
        left = int(gen["rows"]) - int(gen["ok"]) - int(gen["error"]) - int(gen["skipped"])
        done = f": {gen['ok']} row(s) ok and {gen['error']} failed this run, {left} left for the next run"
    raise RunStopped(
        f"stopped by {stopper.signal_name()} after committing the batches in flight{done}; rerun the flow to continue",
        stopper.signal,
    )


def _lease(flow: Flow, stages: list[str]) -> contextlib.AbstractContextManager[Any]:
    """One writer per output: the output the run writes (generate's, else score's) is leased for the whole run."""
    stage = flow.stages.generate
    output = stage.output if stage is not None and "generate" in stages else None
    score = flow.stages.score
    if output is None and score is not None and "score" in stages:
        output = score.output or (stage.output if stage is not None else None)
    if output is None:
        return contextlib.nullcontext()
    spec = stage.lease if stage is not None else LeaseSpec()
    named = os.environ.get(RUN_ID_ENV, "").strip() or os.environ.get(JOB_ENV)  # else the ledger picks a random id
    return output_lease(output, spec, f"flow {flow.name}", run=new_run_id() if named else "")
