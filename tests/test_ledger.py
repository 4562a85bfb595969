"""The run ledger and scheduled incremental runs: one record per run, only new rows get generated."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from zoo_flows import zoo_flow

from ipa_ops import cli
from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow
from ipa_ops.outputs.ledger import RunRecord, flow_hash, read_ledger, recording
from ipa_ops.runner import run_flow

REPO = Path(__file__).resolve().parents[1]
REFS = REPO / "data" / "refs"


def _partition(root: Path, day: str, ids: list[str]) -> None:
    """One day's new rows, as a scheduler's upstream job would drop them: manifests/date=<day>/rows.csv."""
    refs = [str(REFS / f"ref-{i % 4}.png") for i in range(len(ids))]
    adapters = [json.dumps([{"adapter": "style", "images": [ref], "scale": 0.6}]) for ref in refs]
    folder = root / "manifests" / f"date={day}"
    folder.mkdir(parents=True)
    frame = pd.DataFrame({"id": ids, "prompt": [f"prompt {i}" for i in ids], "seed": range(len(ids))})
    frame.assign(adapters=adapters).to_csv(folder / "rows.csv", index=False)


def _flow(root: Path, zoo: Path, manifest: str) -> Flow:
    return zoo_flow("quickstart", root, zoo, manifest)


def test_scheduled_runs_generate_only_new_rows_and_are_recorded(
    tmp_path: Path, zoo_dir: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _partition(tmp_path, "2026-11-23", ["a", "b"])
    flow = _flow(tmp_path, zoo_dir, str(tmp_path / "manifests" / "date=*") + "/")
    run_flow(flow, ["extract"])
    assert read_ledger(str(tmp_path / "out")) == []  # no generate stage, no output root, no record

    first = run_flow(flow, ["generate"])["generate"]
    second = run_flow(flow, ["generate"])["generate"]
    assert (first["ok"], first["skipped"]) == (2, 0)
    assert (second["ok"], second["skipped"]) == (0, 2)  # two runs in a row: nothing the second time
    _partition(tmp_path, "2026-11-24", ["c"])  # the next night's rows arrive
    third = run_flow(flow, ["generate"])["generate"]
    assert (third["ok"], third["skipped"]) == (1, 2)

    records = read_ledger(str(tmp_path / "out"))
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert [r["counts"]["generate"]["ok"] for r in records] == [2, 0, 1]
    assert [len(r["inputs"]) for r in records] == [1, 1, 2]
    assert records[2]["inputs"][1]["partitions"] == {"date": "2026-11-24"}
    assert records[0]["inputs"][0]["sha256"] == records[2]["inputs"][0]["sha256"]  # the old partition is unchanged
    assert len({r["run_id"] for r in records}) == 3 and all(r["flow_hash"] == flow_hash(flow) for r in records)
    assert all(r["started_at"] < r["finished_at"] and r["seconds"] > 0 for r in records)

    assert cli.main(["runs", "ls", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "ok=1 error=0 skipped=2" in lines[2] and "inputs=2" in lines[2]


def test_a_failed_run_is_recorded_with_its_error(tmp_path: Path, zoo_dir: Path, ray_local: None) -> None:
    flow = _flow(tmp_path, zoo_dir, str(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match="missing.csv"):
        run_flow(flow, ["generate"])
    (record,) = read_ledger(str(tmp_path / "out"))
    assert record["status"] == "failed" and "missing.csv" in record["error"] and "\n" not in record["error"]
    assert record["inputs"] == [] and record["finished_at"]


def test_record_run_id_and_partial_status(tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _partition(tmp_path, "2026-11-23", ["a"])
    flow = _flow(tmp_path, zoo_dir, str(tmp_path / "manifests"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "ipa-x-1"}}))
    assert RunRecord(flow, ["generate"], str(tmp_path / "out"), "m").data["run_id"] == "ipa-x-1"  # the Ray job's id
    monkeypatch.setenv("IPA_RUN_ID", "nightly/2026-11-23")
    results: dict = {}
    with recording(flow, ["generate"], results) as record:
        assert record is not None and record.data["status"] == "running"
        results["generate"] = {"ok": 0, "error": 1, "skipped": 0}
    (entry,) = read_ledger(str(tmp_path / "out"))
    assert entry["run_id"] == "nightly-2026-11-23" and entry["status"] == "partial"
    assert entry["inputs"][0]["partitions"] == {"date": "2026-11-23"}


def test_runs_ls_names_a_missing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", "ls", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nowhere'}: no such output directory") and err.count("\n") == 1
