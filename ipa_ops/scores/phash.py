"""`phash` (imagehash's DCT perceptual hash, 64 bits by default) and `dup_of` across a whole output.

`phash` is per image, so actors compute it with the others. `dup_of` compares each image with
every earlier one (results order: the row that finished first is the original), so it runs on
the driver once the hashes are in: the row key of the first earlier image within `max_distance`
bits, or null. Earlier rows never change their answer when later rows arrive, so a rerun only
computes `dup_of` for rows that have none yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ipa_ops.scores.base import ScoreItem, Scorer, Value

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class PHashScore(Scorer):
    name = "phash"
    metrics = ("phash", "dup_of")

    def facts(self) -> dict[str, Any]:
        import imagehash

        return {"library": f"imagehash {imagehash.__version__}", "hash_size": self.spec.hash_size,
                "max_distance": self.spec.max_distance}  # fmt: skip

    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        import imagehash

        return [{"phash": str(imagehash.phash(i.image, hash_size=self.spec.hash_size))} for i in items]


def hash_bytes(hexes: Sequence[str]) -> np.ndarray:
    """[n, bytes] uint8 of equal-length hex hashes."""
    return np.array([list(bytes.fromhex(h)) for h in hexes], dtype=np.uint8).reshape(len(hexes), -1)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes (imagehash's `h1 - h2`)."""
    return int(_POPCOUNT[np.bitwise_xor(hash_bytes([a]), hash_bytes([b]))].sum())


def find_duplicates(ordered: Sequence[tuple[str, str]], wanted: set[str], max_distance: int) -> dict[str, str | None]:
    """For each key in `wanted`: the first key before it in `ordered` ((row_key, phash), earliest
    first) whose hash is within `max_distance` bits, or None."""
    if not ordered:
        return {}
    keys = [k for k, _ in ordered]
    bits = hash_bytes([h for _, h in ordered])
    found: dict[str, str | None] = {}
    for i, key in enumerate(keys):
        if key not in wanted:
            continue
        if i == 0:
            found[key] = None
            continue
        distances = _POPCOUNT[np.bitwise_xor(bits[:i], bits[i])].sum(axis=1)
        close = np.flatnonzero(distances <= max_distance)
        found[key] = keys[int(close[0])] if close.size else None
    return found
