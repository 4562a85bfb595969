"""KubeRay / CronJob renderings of a flow (`ipa cluster render`).

Renderings are plain dicts dumped as YAML: a `RayCluster`, a `RayJob`, a `RayCronJob` (KubeRay
>= 1.6, `RayCronJob` feature gate) and a Kubernetes `CronJob` that runs `ipa submit` against the
RayCluster. They depend only on the flow file and the options, never on the environment, so the
checked-in copies under cluster/rendered/ regenerate byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ipa_ops.cluster.jobs import RAY_VERSION, entrypoint, hash_with_mirror, slug
from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow, parse_flow, set_path

KINDS = ("raycluster", "rayjob", "raycronjob", "cronjob")


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
    base = f"ipa-{slug(flow.name, 24)}"
    labels = {"app.kubernetes.io/name": "ipa", "ipa.io/flow": slug(flow.name, 63), "ipa.io/flow-hash": digest}
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
