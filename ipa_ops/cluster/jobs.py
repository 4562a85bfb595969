"""Ray Jobs submission of a flow: deterministic job ids, entrypoint, runtime_env, the job client.

Submission (`ipa submit`) sends `python -m ipa_ops.cli run FLOW --set ...` to a cluster's job
server with a *deterministic* submission id, `ipa-<flow>-<flow hash>-<partition>` (partition:
today's UTC date unless given), so a scheduler that fires twice for the same night submits once.
The code travels as the Ray `working_dir` (the project folder, minus .venv/.git/runs/stores), a
built wheel (`py_modules`), or not at all when the cluster image already holds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs.ledger import flow_hash

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ipa_ops/, shipped whole as py_modules
PROGRAM = ("python", "-m", "ipa_ops.cli")  # works from a working_dir or a py_modules wheel, unlike `ipa`
RAY_VERSION = "2.60.0"  # the pin in pyproject.toml: the head and the image must run this Ray
EXCLUDES = ".venv .git runs stores ipa-demo .cache **/__pycache__ .pytest_cache .ruff_cache *.egg-info .whl".split()
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "x"


def hash_with_mirror(flow: Flow, mirror: str | None) -> str:
    """The flow hash the job will record: the flow's mirror, or the `--mirror` the job is given.

    The local IPA_MIRROR is ignored: it does not travel to the cluster, and renderings must not
    depend on the machine they are made on.
    """
    return flow_hash(flow.model_copy(update={"mirror": mirror}) if mirror else flow, use_env=False)


def submission_id(flow: Flow, partition: str, mirror: str | None = None, attempt: int = 1) -> str:
    """`ipa-<flow>-<hash>-<partition>[-a<attempt>]`: the same scheduled run always gets the same id."""
    base = f"ipa-{slug(flow.name, 30)}-{hash_with_mirror(flow, mirror)}-{slug(partition, 40)}"
    return base if attempt == 1 else f"{base}-a{attempt}"


def default_partition() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d}"


def entrypoint(flow: Flow, flow_path: str, overrides: list[str], cluster_dir: str | None = None) -> str:
    """The job's shell command: `ipa run` of the flow with the same overrides, inside the job's cluster."""
    args = [*PROGRAM, "run", flow_path, *[a for o in overrides for a in ("--set", o)]]
    if flow.ray.address:  # inside a job the driver joins the job's own cluster (RAY_ADDRESS)
        args += ["--set", "ray.address=null"]
    command = shlex.join(args)
    return f"cd {shlex.quote(cluster_dir)} && {command}" if cluster_dir else command


@dataclass
class SubmitOptions:
    """What `ipa submit` sends besides the entrypoint; see `runtime_env`."""

    working_dir: str | None = "."
    cluster_dir: str | None = None  # the project already sits there on the cluster: upload nothing
    wheel: str | None = None
    pip: bool = False
    hf_home: str | None = None
    mirror: str | None = None
    offline: bool = False
    env: dict[str, str] = field(default_factory=dict)


def job_env(opts: SubmitOptions) -> dict[str, str]:
    env = {"HF_HOME": opts.hf_home, "IPA_MIRROR": opts.mirror, "HF_HUB_OFFLINE": "1" if opts.offline else None}
    return {k: v for k, v in {**env, **opts.env}.items() if v}


def runtime_env(opts: SubmitOptions) -> dict[str, Any]:
    """Ray runtime_env of a submission: code, environment, and pip dependencies only when asked.

    Nothing is installed on the cluster unless `pip` is set: a head started from the project's
    environment (or the project image) already has every dependency.
    """
    env: dict[str, Any] = {}
    variables = job_env(opts)
    if variables:
        # the driver's ray.init passes IPA_*/HF_* on too; let its copy of the same values win
        env["env_vars"] = {**variables, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    if opts.wheel:
        if not Path(opts.wheel).is_file() or not opts.wheel.endswith(".whl"):
            raise UserError(f"--wheel {opts.wheel}: not a wheel file; build one with `pip wheel --no-deps -w dist .`")
        env["py_modules"] = [str(Path(opts.wheel).resolve())]
    if opts.working_dir and not opts.cluster_dir:
        wd = Path(opts.working_dir).resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {opts.working_dir}: not a directory; pass the project folder")
        env["working_dir"], env["excludes"] = str(wd), list(EXCLUDES)
        if not (wd / "ipa_ops").is_dir() and not opts.wheel:  # ship the package the submitter runs
            env["py_modules"] = [str(PACKAGE_DIR)]
    if opts.pip:
        env["pip"] = project_requirements()
    return env


def project_requirements() -> list[str]:
    """The project's dependencies, from pyproject.toml in a checkout or the installed package metadata."""
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if pyproject.is_file():
        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    from importlib import metadata

    return [r for r in metadata.requires("ipa-ops") or [] if "extra ==" not in r]


def job_flow_path(flow_path: str, opts: SubmitOptions) -> str:
    """The flow file as the job sees it: relative to the uploaded working dir (or as given on the cluster)."""
    if opts.cluster_dir or not opts.working_dir:
        return flow_path
    wd, path = Path(opts.working_dir).resolve(), Path(flow_path).resolve()
    if not path.is_relative_to(wd):
        raise UserError(f"{flow_path}: outside the working dir {wd}; move it there or pass --working-dir")
    return path.relative_to(wd).as_posix()


# -- Ray Jobs ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None, fallback: str | None = None) -> Any:
    """A JobSubmissionClient: `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else `fallback` (the flow's)."""
    import ray.exceptions
    from ray.job_submission import JobSubmissionClient

    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    where = address or next((os.environ[n] for n in names if os.environ.get(n)), None) or fallback
    if not where:
        raise UserError("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    _use_token_if_present()
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one INFO line per file skipped in the upload
    auth_error = getattr(ray.exceptions, "AuthenticationError", ())
    try:
        with _without_env(*names):  # Ray would let the environment beat an explicit address
            return JobSubmissionClient(where)
    except auth_error:
        raise UserError(f"{where}: the cluster wants its Ray auth token; set RAY_AUTH_TOKEN to it") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"{where}: cannot reach the Ray job server ({_first_line(exc)}); is the head up?") from None


def _use_token_if_present() -> None:
    """Send the Ray auth token when one is configured, as `ray.init` does (Ray 2.60 clusters may want one)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    setup_log = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = setup_log.level
    setup_log.setLevel(logging.ERROR)  # it warns "token authentication is enabled" on every call
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        setup_log.setLevel(level)


def job_info(client: Any, job_id: str) -> Any | None:
    """The job's details, or None when the cluster has no job with that id."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise UserError(f"job {job_id}: {_first_line(exc)}") from None


def submit(client: Any, job_id: str, command: str, env: dict[str, Any], **kwargs: Any) -> tuple[str, Any | None]:
    """Submit once: returns (job_id, None) when submitted, (job_id, details) when the id already existed."""
    existing = job_info(client, job_id)
    if existing is not None:
        return job_id, existing
    try:
        client.submit_job(entrypoint=command, submission_id=job_id, runtime_env=env, **kwargs)
    except RuntimeError as exc:
        if "already exists" in str(exc):  # lost a race with another submitter
            return job_id, job_info(client, job_id)
        raise UserError(f"job {job_id}: submission refused: {_first_line(exc)}") from None
    return job_id, None


def wait(client: Any, job_id: str, follow: bool = False, poll_s: float = 1.0) -> str:
    """Block until the job ends (streaming its logs when `follow`); returns the final status name."""
    import asyncio
    import sys
    import time

    if follow:

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        with contextlib.suppress(RuntimeError):  # the stream closes when the job ends
            asyncio.run(tail())
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
