"""`ipa noise TYPE [IMAGE ...] --out DIR`: ComfyUI's IPAdapterNoise negatives as PNG files.

The files go in a manifest entry's `negative_images` (and an extract stage's images), like any
negative reference: extract encodes them once, and their content hash enters the row keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipa_ops.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("noise", help="write noise negatives as ComfyUI's IPAdapterNoise makes them (PNG)")
    cmd.add_argument("type", help="fade, dissolve, gaussian or shuffle")
    cmd.add_argument("images", nargs="*", help="references to noise (IPAdapterNoise's image_optional); none: black")
    cmd.add_argument("--strength", type=float, default=1.0, help="0 to 1 (default 1.0, as ComfyUI)")
    cmd.add_argument("--blur", type=int, default=0, help="Gaussian blur kernel size, 0 to 32 (default 0: none)")
    cmd.add_argument("--out", required=True, help="folder to write the PNGs into")
    cmd.set_defaults(func=_noise)


def noise_name(source: str | None, kind: str, strength: float, blur: int) -> str:
    """`<stem>.noise-<type>-s<strength>-b<blur>.png` (`noise-...png` for the black image)."""
    stem = f"{Path(source).stem}." if source else ""
    return f"{stem}noise-{kind}-s{strength:g}-b{blur}.png"


def _noise(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ipa_ops.store.images import ImageError, read_image
    from ipa_ops.store.noise import noise_image, to_uint8

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source in args.images or [None]:
        try:
            pixels = np.asarray(read_image(source)[0]) if source else None
            made = noise_image(pixels, args.type, args.strength, args.blur)
        except ImageError as exc:
            raise UserError(str(exc)) from None
        except ValueError as exc:
            raise UserError(f"ipa noise: {exc}") from None
        path = out / noise_name(source, args.type, args.strength, args.blur)
        Image.fromarray(to_uint8(made)).save(path)
        print(path)
    return 0
