"""`ipa` command line: parses arguments and hands each command to the layer below.

Commands live in `ipa_ops/commands/<area>.py`; each module's `register(subparsers)` adds its
parsers and sets `func(args) -> int` (the exit code). Errors meant for users are raised as
`UserError` (or the library's own one-line errors) and printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ipa_ops.errors import UserError

COMMAND_MODULES = (
    *("core", "zoo", "store", "manifest", "cluster", "doctor"),
    *("compact", "reproduce", "scores", "export", "schedule", "noise"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipa", description="IP-Adapter dataset generation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"ipa_ops.commands.{name}")
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name != f"ipa_ops.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))  # RunStopped: 128 + signal


if __name__ == "__main__":
    sys.exit(main())
