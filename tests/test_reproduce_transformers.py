"""`ipa reproduce` of Flux and SD3.5 rows: each row of a real run is remade bit-identically from its
results row and from its image alone (tests/test_reproduce_families.py does the UNet families).

Flux rows: the guide's call, two references, true CFG (a negative prompt, the black negative image and
a per-row `true_cfg_scale`), img2img and a ControlNet row. SD3.5 rows, under a flow LoRA: the guide's
call, a negative prompt and img2img. Both run through the real extract and generate stages on the family
zoo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from PIL import Image
from zoo_flows import REPO, assert_reproduces

from ipa_ops.flow.spec import parse_flow
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.stages.extract import run_extract
from ipa_ops.stages.generate import run_generate
from ipa_ops.zoo import build_family_zoo
from ipa_ops.zoo.flux_controlnet import FLUX_CANNY

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU

REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
SD3_LORA = "test-loras/sd35-style"  # written into the zoo by `runs`, in diffusers' SD3 LoRA layout


def _entry(adapter: str, images: list[str], scale: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"adapter": adapter, "images": images, "scale": scale, **extra}]


def _flux_rows(black: str) -> list[dict[str, Any]]:
    return [
        {"id": "flux-guide", "seed": 0, "adapters": _entry("xlabs", REFS[:1], 0.7)},
        {"id": "flux-two-refs", "seed": 1, "adapters": _entry("xlabs", REFS[1:3], {"value": 0.9, "end": 0.5}),
         "guidance_scale": 5.0},
        {"id": "flux-true-cfg", "seed": 2, "negative_prompt": "blurry", "true_cfg_scale": 3.0,
         "adapters": _entry("xlabs", REFS[:1], 0.6, negative_images=[black])},
        {"id": "flux-img2img", "seed": 3, "task": "img2img", "init_image": REFS[3], "strength": 0.6,
         "adapters": _entry("xlabs", REFS[2:3], 0.7)},
        {"id": "flux-controlnet", "seed": 4, "task": "controlnet", "control_image": REFS[2], "controlnet_scale": 0.8,
         "adapters": _entry("xlabs", REFS[1:2], 0.7)},
    ]  # fmt: skip


SD3_ROWS: list[dict[str, Any]] = [
    {"id": "sd3-guide", "seed": 0, "adapters": _entry("instantx", REFS[:1], 0.5)},
    {"id": "sd3-negative", "seed": 1, "negative_prompt": "blurry", "adapters": _entry("instantx", REFS[1:2], 0.8)},
    {"id": "sd3-img2img", "seed": 2, "task": "img2img", "init_image": REFS[3], "strength": 0.6, "steps": 4,
     "adapters": _entry("instantx", REFS[2:3], {"value": 0.9, "end": 0.5})},
]  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_zoo(tmp_path_factory.mktemp("dit-zoo"), ("flux", "sd3"))


def _run(name: str, zoo: Path, root: Path, rows: list[dict[str, Any]], **flow: Any) -> dict[str, dict[str, Any]]:
    """flows/<name>.yaml on the zoo over `rows`: extract, then generate; the results rows by id."""
    frame = pd.DataFrame([{"prompt": "a photo of a cat", **r} for r in rows])
    frame["adapters"] = frame["adapters"].map(json.dumps)
    if "steps" in frame:
        frame["steps"] = frame["steps"].astype("Int64")
    frame.to_csv(root / "rows.csv", index=False)
    data = yaml.safe_load((REPO / "flows" / f"{name}.yaml").read_text())
    data.update(mirror=str(zoo), **flow)
    if "controlnets" in flow:
        data["models"][name]["controlnet"] = next(iter(flow["controlnets"]))
    data["stages"]["extract"].update(images=REFS + [str(root / "black.png")], store=str(root / "store"),
                                     resources={"batch_size": 8})  # fmt: skip
    data["stages"]["generate"].update(
        manifest=str(root / "rows.csv"), store=str(root / "store"), output=str(root / "out"),
        defaults={"width": 32, "height": 32, "steps": 2, "guidance_scale": 3.5}, resources={"batch_size": 8},
    )  # fmt: skip
    parsed = parse_flow(data)
    assert parsed.stages.extract is not None and parsed.stages.generate is not None
    run_extract(parsed, parsed.stages.extract)
    counts = run_generate(parsed, parsed.stages.generate)
    results = OutputDir(str(root / "out")).read_results()
    assert counts["error"] == 0, results["error"].tolist()
    return {r["id"]: r for r in results.to_dict("records")}


@pytest.fixture(scope="module")
def runs(zoo: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from ipa_ops.zoo.lora import save_transformer_lora
    from ipa_ops.zoo.sd3 import SD35_REPO

    transformer = SD3Transformer2DModel.from_pretrained(zoo / SD35_REPO / "transformer")
    save_transformer_lora(StableDiffusion3Pipeline, zoo / SD3_LORA, transformer, rank=4, name="sd35-style")
    flux_root, sd3_root = tmp_path_factory.mktemp("flux-run"), tmp_path_factory.mktemp("sd3-run")
    for root in (flux_root, sd3_root):
        Image.new("RGB", (32, 32)).save(root / "black.png")  # FluxPipeline's default negative image
    flux = _run("flux", zoo, flux_root, _flux_rows(str(flux_root / "black.png")),
                controlnets={"canny": {"source": FLUX_CANNY}})  # fmt: skip
    sd3 = _run("sd3", zoo, sd3_root, SD3_ROWS, loras={"style": {"source": SD3_LORA, "weight": 0.8}})
    return {"rows": {**flux, **sd3}, "outputs": {"flux": str(flux_root / "out"), "sd3": str(sd3_root / "out")}}


def test_records_hold_what_the_rows_asked(runs: dict[str, Any]) -> None:
    rows = runs["rows"]
    assert rows["flux-true-cfg"]["true_cfg_scale"] == 3.0 and rows["flux-true-cfg"]["negative_prompt"] == "blurry"
    assert pd.isna(rows["flux-guide"]["true_cfg_scale"])
    assert rows["flux-controlnet"]["task"] == "controlnet" and rows["flux-controlnet"]["model"] == "flux"
    for rid in ("sd3-guide", "sd3-negative", "sd3-img2img"):
        (lora,) = rows[rid]["loras"]
        assert (lora["alias"], lora["weight"]) == ("style", 0.8) and lora["fingerprint"], rid
    assert list(rows["flux-guide"]["loras"]) == []


@pytest.mark.parametrize("rid", [r["id"] for r in _flux_rows("")] + [r["id"] for r in SD3_ROWS])
def test_reproduce_bit_identically(
    runs: dict[str, Any], rid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    row = runs["rows"][rid]
    output = runs["outputs"][rid.split("-")[0]]
    monkeypatch.chdir(tmp_path)
    assert_reproduces(output, row, tmp_path, capsys)
