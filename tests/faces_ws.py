"""One embedding store for test_sdxl, test_faces and test_faceid, filled once by the real extract stage.

Extraction costs mostly fixed Ray Data and model start-up time, so the three files share one run
(cached for the session) over every image they use: three drawn faces, a faceless image, ten style
images and the repository's reference images, through one InsightFace and three CLIP encoders
(the aligned face crops are CLIP-encoded by all three, as the extract stage does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ipa_ops.flow.spec import Flow, parse_flow
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.stages.extract import run_extract
from ipa_ops.store.dataset import EmbeddingStore
from ipa_ops.zoo import draw_face

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
H94 = "h94/IP-Adapter"
FACEID = "h94/IP-Adapter-FaceID"
LAION = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
REPO = Path(__file__).resolve().parents[1]
ENCODERS: dict[str, dict[str, Any]] = {
    "faces": {"type": "insightface", "det_size": 640},
    "vit-h": {"type": "clip", "source": H94, "subfolder": "models/image_encoder", "hidden_states": True},
    "bigg": {"type": "clip", "source": H94, "subfolder": "sdxl_models/image_encoder"},
    "laion": {"type": "clip", "source": LAION, "hidden_states": True},
}
_CACHE: dict[str, Workspace] = {}


@dataclass
class Workspace:
    """The shared inputs and store, and helpers to write a manifest and plan it against a flow."""

    root: Path
    zoo: Path
    faces: list[str]
    blank: str
    styles: list[str]
    refs: list[str]
    store: EmbeddingStore

    def flow(
        self, adapters: dict[str, Any], rows: list[dict[str, Any]], name: str, loras: dict[str, Any] | None = None
    ) -> Flow:
        """A flow over the shared store with these adapters (and LoRAs); `rows` become its manifest."""
        manifest = self.root / f"{name}.csv"
        frame = pd.DataFrame([{**r, "adapters": json.dumps(r.get("adapters", []))} for r in rows])
        frame.to_csv(manifest, index=False)
        stage = {"manifest": str(manifest), "model": "sd15", "store": str(self.root / "store"),
                 "output": str(self.root / name), "defaults": {"width": 64, "height": 64, "steps": 3},
                 "resources": {"batch_size": 4}}  # fmt: skip
        return parse_flow({
            "name": name, "mirror": str(self.zoo),
            "models": {"sd15": {"source": SD15}, "sdxl": {"source": SDXL}},
            "encoders": ENCODERS, "adapters": adapters, "loras": loras or {},
            "stages": {"extract": self._extract(), "generate": stage},
        })  # fmt: skip

    def plan(self, flow: Flow) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        """Plans by row id, and error / skipped results by row id, as the generate stage makes them."""
        assert flow.stages.generate is not None
        plans, errors = plan_manifest(flow, flow.stages.generate)
        return {p.id: p for p in plans}, {e["id"]: e for e in errors}

    def _extract(self) -> dict[str, Any]:
        images = [*self.faces, self.blank, *self.styles, *self.refs]
        return {"images": images, "encoders": list(ENCODERS), "store": str(self.root / "store"),
                "resources": {"num_cpus": 0.5, "batch_size": 8}}  # fmt: skip


def workspace(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The session's workspace, extracted on first use (needs an initialised Ray)."""
    if str(zoo) in _CACHE:
        return _CACHE[str(zoo)]
    root = tmp_path_factory.mktemp("faces-ws")
    (root / "in").mkdir()
    faces = [str(root / "in" / f"face{i}.png") for i in range(3)]
    for i, path in enumerate(faces):
        draw_face((256, 256), seed=40 + i).save(path)
    blank = str(root / "in" / "blank.png")
    Image.new("RGB", (128, 128), (90, 90, 90)).save(blank)  # no face: uniform mid grey
    rng = np.random.default_rng(5)
    styles = [str(root / "in" / f"style{i}.png") for i in range(10)]
    for path in styles:
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).resize((96, 96)).save(path)
    refs = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
    ws = Workspace(root, zoo, faces, blank, styles, refs, EmbeddingStore(str(root / "store")))
    flow = ws.flow({}, [], "extract-only")
    assert flow.stages.extract is not None
    run_extract(flow, flow.stages.extract)
    _CACHE[str(zoo)] = ws
    return ws
