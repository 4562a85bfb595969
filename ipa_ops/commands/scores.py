"""`ipa scores OUTPUT [--rows]`: a summary of an output's scores, or every row's scores as CSV."""

from __future__ import annotations

import argparse
import sys

from ipa_ops.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    scores = sub.add_parser("scores", help="summarise an output's scores (--rows: per-row CSV on stdout)")
    scores.add_argument("output", help="output directory (local path or fsspec URI)")
    scores.add_argument("--rows", action="store_true", help="write row_key, id and one column per score as CSV")
    scores.add_argument(
        "--below",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="count rows below VALUE for METRIC (repeatable; defaults: clip_t 0.2, clip_i_min 0.6, face_sim 0.5, ...)",
    )
    scores.set_defaults(func=_scores)


def _thresholds(items: list[str]) -> dict[str, float]:
    found = {}
    for item in items:
        metric, sep, value = item.partition("=")
        try:
            found[metric.strip()] = float(value)
        except ValueError:
            raise UserError(f"--below {item!r}: expected METRIC=NUMBER, e.g. clip_i_min=0.6") from None
        if not sep:
            raise UserError(f"--below {item!r}: expected METRIC=NUMBER, e.g. clip_i_min=0.6")
    return found


def _scores(args: argparse.Namespace) -> int:
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.scores import score_summary, scores_table

    out = OutputDir(args.output)
    if not out.fs.isdir(out.root):
        raise UserError(f"{args.output}: no such output directory")
    table = scores_table(out)
    if args.rows:
        table.to_csv(sys.stdout, index=False, float_format="%.6g")
        return 0
    if table.empty:
        print(f"{args.output}: no scores yet; add a `score:` stage to the flow and run `ipa run FLOW --stage score`")
        return 0
    summary = score_summary(table, _thresholds(args.below))
    print(f"{args.output}: {len(table)} scored row(s); scorers: {', '.join(sorted(table.attrs['scorers'].values()))}")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    return 0
