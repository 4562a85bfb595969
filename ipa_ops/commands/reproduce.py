"""`ipa reproduce OUTPUT ROW_KEY --out DIR` / `ipa reproduce --png FILE --out DIR`: remake one image
from its own record and say whether it equals the original (exit 1 when it does not)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "reproduce",
        help="remake one image from its record (results row or the image's own metadata); compare to the original",
    )
    cmd.add_argument("output", nargs="?", help="output directory holding the row's results")
    cmd.add_argument("row_key", nargs="?", help="row key of the image (its file name)")
    cmd.add_argument("--png", metavar="FILE", help="read the record from this PNG (or GIF) written by ipa instead")
    cmd.add_argument("--out", required=True, metavar="DIR", help="where the remade file is written (<row_key>.png)")
    cmd.add_argument("--mirror", help="mirror / zoo root for the weights (default: IPA_MIRROR, then the record's)")
    cmd.add_argument("--flow", help="take the model sources from this flow file instead of the record")
    cmd.add_argument("--store", help="embedding store URI (default: the one the record names)")
    cmd.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    cmd.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from ipa_ops.errors import UserError
    from ipa_ops.flow.spec import load_flow
    from ipa_ops.generate import reproduce

    if args.png and (args.output or args.row_key):
        raise UserError("reproduce: give either OUTPUT ROW_KEY or --png FILE, not both")
    if args.png:
        original = reproduce.from_image(args.png)
    elif args.output and args.row_key:
        original = reproduce.from_output(args.output, args.row_key)
    else:
        raise UserError("reproduce: give OUTPUT ROW_KEY (a results row) or --png FILE (an image written by ipa)")
    sources = load_flow(args.flow) if args.flow else None
    array = reproduce.remake(original, args.mirror, args.store, sources, args.device)
    encoded, written = reproduce.write(original, args.out, array)
    result = reproduce.compare(original, encoded)
    print(f"remade row {original.record['id']} ({original.record['row_key']}): {written[0]}")
    if result.identical_pixels:
        same = "pixels and bytes" if result.identical_bytes else "pixels (the files' bytes differ)"
        print(f"identical to the original: {same} equal {', '.join(result.compared)}")
        return 0
    print(
        f"differs from the original: max |difference| {result.max_difference}/255, "
        f"{result.differing_values} pixel values differ ({', '.join(result.compared)})"
    )
    return 1
