"""`ipa compact OUTPUT`: merge an output's results parts, one part per run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    compact = sub.add_parser("compact", help="merge an output's results parts (one part per run)")
    compact.add_argument("output", help="output directory (local path or fsspec URI)")
    compact.set_defaults(func=_compact)


def _compact(args: argparse.Namespace) -> int:
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.results_writer import compact_output

    found = compact_output(OutputDir(args.output))
    print(f"{args.output}: {found['parts_before']} results parts -> {found['parts_after']}")
    return 0
