"""Corrupt, foreign and newer-schema files in the store and the ledger; `ipa doctor` (local and S3).

Faults are injected as a full disk or an interrupted copy leaves them: a real part cut to 500
bytes, a Parquet file of someone else's columns dropped into an encoder folder, a part stamped
with a future schema version, a ledger record cut mid-way and a JSON file that is no record.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from test_s3 import BUCKET, s3  # noqa: F401 - the loopback moto server fixture

from ipa_ops.cli import main
from ipa_ops.outputs.ledger import read_ledger
from ipa_ops.storage.quarantine import NewerSchema
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now, vector_dims
from ipa_ops.store.health import VERSION_KEY, read_part

ENC = "vit-h@0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def _rows(start: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        sha = hashlib.sha256(f"image-{i}".encode()).hexdigest()
        out.append({"key": content_key(sha, ENC), "image_sha256": sha, "source_uri": f"/refs/{i}.png",
                    "encoder": ENC, "kind": "clip", "status": "ok", "error": "", "notes": "", "created_at": now(),
                    "image_embeds": rng.standard_normal(8).astype(np.float32)})  # fmt: skip
    return out


def _part(store: EmbeddingStore, rows: list[dict[str, Any]]) -> str:
    return store.append(build_table(rows, vector_dims(rows[0])))


def _truncate(path: str, keep: int = 500) -> None:
    with fsspec.open(path, "rb") as f:
        data = f.read()
    with fsspec.open(path, "wb") as f:
        f.write(data[:keep])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_truncated_store_part_is_moved_aside_and_the_rest_reads(tmp_path: Path, caplog: Any) -> None:
    uri = str(tmp_path / "emb")
    writer = EmbeddingStore(uri)
    bad, good = _rows(0, 3), _rows(3, 2)
    cut = Path(_part(writer, bad))
    cut = cut.rename(cut.with_name("part-0000.parquet"))  # sorts first: the folder's schema comes from another part
    _part(writer, good)
    _truncate(str(cut))
    with caplog.at_level(logging.WARNING, logger="ipa_ops.storage.quarantine"):
        store = EmbeddingStore(uri)
        assert store.keys() == {r["key"] for r in good}  # the rest reads; the cut part's rows are simply missing
        _part(store, _rows(10, 1))  # and the store takes new parts (schema from a part that reads)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(cut) in lines[0] and "magic bytes" in lines[0]
    moved = tmp_path / "emb" / "_quarantine" / ENC / "part-0000.parquet"
    assert not cut.exists() and moved.stat().st_size == 500
    reason = json.loads(moved.with_name("part-0000.parquet.reason.json").read_text())
    assert reason["original"] == str(cut) and reason["kind"] == "unreadable" and "Parquet" in reason["reason"]
    assert len(EmbeddingStore(uri).keys()) == 3  # a later reader sees no trace of it (and moves nothing)


def test_foreign_part_is_moved_aside(tmp_path: Path) -> None:
    uri = str(tmp_path / "emb")
    _part(EmbeddingStore(uri), _rows(0, 2))
    stray = tmp_path / "emb" / ENC / "part-stray.parquet"
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(stray)
    assert len(EmbeddingStore(uri).keys()) == 2
    reason = json.loads((tmp_path / "emb" / "_quarantine" / ENC / "part-stray.parquet.reason.json").read_text())
    assert reason["kind"] == "foreign" and "no column key" in reason["reason"] and not stray.exists()


def test_newer_schema_part_is_refused_and_never_touched(tmp_path: Path) -> None:
    uri = str(tmp_path / "emb")
    store = EmbeddingStore(uri)
    path = _part(store, _rows(0, 2))
    table = pq.read_table(path)
    newer = table.replace_schema_metadata({**table.schema.metadata, VERSION_KEY: b"2"})
    future = tmp_path / "emb" / ENC / "part-future.parquet"
    pq.write_table(newer, future)
    before = _tree(tmp_path / "emb")
    with pytest.raises(NewerSchema, match=r"part-future\.parquet: written with store schema 2; .* upgrade ipa"):
        EmbeddingStore(uri).keys()
    with pytest.raises(NewerSchema):  # nor does it append next to it
        _part(EmbeddingStore(uri), _rows(5, 1))
    assert _tree(tmp_path / "emb") == before


def test_bad_ledger_records_are_moved_aside_and_the_rest_read(tmp_path: Path, capsys: Any) -> None:
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    good = {"run_id": "r1", "status": "ok", "started_at": "2026-12-01T00:00:00+00:00"}
    (runs / "20261201T000000Z-r1.json").write_text(json.dumps(good))
    (runs / "20261201T010000Z-r2.json").write_text(json.dumps({**good, "run_id": "r2"})[:30])  # cut by a full disk
    (runs / "20261201T020000Z-r3.json").write_text("[1, 2, 3]")  # JSON, but no record
    assert main(["runs", "ls", str(tmp_path / "out")]) == 0  # what a person looks at first: no traceback
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r1\tok\t")
    assert [r["run_id"] for r in read_ledger(str(tmp_path / "out"))] == ["r1"]
    moved = tmp_path / "out" / "_quarantine" / "runs"
    assert sorted(p.name for p in moved.glob("*.json") if not p.name.endswith(".reason.json")) == [
        "20261201T010000Z-r2.json",
        "20261201T020000Z-r3.json",
    ]
    reasons = {p.name: json.loads(p.read_text())["kind"] for p in moved.glob("*.reason.json")}
    assert sorted(reasons.values()) == ["foreign", "unreadable"]
    assert [p.name for p in runs.iterdir()] == ["20261201T000000Z-r1.json"]


def test_doctor_lists_without_changing_and_fix_quarantines(tmp_path: Path, capsys: Any) -> None:
    uri = str(tmp_path / "emb")
    store = EmbeddingStore(uri)
    cut = _part(store, _rows(0, 2))
    _part(store, _rows(2, 2))
    table = pq.read_table(_part(store, _rows(4, 1)))
    _truncate(cut)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"7"}), tmp_path / "emb" / ENC / "part-future.parquet")
    before = _tree(tmp_path / "emb")
    assert main(["doctor", uri]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert _tree(tmp_path / "emb") == before  # looking changes nothing
    assert any(line.startswith(f"{cut}: unreadable: ") and "--fix" in line for line in out)
    assert any("part-future.parquet: newer: written with store schema 7" in line for line in out)
    assert out[-1].endswith("store: 4 file(s); 2 problem(s), 0 moved aside")

    assert main(["doctor", uri, "--fix"]) == 1  # the newer part is still there: it needs a newer ipa, not a move
    out = capsys.readouterr().out
    assert f"moved to {tmp_path / 'emb' / '_quarantine' / ENC}" in out and not Path(cut).exists()
    assert (tmp_path / "emb" / ENC / "part-future.parquet").exists()

    out_dir = tmp_path / "out"
    (out_dir / "runs").mkdir(parents=True)
    (out_dir / "runs" / "x.json").write_text('{"run_id": "x", "sta')
    assert main(["doctor", str(out_dir)]) == 1 and "x.json: unreadable:" in capsys.readouterr().out
    assert main(["doctor", str(out_dir), "--fix"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(out_dir)]) == 0 and "ledger: 0 file(s); no problems" in capsys.readouterr().out


def test_doctor_names_a_folder_it_does_not_know(tmp_path: Path, capsys: Any) -> None:
    assert main(["doctor", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "neither an embedding store nor an output" in err[0]


class ShortOnce(LocalFileSystem):
    """A filesystem whose first read of each file returns 500 bytes, as a connection cut mid-body would."""

    cachable = False  # a fresh instance per test: fsspec would otherwise hand back one with `short` filled

    def __init__(self) -> None:
        super().__init__()
        self.short: set[str] = set()

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode == "rb" and path not in self.short:
            self.short.add(path)
            import io

            with super().open(path, "rb") as f:
                return io.BytesIO(f.read()[:500])
        return super().open(path, mode, **kwargs)


def test_a_part_that_reads_short_once_is_not_moved(tmp_path: Path) -> None:
    path = _part(EmbeddingStore(str(tmp_path / "emb")), _rows(0, 3))
    table, problem = read_part(ShortOnce(), path, str(tmp_path / "emb"), lambda pf: pf.read())
    assert problem is None and table is not None and table.num_rows == 3  # re-read whole: it was the transfer
    assert Path(path).exists() and not (tmp_path / "emb" / "_quarantine").exists()


def test_doctor_and_readers_on_s3(s3: Any, capsys: Any) -> None:  # noqa: F811 - the fixture imported above
    uri = f"s3://{BUCKET}/doctor/emb"
    store = EmbeddingStore(uri)
    cut = _part(store, _rows(0, 2))
    _part(store, _rows(2, 3))
    _truncate(cut)
    s3.invalidate_cache()
    assert main(["doctor", uri]) == 1
    out = capsys.readouterr().out
    assert f"{cut}: unreadable: " in out and s3.exists(cut)
    assert main(["doctor", uri, "--fix"]) == 0
    s3.invalidate_cache()
    moved = f"{BUCKET}/doctor/emb/_quarantine/{ENC}/{cut.rsplit('/', 1)[1]}"
    assert not s3.exists(cut) and s3.exists(moved) and s3.exists(moved + ".reason.json")
    assert len(EmbeddingStore(uri).keys()) == 3

    out_uri = f"s3://{BUCKET}/doctor/out"
    s3.pipe_file(f"{BUCKET}/doctor/out/runs/a.json", b'{"run_id": "a", "status": "ok", "started_at": "t"}')
    s3.pipe_file(f"{BUCKET}/doctor/out/runs/b.json", b'{"run_id": "b", "st')
    assert [r["run_id"] for r in read_ledger(out_uri)] == ["a"]  # the reader itself moves the bad one aside
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/doctor/out/_quarantine/runs/b.json")
    assert main(["doctor", out_uri]) == 0


def test_extract_after_a_store_part_is_cut_remakes_its_rows(tmp_path: Path, zoo_dir: Path, ray_local: None) -> None:
    from zoo_flows import zoo_flow

    from ipa_ops.stages.extract import run_extract

    flow = zoo_flow("quickstart", tmp_path, zoo_dir, REPO / "manifests" / "quickstart.csv")
    stage = flow.stages.extract
    assert stage is not None
    run_extract(flow, stage, commit_rows=2)  # several parts
    before = EmbeddingStore(stage.store).keys()
    parts = sorted((tmp_path / "store").glob("*/part-*.parquet"))
    assert len(before) == 4 and len(parts) >= 2
    lost = set(pq.read_table(parts[0], columns=["key"]).column("key").to_pylist()) & before
    _truncate(str(parts[0]))
    again = run_extract(flow, stage)  # the extract stage itself meets the cut part first
    assert again["vit-h"]["new"] == len(lost) and again["vit-h"]["stored"] == 4 - len(lost)
    live = sorted((tmp_path / "store").glob("*/part-*.parquet"))
    keys = [k for p in live for k in pq.read_table(p, columns=["key"]).column("key").to_pylist() if "/" in k]
    image_keys = [k for k in keys if not k.startswith("uncond/")]
    assert sorted(image_keys) == sorted(before)  # every image once: the lost rows made again, nothing twice
    assert list((tmp_path / "store" / "_quarantine").glob("*/part-*.parquet.reason.json"))
