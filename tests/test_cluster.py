"""Cluster operation: submission ids, runtime envs, renderings, and a real local Ray head that runs a job.

The live test starts its own head (`ray start --head --block`) in a separate process group and temp
dir, so it never touches the embedded `ray_local` session or another Ray on this machine, and
stops exactly the processes it started.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray_nodes import free_port, start_node, stop_group

from ipa_ops import cli
from ipa_ops.cluster.jobs import (
    PROGRAM,
    RAY_VERSION,
    SubmitOptions,
    entrypoint,
    hash_with_mirror,
    runtime_env,
    submission_id,
)
from ipa_ops.cluster.render import KINDS, RenderOptions, render, with_sets
from ipa_ops.errors import UserError
from ipa_ops.flow.spec import load_flow
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import read_ledger

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "flows/quickstart.yaml"
RENDERED = REPO / "cluster" / "rendered"
SMALL = ["stages.generate.defaults.width=64", "stages.generate.defaults.height=64", "stages.generate.defaults.steps=3"]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)  # flow paths in commands and renderings are relative to the project
    return REPO


def test_submission_id_is_stable_per_flow_and_partition(in_repo: Path) -> None:
    flow = load_flow(QUICKSTART)
    first = submission_id(flow, "2026-11-24")
    assert first == submission_id(load_flow(QUICKSTART), "2026-11-24")  # same scheduled run, same id
    assert first.startswith("ipa-quickstart-") and first.endswith("-2026-11-24")
    assert submission_id(flow, "2026-11-25") != first
    assert submission_id(load_flow(QUICKSTART, ["stages.generate.defaults.steps=5"]), "2026-11-24") != first
    assert submission_id(flow, "2026-11-24", mirror="/zoo") != first
    assert submission_id(load_flow(QUICKSTART, ["ray.address=auto"]), "2026-11-24") == first  # where, not what
    assert submission_id(flow, "2026-11-24", attempt=2) == first + "-a2"


def test_entrypoint_is_an_ipa_run_of_the_flow(in_repo: Path) -> None:
    flow = load_flow(QUICKSTART, ["ray.address=ray://head:10001"])
    command = entrypoint(flow, QUICKSTART, ["mirror=/z o"], cluster_dir="/app")
    args = _ipa_args(command, cwd="/app")
    assert (args.command, args.flow) == ("run", QUICKSTART)
    assert args.set == ["mirror=/z o", "ray.address=null"]  # the driver joins the job's own cluster


def test_runtime_env_ships_code_but_installs_nothing_unless_asked(in_repo: Path, tmp_path: Path) -> None:
    env = runtime_env(SubmitOptions(working_dir=".", hf_home="/hf", mirror="/zoo", offline=True, env={"A": "1"}))
    assert env["working_dir"] == str(REPO) and {".venv", ".git", "runs", "stores"} <= set(env["excludes"])
    assert "pip" not in env and "py_modules" not in env  # the repo holds ipa_ops: nothing else to ship
    assert env["env_vars"] == {
        "HF_HOME": "/hf",
        "IPA_MIRROR": "/zoo",
        "HF_HUB_OFFLINE": "1",
        "A": "1",
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
    }
    assert runtime_env(SubmitOptions(cluster_dir="/app")) == {}  # the image has everything
    elsewhere = runtime_env(SubmitOptions(working_dir=str(tmp_path)))
    assert elsewhere["py_modules"] == [str(REPO / "ipa_ops")]  # the package travels with the job
    pip = runtime_env(SubmitOptions(pip=True))["pip"]
    assert any(p.startswith("ray[data,default]==") for p in pip) and any(p.startswith("diffusers") for p in pip)
    wheel = tmp_path / "ipa_ops-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    assert runtime_env(SubmitOptions(wheel=str(wheel)))["py_modules"] == [str(wheel)]
    with pytest.raises(UserError, match="--wheel"):
        runtime_env(SubmitOptions(wheel=str(tmp_path)))


def test_submit_dry_run_prints_the_job(in_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["submit", QUICKSTART, "--dry-run", "--partition", "p1", "--set", "mirror=/z"])
    job = json.loads(capsys.readouterr().out)
    assert code == 0 and job["job_id"] == submission_id(load_flow(QUICKSTART, ["mirror=/z"]), "p1")
    assert job["metadata"]["ipa_flow_hash"] in job["job_id"] and job["metadata"]["ipa_partition"] == "p1"
    assert _ipa_args(job["entrypoint"]).set == ["mirror=/z"]


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_document_structure(in_repo: Path, kind: str) -> None:
    flow = load_flow(QUICKSTART)
    opts = RenderOptions(schedule="0 2 * * *")
    doc = render(flow, QUICKSTART, kind, opts)
    assert (doc["apiVersion"], doc["kind"]) == {
        "raycluster": ("ray.io/v1", "RayCluster"),
        "rayjob": ("ray.io/v1", "RayJob"),
        "raycronjob": ("ray.io/v1", "RayCronJob"),
        "cronjob": ("batch/v1", "CronJob"),
    }[kind]
    name = doc["metadata"]["name"]
    assert len(name) <= 47 and name.replace("-", "").isalnum() and name == name.lower()
    digest = doc["metadata"]["labels"]["ipa.io/flow-hash"]
    spec = doc["spec"]
    if kind in ("raycronjob", "cronjob"):
        assert len(spec["schedule"].split()) == 5
    if kind == "raycluster":
        _check_cluster_spec(spec)
    elif kind in ("rayjob", "raycronjob"):
        job = spec if kind == "rayjob" else spec["jobTemplate"]
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
        assert job["metadata"] == {"ipa-flow": "quickstart", "ipa-flow-hash": digest}
        _check_cluster_spec(job["rayClusterSpec"])
        args = _ipa_args(job["entrypoint"], cwd=opts.cluster_dir)
        assert (args.command, args.flow) == ("run", QUICKSTART)
        assert hash_with_mirror(load_flow(args.flow, args.set), None) == digest  # the job runs what the hash says
        assert "stages.generate.output=/mnt/shared/runs/quickstart" in args.set  # outputs on the shared volume
    else:
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert spec["concurrencyPolicy"] == "Forbid" and pod["restartPolicy"] in ("Never", "OnFailure")
        args = cli.build_parser().parse_args(pod["containers"][0]["command"][1:])
        assert (args.command, args.flow, args.cluster_dir) == ("submit", QUICKSTART, "/app")
        assert args.wait and args.retry_failed
        head = render(flow, QUICKSTART, "raycluster", opts)["metadata"]["name"]
        assert args.address == f"http://{head}-head-svc:8265"  # KubeRay's head service of the RayCluster
        assert hash_with_mirror(with_sets(flow, args.set), None) == digest


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["HF_HOME"].startswith("/mnt/shared/") and env["HF_HUB_OFFLINE"] == "1"


def test_ray_version_matches_the_project_pin() -> None:
    assert f'"ray[data,default]=={RAY_VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_render_help_states_the_real_defaults() -> None:
    from ipa_ops.commands.cluster import RENDER_OPTIONS

    for flag, _, doc in RENDER_OPTIONS:
        default = getattr(RenderOptions, flag[2:].replace("-", "_"))
        assert default is None or f"(default {default})" in doc, flag


def test_cron_renderings_need_a_schedule(in_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "render", QUICKSTART, "--kind", "raycronjob"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: schedule:") and "--schedule" in err and "\n" not in err


def test_checked_in_renderings_are_up_to_date(in_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flows = sorted(p.stem for p in (REPO / "flows").glob("*.yaml"))
    for stem in flows:
        for kind in KINDS:
            path = RENDERED / f"{stem}.{kind}.yaml"
            assert path.is_file(), (
                f"{path} missing; make it with: ipa cluster render flows/{stem}.yaml --kind all "
                "--schedule '0 2 * * *' --out-dir cluster/rendered  (no --schedule if the flow has one)"
            )
    for path in sorted(RENDERED.glob("*.yaml")):
        text = path.read_text()
        command = next(line for line in text.splitlines() if line.startswith("# Regenerate: "))
        argv = shlex.split(command.removeprefix("# Regenerate: "))
        assert argv[:3] == ["ipa", "cluster", "render"]
        assert cli.main(argv[1:]) == 0
        assert capsys.readouterr().out == text, f"{path} is stale; regenerate it with: {command[14:]}"
        assert yaml.safe_load(text)["kind"]  # comments did not break the YAML


def test_ray_up_config_is_valid_for_the_autoscaler() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "ray-up.yaml").read_text())
    validate_config(prepare_config(config))
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["min_workers"] >= 1
    assert config["available_node_types"][config["head_node_type"]]["resources"]["GPU"] == 0


# -- a real cluster ---------------------------------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    """This process's environment without any Ray address, so nothing points at a cluster by accident."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`: this venv
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"]))
    return env


def _ready(url: str) -> bool:
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/api/jobs/", timeout=2).read()
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)  # up, and wants the cluster's auth token
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A local head with the dashboard on free ports; yields the job server URL; stops its process group."""
    from importlib.util import find_spec

    missing = [m for m in ("aiohttp_cors", "opencensus", "prometheus_client", "grpc") if find_spec(m) is None]
    if missing:
        pytest.fail(f"ray[default] is incomplete here (no {', '.join(missing)}); run ./scripts/setup")
    temp = tempfile.mkdtemp(prefix="ipa-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash = free_port()
    args = ["start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
    args += [f"--port={free_port()}", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"]
    args += [f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}"]
    args += ["--include-dashboard=true", "--disable-usage-stats"]
    url = f"http://127.0.0.1:{dash}"
    try:
        head = start_node(args, Path(temp) / "head.log", _clean_env(), lambda: _ready(url))
        try:
            yield url
        finally:
            stop_group(head)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _ipa(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipa_ops.cli", *argv],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_runs_the_flow_on_a_cluster_once(ray_head: str, zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    sets = [f"stages.extract.store={tmp_path / 'store'}", f"stages.generate.store={tmp_path / 'store'}"]
    sets += [f"stages.generate.output={out}", *SMALL]
    submit = ["submit", QUICKSTART, "--address", ray_head, "--partition", "test", "--mirror", str(zoo_dir), "--wait"]
    submit += [a for s in sets for a in ("--set", s)]
    first = _ipa(*submit)
    job_id = submission_id(load_flow(REPO / QUICKSTART, sets), "test", mirror=str(zoo_dir))
    try:
        assert first.returncode == 0, first.stdout + first.stderr[-3000:]
        assert f"submitted {job_id}" in first.stdout and f"{job_id}: SUCCEEDED" in first.stdout
    finally:
        if first.returncode != 0:
            print(_ipa("logs", job_id, "--address", ray_head).stdout[-5000:])
            _ipa("stop", job_id, "--address", ray_head)
    results = OutputDir(str(out)).read_results()
    assert sorted(results["id"]) == ["qs-1", "qs-2", "qs-3", "qs-4"] and set(results["status"]) == {"ok"}
    assert len(list((out / "images").glob("*/*.png"))) == 4
    (record,) = read_ledger(str(out))
    assert (record["run_id"], record["status"], record["counts"]["generate"]["ok"]) == (job_id, "ok", 4)
    assert record["flow_hash"] in job_id  # the job ran the flow the submitter hashed

    again = _ipa(*submit)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{job_id}: already submitted (SUCCEEDED)" in again.stdout and "submitted ipa-" not in again.stdout
    assert len(read_ledger(str(out))) == 1 and len(OutputDir(str(out)).read_results()) == 4  # no second run

    status = _ipa("status", job_id, "--address", ray_head)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED")
    assert "generate:" in _ipa("logs", job_id, "--address", ray_head).stdout


def _ipa_args(command: str, cwd: str | None = None) -> object:
    """Parse a job entrypoint with ipa's own parser; it must be `[cd DIR &&] python -m ipa_ops.cli ...`."""
    words = shlex.split(command)
    if cwd is not None:
        assert words[:3] == ["cd", cwd, "&&"]
        words = words[3:]
    assert tuple(words[: len(PROGRAM)]) == PROGRAM
    return cli.build_parser().parse_args(words[len(PROGRAM) :])
