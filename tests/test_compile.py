"""A compiled UNet takes every batch the engine mixes in one graph: no graph breaks, no recompiles.

Graph breaks and recompiles are Dynamo's decisions, made while tracing, whatever backend then
runs the graph; these tests trace with `backend="eager"` (seconds, not minutes) and
`fullgraph=True` (a break is an error). test_generator.py checks the inductor-compiled images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPipeline
from test_generator import _flow, _mixed_rows, _reference
from torch._dynamo.utils import counters

from ipa_ops.flow.schedules import parse_schedule
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.contract import AdapterInput, RowRequest
from ipa_ops.generate.generator import Generator, compile_plan

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ref_style(zoo_dir: Path) -> StableDiffusionPipeline:
    return _reference(zoo_dir, ["ip-adapter_sd15.bin"])


@pytest.fixture
def dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiled(flow: Flow, how: str) -> Generator:
    generator = Generator(flow, device="cpu")
    loaded = generator.load("sd15")
    loaded.family.compile(loaded.pipe, how, "default", backend="eager")
    loaded.compiled = True  # what Generator.load sets for a model whose flow says `compile`
    return generator


def _rescheduled(rows: list[RowRequest]) -> list[RowRequest]:
    """The same rows in another order with other schedules: same shapes, another batch composition."""
    specs = [{"value": 0.9, "end": 0.5}, {"preset": "layout"}, {"steps": [1.0, 0.0, 0.5]}, 0.0]
    out = []
    for i, row in enumerate(reversed(rows)):
        adapters = [dataclasses.replace(x, schedule=parse_schedule(specs[(i + j) % len(specs)]))
                    for j, x in enumerate(row.adapters)]  # fmt: skip
        out.append(dataclasses.replace(row, adapters=adapters, seed=row.seed + 100))
    return out


def _check_one_graph(compiled: Generator, eager: Generator, rows: list[RowRequest], check_first: bool = False) -> None:
    first = compiled.run_batch(rows)
    assert [o.error for o in first] == [""] * len(rows)
    if check_first:  # the rows as given, not only their rescheduled copies, equal the eager UNet's
        for row, out, ref in zip(rows, first, eager.run_batch(rows), strict=True):
            assert np.abs(out.image - ref.image).max() < 2e-3, row.id  # type: ignore[operator]
    assert dict(counters["graph_break"]) == {}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # it did compile
    again = _rescheduled(rows)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile now raises ...
        second = compiled.run_batch(again)
    assert compiled.stats["batch_failures"] == 0  # ... which would have failed the batch
    assert counters["stats"]["unique_graphs"] == graphs
    for row, out, ref in zip(again, second, eager.run_batch(again), strict=True):
        assert out.image is not None and ref.image is not None, row.id
        assert np.abs(out.image - ref.image).max() < 2e-3, row.id


@pytest.mark.parametrize("how", ["regional", "whole"])
def test_mixed_batch_compiles_once_without_graph_breaks(
    how: str, zoo_dir: Path, ref_style: StableDiffusionPipeline, dynamo: None
) -> None:
    """Masks, two adapters, padded image counts, presets, step windows and a row without adapters."""
    rows = _mixed_rows(ref_style, zoo_dir)
    _check_one_graph(_compiled(_flow(zoo_dir), how), Generator(_flow(zoo_dir), device="cpu"), rows)


def test_comfyui_controls_compile_once_without_graph_breaks(
    zoo_dir: Path, ref_style: StableDiffusionPipeline, dynamo: None
) -> None:
    """Precise swaps, embeds scalings and sigma windows are per-row data in the graph, not branches; so are
    the application slots of an adapter listed several times in a row (regional conditioning)."""
    from test_comfyui import _control_row, _regional_row
    from test_generator import _embeds, _refs

    emb = _embeds(ref_style, [_refs(1)])[0]
    rows = [_control_row(ref_style, i, emb) for i in (1, 2, 5, 6)]
    rows.append(_regional_row(list(_embeds(ref_style, [_refs(3)])[0].split(1, dim=1))))
    eager = Generator(_flow(zoo_dir), device="cpu")
    _check_one_graph(_compiled(_flow(zoo_dir), "whole"), eager, rows, check_first=True)


def _faceid_flow(zoo: Path) -> Flow:
    laion = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    weight = "ip-adapter-faceid-plusv2_sd15.bin"
    return Flow.model_validate(
        {
            "name": "t",
            "mirror": str(zoo),
            "models": {"sd15": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5"}},
            "encoders": {"faces": {"type": "insightface"}, "laion": {"type": "clip", "source": laion,
                                                                    "hidden_states": True}},
            "adapters": {"plusv2": {"source": "h94/IP-Adapter-FaceID", "weight_name": weight, "encoder": "faces",
                                    "clip_encoder": "laion"}},
        }
    )  # fmt: skip


def test_faceid_plus_batch_compiles_once_without_graph_breaks(zoo_dir: Path, dynamo: None) -> None:
    """FaceID-Plus v2: per-row face embeddings, crop hidden states and shortcut scales, inside the whole UNet."""
    flow = _faceid_flow(zoo_dir)
    hidden = Generator(flow, device="cpu").load("sd15").facts[0].image_dim
    gen = torch.Generator().manual_seed(0)

    def face(scale: Any, shortcut: float, n: int = 1) -> AdapterInput:
        embeds = torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1)
        clip = torch.randn(n, 5, hidden, generator=gen)
        negative = torch.zeros_like(embeds)
        extra = dict(clip_embeds=clip, clip_negative=torch.zeros_like(clip), shortcut_scale=shortcut)
        return AdapterInput("plusv2", embeds, negative, parse_schedule(scale), **extra)  # type: ignore[arg-type]

    base = dict(model="sd15", width=64, height=64, steps=3, guidance_scale=7.5)
    rows = [
        RowRequest(id="f0", prompt="a portrait", seed=1, adapters=[face(0.7, 1.0)], **base),  # type: ignore[arg-type]
        RowRequest(id="f1", prompt="a painting", seed=2, adapters=[face(0.5, 0.6, 2)], **base),  # type: ignore[arg-type]
        RowRequest(id="f2", prompt="a sketch", seed=3, adapters=[], **base),  # type: ignore[arg-type]
    ]
    _check_one_graph(_compiled(flow, "whole"), Generator(flow, device="cpu"), rows)


def test_compile_options_from_the_flow(caplog: pytest.LogCaptureFixture) -> None:
    spec = Flow.model_validate(
        {"name": "t", "models": {"m": {"source": "x", "compile": "whole", "compile_mode": "reduce-overhead"}}}
    ).models["m"]
    with caplog.at_level(logging.WARNING):
        assert compile_plan(spec, "cpu") == ("whole", "default")  # CUDA graphs: nothing to gain on a CPU
    assert "reduce-overhead makes CUDA graphs; on cpu it does nothing" in caplog.text
    assert compile_plan(spec, "cuda") == ("whole", "reduce-overhead")
    spec.compile = True
    assert compile_plan(spec, "cuda") == ("regional", "reduce-overhead")
    spec.compile = False
    assert compile_plan(spec, "cuda") is None
