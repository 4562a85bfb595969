"""`ipa run | validate | schema | demo`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow, FlowError, load_flow

REPO = Path(__file__).resolve().parents[2]


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a flow's stages")
    run.add_argument("flow")
    run.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    run.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a flow field")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check a flow (or a manifest with --flow) without running it")
    val.add_argument("file")
    val.add_argument("--flow", help="the flow a manifest is checked against")
    val.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    val.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the flow format's JSON Schema")
    schema.set_defaults(func=lambda args: print(json.dumps(Flow.model_json_schema(), indent=2)) or 0)

    demo = sub.add_parser("demo", help="build the tiny zoo and run flows/quickstart.yaml on it")
    demo.add_argument("--out", default="ipa-demo", help="output folder (default: ./ipa-demo)")
    demo.set_defaults(func=_demo)


def _run(args: argparse.Namespace) -> int:
    from ipa_ops.runner import run_flow

    flow = load_flow(args.flow, args.set)
    results = run_flow(flow, args.stage)
    for stage, summary in results.items():
        print(f"{stage}: {json.dumps(summary, default=str)}")
    return 0


def flow_problems(flow: Flow) -> list[str]:
    """Everything `ipa validate FLOW` reports beyond the schema: missing models, pre-flight."""
    from ipa_ops.generate.preflight import check_flow, check_models

    problems = check_models(flow)
    if not problems:
        problems += check_flow(flow)[1]
    return problems


def _validate(args: argparse.Namespace) -> int:
    try:
        if args.flow:
            flow = load_flow(args.flow, args.set)
            from ipa_ops.generate.manifest_plan import manifest_problems

            problems = manifest_problems(flow, args.file)
        else:
            flow = load_flow(args.file, args.set)
            from ipa_ops.scores import source_problems

            problems = flow_problems(flow) + source_problems(flow)
    except FlowError as exc:
        problems = exc.problems if args.flow is None else [f"{exc.source}: {p}" for p in exc.problems]
    for line in problems:
        print(line)
    if not problems:
        print("ok")
    return 1 if problems else 0


def cache_dir() -> Path:
    return Path(os.environ.get("IPA_CACHE", Path.home() / ".cache" / "ipa"))


def _demo(args: argparse.Namespace) -> int:
    from ipa_ops.runner import run_flow
    from ipa_ops.zoo import build_zoo

    flow_file = REPO / "flows" / "quickstart.yaml"
    if not flow_file.is_file():
        raise UserError(f"{flow_file}: not found; run `ipa demo` from a checkout of the ipa repository")
    zoo = build_zoo(cache_dir() / "zoo-tiny", size="tiny")
    out = Path(args.out).resolve()
    overrides = [
        f"mirror={zoo}",
        f"stages.extract.images={REPO / 'data' / 'refs'}",
        f"stages.extract.store={out / 'store'}",
        f"stages.generate.store={out / 'store'}",
        f"stages.generate.manifest={REPO / 'manifests' / 'quickstart.csv'}",
        f"stages.generate.output={out / 'quickstart'}",
        "stages.generate.defaults.width=64",  # the zoo's tiny models: small images, few steps
        "stages.generate.defaults.height=64",
        "stages.generate.defaults.steps=4",
    ]
    os.environ.pop("IPA_MIRROR", None)
    flow = load_flow(flow_file, overrides)
    cwd = os.getcwd()
    os.chdir(REPO)  # the manifest's reference paths are relative to the repository
    try:
        results = run_flow(flow)
    finally:
        os.chdir(cwd)
    gen = results["generate"]
    print(f"extract: {json.dumps(results['extract'], default=str)}")
    print(f"images:  {out / 'quickstart' / 'images'}")
    print(f"results: {out / 'quickstart' / 'results'}")
    print(f"report:  {out / 'quickstart' / 'report.html'}")
    print(
        f"rows ok: {gen['ok']}, failed: {gen['error']}, skipped (done before): {gen['skipped']}, "
        f"{gen['images_per_second']:.2f} images/s"
    )
    return 0 if gen["error"] == 0 else 1
