"""`ipa manifest sweep|show` and `ipa report`: making, reading and reviewing manifests and their outputs."""

from __future__ import annotations

import argparse
import json

from ipa_ops.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    manifest = sub.add_parser("manifest", help="expand sweeps into manifests, show a manifest")
    actions = manifest.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    sweep = actions.add_parser("sweep", help="expand a cartesian sweep spec (YAML) into a manifest")
    sweep.add_argument("spec", help="sweep spec YAML, e.g. manifests/sweep-example.yaml")
    sweep.add_argument("-o", "--out", required=True, help="manifest to write (.parquet, .csv or .jsonl)")
    sweep.set_defaults(func=_sweep)
    show = actions.add_parser("show", help="print a manifest's size, columns and first rows")
    show.add_argument("file", help="manifest file, glob or partitioned folder")
    show.add_argument("-n", "--rows", type=int, default=20, help="rows to print (default 20)")
    show.set_defaults(func=_show)
    report = sub.add_parser("report", help="(re)build report.html (an index) and the pages of rows that changed")
    report.add_argument("output", help="output directory of a generate stage")
    report.add_argument("--manifest", help="manifest to fill in prompts and references results lack")
    report.add_argument("--all", action="store_true", help="rebuild every page, not only those whose results changed")
    report.set_defaults(func=_report)


def _sweep(args: argparse.Namespace) -> int:
    from ipa_ops.manifest.sweep import sweep_to_manifest

    count = sweep_to_manifest(args.spec, args.out)
    print(f"wrote {count} rows to {args.out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ipa_ops.manifest.reading import read_manifest, readable_adapters

    df = read_manifest(args.file)
    used = [c for c in df.columns if df[c].notna().any() and not (c == "adapters" and not df[c].map(bool).any())]
    tasks = df["task"].fillna("text2img (default)").value_counts().to_dict()
    print(f"{args.file}: {len(df)} rows; tasks: {', '.join(f'{k}: {v}' for k, v in tasks.items()) or 'none'}")
    print(f"columns: {', '.join(used)}")
    if len(df) and args.rows > 0:
        head = df[used].head(args.rows).copy()
        if "adapters" in head:
            head["adapters"] = [json.dumps(readable_adapters(a)) if a else "" for a in head["adapters"]]
        print(head.to_string(index=False, max_colwidth=60))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ipa_ops.manifest.rows import read_manifest
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.results_writer import group_parts
    from ipa_ops.report.build import build_report

    out = OutputDir(args.output)
    if not out.fs.exists(out.root):
        raise UserError(f"{args.output}: no such output directory; pass the `output:` of a generate stage")
    manifest = read_manifest(args.manifest) if args.manifest else None
    groups = list(group_parts(out)) if args.all else None
    print(build_report(args.output, manifest, groups=groups))
    return 0
