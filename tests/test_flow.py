"""Flow files: validation messages name the YAML path; CLI validate/schema behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ipa_ops.cli import main
from ipa_ops.flow.spec import FlowError, load_flow

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _quickstart() -> dict:
    return yaml.safe_load((REPO / "flows" / "quickstart.yaml").read_text())


def test_quickstart_parses() -> None:
    flow = load_flow(REPO / "flows" / "quickstart.yaml")
    assert flow.stages.generate is not None and flow.stages.generate.model == "sd15"
    assert flow.adapters["style"].encoder == "vit-h"


def test_misspelled_key_names_path_and_suggestion(tmp_path: Path) -> None:
    data = _quickstart()
    data["stages"]["generate"]["resources"]["batch_sise"] = 4
    with pytest.raises(FlowError) as err:
        load_flow(_write(tmp_path, data))
    assert err.value.problems == [
        "stages.generate.resources.batch_sise: unknown key (did you mean 'batch_size'?); "
        "allowed: actors, batch_size, custom_resources, num_cpus, num_gpus, torch_threads"
    ]


def test_bad_value_names_path_bound_and_value(tmp_path: Path) -> None:
    data = _quickstart()
    data["stages"]["generate"]["resources"]["batch_size"] = 0
    with pytest.raises(FlowError) as err:
        load_flow(_write(tmp_path, data))
    assert err.value.problems == ["stages.generate.resources.batch_size: must be >= 1, got 0"]


def test_unknown_alias_is_reported(tmp_path: Path) -> None:
    data = _quickstart()
    data["adapters"]["style"]["encoder"] = "vit-g"
    with pytest.raises(FlowError) as err:
        load_flow(_write(tmp_path, data))
    assert err.value.problems == ["adapters.style.encoder: unknown alias 'vit-g'; defined: vit-h"]


def test_set_override_is_validated(tmp_path: Path) -> None:
    flow = load_flow(REPO / "flows" / "quickstart.yaml", ["stages.generate.resources.batch_size=3"])
    assert flow.stages.generate is not None and flow.stages.generate.resources.batch_size == 3
    with pytest.raises(FlowError, match=r"stages.generate.resources.actors: must be >= 1, got -1"):
        load_flow(REPO / "flows" / "quickstart.yaml", ["stages.generate.resources.actors=-1"])


def test_validate_cli_reports_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _quickstart()
    data["mirror"] = str(tmp_path / "empty-mirror")
    data["models"]["sd15"]["source"] = "nobody/no-such-model"
    code = main(["validate", str(_write(tmp_path, data))])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert out[0].startswith("models.sd15.source: model 'sd15': nobody/no-such-model not found (looked in path ")
    assert "IPA_MIRROR" in out[0] and "ipa zoo build DIR" in out[0]


def test_validate_cli_rejects_typo_with_nonzero_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _quickstart()
    data["adapterz"] = {}
    assert main(["validate", str(_write(tmp_path, data))]) == 1
    assert capsys.readouterr().out.startswith("adapterz: unknown key (did you mean 'adapters'?)")


def test_schema_is_json_schema_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    resources = schema["$defs"]["GenerateResources"]["properties"]
    assert resources["batch_size"]["description"] == "Rows per actor batch."
    assert schema["additionalProperties"] is False
