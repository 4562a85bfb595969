"""Sweeps: a cartesian product with ids that survive re-expansion and growth."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ipa_ops.cli import main
from ipa_ops.errors import UserError
from ipa_ops.flow.spec import load_flow
from ipa_ops.manifest.checks import check_rows
from ipa_ops.manifest.rows import read_manifest, uri_exists
from ipa_ops.manifest.sweep import SweepSpec, expand_sweep, load_sweep

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "manifests" / "sweep-example.yaml"


def _spec(**vary: list) -> SweepSpec:
    base = {"width": 64, "height": 64, "adapters": [{"adapter": "style", "images": ["data/refs/ref-0.png"]}]}
    return SweepSpec(name="s", adapter="style", base=base, vary=vary)


def test_cartesian_product_with_stable_ids() -> None:
    spec = _spec(prompt=["cat", "dog"], seed=[1, 2, 3], scale=[0.5, {"preset": "style"}])
    df = expand_sweep(spec)
    assert len(df) == 12 and df["id"].is_unique and all(i.startswith("s-") for i in df["id"])
    assert list(expand_sweep(spec)["id"]) == list(df["id"])  # re-expanding gives the same ids
    reordered = SweepSpec(name="s", adapter="style", base=spec.base, vary=dict(reversed(spec.vary.items())))
    assert set(expand_sweep(reordered)["id"]) == set(df["id"])  # axis order does not matter
    grown = expand_sweep(_spec(prompt=["cat", "dog", "owl"], seed=[1, 2, 3], scale=[0.5, {"preset": "style"}]))
    assert set(df["id"]) < set(grown["id"]) and len(grown) == 18  # adding a value keeps the old ids
    first = df.iloc[0]
    assert (first["prompt"], first["seed"], first["width"]) == ("cat", 1, 64)
    assert first["adapters"] == [{"adapter": "style", "images": ["data/refs/ref-0.png"], "scale": 0.5}]


def test_reference_and_preset_axes_change_the_target_adapter() -> None:
    df = expand_sweep(_spec(reference=["data/refs/ref-1.png", ["a.png", "b.png"]], scale=[0.8], preset=["style"]))
    assert [row[0]["images"] for row in df["adapters"]] == [["data/refs/ref-1.png"], ["a.png", "b.png"]]
    assert df["adapters"][0][0]["scale"] == {"preset": "style", "value": 0.8}
    assert "reference" not in df.columns and "preset" not in df.columns


def test_spec_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match=r"vary: unknown column\(s\) 'sede' \(did you mean 'seed'\?\)"):
        expand_sweep(_spec(sede=[1]))
    with pytest.raises(UserError, match=r"vary.seed: value 1 appears twice"):
        expand_sweep(_spec(seed=[1, 1]))
    with pytest.raises(UserError, match="need an adapter entry"):
        expand_sweep(SweepSpec(name="s", vary={"scale": [0.5]}))


def test_example_spec_expands_to_a_valid_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep.parquet"
    assert main(["manifest", "sweep", str(EXAMPLE), "-o", str(out)]) == 0
    df = read_manifest(str(out))
    spec = yaml.safe_load(EXAMPLE.read_text())
    sizes = [len(v) for v in spec["vary"].values()]
    assert len(df) == sizes[0] * sizes[1] * sizes[2] * sizes[3]
    assert set(df["id"]) == set(expand_sweep(load_sweep(EXAMPLE))["id"])
    assert set(df["x_experiment"]) == {"sweep-example"}
    flow = load_flow("flows/quickstart.yaml")
    rows, problems = check_rows(df, flow, flow.stages.generate, exists=uri_exists)
    assert problems == [] and len(rows) == len(df)


def test_manifest_show_prints_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "show", str(REPO / "manifests" / "quickstart.csv"), "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "4 rows" in text and "qs-1" in text and "qs-2" in text and "qs-3" not in text
