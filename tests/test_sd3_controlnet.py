"""SD3.5 ControlNet rows with the IP-Adapter equal diffusers' documented call; a mixed batch equals its rows alone.

The documented call: `StableDiffusion3ControlNetPipeline.from_pipe(<the guide's SD3 IP-Adapter pipeline>,
controlnet=SD3ControlNetModel.from_pretrained(...))` with `ip_adapter_image`, `control_image` and
`controlnet_conditioning_scale`. That pipeline samples the control image's VAE latents from torch's global
RNG, so the reference call is made after `torch.manual_seed(<row seed>)` (what ipa seeds each row's draw
with, `families.sd3.seed_control_latents`). The workspace, zoo and guide helpers are `test_sd3`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_sd3
import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from PIL import Image
from test_sd3 import (
    BATCH_TOL,
    REFS,
    TOL,
    _entry,
    _guide_call,
    _guide_pipe,
    _ours,
    sd3_flow_data,
    workspace,
)
from zoo_flows import REPO, assert_reproduces, outputs_and_calls, validate_lines

from ipa_ops.flow.spec import parse_flow
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.zoo.flux_controlnet import FLUX_CANNY
from ipa_ops.zoo.sd3_controlnet import SD35_CANNY

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU
sd3_zoo = test_sd3.sd3_zoo  # the SD3.5 zoo fixture (this module builds its own copy)

DEPTH = [str(REPO / "data" / "control" / f"depth-{i}.png") for i in range(2)]
SCALE = 0.8  # one controlnet_conditioning_scale per call


def _control(rid: str, seed: int, adapters: list[dict[str, Any]], image: str, scale: float = SCALE) -> dict[str, Any]:
    return {"id": rid, "seed": seed, "adapters": adapters, "task": "controlnet", "control_image": image,
            "controlnet_scale": scale}  # fmt: skip


# other control images, references, scales and schedules, one row without the adapter: one call
CONTROL = [
    _control("cn", 20, [_entry(REFS[:1], 0.5)], REFS[2]),
    _control("cn-depth", 20, [_entry(REFS[:1], 0.5)], DEPTH[0]),  # "cn" but its control image
    _control("cn-window", 21, [_entry(REFS[1:2], {"value": 0.9, "end": 0.5})], REFS[3]),
    _control("cn-strong", 22, [_entry(REFS[2:3], 0.9)], DEPTH[1]),
    _control("cn-none", 23, [], REFS[1]),
]
OTHER_SCALE = _control("cn-half", 20, [_entry(REFS[:1], 0.5)], REFS[2], scale=0.4)  # "cn" at another scale
NO_CFG = {**_control("cn-nocfg", 24, [_entry(REFS[:1], 0.5)], REFS[2]), "guidance_scale": 1.0}  # no [negative; ...]
PLAIN = {"id": "plain", "seed": 20, "adapters": [_entry(REFS[:1], 0.5)]}


def _with_controlnet(source: str) -> dict[str, Any]:
    data = sd3_flow_data()
    data["controlnets"] = {"canny": {"source": source}}
    data["models"]["sd3"]["controlnet"] = "canny"
    return data


@pytest.fixture(scope="module")
def cn(sd3_zoo: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rows = [*CONTROL, OTHER_SCALE, NO_CFG, PLAIN]
    return workspace(sd3_zoo, tmp_path_factory.mktemp("sd3-cn-ws"), rows, _with_controlnet(SD35_CANNY))


def _image(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("rid", ["cn", "cn-nocfg"])
def test_controlnet_row_matches_the_documented_call(cn: dict[str, Any], sd3_zoo: Path, rid: str) -> None:
    """With classifier-free guidance (the control latents of both halves drawn) and without."""
    row = cn["rows"][rid]
    assert (row.guidance_scale > 1) == (rid == "cn")
    controlnet = SD3ControlNetModel.from_pretrained(sd3_zoo / SD35_CANNY, dtype=torch.float32)
    pipe = StableDiffusion3ControlNetPipeline.from_pipe(_guide_pipe(sd3_zoo, 0.5), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)

    def documented(control: str) -> np.ndarray:
        torch.manual_seed(row.seed)  # the control latents' sample: torch's global RNG
        return _guide_call(pipe, row, _image(REFS[0]), control_image=_image(control),
                           controlnet_conditioning_scale=SCALE)  # fmt: skip

    ours = _ours(cn["generator"], row)
    assert np.abs(ours - documented(REFS[2])).max() < TOL
    assert np.abs(ours - documented(DEPTH[0])).max() > 1e-2  # the control image counts
    assert np.abs(ours - _ours(cn["generator"], cn["rows"]["plain"])).max() > 1e-2  # the ControlNet counts


def test_controlnet_rows_share_one_call_and_equal_each_row_alone(cn: dict[str, Any]) -> None:
    generator: Generator = cn["generator"]
    rows = [cn["rows"][r["id"]] for r in CONTROL]
    outs, calls = outputs_and_calls(generator, "sd3", rows)
    assert [o.error for o in outs] == [""] * len(rows)
    assert calls == rows[0].steps  # [negative; positive] of all five rows in one transformer call per step
    for row, out in zip(rows, outs, strict=True):
        assert np.abs(out.image - _ours(generator, row)).max() < BATCH_TOL, row.id
    by_id = {o.id: o.image for o in outs}
    assert np.abs(by_id["cn"] - by_id["cn-depth"]).max() > 1e-2  # each row's own control image, in one batch
    _, two = outputs_and_calls(generator, "sd3", [cn["rows"]["cn"], cn["rows"]["cn-half"]])
    assert two == 2 * rows[0].steps  # one controlnet_conditioning_scale per call


def test_a_call_whose_set_up_fails_leaves_the_pipeline_as_it_was(cn: dict[str, Any]) -> None:
    """The per-row control-latent draw is installed on the shared VAE while the call is set up; a row that
    fails later in the set-up (two uncombined images) must not leave it there for the next call."""
    import copy

    generator: Generator = cn["generator"]
    bad = copy.deepcopy(cn["rows"]["cn"])
    bad.id, bad.adapters[0].embeds = "two-images", torch.cat([bad.adapters[0].embeds] * 2)
    bad.adapters[0].negative = torch.cat([bad.adapters[0].negative] * 2)
    (out,) = generator.generate([bad])
    assert "one image per row" in out.error and "\n" not in out.error
    assert "encode" not in generator.load("sd3").pipe.vae.__dict__  # the stock encode again


def test_row_key_has_the_controlnet_fingerprint_and_the_control_image(
    cn: dict[str, Any], sd3_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    keys = {p.id: p.row_key for p in cn["plans"]}
    assert keys["cn"] != keys["cn-depth"] and keys["cn"] != keys["cn-half"]  # control image, scale
    other = sd3_zoo / "test-controlnets" / "sd35-canny-other"
    if not other.exists():
        controlnet = SD3ControlNetModel.from_pretrained(sd3_zoo / SD35_CANNY, dtype=torch.float32)
        with torch.no_grad():
            controlnet.controlnet_blocks[0].weight.mul_(2.0)
        controlnet.save_pretrained(other)
    data = json.loads(json.dumps(cn["data"]))
    data["controlnets"]["canny"]["source"] = "test-controlnets/sd35-canny-other"
    flow = parse_flow(data)
    assert flow.stages.generate is not None
    plans, errors = plan_manifest(flow, flow.stages.generate)
    moved = {p.id: p.row_key for p in plans}
    assert errors == [] and moved["plain"] == keys["plain"]  # a text2img row does not use the ControlNet
    assert all(moved[r["id"]] != keys[r["id"]] for r in CONTROL)
    assert validate_lines(tmp_path, data, capsys) == ["ok"]


def test_a_controlnet_of_another_family_is_refused_in_one_line(
    cn: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Flux ControlNet on the SD3.5 model: `ipa validate` refuses the flow, and a row run anyway fails alone."""
    data = json.loads(json.dumps(cn["data"]))
    data["controlnets"]["canny"]["source"] = FLUX_CANNY
    line = (
        "controlnets.canny: a FluxControlNetModel runs on flux models, but model 'sd3' is sd3; "
        "set models.sd3.controlnet to the alias of a SD3ControlNetModel folder"
    )
    assert validate_lines(tmp_path, data, capsys) == [line]
    (out,) = Generator(parse_flow(data), device="cpu").generate([cn["rows"]["cn"]])
    assert out.error == f"ValueError: {line}"


def test_controlnet_rows_run_record_and_reproduce(cn: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The generate stage runs the rows; a ControlNet row's record names the ControlNet's fingerprint and its
    control image, and `ipa reproduce` remakes it bit-identically (from the results row and the PNG)."""
    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.stages.generate import run_generate

    flow = cn["flow"]
    generate = flow.stages.generate.model_copy(update={"output": str(tmp_path / "out")})
    counts = run_generate(flow, generate)
    results = {r["id"]: r for r in OutputDir(generate.output).read_results().to_dict("records")}
    assert counts["error"] == 0, [r["error"] for r in results.values()]
    row = results["cn-window"]
    (component,) = row["components"]
    assert (component["kind"], component["alias"]) == ("controlnet", "canny") and component["fingerprint"]
    assert row["control_image"]["uri"] == REFS[3] and row["controlnet_scale"] == SCALE
    monkeypatch.chdir(tmp_path)
    assert_reproduces(generate.output, row, tmp_path, capsys)
