"""The out-of-core latest-attempt index picks the rows `folder.latest` picks, spilled or not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ipa_ops.outputs import latest_index
from ipa_ops.outputs.folder import OutputDir, latest
from ipa_ops.outputs.latest_index import ENTRY, Winners, latest_attempts
from ipa_ops.outputs.view import results_view

PART_ROWS = [0, 37, 100, 3, 250, 1]


def _attempts(seed: int) -> pd.DataFrame:
    """Attempts over few keys and few times, so keys repeat across parts and times tie."""
    rng = np.random.default_rng(seed)
    frames = []
    for part, n in enumerate(PART_ROWS):
        frames.append(
            pd.DataFrame(
                {
                    "row_key": [f"k{i}" for i in rng.integers(0, 60, n)],
                    "finished_at": rng.choice([-(2**62), 5, 6, 7], n),  # -2^62: no finished_at
                    "part": part,
                    "row": np.arange(n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _entries(df: pd.DataFrame, batch: int) -> list[np.ndarray]:
    chunks = []
    for start in range(0, len(df), batch):
        rows = df.iloc[start : start + batch]
        entries = np.empty(len(rows), ENTRY)
        digests = b"".join(hashlib.blake2b(k.encode(), digest_size=16).digest() for k in rows["row_key"])
        words = np.frombuffer(digests, "<u8")
        entries["high"], entries["low"] = words[0::2], words[1::2]
        entries["time"], entries["part"], entries["row"] = rows["finished_at"], rows["part"], rows["row"]
        chunks.append(entries)
    return chunks


def _marked(winners: Winners) -> set[tuple[int, int]]:
    return {(part, int(row)) for part, n in enumerate(PART_ROWS) for row in winners.rows_in(part, 0, n)}


@pytest.mark.parametrize("seed", [0, 1])
def test_latest_attempts_match_folder_latest_in_memory_and_spilled(tmp_path: Path, seed: int) -> None:
    df = _attempts(seed)
    expected = {(int(p), int(r)) for p, r in latest(df, "row_key")[["part", "row"]].itertuples(index=False)}
    assert len(expected) < len(df)  # keys were tried more than once
    in_memory = latest_attempts(_entries(df, 64), PART_ROWS)
    spilled = latest_attempts(_entries(df, 29), PART_ROWS, spill_dir=str(tmp_path / "spill"), bucket_rows=16)
    assert _marked(in_memory) == _marked(spilled) == expected
    assert list((tmp_path / "spill").iterdir()) == []  # the buckets are gone


def test_rows_in_at_unaligned_offsets() -> None:
    winners = Winners(PART_ROWS)
    rng = np.random.default_rng(3)
    flags = [rng.random(n) < 0.4 for n in PART_ROWS]
    for part, chosen in enumerate(flags):
        rows = np.flatnonzero(chosen)
        winners.mark(np.full(len(rows), part), rows)
    for part, n in enumerate(PART_ROWS):
        for first in range(0, n, 7):
            for length in (1, 5, 13, n - first):
                length = min(length, n - first)
                assert winners.rows_in(part, first, length).tolist() == np.flatnonzero(
                    flags[part][first : first + length]
                ).tolist()


def test_view_spills_its_index_and_keeps_latest_semantics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latest_index, "BUCKET_ROWS", 4)  # 40 attempts: ten buckets on disk
    out = OutputDir(str(tmp_path / "out"))
    rng = np.random.default_rng(5)
    for part in range(4):
        rows = []
        for i in range(10):
            key = f"{int(rng.integers(0, 15)):020x}"
            when = [None, "2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z"][int(rng.integers(0, 3))]
            status = "ok" if rng.random() < 0.7 else "error"
            rows.append({"id": f"p{part}-{i}", "row_key": key, "status": status, "finished_at": when, "outputs": []})
        out.append_results(rows)
    expected = latest(out.read_results(), "row_key")
    with results_view(out, spill_dir=str(tmp_path / "spill")) as view:
        table = view.select().read_all()
        ok = view.select("status = 'ok'").read_all()
    assert table.column("id").to_pylist() == expected["id"].tolist()  # same rows, in written order
    assert ok.column("id").to_pylist() == expected[expected["status"] == "ok"]["id"].tolist()
