"""`ipa reproduce` beyond SD1.5 with CLIP adapters: SDXL rows, FaceID rows (FaceID, FaceID-Plus v2),
rows with a flow LoRA, ComfyUI controls (image weights, embeds scaling), and inputs given as paths
relative to the run's working folder.

Two runs over the store test_sdxl / test_faceid share (faces_ws): SDXL (text2img, img2img with an
adapter mask, FaceID-SDXL) and SD1.5 with the LCM LoRA (a CLIP adapter, FaceID, FaceID-Plus v2 with
its shortcut scale, a CLIP adapter with ComfyUI controls). The runs start in their own folder with
relative input paths; every row is then remade from another folder, from its results row and from
its image alone, bit-identically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import faces_ws
import numpy as np
import pandas as pd
import pytest
from faces_ws import FACEID, H94, REPO
from PIL import Image
from zoo_flows import assert_reproduces

from ipa_ops.cli import main
from ipa_ops.generate.records import for_image
from ipa_ops.outputs.files import encode_outputs
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.records.metadata import read_record
from ipa_ops.stages.generate import run_generate

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest: tiny models, shared CPU

LCM = "latent-consistency/lcm-lora-sdv1-5"
XL_ADAPTERS = {
    "sdxl": {"source": H94, "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.bin", "encoder": "bigg"},
    "faceid-xl": {"source": FACEID, "weight_name": "ip-adapter-faceid_sdxl.bin", "encoder": "faces"},
}
SD15_ADAPTERS = {
    "style15": {"source": H94, "subfolder": "models", "weight_name": "ip-adapter_sd15.bin", "encoder": "vit-h"},
    "faceid": {"source": FACEID, "weight_name": "ip-adapter-faceid_sd15.bin", "encoder": "faces"},
    "plusv2": {"source": FACEID, "weight_name": "ip-adapter-faceid-plusv2_sd15.bin", "encoder": "faces",
               "clip_encoder": "laion", "shortcut_scale": 0.9},
}  # fmt: skip
INIT, MASK = "inputs/init.png", "inputs/left.png"  # relative to the folder the runs start in


def _entry(adapter: str, images: list[str], scale: float, **extra: Any) -> list[dict[str, Any]]:
    return [{"adapter": adapter, "images": images, "scale": scale, **extra}]


def _rows(ws: faces_ws.Workspace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    refs, faces = ws.refs, ws.faces
    xl = [
        {"id": "xl-t2i", "model": "sdxl", "prompt": "an sdxl fox", "negative_prompt": "blurry", "seed": 11,
         "adapters": _entry("sdxl", refs[:1], 0.6)},
        {"id": "xl-i2i", "model": "sdxl", "prompt": "an sdxl img2img", "seed": 12, "task": "img2img",
         "init_image": INIT, "strength": 0.6, "adapters": _entry("sdxl", refs[1:2], 0.7, masks=[MASK])},
        {"id": "xl-faceid", "model": "sdxl", "prompt": "an sdxl portrait", "seed": 13,
         "adapters": _entry("faceid-xl", faces[:1], 0.6)},
    ]  # fmt: skip
    lora = [
        {"id": "lora-style", "prompt": "style with a lora", "seed": 21, "adapters": _entry("style15", refs[2:3], 0.6)},
        {"id": "lora-faceid", "prompt": "faceid with a lora", "seed": 22, "adapters": _entry("faceid", faces[:1], 0.6)},
        {"id": "lora-plusv2", "prompt": "plus v2 with a lora", "seed": 23,
         "adapters": _entry("plusv2", faces[1:2], 0.7, face={"shortcut_scale": 0.6})},
        {"id": "lora-comfy", "prompt": "comfyui controls", "seed": 24,  # image weights, K+V embeds scaling
         "adapters": _entry("style15", refs[:2], 0.8, image_weights=[1.0, 0.4], embeds_scaling="K+V")},
    ]  # fmt: skip
    return xl, lora


ROW_IDS = ["xl-t2i", "xl-i2i", "xl-faceid", "lora-style", "lora-faceid", "lora-plusv2", "lora-comfy"]


@pytest.fixture(scope="module")
def runs(zoo_dir: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = faces_ws.workspace(zoo_dir, tmp_path_factory)
    start = tmp_path_factory.mktemp("run-cwd")
    (start / "inputs").mkdir()
    shutil.copy(REPO / "data" / "refs" / "ref-3.png", start / INIT)
    shutil.copy(REPO / "data" / "masks" / "left.png", start / MASK)
    xl_rows, lora_rows = _rows(ws)
    flows = [
        ws.flow(XL_ADAPTERS, xl_rows, "repro-xl"),
        ws.flow(SD15_ADAPTERS, lora_rows, "repro-lora", loras={"lcm": {"source": LCM, "weight": 0.7}}),
    ]
    rows: dict[str, dict[str, Any]] = {}
    before = os.getcwd()
    os.chdir(start)  # the runs read INIT and MASK relative to here
    try:
        for flow in flows:
            assert flow.stages.generate is not None
            counts = run_generate(flow, flow.stages.generate)
            results = OutputDir(flow.stages.generate.output).read_results()
            assert counts["error"] == 0, results["error"].tolist()
            rows.update({r["id"]: r for r in results.to_dict("records")})
    finally:
        os.chdir(before)
    assert sorted(rows) == sorted(ROW_IDS)
    return {"rows": rows, "outputs": {f.name: f.stages.generate.output for f in flows}, "start": start}  # type: ignore[union-attr]


def test_records_of_sdxl_faceid_and_lora_rows(runs: dict[str, Any]) -> None:
    rows, start = runs["rows"], runs["start"]
    i2i = rows["xl-i2i"]
    assert i2i["model"] == "sdxl" and i2i["init_image"]["uri"] == str(start / INIT)  # absolute: as the run read it
    assert i2i["adapters"][0]["masks"][0]["uri"] == str(start / MASK)
    for rid in ("lora-style", "lora-faceid", "lora-plusv2"):
        (lora,) = rows[rid]["loras"]
        assert (lora["alias"], lora["weight"]) == ("lcm", 0.7) and lora["fingerprint"]
    face = rows["lora-plusv2"]["adapters"][0]["face"]
    assert face["shortcut_scale"] == 0.6 and face["clip_keys"] and face["clip_encoder"]
    comfy, style = rows["lora-comfy"]["adapters"][0], rows["lora-style"]["adapters"][0]
    assert list(comfy["image_weights"]) == [1.0, 0.4] and comfy["embeds_scaling"] == "K+V"
    assert style["image_weights"] is None and style["embeds_scaling"] is None  # unset: null in the struct
    assert pd.isna(rows["lora-style"]["true_cfg_scale"])
    assert json.loads(rows["xl-faceid"]["sources"])["adapters"]["faceid-xl"]["weight_name"].endswith("sdxl.bin")


@pytest.mark.parametrize("rid", ROW_IDS)
def test_reproduce_from_another_folder(
    runs: dict[str, Any], rid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """From the results row and from the image alone, in a folder where the relative inputs are not."""
    row = runs["rows"][rid]
    output = runs["outputs"]["repro-xl" if rid.startswith("xl") else "repro-lora"]
    monkeypatch.chdir(tmp_path)
    assert_reproduces(output, row, tmp_path, capsys)


def test_records_with_relative_paths_still_reproduce_from_the_runs_folder(
    runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A record written before paths were made absolute keeps them relative: it reproduces from the
    folder the run started in, and elsewhere says, in one line, where to run it from."""
    row = runs["rows"]["xl-i2i"]
    record = read_record(row["outputs"][0])
    mates = record.pop("batch_records", [])
    record["init_image"]["uri"] = INIT
    record["adapters"][0]["masks"][0]["uri"] = MASK
    with Image.open(row["outputs"][0]) as image:
        pixels = np.asarray(image.convert("RGB"))
    old = tmp_path / "old.png"
    old.write_bytes(encode_outputs(pixels, for_image(record, mates)).data)
    monkeypatch.chdir(runs["start"])
    assert main(["reproduce", "--png", str(old), "--out", str(tmp_path / "r")]) == 0
    said = capsys.readouterr().out
    assert "identical to the original: pixels and bytes" in said, said
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--png", str(old), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"row xl-i2i: init_image: {INIT} cannot be read" in err and "relative path" in err and "\n" not in err
