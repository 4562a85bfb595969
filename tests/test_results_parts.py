"""Results in few large parts: buffered commits, compaction with no moment of a row seen twice or
missing, `ipa compact` on folders of today's and older layouts, and unreadable or refused parts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_quarantine import ShortOnce

from ipa_ops.cli import main
from ipa_ops.outputs import results_parts
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.results_parts import ResultsPartRefused
from ipa_ops.outputs.results_writer import ResultsWriter, compact_group


def _row(i: int, status: str = "ok", when: str | None = None, out: OutputDir | None = None) -> dict[str, Any]:
    key = f"{i:020x}"
    outputs = []
    if out is not None and status == "ok":
        outputs = [out.write_bytes_atomic(out.image_path(key), b"png")]
    return {
        "id": f"r{i}",
        "row_key": key,
        "status": status,
        "error": "" if status == "ok" else f"row r{i}: boom",
        "outputs": outputs,
        "seed": i,
        "finished_at": when or f"2024-01-01T00:00:{i % 60:02d}.{i:06d}Z",
    }


def _parts(out: OutputDir) -> list[str]:
    return sorted(Path(p).name for p in results_parts.list_parts(out.fs, out.results_dir()))


def test_writer_commits_every_n_rows_and_on_close(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    writer = ResultsWriter(out, rows=3, seconds=3600)
    writer.add([_row(0), _row(1)])
    assert _parts(out) == []  # buffered, not yet a part
    writer.add([_row(2), _row(3)])
    assert len(_parts(out)) == 1 and len(out.read_results()) == 4  # the window filled: one part of 4
    writer.add([_row(4)])
    assert len(_parts(out)) == 1
    writer.close(compact=False)
    parts = _parts(out)
    assert len(parts) == 2 and all(f"-{writer.run_tag}-" in p for p in parts)
    assert sorted(out.read_results()["id"]) == [f"r{i}" for i in range(5)]


def test_writer_commits_after_seconds(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    writer = ResultsWriter(out, rows=10_000, seconds=0.2)
    writer.add([_row(0)])
    assert _parts(out) == []
    time.sleep(0.25)
    writer.add([_row(1)])  # the oldest buffered row waited past the window: committed now
    assert len(_parts(out)) == 1 and len(out.read_results()) == 2


def test_close_compacts_the_run_into_one_part(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    writer = ResultsWriter(out, rows=2, seconds=3600)
    for i in range(0, 7, 2):
        writer.add([_row(i, out=out), _row(i + 1, "error")])
    assert len(_parts(out)) == 4
    done = out.done_keys()
    final = writer.close()
    parts = _parts(out)
    assert parts == [Path(final).name] and parts[0].endswith(".parquet") and "-c" in parts[0]
    results = out.read_results()
    assert sorted(results["id"]) == sorted(f"r{i}" for i in range(8)) and out.done_keys() == done


def test_a_reader_never_sees_a_row_twice_or_misses_one_during_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = OutputDir(str(tmp_path / "out"))
    writer = ResultsWriter(out, rows=2, seconds=3600)
    for i in range(0, 6, 2):
        writer.add([_row(i), _row(i + 1)])
    writer.commit()
    expected = sorted(f"r{i}" for i in range(6))

    # 1. killed between writing the merged part and removing the small ones: rows in both, seen once
    real_rm = out.fs.rm
    calls: list[str] = []

    def rm_then_die(path: str, *args: Any, **kwargs: Any) -> None:
        if calls:
            raise KeyboardInterrupt("killed mid-compaction")
        calls.append(path)
        real_rm(path, *args, **kwargs)

    monkeypatch.setattr(out.fs, "rm", rm_then_die)
    with pytest.raises(KeyboardInterrupt):
        compact_group(out, writer.run_tag)
    monkeypatch.setattr(out.fs, "rm", real_rm)
    assert len(_parts(out)) == 3  # the merged part and two small parts it already holds
    assert sorted(out.read_results()["id"]) == expected

    # 2. a reader that listed the parts before a compaction removed them looks again, misses nothing
    real_open = out.fs.open
    compacted: list[str] = []

    def open_after_compaction(path: str, *args: Any, **kwargs: Any) -> Any:
        if not compacted:  # the reader has listed the parts; a compaction runs before it opens the first
            monkeypatch.setattr(out.fs, "open", real_open)
            compacted.append(str(compact_group(out, writer.run_tag)))
            monkeypatch.setattr(out.fs, "open", open_after_compaction)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(out.fs, "open", open_after_compaction)
    assert sorted(out.read_results()["id"]) == expected
    monkeypatch.setattr(out.fs, "open", real_open)
    assert _parts(out) == [Path(compacted[0]).name]  # the leftovers of step 1 merged, no attempt twice
    assert len(pq.read_table(compacted[0])) == 6


def test_compact_command_merges_todays_layout_one_part_per_day(tmp_path: Path, capsys: Any) -> None:
    out = OutputDir(str(tmp_path / "out"))
    for i in range(6):  # today's version: one part per batch, `part-<ts>-<uuid12>.parquet`, no run in the name
        day = "20240101" if i < 4 else "20240102"
        out.append_results([_row(i, out=out)], name=f"part-{day}T00000{i}000000Z-{i:012x}.parquet")
    older = _row(0, "error", "2023-12-31T00:00:00Z")  # an earlier attempt of r0, in a part of the same day
    out.append_results([older], name="part-20240101T000009000000Z-abcdef012345.parquet")
    before = out.read_results()
    done = out.done_keys()
    assert main(["compact", out.uri]) == 0
    assert "7 results parts -> 2" in capsys.readouterr().out
    parts = _parts(out)
    assert [p[:13] for p in parts] == ["part-20240101", "part-20240102"] and all("-c" in p for p in parts)
    after = out.read_results()
    assert len(after) == len(before) == 7 and out.done_keys() == done == {f"{i:020x}" for i in range(6)}
    assert main(["compact", out.uri]) == 0 and _parts(out) == parts  # nothing left to merge


def test_unreadable_part_is_quarantined_and_its_rows_are_not_done(tmp_path: Path, caplog: Any) -> None:
    out = OutputDir(str(tmp_path / "out"))
    good = out.append_results([_row(0, out=out)])
    bad = out.append_results([_row(1, out=out)])
    Path(bad).write_bytes(Path(bad).read_bytes()[:40])  # a truncated upload
    with caplog.at_level(logging.WARNING, logger="ipa_ops.storage.quarantine"):  # the line every reader logs
        assert out.done_keys() == {f"{0:020x}"}  # its row is not done: the next run makes it again
    lines = [r.getMessage() for r in caplog.records]
    moved = tmp_path / "out" / "results" / "_quarantine" / Path(bad).name
    assert len(lines) == 1 and bad in lines[0] and str(moved) in lines[0] and "unreadable results part" in lines[0]
    assert "\n" not in lines[0] and "will be made again" in lines[0]
    assert moved.is_file() and not Path(bad).exists() and Path(good).exists()
    reason = json.loads((moved.parent / f"{moved.name}.reason.json").read_text())  # as the store's and ledger's
    assert reason["original"] == bad and reason["kind"] == "unreadable" and "Parquet" in reason["reason"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ipa_ops.storage.quarantine"):
        assert list(out.read_results()["id"]) == ["r0"]
    assert not caplog.records  # said once, then gone


def test_a_failed_first_read_of_a_good_part_moves_nothing(tmp_path: Path) -> None:
    """A read cut short (a dropped connection) is told apart from a bad file: the part is read again whole."""
    out = OutputDir(str(tmp_path / "out"))
    path = out.append_results([_row(0, out=out)])
    assert Path(path).stat().st_size > 500  # so the first read is cut
    fs = ShortOnce()  # its first read of each file returns 500 bytes, as a connection cut mid-body would
    table = results_parts.read_part(fs, path)
    assert table is not None and table.column("id").to_pylist() == ["r0"] and fs.short == {path}
    assert Path(path).exists() and not (tmp_path / "out" / "results" / "_quarantine").exists()


@pytest.mark.parametrize("kind", ["newer", "foreign"])
def test_newer_or_foreign_part_is_refused_and_never_rewritten(tmp_path: Path, kind: str) -> None:
    out = OutputDir(str(tmp_path / "out"))
    out.append_results([_row(0)])
    path = tmp_path / "out" / "results" / "part-20300101T000000000000Z-r0123456789ab-000000.parquet"
    if kind == "newer":
        table = results_parts.stamp(pa.table({"id": ["x"], "row_key": ["ab" * 10], "status": ["ok"]}))
        table = table.replace_schema_metadata({results_parts.META_KEY: b"99"})
        message = "results schema version 99 is not one this ipa reads"
    else:
        table = pa.table({"name": ["x"], "value": [1]})
        message = "not an ipa results part"
    pq.write_table(table, path)
    data = path.read_bytes()
    out.append_results([_row(1)], name="part-20300101T000001000000Z-r0123456789ab-000001.parquet")  # same run
    with pytest.raises(ResultsPartRefused, match=message) as caught:
        out.read_results()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert main(["compact", out.uri]) == 2  # refused as a one-line error, not a traceback
    assert path.read_bytes() == data and not (tmp_path / "out" / "results" / "_quarantine").exists()


def test_compaction_quarantines_an_unreadable_part_and_merges_the_rest(tmp_path: Path, caplog: Any) -> None:
    out = OutputDir(str(tmp_path / "out"))
    writer = ResultsWriter(out, rows=1, seconds=3600)
    writer.add([_row(0, out=out)])
    writer.add([_row(1, out=out)])
    writer.add([_row(2, out=out)])
    broken = Path(writer.parts[1])
    broken.write_bytes(b"PAR1 not really")  # no footer: "Parquet magic bytes not found"
    with caplog.at_level(logging.WARNING, logger="ipa_ops.storage.quarantine"):
        merged = writer.close()
    assert _parts(out) == [Path(merged).name] and sorted(out.read_results()["id"]) == ["r0", "r2"]
    assert (tmp_path / "out" / "results" / "_quarantine" / broken.name).is_file()
    assert "unreadable results part" in caplog.text
    assert out.done_keys() == {f"{0:020x}", f"{2:020x}"}  # r1 is made again by the next run
