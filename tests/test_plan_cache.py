"""A rerun recognises unchanged rows without planning them again, and only those: a changed row,
a changed file its key hashed, or a changed flow plans again; keys always equal a full plan's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from zoo_flows import zoo_flow

from ipa_ops.flow.spec import Flow
from ipa_ops.generate import manifest_plan
from ipa_ops.generate.manifest_plan import plan_manifest, plan_rows


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def planned(zoo_dir: Path, tmp_path: Path) -> tuple[Flow, Path, list[dict]]:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(init)
    rows = [{"id": f"t{i}", "prompt": f"prompt {i}", "seed": i} for i in range(6)]
    rows += [{"id": "i0", "prompt": "edit", "seed": 9, "task": "img2img", "init_image": str(init)}]
    manifest = tmp_path / "m.jsonl"
    _write(manifest, rows)
    return zoo_flow("quickstart", tmp_path, zoo_dir, manifest), manifest, rows


def _count_planned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = manifest_plan.plan_row

    def counting(row, *args, **kwargs):  # the real planner, counted
        seen.append(row.id)
        return real(row, *args, **kwargs)

    monkeypatch.setattr(manifest_plan, "plan_row", counting)
    return seen


def test_done_rows_are_skipped_without_planning(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    flow, manifest, rows = planned
    stage = flow.stages.generate
    full = {p.id: p.row_key for p in plan_manifest(flow, stage)[0]}
    first = plan_rows(flow, stage, reuse=True, done=lambda keys: set())  # nothing done yet: all planned
    assert first.skipped == 0 and {p.id: p.row_key for p in first.plans} == full
    assert len(list((Path(stage.output) / "_plans").glob("*.parquet"))) == 2  # rows and their files

    seen = _count_planned(monkeypatch)
    done_keys = set(full.values()) - {full["t1"]}  # every row done but t1 (its image was deleted)
    asked: list[set[str]] = []
    again = plan_rows(flow, stage, reuse=True, done=lambda keys: asked.append(keys) or keys & done_keys)
    assert asked == [set(full.values())]  # done-detection asked once, for the known keys
    assert again.skipped == 6 and seen == ["t1"] and [p.row_key for p in again.plans] == [full["t1"]]

    rows[2]["prompt"] = "a changed prompt"  # an edited row is planned again, the others are still known
    _write(manifest, rows)
    seen.clear()
    edited = plan_rows(flow, stage, reuse=True, done=lambda keys: keys)
    assert seen == ["t2"] and edited.skipped == 6
    assert edited.plans[0].row_key == {p.id: p.row_key for p in plan_manifest(flow, stage)[0]}["t2"]


def test_a_changed_file_or_flow_plans_every_row_again(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    flow, manifest, rows = planned
    stage = flow.stages.generate
    plan_rows(flow, stage, reuse=True, done=lambda keys: set())
    seen = _count_planned(monkeypatch)
    assert plan_rows(flow, stage, reuse=True, done=lambda keys: keys).skipped == 7 and seen == []

    init = Path(rows[-1]["init_image"])
    Image.new("RGB", (64, 64), (99, 20, 30)).save(init)  # edited in place: its key changes
    os.utime(init, ns=(1, 1))
    redo = plan_rows(flow, stage, reuse=True, done=lambda keys: keys)
    assert redo.skipped == 0 and len(seen) == 7
    new_key = next(p.row_key for p in redo.plans if p.id == "i0")
    assert new_key == next(p.row_key for p in plan_manifest(flow, stage)[0] if p.id == "i0")

    seen.clear()
    other = flow.model_copy(deep=True)
    other.stages.generate.defaults.steps = 3  # a flow change that changes every key
    assert plan_rows(other, other.stages.generate, reuse=True, done=lambda keys: keys).skipped == 0
    assert len(seen) == 7


def test_validate_reuses_known_rows_and_still_finds_repeated_ids(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    flow, manifest, rows = planned
    stage = flow.stages.generate
    plan_rows(flow, stage, reuse=True, done=lambda keys: set())
    seen = _count_planned(monkeypatch)
    assert manifest_plan.manifest_problems(flow, str(manifest)) == [] and seen == []
    _write(manifest, [*rows, rows[0]])  # the same row twice: known, but a repeated id
    problems = manifest_plan.manifest_problems(flow, str(manifest))
    assert len(problems) == 1 and "duplicate id" in problems[0] and "t0" in problems[0]
