"""Which row of which results part holds each key's latest attempt, in memory flat in the rows.

The results view (view.py) needs, before it streams the parts, the place (part, row) of every
key's latest attempt: by `finished_at`, then part, then row order, as `folder.latest` decides. An
index of every attempt held whole costs ~40 bytes a row at rest and more while sorted, so a
driver exporting 10^6 rows grew by ~0.1 GB for it. Here the index goes out of core instead:

1. every attempt becomes one fixed-size entry (a 128-bit digest of its key, time, part, row);
   entries are split into hash buckets by digest, so all attempts of a key land in one bucket,
   and buckets are written to a temporary folder as they come (unless the whole output fits in
   one bucket, which then stays in memory);
2. buckets are resolved one at a time (numpy sort, the last entry of each key wins) and the
   winners marked in a bitmap over all rows, one bit a row (125 kB at 10^6 rows).

Memory: one bucket (`BUCKET_ROWS` entries) plus the bitmap, whatever the number of rows, up to
`BUCKET_ROWS * MAX_BUCKETS` (~1.7 * 10^7) rows; beyond that buckets grow by 2 bytes a row.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np

ENTRY = np.dtype([("high", "<u8"), ("low", "<u8"), ("time", "<i8"), ("part", "<i4"), ("row", "<i8")])
BUCKET_ROWS = 1 << 16  # entries resolved at once (36 B each; the sort needs a few times that)
MAX_BUCKETS = 256  # files open at once while spilling


class Winners:
    """A bitmap over every row of every part: set where the row is its key's latest attempt."""

    def __init__(self, part_rows: list[int]):
        self.offsets = np.concatenate([[0], np.cumsum(part_rows, dtype=np.int64)])
        self.bits = np.zeros((int(self.offsets[-1]) + 7) // 8, np.uint8)

    def mark(self, part: np.ndarray, row: np.ndarray) -> None:
        place = self.offsets[part] + row
        np.bitwise_or.at(self.bits, place >> 3, np.left_shift(1, place & 7).astype(np.uint8))

    def rows_in(self, part: int, first: int, n: int) -> np.ndarray:
        """Positions 0..n-1 (rows first..first+n-1 of `part`) that are latest attempts, ascending."""
        start = int(self.offsets[part]) + first
        lo = start >> 3
        flags = np.unpackbits(self.bits[lo : (start + n + 7) >> 3], bitorder="little")
        skip = start - (lo << 3)
        return np.flatnonzero(flags[skip : skip + n])


def latest_attempts(
    entries: Iterable[np.ndarray], part_rows: list[int], spill_dir: str | None = None, bucket_rows: int | None = None
) -> Winners:
    """The latest attempt of each key among `entries` (arrays of `ENTRY`, every row of every part).

    `part_rows` is each part's row count (entries' `row` is the row within its part); buckets spill
    to a temporary folder under `spill_dir` (default: the system's) when there is more than one.
    """
    winners = Winners(part_rows)
    buckets = min(MAX_BUCKETS, max(1, -(-sum(part_rows) // (bucket_rows or BUCKET_ROWS))))
    if buckets == 1:
        held = list(entries)
        if held:
            winners.mark(*_last_of_each_key(np.concatenate(held)))
        return winners
    if spill_dir:
        os.makedirs(spill_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ipa-latest-", dir=spill_dir or None) as folder:
        paths = [os.path.join(folder, f"bucket-{b:03d}.bin") for b in range(buckets)]
        files = [open(path, "wb") for path in paths]
        try:
            for chunk in entries:
                bucket = chunk["high"] % np.uint64(buckets)
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
                for b in np.flatnonzero(np.diff(bounds)):
                    files[b].write(chunk[order[bounds[b] : bounds[b + 1]]].tobytes())
        finally:
            for f in files:
                f.close()
        for path in paths:
            found = np.fromfile(path, ENTRY)
            os.remove(path)
            if len(found):
                winners.mark(*_last_of_each_key(found))
    return winners


def _last_of_each_key(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part, row) of each key's last entry by time, then part, then row."""
    order = np.lexsort((entries["row"], entries["part"], entries["time"], entries["low"], entries["high"]))
    high, low = entries["high"][order], entries["low"][order]
    last = order[np.append((high[1:] != high[:-1]) | (low[1:] != low[:-1]), True)]
    return entries["part"][last].astype(np.int64), entries["row"][last]
