"""The embedding store: round trips, atomic parts, plain-tool readability, import, CLI."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ipa_ops.cli import main
from ipa_ops.errors import UserError
from ipa_ops.store.dataset import EmbeddingStore, StoreError, build_table, content_key, now, uncond_key, vector_dims
from ipa_ops.store.imports import import_embeddings

ENC = "vit-h@0123456789abcdef"
RNG = np.random.default_rng(0)


def _sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _row(i: int, enc: str = ENC, status: str = "ok", hidden: bool = True, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": content_key(_sha(i), enc), "image_sha256": _sha(i), "source_uri": f"/refs/{i}.png",
        "encoder": enc, "kind": "clip", "status": status, "error": "" if status == "ok" else f"/refs/{i}.png: bad",
        "notes": "", "created_at": now(),
    }  # fmt: skip
    if status == "ok":
        row["image_embeds"] = RNG.standard_normal(8).astype(np.float32)
        if hidden:
            row["hidden_states"] = RNG.standard_normal((5, 6)).astype(np.float32)
            row["hidden_shape"] = [5, 6]
    return {**row, **extra}


def _append(store: EmbeddingStore, rows: list[dict[str, Any]]) -> str:
    dims = vector_dims(rows[0]) or {"image_embeds": 8, "hidden_states": 30}  # error rows carry no vectors
    return store.append(build_table(rows, dims))


def test_round_trip_shapes_and_rows(tmp_path: Path) -> None:
    store = EmbeddingStore(str(tmp_path / "emb"))
    rows = [_row(i) for i in range(3)] + [_row(3, status="error")]
    uncond = {**_row(9), "key": uncond_key(ENC), "image_sha256": ""}
    part = _append(store, rows + [uncond])
    assert Path(part).name.startswith("part-") and part.endswith(".parquet")
    assert store.keys() == {r["key"] for r in rows}  # unconditional row is not an image key
    pooled = store.get([rows[1]["key"], rows[0]["key"]])
    assert [t.shape for t in pooled] == [torch.Size([8])] * 2 and pooled[0].dtype == torch.float32
    assert torch.equal(pooled[0], torch.from_numpy(rows[1]["image_embeds"]))
    hidden = store.get([rows[2]["key"]], field="hidden_states")[0]
    assert hidden.shape == (5, 6) and torch.equal(hidden, torch.from_numpy(rows[2]["hidden_states"]))
    assert torch.equal(store.uncond(ENC, "hidden_states"), torch.from_numpy(uncond["hidden_states"]))
    with pytest.raises(StoreError, match="/refs/3.png: bad"):
        store.get([rows[3]["key"]])
    with pytest.raises(StoreError, match="no row for"):
        store.get([content_key(_sha(99), ENC)])
    info = store.rows([rows[3]["key"], "missing/key"])
    assert list(info["status"]) == ["error", "missing"] and info["error"][0] == "/refs/3.png: bad"


def test_pooled_only_encoder_and_zero_uncond(tmp_path: Path) -> None:
    store = EmbeddingStore(str(tmp_path / "emb"))
    _append(store, [_row(0, enc="light@00", hidden=False)])
    assert torch.equal(store.uncond("light@00"), torch.zeros(8))  # diffusers: zeros_like(image_embeds)
    with pytest.raises(StoreError, match="stores no hidden_states"):
        store.get([content_key(_sha(0), "light@00")], field="hidden_states")


def test_plain_tools_read_an_encoder_folder(tmp_path: Path) -> None:
    store = EmbeddingStore(str(tmp_path / "emb"))
    rows = [_row(i) for i in range(4)]
    _append(store, rows[:2])
    _append(store, rows[2:])
    folder = tmp_path / "emb" / ENC
    (folder / ".part-deadbeef.parquet.tmp").write_bytes(b"PAR1 half a part")  # a killed writer's leftover
    schema = pq.read_schema(next(folder.glob("part-*.parquet")))
    assert schema.field("image_embeds").type == pa.list_(pa.float32(), 8)
    assert schema.field("hidden_states").type == pa.list_(pa.float32(), 30)
    frame = pd.read_parquet(folder)
    assert sorted(frame["key"]) == sorted(r["key"] for r in rows)
    assert np.allclose(
        np.stack(frame.set_index("key").loc[rows[0]["key"], ["image_embeds"]])[0], rows[0]["image_embeds"]
    )
    con = duckdb.connect()
    got = con.execute(f"select key, image_embeds[1] from read_parquet('{folder}/*.parquet') order by key").fetchall()
    assert len(got) == 4 and {k for k, _ in got} == {r["key"] for r in rows}
    assert EmbeddingStore(str(tmp_path / "emb")).keys() == {r["key"] for r in rows}
    assert EmbeddingStore(str(tmp_path / "emb")).stats()["temp_files"] == 1


def test_new_parts_are_seen_and_errors_give_way(tmp_path: Path) -> None:
    reader = EmbeddingStore(str(tmp_path / "emb"))
    writer = EmbeddingStore(str(tmp_path / "emb"))
    _append(writer, [_row(0, status="error")])
    assert reader.rows([content_key(_sha(0), ENC)])["status"][0] == "error"
    _append(writer, [_row(0)])  # a retry that succeeded: the ok row wins over the earlier error
    assert reader.rows([content_key(_sha(0), ENC)])["status"][0] == "ok"
    assert reader.get([content_key(_sha(0), ENC)])[0].shape == (8,)


def test_width_mismatch_is_refused(tmp_path: Path) -> None:
    store = EmbeddingStore(str(tmp_path / "emb"))
    _append(store, [_row(0)])
    wide = _row(1, image_embeds=np.zeros(9, dtype=np.float32))
    with pytest.raises(UserError, match="width 9 but encoder .* stores width 8"):
        _append(store, [wide])


def test_memory_store_writes_whole_objects() -> None:
    store = EmbeddingStore("memory://stores/emb-test")
    _append(store, [_row(0), _row(1)])
    again = EmbeddingStore("memory://stores/emb-test")
    assert len(again.keys()) == 2 and again.stats()["encoders"][ENC]["rows"] == 2


def test_s3_store_and_image_through_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    moto = pytest.importorskip("moto.server")
    server = moto.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("emb-bucket")
        store = EmbeddingStore("s3://emb-bucket/store")
        part = _append(store, [_row(0)])
        assert part.startswith("s3://emb-bucket/store/")
        assert EmbeddingStore("s3://emb-bucket/store").get([content_key(_sha(0), ENC)])[0].shape == (8,)
    finally:
        server.stop()


def _ipadpt(path: Path, obj: Any) -> str:
    torch.save(obj, path)
    return str(path)


def test_import_diffusers_and_comfyui_layouts(tmp_path: Path) -> None:
    uri = str(tmp_path / "emb")
    pooled = torch.randn(2, 3, 8)
    pooled[0] = 0  # negative half first, as prepare_ip_adapter_image_embeds returns it
    hidden = torch.randn(2, 1, 5, 6)
    result = import_embeddings(_ipadpt(tmp_path / "a.ipadpt", [pooled, hidden]), ["light@01", "plus@02"], uri)
    assert result["new"] == 4 and len(result["keys"]) == 4
    store = EmbeddingStore(uri)
    assert torch.equal(store.get(result["keys"][1:2])[0], pooled[1, 1])
    assert torch.equal(store.get(result["keys"][3:], field="hidden_states")[0], hidden[1, 0])
    assert torch.equal(store.uncond("plus@02", "hidden_states"), hidden[0, 0])
    again = import_embeddings(str(tmp_path / "a.ipadpt"), ["light@01", "plus@02"], uri)
    assert again["new"] == 0 and again["stored"] == 4
    comfy = import_embeddings(_ipadpt(tmp_path / "c.ipadpt", torch.randn(2, 8)), ["light@01"], uri)
    assert comfy["new"] == 2
    with pytest.raises(UserError, match="ambiguous; pass --layout"):
        import_embeddings(_ipadpt(tmp_path / "amb.ipadpt", torch.randn(2, 5, 6)), ["plus@02"], uri)
    v1 = import_embeddings(str(tmp_path / "amb.ipadpt"), ["plus@02"], uri, layout="comfyui")
    assert v1["new"] == 2


def test_import_refuses_code_and_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = _ipadpt(tmp_path / "evil.ipadpt", [torch.zeros(2, 1, 4), argparse.Namespace(x=1)])
    code = main(["store", "import", evil, "--encoder", "x@1", "--store", str(tmp_path / "emb")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {evil}: refused: unpickling it would run arbitrary code")
    assert "\n" not in err
    assert not (tmp_path / "emb").exists()


def test_cli_ls_show_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "emb")
    rows = [_row(0), _row(1, status="error")]
    _append(EmbeddingStore(uri), rows)
    assert main(["store", "ls", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[1] for line in out) == ["error", "ok"]
    assert main(["store", "ls", uri, "--encoder", "vit-h", "--status", "error"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert main(["store", "show", uri, rows[0]["key"]]) == 0
    shown = capsys.readouterr().out
    assert "hidden_states: shape [5, 6]" in shown and "status: ok" in shown
    assert main(["store", "stats", uri]) == 0
    assert f"{ENC} (clip): 2 rows (1 error, 1 ok); uncond missing" in capsys.readouterr().out
    assert main(["store", "stats", str(tmp_path / "nothing")]) == 2
    assert "no embedding store here" in capsys.readouterr().err
