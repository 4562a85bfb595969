"""`ipa doctor PATH [--fix]`: list the files of a store or output that a run would trip on."""

from __future__ import annotations

import argparse

from ipa_ops.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    doc = sub.add_parser(
        "doctor", help="list unreadable, foreign or newer-schema files of a store or an output (--fix: move aside)"
    )
    doc.add_argument("path", help="embedding store or output folder (local path, s3://, gs://, ...)")
    doc.add_argument("--fix", action="store_true", help="move unreadable and foreign files to <path>/_quarantine/")
    doc.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from ipa_ops.doctor import CHECKERS, diagnose, fix, shown

    fs, report = diagnose(args.path)
    if not report.kinds:
        raise UserError(
            f"{args.path}: neither an embedding store nor an output folder "
            f"(looked for: {', '.join(CHECKERS)}); pass the store or output root"
        )
    moved = fix(fs, report.problems) if args.fix else {}
    left = 0
    for problem in report.problems:
        line = f"{shown(fs, problem.path)}: {problem.kind}: {problem.reason}"
        if problem.path in moved:
            print(f"{line}; moved to {shown(fs, moved[problem.path])}")
            continue
        left += 1
        hint = "" if not problem.fixable else "; `ipa doctor --fix` moves it aside"
        print(f"{line}{hint}")
    checked = ", ".join(f"{name}: {n} file(s)" for name, n in report.kinds.items())
    state = "no problems" if not report.problems else f"{len(report.problems)} problem(s), {len(moved)} moved aside"
    print(f"{args.path}: checked {checked}; {state}")
    return 1 if left else 0
