"""An example flow pointed at the tiny zoo and a test's own folder: store, manifest, output, small images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ipa_ops.flow.spec import Flow, load_flow

REPO = Path(__file__).resolve().parents[1]


def zoo_flow(
    name: str, root: Path, zoo: Path, manifest: Path | str, *extra: str, steps: int = 2, output: str = "out"
) -> Flow:
    """`flows/<name>.yaml` on the zoo, the repository's reference images, 64x64 images, `steps` steps."""
    return load_flow(
        REPO / "flows" / f"{name}.yaml",
        [
            f"mirror={zoo}",
            f"stages.extract.images={REPO / 'data' / 'refs'}",
            f"stages.extract.store={root / 'store'}",
            f"stages.generate.store={root / 'store'}",
            f"stages.generate.manifest={manifest}",
            f"stages.generate.output={root / output}",
            "stages.generate.defaults.width=64",
            "stages.generate.defaults.height=64",
            f"stages.generate.defaults.steps={steps}",
            *extra,
        ],
    )


def validate_lines(tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """`ipa validate` of a flow given as a dict: its printed lines (`["ok"]` when it passes)."""
    from ipa_ops.cli import main

    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["validate", str(path)])
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line]
    assert (code == 0) == (lines == ["ok"]), lines
    return lines


def run_example_flow(
    name: str, zoo: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`flows/<name>.yaml` validates on `zoo` and runs `manifests/<name>.csv` with every row ok."""
    import pandas as pd

    from ipa_ops.cli import main
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.stages.generate import run_generate

    monkeypatch.setenv("IPA_MIRROR", str(zoo))
    assert main(["validate", str(REPO / "flows" / f"{name}.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    flow = zoo_flow(name, tmp_path, zoo, REPO / "manifests" / f"{name}.csv", f"stages.generate.store={store}")
    assert flow.stages.generate is not None
    run_generate(flow, flow.stages.generate)
    results = OutputDir(str(tmp_path / "out")).read_results()
    manifest = pd.read_csv(REPO / "manifests" / f"{name}.csv")
    assert sorted(results["id"]) == sorted(manifest["id"]) and set(results["status"]) == {"ok"}, results["error"]


def outputs_and_calls(generator: Any, model: str, rows: list[Any]) -> tuple[list[Any], int]:
    """The rows' outputs from one `generate` call, and how many times the model's transformer ran."""
    transformer = generator.load(model).pipe.transformer
    calls: list[int] = []
    hook = transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        outs = generator.generate(rows)
    finally:
        hook.remove()
    return outs, len(calls)


def assert_reproduces(output: str, row: dict[str, Any], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ipa reproduce` remakes a results row bit-identically, from the output folder and from its PNG alone."""
    from ipa_ops.cli import main

    assert main(["reproduce", output, row["row_key"], "--out", str(folder / "a")]) == 0
    said = capsys.readouterr().out
    assert "identical to the original: pixels and bytes" in said, said
    assert (folder / "a" / f"{row['row_key']}.png").read_bytes() == Path(row["outputs"][0]).read_bytes()
    assert main(["reproduce", "--png", row["outputs"][0], "--out", str(folder / "b")]) == 0
    said = capsys.readouterr().out
    assert "identical to the original: pixels and bytes" in said, said
