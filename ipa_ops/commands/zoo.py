"""`ipa zoo build DIR`: fabricate the offline model mirror."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="fabricate a mirror of random-weight models in the real layouts")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zsub.add_parser("build", help="build the zoo into DIR (reused when already built)")
    build.add_argument("dir")
    build.add_argument("--size", choices=["tiny", "small", "full"], default="tiny")
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds a finished zoo")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from ipa_ops.zoo import build_family_zoo, build_zoo

    start = time.perf_counter()
    root = build_zoo(args.dir, size=args.size, force=args.force, scorers=True)  # the score stage's models too
    if args.size != "full":  # full-size Flux is tens of GB of random weights: configs only (zoo/flux.py)
        build_family_zoo(root, size=args.size)  # Flux: added when missing, the UNet zoo untouched
    print(f"zoo ({args.size}) ready at {root} in {time.perf_counter() - start:.1f}s; use it with IPA_MIRROR={root}")
    return 0
