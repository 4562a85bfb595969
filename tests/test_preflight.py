"""Pre-flight: adapter checkpoints checked against base model and encoder before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ipa_ops.cli import main
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.families import adapter_facts
from ipa_ops.generate.preflight import check_flow

H94 = "h94/IP-Adapter"


def _flow(zoo: Path, model: str, encoder_sub: str, weight: str, subfolder: str, hidden: bool = False) -> dict:
    return {
        "name": "pf",
        "mirror": str(zoo),
        "models": {"base": {"source": model}},
        "encoders": {"enc": {"type": "clip", "source": H94, "subfolder": encoder_sub, "hidden_states": hidden}},
        "adapters": {"ad": {"source": H94, "subfolder": subfolder, "weight_name": weight, "encoder": "enc"}},
        "stages": {"generate": {"manifest": "m.csv", "model": "base", "output": "out"}},
    }


SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_facts_classify_real_layouts(zoo_dir: Path) -> None:
    pooled = adapter_facts(zoo_dir / H94 / "models" / "ip-adapter_sd15.bin")
    plus = adapter_facts(zoo_dir / H94 / "models" / "ip-adapter-plus_sd15.safetensors")
    assert (pooled.kind, pooled.tokens, pooled.needs_hidden_states) == ("pooled", 4, False)
    assert (plus.kind, plus.tokens, plus.needs_hidden_states) == ("plus", 16, True)
    assert pooled.ip_layers == plus.ip_layers == 16  # SD1.5's 16 cross-attention layers


def test_vit_h_adapter_on_bigg_encoder_is_one_line(zoo_dir: Path) -> None:
    flow = Flow.model_validate(
        _flow(zoo_dir, SDXL, "sdxl_models/image_encoder", "ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_models", True)
    )
    _, problems = check_flow(flow)
    assert len(problems) == 1
    assert problems[0].startswith("adapters.ad: ip-adapter-plus_sdxl_vit-h.safetensors expects image features of dim ")
    assert problems[0].endswith(
        "ip-adapter-plus_sdxl_vit-h needs the ViT-H encoder from models/image_encoder, not sdxl_models/image_encoder"
    )


def test_matching_pair_passes(zoo_dir: Path) -> None:
    ok = Flow.model_validate(
        _flow(zoo_dir, SDXL, "models/image_encoder", "ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_models", True)
    )
    assert check_flow(ok)[1] == []


def test_sdxl_adapter_on_sd15_model(zoo_dir: Path) -> None:
    flow = Flow.model_validate(_flow(zoo_dir, SD15, "sdxl_models/image_encoder", "ip-adapter_sdxl.bin", "sdxl_models"))
    _, problems = check_flow(flow)
    assert len(problems) == 1
    assert problems[0].startswith("adapters.ad: ip-adapter_sdxl.bin is built for cross-attention dim ")
    assert (
        "but model 'base' has 32 with 16; use an adapter made for that base model (this one looks like SDXL)"
        in (problems[0])
    )


def test_plus_adapter_needs_hidden_states(zoo_dir: Path) -> None:
    flow = Flow.model_validate(
        _flow(zoo_dir, SD15, "models/image_encoder", "ip-adapter-plus_sd15.safetensors", "models", hidden=False)
    )
    assert check_flow(flow)[1] == [
        "adapters.ad: ip-adapter-plus_sd15.safetensors consumes penultimate hidden states; set "
        "encoders.enc.hidden_states: true and re-run extract"
    ]


def test_validate_cli_prints_preflight_problem(
    zoo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _flow(zoo_dir, SD15, "sdxl_models/image_encoder", "ip-adapter_sd15.bin", "models")
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("adapters.ad: ip-adapter_sd15.bin expects image features of dim 24")
    data["encoders"]["enc"]["subfolder"] = "models/image_encoder"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
