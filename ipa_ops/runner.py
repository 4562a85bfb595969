"""Compose a flow's stages and run them on Ray (embedded locally unless an address is given)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs.ledger import RUN_ID_ENV, new_run_id, recording
from ipa_ops.stages.ray_address import JOB_ENV, init_address
from ipa_ops.storage.lease import output_lease

STAGE_ORDER = ("extract", "generate")


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
    with _lease(flow, wanted), recording(flow, wanted, results), ray_session(flow):  # one ledger record per run
        for name in wanted:
            if name == "extract":
                from ipa_ops.stages.extract import run_extract

                results[name] = run_extract(flow, flow.stages.extract)
            else:
                from ipa_ops.stages.generate import run_generate

                results[name] = run_generate(flow, flow.stages.generate)
    return results


def _lease(flow: Flow, stages: list[str]) -> contextlib.AbstractContextManager[Any]:
    """One writer per output: the generate stage's output is leased for the whole run (lease.py)."""
    stage = flow.stages.generate
    if "generate" not in stages or stage is None:
        return contextlib.nullcontext()
    named = os.environ.get(RUN_ID_ENV, "").strip() or os.environ.get(JOB_ENV)  # else the ledger picks a random id
    return output_lease(stage.output, stage.lease, f"flow {flow.name}", run=new_run_id() if named else "")
