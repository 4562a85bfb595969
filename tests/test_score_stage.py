"""The score stage end to end on the zoo: flows/scored.yaml scores every row, a rerun scores nothing,
an added scorer runs alone, a planted near-duplicate is found, a cut part is quarantined and its rows
scored again, and `ipa scores` summarises or lists the scores."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageEnhance
from zoo_flows import zoo_flow

from ipa_ops.cli import main
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import read_ledger
from ipa_ops.outputs.scores import read_records, score_summary, scores_table
from ipa_ops.runner import run_flow
from ipa_ops.stages.score import run_score
from ipa_ops.zoo.scorers import CLIP_L

REPO = Path(__file__).resolve().parents[1]
METRICS = {"clip_t", "clip_score", "clip_i_mean", "clip_i_min", "phash", "dup_of", "aesthetic", "nsfw", "nsfw_score"}
FACES = ("encoders.faces={type: insightface, pack: buffalo_l, det_size: 320}", "stages.score.scorers.face_sim={}")


def _flow(root: Path, zoo: Path, *extra: str) -> Any:
    return zoo_flow("scored", root, zoo, REPO / "manifests" / "quickstart.csv", "stages.score.resources.batch_size=3",
                    *extra, steps=2)  # fmt: skip


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, scorer_zoo: Path, ray_local: None) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scored")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the manifest's references are relative to the project
        torch.set_num_threads(1)
        results = run_flow(_flow(root, scorer_zoo))
    return root, results


def test_every_row_is_scored_on_its_png(scored: tuple[Path, dict], scorer_zoo: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    root, results = scored
    assert results["generate"]["ok"] == 4
    assert results["score"]["scored"] == {n: 4 for n in ("clip_t", "clip_i", "phash", "aesthetic", "nsfw")}
    table = scores_table(str(root / "out"))
    assert len(table) == 4 and METRICS <= set(table.columns)
    numeric = sorted(METRICS - {"phash", "dup_of"})
    assert table[numeric].notna().all().all() and table["phash"].notna().all()
    assert table["dup_of"].isna().all()  # four different images
    index = (root / "out" / "report.html").read_text()  # the score stage rebuilt the report's index
    assert "clip_t: n=4" in index and (root / "out" / "report" / "worst-clip_t" / "page-00001.html").is_file()
    # clip_t recomputed from the PNG files as written, with CLIPModel's own forward
    results_rows = OutputDir(str(root / "out")).read_results().set_index("row_key")
    model, processor = CLIPModel.from_pretrained(scorer_zoo / CLIP_L).eval(), CLIPProcessor.from_pretrained(
        scorer_zoo / CLIP_L)  # fmt: skip
    images = [Image.open(results_rows.loc[k, "outputs"][0]).convert("RGB") for k in table["row_key"]]
    prompts = [results_rows.loc[k, "prompt"] for k in table["row_key"]]
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
        cos = (out.logits_per_image / model.logit_scale.exp()).diagonal().numpy()
    assert np.allclose(table["clip_t"], cos, atol=1e-5)


def test_rerun_scores_nothing_and_an_added_scorer_runs_alone(scored: tuple[Path, dict], scorer_zoo: Path) -> None:
    root, _ = scored
    flow = _flow(root, scorer_zoo)
    parts = sorted((root / "out" / "scores").glob("part-*.parquet"))
    again = run_flow(flow, ["score"])["score"]
    assert again["scored_rows"] == 0 and again["dup_of"] == 0
    assert sorted((root / "out" / "scores").glob("part-*.parquet")) == parts
    last = read_ledger(str(root / "out"))[-1]  # a score-only run is recorded in the output's ledger
    assert last["stages"] == ["score"] and last["status"] == "ok" and last["counts"]["score"]["scored_rows"] == 0
    with_faces = _flow(root, scorer_zoo, *FACES)
    added = run_score(with_faces, with_faces.stages.score)
    assert added["scored"] == {"clip_t": 0, "clip_i": 0, "face_sim": 4, "phash": 0, "aesthetic": 0, "nsfw": 0}
    table = scores_table(str(root / "out"))
    assert table["no_face"].notna().all() and table["face_sim"].isna().all()  # no face adapter in these rows


def _plant_unreadable(out: OutputDir) -> str:
    """A results row whose PNG is cut: it must fail alone, with one error record per scorer."""
    key = "e" * 20
    path = out.write_bytes_atomic(out.image_path(key), b"\x89PNG but cut")
    out.append_results([{"id": "cut-png", "row_key": key, "status": "ok", "outputs": [path], "prompt": "x",
                         "seed": 1, "finished_at": pd.Timestamp.now(tz="UTC")}])  # fmt: skip
    return key


def test_a_planted_near_duplicate_is_found_and_a_bad_image_fails_alone(
    scored: tuple[Path, dict], scorer_zoo: Path
) -> None:
    root, _ = scored
    out = OutputDir(str(root / "out"))
    bad_key = _plant_unreadable(out)
    rows = out.read_results()
    original = rows.iloc[1]
    copy_key = "f" * 20
    image = ImageEnhance.Brightness(Image.open(original["outputs"][0]).convert("RGB")).enhance(1.03)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = out.write_bytes_atomic(out.image_path(copy_key), buf.getvalue())
    now = pd.Timestamp.now(tz="UTC")
    out.append_results([{"id": "planted", "row_key": copy_key, "status": "ok", "outputs": [path],
                         "prompt": original["prompt"], "seed": 1, "finished_at": now}])  # fmt: skip
    flow = _flow(root, scorer_zoo)
    found = run_score(flow, flow.stages.score)
    assert found["scored_rows"] == 2 and found["dup_of"] == 1 and found["errors"] == 1
    assert set(found["scored"].values()) == {1}  # the copy, by every scorer; the bad row by none
    table = scores_table(out).set_index("row_key")
    assert table.loc[copy_key, "dup_of"] == original["row_key"]
    assert table.drop(index=copy_key)["dup_of"].isna().all()
    errors = read_records(out)
    errors = errors[(errors["row_key"] == bad_key) & (errors["metric"] == "error")]
    assert len(errors) == 5 and all(t.startswith("row cut-png: ") for t in errors["text"])
    assert bad_key not in table.index  # an error is not a score


def test_a_cut_scores_part_is_quarantined_and_its_rows_scored_again(scored: tuple[Path, dict], scorer_zoo: Path):
    root, _ = scored
    folder = root / "out" / "scores"
    before = read_records(str(root / "out"))
    part = max(folder.glob("part-*.parquet"), key=lambda p: p.stat().st_size)
    lost = pd.read_parquet(part)
    part.write_bytes(part.read_bytes()[:100])
    flow = _flow(root, scorer_zoo)
    again = run_score(flow, flow.stages.score)
    assert list((folder / "_quarantine").glob("*.reason.json"))
    lost_pairs = lost.loc[lost["metric"] != "dup_of", ["row_key", "scorer"]].drop_duplicates()
    lost_keys = set(lost_pairs["row_key"]) | {"e" * 20}  # the unreadable row planted above is tried again
    assert again["scored_rows"] == len(lost_keys) and again["errors"] == 1
    after = read_records(str(root / "out"))
    assert set(zip(after["row_key"], after["metric"], strict=True)) == set(
        zip(before["row_key"], before["metric"], strict=True))  # fmt: skip


def test_ipa_scores_summary_and_rows(scored: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = scored
    assert main(["scores", str(root / "out"), "--below", "aesthetic=100"]) == 0
    text = capsys.readouterr().out
    assert "clip_i_min" in text and "aesthetic" in text and "below" in text
    summary = score_summary(scores_table(str(root / "out")), {"aesthetic": 100}).set_index("metric")
    assert summary.loc["aesthetic", "below"] == summary.loc["aesthetic", "count"] == 5  # all below 100
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["aesthetic"])
    assert line.split()[1] == "5" and " 5 " in line[line.index("100"):]
    assert main(["scores", str(root / "out"), "--rows"]) == 0
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(rows.columns[:2]) == ["row_key", "id"] and METRICS <= set(rows.columns)
    table = scores_table(str(root / "out"))
    assert np.allclose(rows.sort_values("row_key")["clip_t"], table["clip_t"], atol=1e-5)
    assert json.dumps(sorted(rows["id"])) == json.dumps(sorted(table["id"]))


def test_faceid_flow_scores_every_row(tmp_path: Path, zoo_dir: Path, ray_local: None) -> None:
    manifest = tmp_path / "faceid.csv"
    pd.read_csv(REPO / "manifests" / "faceid.csv").head(1).to_csv(manifest, index=False)  # the FaceID row
    flow = zoo_flow("faceid", tmp_path, zoo_dir, manifest, f"stages.extract.images={REPO / 'data' / 'faces'}",
                    "stages.extract.encoders=[faces]", steps=1)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        results = run_flow(flow)
    assert results["generate"]["ok"] == 1 and results["score"]["scored"] == {"face_sim": 1}
    table = scores_table(str(tmp_path / "out"))
    assert len(table) == 1 and table["no_face"].notna().all() and table["face_count"].notna().all()


def test_clip_i_reads_references_from_the_store(
    scored: tuple[Path, dict], scorer_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipa_ops.scores import ScoreContext, ScoreItem, build_scorers

    root, _ = scored
    monkeypatch.chdir(REPO)  # the results' reference paths are relative to the project
    flow = _flow(root, scorer_zoo)
    (scorer,) = [s for s in build_scorers(ScoreContext(flow, str(root / "store")), flow.stages.score.scorers)
                 if s.name == "clip_i"]  # fmt: skip
    scorer.ensure_loaded()
    encoded: list[int] = []
    encode = scorer.encoder.encode
    monkeypatch.setattr(scorer.encoder, "encode", lambda images: encoded.append(len(images)) or encode(images))
    rows = OutputDir(str(root / "out")).read_results()
    latest_rows = rows[rows["id"].str.startswith("qs-")]
    items = [ScoreItem(r.row_key, r.id, r.prompt, Image.open(r.outputs[0]).convert("RGB"), list(r.references))
             for r in latest_rows.itertuples()]  # fmt: skip
    got = scorer.score(items)
    assert encoded == [len(items)]  # one batch of outputs; no reference was encoded again
    table = scores_table(str(root / "out")).set_index("row_key")
    for item, values in zip(items, got, strict=True):
        assert values["clip_i_mean"] == pytest.approx(table.loc[item.row_key, "clip_i_mean"], abs=1e-6)

