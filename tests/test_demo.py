"""`ipa demo`: the quick start on the tiny zoo writes one ok row and one PNG per manifest row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from reports import report_text

from ipa_ops.cli import main
from ipa_ops.outputs.folder import OutputDir

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(
    zoo_dir: Path, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "zoo-tiny").symlink_to(zoo_dir)  # the demo's cached zoo is the session's zoo
    monkeypatch.setenv("IPA_CACHE", str(cache))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    manifest = pd.read_csv(REPO / "manifests" / "quickstart.csv")
    assert f"rows ok: {len(manifest)}, failed: 0" in printed
    n = len(manifest)  # progress on stderr, per stage, a plain line when not on a terminal
    assert f"generate: {n}/{n} rows (100%) | ok {n} | errors 0 |" in captured.err
    assert "extract: " in captured.err and "images (100%)" in captured.err
    assert f"report:  {out / 'quickstart' / 'report.html'}" in printed
    results = OutputDir(str(out / "quickstart")).read_results()
    assert sorted(results["id"]) == sorted(manifest["id"]) and set(results["status"]) == {"ok"}
    assert len(list((out / "quickstart" / "images").glob("*/*.png"))) == len(manifest)
    report = report_text(out / "quickstart")
    assert report.count("<img") >= 2 * len(manifest)  # a reference and an output per row
    for prompt in manifest["prompt"]:
        assert prompt in report
