"""`ipa submit | status | logs | stop`, `ipa runs ls`, `ipa cluster render`: flows on Ray clusters."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ipa_ops.errors import UserError

SUCCESS = "SUCCEEDED"
MAX_ATTEMPTS = 10
RENDER_OPTIONS = (
    ("--image", str, "the project image (cluster/Dockerfile), as your cluster pulls it (default ipa:0.1.0)"),
    ("--cluster-dir", str, "where the image holds the project (default /app)"),
    ("--shared-root", str, "where relative store/output paths go: a RWX volume path or s3://... (default /mnt/shared)"),
    ("--pvc", str, "the ReadWriteMany claim mounted at the shared root (default ipa-shared)"),
    ("--max-workers", int, "GPU workers the autoscaler may start (default 4)"),
    ("--gpus-per-worker", int, "GPUs per worker pod (default 1)"),
    ("--schedule", str, "cron for raycronjob/cronjob (default: the flow's `schedule:`)"),
    ("--mirror", str, "IPA_MIRROR in every pod (a mirror folder on the shared volume)"),
)
_NOTES = {
    "raycluster": "A long-running autoscaling RayCluster (KubeRay >= 1.1). Submit to it with\n"
    "  ipa submit FLOW --address http://{base}-head-svc:8265 --cluster-dir /app   (from inside the cluster)",
    "rayjob": "One run on a RayCluster of its own, deleted when the run ends: kubectl apply -f FILE",
    "raycronjob": "Scheduled RayJobs. Needs KubeRay >= 1.6 with the RayCronJob feature gate on\n"
    "  (helm ... -f cluster/kuberay-operator-values.yaml); else use the CronJob rendering.",
    "cronjob": "Plain Kubernetes alternative to RayCronJob: runs `ipa submit` against the RayCluster of\n"
    "  the raycluster rendering; a night submitted twice runs once.",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a flow to a Ray cluster as a Ray job (once per flow and partition)")
    p.add_argument("flow")
    _address(p)
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a flow field")
    p.add_argument("--partition", help="the run this is, e.g. a date (default: today, UTC); part of the job id")
    p.add_argument("--retry-failed", action="store_true", help="if this run's job failed or stopped, submit again")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends (implies --wait)")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default: .)")
    code.add_argument("--cluster-dir", help="the project is already at this path on the cluster: upload nothing")
    p.add_argument("--wheel", help="ship a built ipa wheel (py_modules) instead of the local package")
    p.add_argument("--pip", action="store_true", help="have Ray pip-install the project's dependencies for the job")
    p.add_argument("--hf-home", help="HF_HOME on the cluster (a Hugging Face cache every node mounts)")
    p.add_argument("--mirror", help="IPA_MIRROR on the cluster (a mirror/zoo folder every node mounts)")
    p.add_argument("--offline", action="store_true", help="HF_HUB_OFFLINE=1 on the cluster")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="another job env variable")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-memory", type=int, help="memory in bytes reserved for the driver")
    p.add_argument("--entrypoint-resources", type=json.loads, help='custom resources for the driver, JSON {"x": 1}')
    p.add_argument(
        "--dry-run", action="store_true", help="print the job id, entrypoint and runtime_env; submit nothing"
    )
    p.set_defaults(func=_submit)

    for name, doc, func in (("status", "a job's status", _status), ("stop", "stop a job", _stop)):
        q = sub.add_parser(name, help=doc)
        q.add_argument("job_id")
        _address(q)
        q.set_defaults(func=func)
    logs = sub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    _address(logs)
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    logs.set_defaults(func=_logs)

    runs = sub.add_parser("runs", help="the run ledger of an output directory").add_subparsers(required=True)
    ls = runs.add_parser("ls", help="one line per run: id, status, start, seconds, counts, inputs")
    ls.add_argument("output", help="output directory (local path or any fsspec URI)")
    ls.add_argument("--json", action="store_true", help="the records as JSON lines")
    ls.set_defaults(func=_runs_ls)

    cluster = sub.add_parser("cluster", help="Kubernetes material for a flow").add_subparsers(required=True)
    r = cluster.add_parser("render", help="KubeRay RayCluster / RayJob / RayCronJob or a CronJob for flows")
    r.add_argument("flows", nargs="+", metavar="FLOW")
    r.add_argument("--kind", required=True, choices=["raycluster", "rayjob", "raycronjob", "cronjob", "all"])
    r.add_argument("--out-dir", help="write <flow>.<kind>.yaml files here instead of printing")
    r.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a flow field")
    for flag, kind, doc in RENDER_OPTIONS:  # defaults live in cluster/render.py: RenderOptions
        r.add_argument(flag, type=kind, help=doc)
    r.set_defaults(func=_render)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")


def _submit(args: argparse.Namespace) -> int:
    from ipa_ops.cluster import jobs as cluster
    from ipa_ops.flow.spec import load_flow

    flow = load_flow(args.flow, args.set)
    env = dict(_pair(e, "--env") for e in args.env)
    opts = cluster.SubmitOptions(
        args.working_dir, args.cluster_dir, args.wheel, args.pip, args.hf_home, args.mirror, args.offline, env
    )
    partition = args.partition or cluster.default_partition()
    command = cluster.entrypoint(flow, cluster.job_flow_path(args.flow, opts), args.set, opts.cluster_dir)
    runtime_env = cluster.runtime_env(opts)
    digest = cluster.hash_with_mirror(flow, opts.mirror)
    extra: dict[str, Any] = {"metadata": {"ipa_flow": flow.name, "ipa_flow_hash": digest, "ipa_partition": partition}}
    for key in ("num_cpus", "num_gpus", "memory", "resources"):
        if getattr(args, f"entrypoint_{key}") is not None:
            extra[f"entrypoint_{key}"] = getattr(args, f"entrypoint_{key}")
    job_id = cluster.submission_id(flow, partition, opts.mirror)
    if args.dry_run:
        print(json.dumps({"job_id": job_id, "entrypoint": command, "runtime_env": runtime_env, **extra}, indent=2))
        return 0
    client = cluster.job_client(args.address, flow.ray.address)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job_id, existing = cluster.submit(
            client, cluster.submission_id(flow, partition, opts.mirror, attempt), command, runtime_env, **extra
        )
        status = existing.status.value if existing is not None else None
        if not (args.retry_failed and status in ("FAILED", "STOPPED")):
            break
    if existing is None:
        print(f"submitted {job_id}: {command}")
        print(f"logs: ipa logs {job_id} --follow{_addr_flag(args)}")
    else:
        failed = status in ("FAILED", "STOPPED") and not args.retry_failed
        again = "pass another --partition" + (" or --retry-failed" if failed else "")
        print(f"{job_id}: already submitted ({status}); not submitting the same run twice; to run again, {again}")
    if not (args.wait or args.follow):
        return 0
    final = cluster.wait(client, job_id, follow=args.follow)
    print(f"{job_id}: {final}")
    return 0 if final == SUCCESS else 1


def _pair(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"{flag} {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key, value


def _addr_flag(args: argparse.Namespace) -> str:
    return f" --address {shlex.quote(args.address)}" if args.address else ""


def _client_and_info(args: argparse.Namespace) -> tuple[Any, Any]:
    from ipa_ops.cluster import jobs as cluster

    client = cluster.job_client(args.address)
    info = cluster.job_info(client, args.job_id)
    if info is None:
        raise UserError(
            f"job {args.job_id}: not found on this cluster; list jobs with `ray job list{_addr_flag(args)}`"
        )
    return client, info


def _status(args: argparse.Namespace) -> int:
    _, info = _client_and_info(args)
    print(f"{args.job_id}: {info.status.value}")
    for key in ("message", "entrypoint", "start_time", "end_time", "metadata", "driver_exit_code"):
        value = getattr(info, key, None)
        if key.endswith("_time") and isinstance(value, int):  # Ray gives epoch milliseconds
            value = datetime.fromtimestamp(value / 1000, UTC).isoformat(timespec="seconds")
        if value not in (None, "", {}):
            print(f"  {key}: {value}")
    return 0 if info.status.value != "FAILED" else 1


def _logs(args: argparse.Namespace) -> int:
    from ipa_ops.cluster import jobs as cluster

    client, _ = _client_and_info(args)
    if args.follow:
        print(f"{args.job_id}: {cluster.wait(client, args.job_id, follow=True)}")
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client, info = _client_and_info(args)
    if client.stop_job(args.job_id):
        print(f"{args.job_id}: stopping")
    else:
        print(f"{args.job_id}: not running ({info.status.value}); nothing to stop")
    return 0


def _runs_ls(args: argparse.Namespace) -> int:
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.ledger import read_ledger

    out = OutputDir(args.output)
    if not out.fs.exists(out.root):
        raise UserError(f"{args.output}: no such output directory; pass a flow's stages.generate.output")
    records = read_ledger(args.output)
    for r in records:
        if args.json:
            print(json.dumps(r, sort_keys=True))
            continue
        gen = r.get("counts", {}).get("generate", {})
        counts = " ".join(f"{k}={gen[k]}" for k in ("ok", "error", "skipped") if k in gen)
        line = f"{r['run_id']}\t{r['status']}\t{r['started_at']}\t{r.get('seconds') or '-'}s\t{counts or '-'}"
        note = r.get("error", "") or "; ".join(r.get("faults") or [])  # what went wrong, or what was survived
        print(f"{line}\tinputs={len(r.get('inputs', []))}\t{note}".rstrip())
    if not records and not args.json:
        print(f"{args.output}: no runs recorded yet (runs/ is empty)", file=sys.stderr)
    return 0


def _render(args: argparse.Namespace) -> int:
    from ipa_ops.cluster import render as rendering
    from ipa_ops.flow.spec import load_flow

    given = {name: getattr(args, name) for name in _option_names() if getattr(args, name) is not None}
    opts = rendering.RenderOptions(**given, overrides=args.set)
    kinds = rendering.KINDS if args.kind == "all" else (args.kind,)
    chunks = []
    for flow_path in args.flows:
        flow = load_flow(flow_path, args.set)
        for kind in kinds:
            doc = rendering.render(flow, flow_path, kind, opts)
            note = _NOTES[kind].replace("{base}", doc["metadata"]["name"])
            header = (
                f"{doc['kind']} for flow {flow.name!r}, made by `ipa cluster render`; edit the flow, not this file.\n"
                f"Regenerate: {_command(flow_path, kind, args)}\n{note}"
            )
            text = rendering.to_yaml(doc, header)
            if args.out_dir:
                path = Path(args.out_dir) / f"{Path(flow_path).stem}.{kind}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(path)
            else:
                chunks.append(text)
    if chunks:
        sys.stdout.write("---\n".join(chunks))
    return 0


def _option_names() -> list[str]:
    return [flag[2:].replace("-", "_") for flag, _, _ in RENDER_OPTIONS]


def _command(flow_path: str, kind: str, args: argparse.Namespace) -> str:
    """The render command line for one document, with the options given (so the header reproduces it)."""
    parts = ["ipa", "cluster", "render", flow_path, "--kind", kind]
    for flag, name in zip([o[0] for o in RENDER_OPTIONS], _option_names(), strict=True):
        if getattr(args, name) is not None:
            parts += [flag, str(getattr(args, name))]
    for item in args.set:
        parts += ["--set", item]
    return shlex.join(parts)
