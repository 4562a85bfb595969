"""`ipa schedule`: the effective scales it prints are the generator's, named as diffusers names the layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ipa_ops.cli import main
from ipa_ops.flow.schedules import NoiseLevels, parse_schedule
from ipa_ops.flow.spec import load_flow
from ipa_ops.generate.families.base import effective, layer_scales
from ipa_ops.generate.generator import Generator

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _printed(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "spec",
    [
        {"weight_type": "composition precise", "value": 0.7, "composition_boost": 0.3, "curve": "ease_out"},
        {"preset": "style", "value": 0.9, "end": 0.5},
        {"weight_type": "ease in-out", "start_at": 0.25, "end_at": 0.9},
    ],
)
def test_schedule_prints_the_generators_scales(
    zoo_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, spec: dict
) -> None:
    monkeypatch.setenv("IPA_MIRROR", str(zoo_dir))
    flow_file = str(REPO / "flows" / "quickstart.yaml")
    found = _printed(capsys, "schedule", flow_file, "--adapter", "style", "--steps", "6", json.dumps(spec))
    loaded = Generator(load_flow(flow_file), device="cpu").load("sd15")
    pipe, names = loaded.pipe, loaded.layer_names
    pipe.scheduler.set_timesteps(6)
    steps = len(pipe.scheduler.timesteps)
    noise = NoiseLevels.of(pipe.scheduler.timesteps.numpy(), pipe.scheduler.alphas_cumprod.numpy())
    parsed = parse_schedule(spec)
    expected = effective(loaded.family, parsed, pipe, names, steps, noise)
    assert [layer["name"] + ".processor" for layer in found["layers"]] == names
    np.testing.assert_allclose([layer["scales"] for layer in found["layers"]], expected, atol=1e-8)
    swapped = layer_scales(loaded.family, parsed, pipe, names)[1]
    assert [bool(layer.get("unconditional_side")) for layer in found["layers"]] == swapped.tolist()
    assert found["family"] == "sd15" and found["steps"] == 6 and len(found["timesteps"]) == steps
    assert np.ptp(expected) > 0  # the spec really varies


def test_schedule_names_a_bad_spec(
    zoo_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IPA_MIRROR", str(zoo_dir))
    flow_file = str(REPO / "flows" / "quickstart.yaml")
    assert main(["schedule", flow_file, "--adapter", "style", "--steps", "4", '{"weight_type": "ease_in"}']) == 2
    err = capsys.readouterr().err
    assert "unknown weight_type 'ease_in' (ComfyUI's names, verbatim)" in err and err.count("\n") == 1
    assert main(["schedule", flow_file, "--adapter", "nope", "--steps", "4", "0.5"]) == 2
    assert "--adapter: 'nope' is not in the flow's adapters (style)" in capsys.readouterr().err
