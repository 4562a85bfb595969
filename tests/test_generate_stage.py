"""The generate stage end to end on embedded Ray: outputs, resume, bad rows, a crashing actor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from reports import report_text
from zoo_flows import zoo_flow

from ipa_ops.cli import main
from ipa_ops.flow.spec import Flow
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.manifest_plan import plan_manifest
from ipa_ops.generate.prepare import prepare
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.stages.extract import run_extract
from ipa_ops.stages.generate import GeneratorActor, run_generate, torch_threads
from ipa_ops.store.dataset import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]
REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
MASKS = [str(REPO / "data" / "masks" / f"{s}.png") for s in ("left", "right")]


def _adapters(images: list[str], scale: object = 0.6, **extra: object) -> str:
    return json.dumps([{"adapter": "style", "images": images, "scale": scale, **extra}])


def _good_rows(n: int = 10) -> list[dict]:
    scales: list[object] = [0.6, {"preset": "style"}, {"value": 0.8, "end": 0.5}, {"curve": "ease_in"}]
    return [
        {
            "id": f"g{i}",
            "prompt": f"a test image number {i}",
            "seed": 100 + i,
            "adapters": _adapters([REFS[i % 4]], scales[i % 4]),
        }
        for i in range(n)
    ]


def _flow(root: Path, zoo: Path, manifest: Path, output: str = "out") -> Flow:
    return zoo_flow("quickstart", root, zoo, manifest, "stages.generate.resources.batch_size=4", steps=3, output=output)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path, ray_local: None) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("generate")
    manifest = root / "manifest.csv"
    pd.DataFrame(_good_rows()).to_csv(manifest, index=False)
    flow = _flow(root, zoo_dir, manifest)
    assert flow.stages.extract is not None
    run_extract(flow, flow.stages.extract)
    return root, manifest


def test_run_writes_results_images_report_and_resumes(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    root, manifest = workspace
    flow = _flow(root, zoo_dir, manifest, "resume")
    assert flow.stages.generate is not None
    first = run_generate(flow, flow.stages.generate)
    assert (first["ok"], first["error"], first["skipped"]) == (10, 0, 0)
    out = OutputDir(str(root / "resume"))
    results = out.read_results()
    assert sorted(results["id"]) == [f"g{i}" for i in range(10)] and set(results["status"]) == {"ok"}
    parts = root / "resume" / "results"
    assert len(list(parts.glob("part-*.parquet"))) == 1  # buffered: one part for the run, not one per batch
    images = sorted((root / "resume" / "images").glob("*/*.png"))  # fanned out: images/<key[:2]>/<key>.png
    assert len(images) == 10 and all(Image.open(p).size == (64, 64) for p in images)
    assert all(p.parent.name == p.stem[:2] for p in images) and set(results["row_key"]) == {p.stem for p in images}
    report = report_text(root / "resume")
    assert all(f"a test image number {i}" in report for i in range(10))
    assert json.loads((root / "resume" / "run.json").read_text())["counts"]["ok"] == 10
    provenance = json.loads(results["provenance"].iloc[0])
    assert provenance["embedding_keys"] and provenance["model_fingerprint"]

    for path in images[:3]:  # a user deletes three images they dislike
        path.unlink()
    second = run_generate(flow, flow.stages.generate)
    assert (second["ok"], second["skipped"]) == (3, 7)
    assert len(list(parts.glob("part-*.parquet"))) == 2  # one part per run
    assert len(out.read_results()) == 13 and len(list((root / "resume" / "images").glob("*/*.png"))) == 10
    third = run_generate(flow, flow.stages.generate)
    assert (third["ok"], third["skipped"]) == (0, 10)
    assert len(out.read_results()) == 13


def test_changed_parameter_gives_new_key(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    root, manifest = workspace
    flow = _flow(root, zoo_dir, manifest)
    assert flow.stages.generate is not None
    before = {p.id: p.row_key for p in plan_manifest(flow, flow.stages.generate)[0]}
    changed = pd.read_csv(manifest)
    changed.loc[0, "seed"] = 999
    changed.loc[1, "adapters"] = _adapters([REFS[1]], 0.61)
    path = root / "changed.csv"
    changed.to_csv(path, index=False)
    after = {p.id: p.row_key for p in plan_manifest(flow, flow.stages.generate, str(path))[0]}
    assert after["g0"] != before["g0"] and after["g1"] != before["g1"]
    assert all(after[k] == before[k] for k in before if k not in ("g0", "g1"))


def test_stage_row_equals_diffusers_with_store_embeddings(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    """(a) of the generation issue: scalar scale, ip_adapter_image_embeds read from the store."""
    root, manifest = workspace
    flow = _flow(root, zoo_dir, manifest)
    stage = flow.stages.generate
    assert stage is not None
    plan = next(p for p in plan_manifest(flow, stage)[0] if p.id == "g0")
    store = EmbeddingStore(str(root / "store"))
    row = prepare(plan, store)
    (ours,) = Generator(flow, device="cpu").generate([row])
    assert ours.error == "" and ours.image is not None

    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / "stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_ip_adapter(
        str(zoo_dir / "h94/IP-Adapter"),
        subfolder="models",
        weight_name="ip-adapter_sd15.bin",
        image_encoder_folder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.6)
    key = plan.adapters[0].keys[0]
    pos = store.get([key])[0][None, None]
    neg = store.uncond(plan.adapters[0].encoder)[None, None]
    expected = pipe(
        prompt=row.prompt,
        num_inference_steps=3,
        height=64,
        width=64,
        guidance_scale=row.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(row.seed),
        output_type="np",
        ip_adapter_image_embeds=[torch.cat([neg, pos])],
    ).images[0]
    assert np.abs(ours.image - expected).max() < 1e-4


BAD_ROWS = {
    "b-alias": (
        {"adapters": json.dumps([{"adapter": "stlye", "images": [REFS[0]]}])},
        "row b-alias: adapters[0].adapter: unknown adapter alias 'stlye'",
    ),
    "b-missing": (
        {"adapters": _adapters([str(REPO / "data" / "refs" / "nope.png")])},
        "row b-missing: adapters[0].images[0]:",
    ),
    "b-maskcount": ({"adapters": _adapters(REFS[:2], masks=MASKS[:1])}, "row b-maskcount: adapters[0].masks:"),
    "b-aspect": ({"width": 96, "adapters": _adapters(REFS[:2], masks=MASKS)}, "row b-aspect: adapters[0].masks"),
    "b-size": ({"width": 60}, "row b-size: width: must be a multiple of 8, got 60"),
    "b-sched": ({"adapters": _adapters([REFS[0]], "{not json")}, "row b-sched: adapters[0].scale:"),
    "b-nan": ({"adapters": _adapters([REFS[0]], {"value": float("nan")})}, "row b-nan: adapters[0].scale:"),
}


def test_bad_rows_fail_alone_with_messages(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    root, _ = workspace
    rows = _good_rows(2)
    for rid, (extra, _) in BAD_ROWS.items():
        rows.append({"id": rid, "prompt": "bad", "seed": 1, "adapters": _adapters([REFS[0]]), **extra})
    path = root / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    flow = _flow(root, zoo_dir, path, "bad")
    assert flow.stages.generate is not None
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["error"]) == (2, len(BAD_ROWS))
    results = OutputDir(str(root / "bad")).read_results().set_index("id")
    for rid, (_, message) in BAD_ROWS.items():
        assert results.loc[rid, "status"] == "error"
        assert str(results.loc[rid, "error"]).startswith(message), (rid, results.loc[rid, "error"])
    assert set(results.loc[["g0", "g1"], "status"]) == {"ok"}


class CrashOnThirdBatch(GeneratorActor):
    """Kills its own process on its third batch, once (a marker file survives into the next dataset's actor)."""

    marker = ""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.batches = 0

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        if self.batches == 3 and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return super().__call__(batch)


def test_worker_crash_still_gives_every_row_once(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    root, manifest = workspace
    flow = _flow(root, zoo_dir, manifest, "crash")
    stage = flow.stages.generate
    assert stage is not None
    stage.resources.batch_size = 2
    CrashOnThirdBatch.marker = str(root / "crashed.marker")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    summary = run_generate(flow, stage, actor_cls=CrashOnThirdBatch)
    assert Path(CrashOnThirdBatch.marker).exists()  # it did crash
    results = OutputDir(str(root / "crash")).read_results()
    assert summary["ok"] == 10
    assert sorted(results["id"]) == [f"g{i}" for i in range(10)]  # every row exactly once
    assert len(list((root / "crash" / "results").glob("part-*.parquet"))) == 1
    faults = summary["faults"]  # the rows not yet back went to a second dataset (stages/recovery.py)
    assert faults["rounds"] == 2 and faults["nodes_lost"] == [] and faults["rows_resubmitted"][0] <= 10
    assert faults["message"].startswith("generate: a Ray worker was lost; the rows not yet back")


class ReportsThreads(GeneratorActor):
    """Writes the torch threads it runs with into each row's `worker` field."""

    def __call__(self, batch: dict) -> dict:
        import torch

        out = super().__call__(batch)
        out["worker"] = np.array([f"threads={torch.get_num_threads()}"] * len(out["worker"]), dtype=object)
        return out


def test_cpu_generator_actor_uses_the_machine(workspace: tuple[Path, Path], zoo_dir: Path) -> None:
    """On a CPU-only cluster the generator's torch gets the cluster's cores (Ray alone would give it one)."""
    root, manifest = workspace
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    flow = _flow(root, zoo_dir, manifest, "threads")
    stage = flow.stages.generate
    assert stage is not None and stage.resources.num_cpus == 1 and stage.resources.torch_threads is None
    run_generate(flow, stage, actor_cls=ReportsThreads)
    cores = int(ray.cluster_resources()["CPU"])
    assert set(OutputDir(str(root / "threads")).read_results()["worker"]) == {f"threads={max(1, cores)}"}
    assert torch_threads(stage.resources.model_copy(update={"torch_threads": 3})) == 3  # as set, when set
    assert torch_threads(stage.resources.model_copy(update={"actors": 2})) == max(1, cores // 2)



KILLED_DRIVER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import ray
from reports import report_text
from zoo_flows import zoo_flow
from ipa_ops.outputs import results_writer
from ipa_ops.stages.generate import run_generate

real_commit = results_writer.ResultsWriter.commit

def commit_then_die(self):  # kill -9 of this driver (and its Ray) right after its first committed part
    path = real_commit(self)
    if path:
        os.killpg(0, signal.SIGKILL)
    return path

results_writer.ResultsWriter.commit = commit_then_die
root, zoo, manifest = map(Path, sys.argv[1:4])
overrides = ("stages.generate.resources.batch_size=2", "stages.generate.commit_rows=2")
flow = zoo_flow("quickstart", root, zoo, manifest, *overrides, steps=3, output="killed")
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
run_generate(flow, flow.stages.generate)
"""


def test_driver_killed_mid_run_then_rerun_gives_every_row_once_ok(
    workspace: tuple[Path, Path], zoo_dir: Path
) -> None:
    """kill -9 of the driver (and its embedded Ray) after its first buffered commit, then a rerun."""
    import contextlib
    import signal
    import subprocess

    root, manifest = workspace
    results = root / "killed" / "results"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER, str(root), str(zoo_dir), str(manifest), str(REPO / "tests")],
        start_new_session=True,  # its own process group: the driver and the Ray it started die together
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    out = OutputDir(str(root / "killed"))
    committed = out.read_results()
    assert len(committed) == 2  # the first window; the rows buffered or in flight after it are lost
    assert len(list(results.glob("part-*.parquet"))) == 1

    flow = _flow(root, zoo_dir, manifest, "killed")
    assert flow.stages.generate is not None
    summary = run_generate(flow, flow.stages.generate)
    assert (summary["ok"], summary["skipped"]) == (8, 2)
    results_df = out.read_results()
    assert sorted(results_df["id"]) == [f"g{i}" for i in range(10)] and set(results_df["status"]) == {"ok"}
    images = {p.stem for p in (root / "killed" / "images").glob("*/*.png")}
    assert images == set(results_df["row_key"]) and out.done_keys() == images
    assert len(list(results.glob("part-*.parquet"))) == 2  # the killed run's part and the rerun's one
    assert main(["compact", str(root / "killed")]) == 0
    assert len(list(results.glob("part-*.parquet"))) == 2  # already one part per run: nothing to merge
    assert sorted(out.read_results()["id"]) == [f"g{i}" for i in range(10)]
