"""Running flows on Ray clusters: Ray Jobs submission, and KubeRay / CronJob renderings of a flow.

Submission (`ipa submit`) sends `python -m ipa_ops.cli run FLOW --set ...` to a cluster's job
server with a *deterministic* submission id, `ipa-<flow>-<flow hash>-<partition>` (partition:
today's UTC date unless given), so a scheduler that fires twice for the same night submits once.
The code travels as the Ray `working_dir` (the project folder, minus .venv/.git/runs/stores), a
built wheel (`py_modules`), or not at all when the cluster image already holds it.

Renderings (`ipa cluster render`) are plain dicts dumped as YAML: a `RayCluster`, a `RayJob`, a
`RayCronJob` (KubeRay >= 1.6, `RayCronJob` feature gate) and a Kubernetes `CronJob` that runs
`ipa submit` against the RayCluster. They depend only on the flow file and the options, never on
the environment, so the checked-in copies under cluster/rendered/ regenerate byte for byte.
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

import yaml

from ipa_ops.errors import UserError
from ipa_ops.flow import Flow, parse_flow, set_path
from ipa_ops.ledger import flow_hash

PACKAGE_DIR = Path(__file__).resolve().parent
PROGRAM = ("python", "-m", "ipa_ops.cli")  # works from a working_dir or a py_modules wheel, unlike `ipa`
RAY_VERSION = "2.60.0"  # the pin in pyproject.toml: the head and the image must run this Ray
EXCLUDES = ".venv .git runs stores ipa-demo .cache **/__pycache__ .pytest_cache .ruff_cache *.egg-info .whl".split()
KINDS = ("raycluster", "rayjob", "raycronjob", "cronjob")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "x"


def hash_with_mirror(flow: Flow, mirror: str | None) -> str:
    """The flow hash the job will record: the flow's mirror, or the `--mirror` the job is given.

    The local IPA_MIRROR is ignored: it does not travel to the cluster, and renderings must not
    depend on the machine they are made on.
    """
    return flow_hash(flow.model_copy(update={"mirror": mirror}) if mirror else flow, use_env=False)


def submission_id(flow: Flow, partition: str, mirror: str | None = None, attempt: int = 1) -> str:
    """`ipa-<flow>-<hash>-<partition>[-a<attempt>]`: the same scheduled run always gets the same id."""
    base = f"ipa-{_slug(flow.name, 30)}-{hash_with_mirror(flow, mirror)}-{_slug(partition, 40)}"
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


# -- renderings ------------------------------------------------------------------------------------------
@dataclass
class RenderOptions:
    """Knobs of the Kubernetes renderings; the defaults are what cluster/rendered/ holds."""

    image: str = "ipa:0.1.0"
    cluster_dir: str = "/app"  # where the Dockerfile puts the project
    shared_root: str = "/mnt/shared"  # store/output land here (a RWX volume, or s3://bucket/prefix)
    pvc: str = "ipa-shared"
    max_workers: int = 4
    gpus_per_worker: int = 1
    schedule: str | None = None
    mirror: str | None = None
    overrides: list[str] = field(default_factory=list)


def shared_overrides(flow: Flow, root: str) -> list[str]:
    """`--set`s that move the flow's relative store/output paths under the shared root every node sees."""
    out = []
    stages = flow.stages
    pairs = [("stages.extract.store", stages.extract.store if stages.extract else None)]
    if stages.generate:
        pairs += [("stages.generate.store", stages.generate.store), ("stages.generate.output", stages.generate.output)]
    for path, value in pairs:
        if value and "://" not in value and not value.startswith("/"):
            out.append(f"{path}={root.rstrip('/')}/{value}")
    return out


def with_sets(flow: Flow, overrides: list[str]) -> Flow:
    """The flow as `ipa run FLOW --set ...` loads it on the cluster."""
    data = flow.model_dump(mode="json")
    for item in overrides:
        set_path(data, *item.split("=", 1))
    return parse_flow(data, "--set")


def render(flow: Flow, flow_path: str, kind: str, opts: RenderOptions) -> dict[str, Any]:
    """One Kubernetes document of `kind` (see KINDS) that runs the flow from the project image."""
    if kind not in KINDS:
        raise UserError(f"--kind {kind}: unknown; one of {', '.join(KINDS)}")
    overrides = [*shared_overrides(flow, opts.shared_root), *opts.overrides]
    digest = hash_with_mirror(with_sets(flow, overrides), opts.mirror)  # what the job will load
    job_args = (flow, flow_path, overrides, digest, opts)
    base = f"ipa-{_slug(flow.name, 24)}"
    labels = {"app.kubernetes.io/name": "ipa", "ipa.io/flow": _slug(flow.name, 63), "ipa.io/flow-hash": digest}
    meta = {"name": base, "labels": labels}
    if kind == "raycluster":
        return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": _cluster_spec(opts)}
    if kind == "rayjob":  # the name carries the hash: applying the same flow twice is one RayJob
        job_meta = {**meta, "name": f"{base}-{digest[:8]}"}
        return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": job_meta, "spec": _job_spec(*job_args)}
    schedule = opts.schedule or flow.schedule
    if not schedule or len(schedule.split()) != 5:
        raise UserError(
            f"schedule: flow {flow.name!r} has no 5-field cron schedule ({schedule!r}); "
            "set `schedule:` in the flow or pass --schedule '0 2 * * *'"
        )
    if kind == "raycronjob":
        spec = {"schedule": schedule, "jobTemplate": _job_spec(*job_args)}
        return {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": meta, "spec": spec}
    sets = [a for o in overrides for a in ("--set", o)]
    submit_args = ["ipa", "submit", flow_path, "--address", f"http://{base}-head-svc:8265", "--wait", "--retry-failed"]
    submit_args += ["--cluster-dir", opts.cluster_dir, *sets]
    container = {
        "name": "ipa-submit",
        "image": opts.image,
        "workingDir": opts.cluster_dir,
        "command": submit_args,
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
    }
    pod = {"metadata": {"labels": labels}, "spec": {"restartPolicy": "Never", "containers": [container]}}
    job = {"backoffLimit": 2, "activeDeadlineSeconds": 86400, "template": pod}
    spec = dict(schedule=schedule, concurrencyPolicy="Forbid", startingDeadlineSeconds=3600)
    spec.update(successfulJobsHistoryLimit=3, failedJobsHistoryLimit=3, jobTemplate={"spec": job})
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {**meta, "name": f"{base}-submit"}, "spec": spec}


def _job_spec(flow: Flow, flow_path: str, overrides: list[str], digest: str, opts: RenderOptions) -> dict[str, Any]:
    return {
        "entrypoint": entrypoint(flow, flow_path, overrides, opts.cluster_dir),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "activeDeadlineSeconds": 86400,
        "backoffLimit": 2,
        "metadata": {"ipa-flow": flow.name, "ipa-flow-hash": digest},
        "rayClusterSpec": _cluster_spec(opts),
    }


def _cluster_spec(opts: RenderOptions) -> dict[str, Any]:
    """A CPU-only head (runs the driver) and one autoscaled GPU worker group, sharing one volume."""
    env, mounts, volumes = [], [], []
    if "://" not in opts.shared_root:
        env = [{"name": "HF_HOME", "value": f"{opts.shared_root}/hf-cache"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
        mounts = [{"name": "shared", "mountPath": opts.shared_root}]
        volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": opts.pvc}}]
    if opts.mirror:
        env.append({"name": "IPA_MIRROR", "value": opts.mirror})

    def pod(name: str, resources: dict[str, Any], ports: list[dict] | None = None) -> dict[str, Any]:
        container: dict[str, Any] = {"name": name, "image": opts.image, "workingDir": opts.cluster_dir}
        container.update({"ports": ports} if ports else {})
        container.update({"env": env, "volumeMounts": mounts} if env or mounts else {})
        container["resources"] = {"requests": resources, "limits": resources}
        spec: dict[str, Any] = {"containers": [container]}
        if "nvidia.com/gpu" in resources:
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return {"spec": {**spec, **({"volumes": volumes} if volumes else {})}}

    ports = [{"containerPort": p, "name": n} for p, n in ((6379, "gcs-server"), (8265, "dashboard"), (10001, "client"))]
    gpu = {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": str(opts.gpus_per_worker)}
    workers = {"groupName": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": opts.max_workers}
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
            "template": pod("ray-head", {"cpu": "2", "memory": "8Gi"}, ports),
        },
        "workerGroupSpecs": [{**workers, "rayStartParams": {}, "template": pod("ray-worker", gpu)}],
    }


COMMENTS = {
    "rayVersion": "the Ray in the image; the project pins ray==2.60.0",
    "enableInTreeAutoscaling": "the autoscaler adds GPU workers while actors wait for GPUs",
    "idleTimeoutSeconds": "idle workers go away after this many seconds",
    "num-cpus": "nothing is scheduled on the head; it runs the job driver only",
    "num-gpus": "a CPU head",
    "minReplicas": "keep one GPU worker: with no GPU in the cluster a flow falls back to CPU actors",
    "maxReplicas": "the most GPU workers the autoscaler starts",
    "nvidia.com/gpu": "GPUs per worker; Ray takes num-gpus from this",
    "HF_HOME": "models load from this shared Hugging Face cache (see cluster/README.md)",
    "HF_HUB_OFFLINE": "workers never download; fill the cache once beforehand",
    "claimName": "ReadWriteMany volume on every pod: store, outputs, HF cache",
    "entrypoint": "an `ipa run` of the flow, from the project inside the image",
    "shutdownAfterJobFinishes": "delete the RayCluster when the job ends",
    "ttlSecondsAfterFinished": "but keep it this many seconds first, for its logs",
    "activeDeadlineSeconds": "stop a run that takes longer than this",
    "backoffLimit": "retries; a retry skips the rows already done",
    "ipa-flow-hash": "hash of what the flow computes: same hash, same work",
    "schedule": "cron (the flow's `schedule:` unless --schedule)",
    "concurrencyPolicy": "never two submissions of this flow at once",
    "command": "the same scheduled night submitted twice runs once (deterministic submission id)",
}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # repeated blocks written out, no &id001 anchors
        return True


def to_yaml(doc: dict[str, Any], header: str) -> str:
    """YAML of a document, with a header, and a comment line above the first use of each commented key."""
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=10_000, default_flow_style=False)
    lines, seen = [f"# {h}".rstrip() for h in header.splitlines()], set()
    for line in text.splitlines():
        match = re.match(r"^(\s*)(?:- )?([A-Za-z][\w./-]*):", line)
        if match and match.group(2) in COMMENTS and match.group(2) not in seen:
            seen.add(match.group(2))
            lines.append(f"{match.group(1)}# {COMMENTS[match.group(2)]}")
        lines.append(line)
    return "\n".join(lines) + "\n"
