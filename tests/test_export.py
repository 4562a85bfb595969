"""`ipa export`: each format read back by the real readers (datasets, webdataset), --where / --limit,
the results view's generic columns and joins, and an export that never looks finished half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image
from zoo_flows import zoo_flow

from ipa_ops.cli import main
from ipa_ops.errors import UserError
from ipa_ops.export.options import ExportOptions
from ipa_ops.export.staging import MANIFEST, is_finished
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.view import WhereError, results_view
from ipa_ops.stages.export import run_export
from ipa_ops.stages.extract import run_extract
from ipa_ops.stages.generate import run_generate

REPO = Path(__file__).resolve().parents[1]
REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
OK_IDS = ["a1", "a2", "a3", "b1", "b2"]


def _adapters(image: str) -> str:
    return json.dumps([{"adapter": "style", "images": [image], "scale": 0.6}])


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path, ray_local: None) -> Path:
    """One quick-start run on the tiny zoo: five ok rows and one error row, reused by every test."""
    root = tmp_path_factory.mktemp("export")
    rows = [
        {"id": rid, "prompt": f"prompt of {rid}", "seed": 10 + i, "adapters": _adapters(REFS[i % 4])}
        for i, rid in enumerate(OK_IDS)
    ]
    rows.append({"id": "bad", "prompt": "x", "seed": 1, "adapters": _adapters(str(REPO / "data" / "nope.png"))})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    flow = zoo_flow("quickstart", root, zoo_dir, manifest, "stages.generate.resources.batch_size=6", steps=2)
    assert flow.stages.extract is not None and flow.stages.generate is not None
    run_extract(flow, flow.stages.extract)
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["error"]) == (5, 1)
    return root / "out"


def _results(out: Path) -> pd.DataFrame:
    return OutputDir(str(out)).read_results().set_index("row_key")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _source_png(out: Path, row: pd.Series) -> np.ndarray:
    return _pixels(Image.open(OutputDir(str(out)).resolve(str(row["outputs"][0]))))


def _export(out: Path, dest: Path, fmt: str, **options: object) -> dict:
    return run_export(str(out), str(dest), ExportOptions(format=fmt, **options))  # type: ignore[arg-type]


def test_imagefolder_loads_with_datasets(run_out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "folder"
    found = _export(run_out, dest, "imagefolder", folder_files=2)
    assert found["rows"] == 5 and is_finished(str(dest))
    folders = sorted(p for p in dest.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["00000", "00001", "00002"]  # 2 + 2 + 1: no folder over folder_files
    assert all(len(list(p.glob("*.png"))) <= 2 and (p / "metadata.parquet").is_file() for p in folders)

    loaded = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train")
    results = _results(run_out)
    assert len(loaded) == 5 and sorted(loaded["id"]) == OK_IDS
    for row in loaded:
        source = results.loc[row["row_key"]]
        assert (row["id"], row["prompt"], row["seed"]) == (source["id"], source["prompt"], source["seed"])
        assert row["provenance"] == source["provenance"] and row["status"] == "ok"
        np.testing.assert_array_equal(_pixels(row["image"]), _source_png(run_out, source))


def test_parquet_loads_with_datasets(run_out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "parquet"
    found = _export(run_out, dest, "parquet", row_group_rows=2, shard_rows=3)  # files of 3 + 2 rows
    names = sorted(p.name for p in dest.glob("*.parquet"))
    assert names == found["files"] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    for name in names:
        meta = pq.ParquetFile(dest / name).metadata
        assert all(meta.row_group(i).num_rows <= 2 for i in range(meta.num_row_groups))
    schema = pq.read_schema(dest / names[0])
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}

    loaded = datasets.load_dataset("parquet", data_files=str(dest / "*.parquet"), split="train")
    results = _results(run_out)
    assert isinstance(loaded.features["image"], datasets.Image)
    assert len(loaded) == 5 and [r["id"] for r in loaded] == OK_IDS  # written order, across files
    for row in loaded:
        source = results.loc[row["row_key"]]
        assert row["prompt"] == source["prompt"] and row["outputs"] == list(source["outputs"])
        np.testing.assert_array_equal(_pixels(row["image"]), _source_png(run_out, source))


def test_webdataset_shards_group_members_by_key(run_out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "wds"
    found = _export(run_out, dest, "webdataset", shard_bytes=1)  # every row closes its shard
    shards = sorted(str(p) for p in dest.glob("*.tar"))
    assert [Path(s).name for s in shards] == [f"{i:05d}.tar" for i in range(5)] == found["files"]
    for shard in shards:
        stats = json.loads(Path(shard.replace(".tar", "_stats.json")).read_text())
        assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (1, 1, 0)
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len({n.split(".")[0] for n in names}) == 1 and sorted(n.split(".")[1] for n in names) == [
            "json",
            "png",
            "txt",
        ]

    results = _results(run_out)
    samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(results.index[results["status"] == "ok"])
    for sample in samples:
        source = results.loc[sample["__key__"]]
        record = sample["json"]
        assert (record["id"], record["row_key"], record["seed"]) == (source["id"], sample["__key__"], source["seed"])
        assert record["outputs"] == list(source["outputs"]) and sample["txt"] == source["prompt"]
        assert pd.Timestamp(record["finished_at"]) == source["finished_at"]
        np.testing.assert_array_equal(_pixels(sample["png"]), _source_png(run_out, source))


def test_where_and_limit_on_the_cli(run_out: Path, tmp_path: Path) -> None:
    def exported(dest: Path) -> list[str]:
        return sorted(pq.read_table(next(dest.glob("*.parquet")), columns=["id"]).column("id").to_pylist())

    where = "status = 'ok' and id like 'a%' and seed > 10"
    assert main(["export", str(run_out), str(tmp_path / "b"), "--format", "parquet", "--where", where]) == 0
    assert exported(tmp_path / "b") == ["a2", "a3"]
    assert main(["export", str(run_out), str(tmp_path / "c"), "--format", "parquet", "--limit", "2"]) == 0
    assert exported(tmp_path / "c") == ["a1", "a2"]  # the first two in written order
    # error rows are never exported: no images; an empty selection is a finished, empty export
    assert _export(run_out, tmp_path / "d", "parquet", where="status = 'error'")["rows"] == 0
    assert is_finished(str(tmp_path / "d")) and not list((tmp_path / "d").glob("*.parquet"))


def test_where_on_joined_columns_and_null_checks(run_out: Path, tmp_path: Path) -> None:
    keys = sorted(_results(run_out).index)
    scores = pa.table({"row_key": keys[:3], "dup_of": [None, keys[0], None], "clip_t": [0.1, 0.2, 0.3]})
    options = ExportOptions(format="parquet", where="dup_of is null and clip_t > 0.05")
    found = run_export(str(run_out), str(tmp_path / "j"), options, extra=[scores])
    table = pq.read_table(tmp_path / "j" / found["files"][0])
    ok = set(_results(run_out).query("status == 'ok'").index)
    assert set(table.column("row_key").to_pylist()) == {keys[0], keys[2]} & ok
    assert "clip_t" in table.column_names and "dup_of" in table.column_names


def test_the_cli_filters_on_the_outputs_own_scores(run_out: Path, tmp_path: Path) -> None:
    import shutil
    from datetime import UTC, datetime

    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.scores import write_score_part

    scored = tmp_path / "scored"
    shutil.copytree(run_out, scored)
    ok = sorted(_results(run_out).query("status == 'ok'").index)
    when = datetime.now(UTC)
    records = [
        {"row_key": key, "id": "x", "scorer": "clip_t@0", "name": "clip_t", "metric": "clip_t", "value": value,
         "scored_at": when}
        for key, value in zip(ok[:2], [0.9, 0.1], strict=True)
    ]  # fmt: skip
    write_score_part(OutputDir(str(scored)), records)
    assert main(["export", str(scored), str(tmp_path / "s"), "--format", "parquet", "--where", "clip_t >= 0.5"]) == 0
    table = pq.read_table(next((tmp_path / "s").glob("*.parquet")), columns=["row_key", "clip_t"])
    assert table.column("row_key").to_pylist() == [ok[0]] and table.column("clip_t").to_pylist() == [0.9]


def test_bad_where_is_one_line_and_leaves_nothing(
    run_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "bad"
    errors = []
    for where in ("stauts = 'ok'", "status = ", "1; select 2", "id in (select * from read_csv('/etc/passwd'))"):
        assert main(["export", str(run_out), str(dest), "--format", "webdataset", "--where", where]) == 2
        errors.append(capsys.readouterr().err.strip())
        assert errors[-1].startswith("error: --where ") and "\n" not in errors[-1], errors[-1]
    assert '"stauts" not found' in errors[0] and "Permission Error" in errors[3]
    assert not dest.exists() and not list(tmp_path.glob(".bad.ipa-export-*"))


def test_failure_half_way_leaves_no_dest(run_out: Path, tmp_path: Path) -> None:
    """A --where that binds but fails on the data (a cast of 'a1' to an integer) fails mid-export."""
    dest = tmp_path / "half"
    with pytest.raises(WhereError, match="Conversion Error"):
        _export(run_out, dest, "imagefolder", where="CAST(id AS INTEGER) > 0")
    assert not dest.exists() and not list(tmp_path.glob(".half.ipa-export-*"))


def test_killed_export_is_not_taken_as_finished(run_out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ipa_ops.cli", "export", str(run_out), str(dest), "--format", "webdataset"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".killed.ipa-export-*/owner.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the export never started staging"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the export and anything it started
        proc.wait()
    assert not dest.exists() and not is_finished(str(dest))
    (stale,) = tmp_path.glob(".killed.ipa-export-*")
    with pytest.raises(Exception):  # noqa: B017 - whatever datasets raises, a half export does not load
        datasets.load_dataset("webdataset", data_files=str(dest / "*.tar"), split="train")

    found = _export(run_out, dest, "webdataset")  # the next export removes the dead one's staging
    assert found["rows"] == 5 and is_finished(str(dest)) and not stale.exists()
    with pytest.raises(UserError, match="exists and is not empty"):
        _export(run_out, dest, "webdataset")
    assert json.loads((dest / MANIFEST).read_text())["rows"] == 5


def _synthetic(root: Path) -> OutputDir:
    """An output whose parts differ in age: nested record columns, a column only newer parts have, a
    key tried twice (error, then ok), and a row whose image a user deleted."""
    out = OutputDir(str(root))
    rows = []
    for i in range(4):
        key = f"{i:020x}"
        image = np.full((8, 8, 3), 40 * i, np.uint8)
        out.write_bytes_atomic(out.image_path(key), lambda f, a=image: Image.fromarray(a).save(f, format="PNG"))
        rows.append(
            {
                "id": f"s{i}",
                "row_key": key,
                "status": "ok",
                "outputs": [out.image_path(key)],
                "seed": i,
                "prompt": f"synthetic {i}",
                "finished_at": "2025-01-01T00:00:00+00:00",
                "x_request": {"width": 8, "adapters": [{"alias": "style", "scale": [0.5, 1.0]}]},
            }
        )
    out.append_results([{**rows[1], "status": "error", "error": "first try failed"}] + rows[2:])
    late = {**rows[1], "finished_at": "2025-01-02T00:00:00+00:00", "x_new": "late"}
    out.append_results([rows[0], late])
    os.remove(out._strip(out.image_path(rows[3]["row_key"])))
    return out


def test_generic_nested_columns_latest_attempt_and_missing_images(tmp_path: Path, ray_local: None) -> None:
    out = _synthetic(tmp_path / "synthetic")
    with results_view(out) as view:
        assert {"x_request", "x_new"} <= set(view.columns)
        table = view.select("status = 'ok'").read_all()
    assert sorted(table.column("id").to_pylist()) == ["s0", "s1", "s2", "s3"]  # s1: its later, ok attempt
    assert pa.types.is_struct(table.schema.field("x_request").type)
    assert table.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")  # as the parts spell it

    found = run_export(out.uri, str(tmp_path / "wds"), ExportOptions(format="webdataset"))
    assert (found["rows"], found["missing_images"]) == (3, 1)
    stats = json.loads((tmp_path / "wds" / "00000_stats.json").read_text())
    assert (stats["successes"], stats["failed_to_download"]) == (3, 1)
    records = {s["__key__"]: s for s in webdataset.WebDataset(str(tmp_path / "wds" / "00000.tar"), shardshuffle=False)}
    record = json.loads(records[f"{1:020x}"]["json"])
    assert record["x_request"] == {"width": 8, "adapters": [{"alias": "style", "scale": [0.5, 1.0]}]}
    assert record["x_new"] == "late" and record["status"] == "ok"

    run_export(out.uri, str(tmp_path / "folder"), ExportOptions(format="imagefolder"))
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "folder"), split="train")
    by_id = {r["id"]: r for r in loaded}
    assert sorted(by_id) == ["s0", "s1", "s2"]
    assert by_id["s1"]["x_request"]["adapters"][0]["scale"] == [0.5, 1.0]
    assert _pixels(by_id["s2"]["image"])[0, 0].tolist() == [80, 80, 80]


def test_view_refuses_bad_extra_tables(tmp_path: Path) -> None:
    out = _synthetic(tmp_path / "synthetic")
    key = f"{0:020x}"
    with pytest.raises(UserError, match="twice"):
        results_view(out, extra=[pa.table({"row_key": [key, key], "clip_t": [0.1, 0.2]})])
    with pytest.raises(UserError, match="already in the results view"):
        results_view(out, extra=[pa.table({"row_key": [key], "seed": [1]})])
    with pytest.raises(UserError, match="no row_key"):
        results_view(out, extra=[pa.table({"key": [key]})])
