"""`ipa schedule FLOW --adapter A --steps N SPEC`: the effective scales of a scale spec, as JSON."""

from __future__ import annotations

import argparse
import json

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import load_flow


def register(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("schedule", help="print the effective per-layer, per-step scales of a scale spec")
    cmd.add_argument("flow", help="flow file")
    cmd.add_argument("spec", help='scale spec as in a manifest: a number or JSON, e.g. \'{"weight_type": "ease in"}\'')
    cmd.add_argument("--adapter", required=True, help="adapter alias from the flow")
    cmd.add_argument("--steps", type=int, required=True, help="denoising steps")
    cmd.add_argument("--model", default=None, help="model alias (default: the generate stage's, or one that fits)")
    cmd.set_defaults(func=_schedule)


def _schedule(args: argparse.Namespace) -> int:
    from ipa_ops.generate.schedule_view import effective_scales

    flow = load_flow(args.flow)
    try:
        found = effective_scales(flow, args.adapter, args.steps, args.spec, args.model)
    except ValueError as exc:
        raise UserError(f"{args.spec}: {exc}") from None
    head = json.dumps({k: v for k, v in found.items() if k != "layers"})
    layers = ",\n".join("  " + json.dumps(layer) for layer in found["layers"])
    print(f'{head[:-1]}, "layers": [\n{layers}\n]}}')  # one IP layer a line, still one JSON document
    return 0
