"""The extract stage on Ray Data: reference images -> embedding store.

    list inputs (driver) ─► read + sha256 + claim + decode (CPU tasks) ─► face encoder pools
    ─► CLIP encoder pools (also fed the aligned face crops) ─► driver: rows -> store parts

With GPU pools, decoding runs in CPU tasks on the CPUs the pools leave free. With CPU pools the
first pool's actors decode their own batches (`DecodingEncodeActor`), so no decoded pixels cross
processes. Each actor works on `calls_per_actor` batches at once, in threads:
on a CPU-only machine one actor holding every core decodes and encodes on all of them and pays
the start-up (a process, torch, transformers, the weights) once instead of once per core.

Each row travelling through the pipeline is one (image, encoder) job. A shared `Claims` actor
knows every key already in the store and hands each new key to one input (extract_inputs.py),
so an image stored before, or present twice under two names, is never decoded or encoded again.
The driver commits a part every `commit_rows` rows or `commit_seconds`, so a crash loses at most
what was not yet committed; the next run skips what was. Bad inputs become `error` rows, never
exceptions. A lost node or actor (stages/recovery.py): the inputs not yet back whole go to a new
dataset on the nodes left; what is already stored is not encoded again, and a key stored twice
(a job made again) is dropped by the committer, so every embedding is in the store once.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import EncoderSpec, Flow
from ipa_ops.flow.stage_specs import ExtractStage
from ipa_ops.stages import custom_resources, gpus_per_actor, recovery
from ipa_ops.stages.extract_inputs import (
    CROP_SUFFIX,
    DECODE_BATCH,
    Arrivals,
    _job,
    _table,
    claim,
    claims_on_driver_node,
    decode_batch,
)
from ipa_ops.stages.extract_rows import COUNT_FIELDS, Committer, collect, faces_missing_crops, store_row, summarize
from ipa_ops.stages.progress import Progress
from ipa_ops.stages.ray_address import ensure_ray
from ipa_ops.store.dataset import EmbeddingStore, content_key, uncond_key
from ipa_ops.store.encoders.ids import clip_folder, encoder_id, face_pack_dir
from ipa_ops.store.images import expand_inputs

log = logging.getLogger(__name__)
def _buffers(batch: pa.Table) -> list[Any]:
    """The `pixels` of every row as zero-copy pyarrow buffers (Image.frombuffer and _table accept them)."""
    return [value.as_buffer() if value.is_valid else b"" for value in batch.column("pixels")]


def _image(job: dict[str, Any]) -> Image.Image:
    return Image.frombuffer("RGB", (job["width"], job["height"]), job["pixels"], "raw", "RGB", 0, 1)


class EncodeActor:
    """One encoder's actor: encodes its `todo` jobs, passes every other job through unchanged.

    Ray Data may call it from several threads at once (`calls_per_actor`): loading the model and
    emitting the unconditional row happen once under a lock, and InsightFace (whose detector input
    size changes between retries) analyses one image at a time.
    """

    def __init__(self, alias: str, spec_json: str, mirror: str | None, enc_id: str, gpu: bool, emit_uncond: bool,
                 claims: Any = None, crop_encoders: dict[str, str] | None = None, torch_threads: int = 0):  # fmt: skip
        self.alias, self.enc_id, self.spec = alias, enc_id, EncoderSpec.model_validate_json(spec_json)
        self.emit_uncond, self.claims, self.crop_encoders = emit_uncond, claims, crop_encoders or {}
        self.mirror, self.gpu, self.torch_threads = mirror, gpu, torch_threads
        self._encoder: Any = None
        self._lock = threading.RLock()

    @property
    def encoder(self) -> Any:
        """The model, loaded on first use: a re-run where everything is stored loads nothing."""
        with self._lock:
            return self._encoder if self._encoder is not None else self._load()

    def _load(self) -> Any:
        if self.torch_threads:  # calls run side by side: each gets its share of the cores, not all of them
            import torch

            torch.set_num_threads(self.torch_threads)
        if self.spec.type == "clip":
            from ipa_ops.store.encoders.siglip import vision_encoder

            folder = clip_folder(self.spec, self.mirror)  # CLIP, or SigLIP (SD3.5's encoder) by its config
            self._encoder = vision_encoder(
                folder, self.spec.hidden_states, self.spec.crop, gpu=self.gpu, uncond_image=self.spec.uncond_image,
                prep=self.spec.prep,
            )
        else:
            from ipa_ops.store.encoders.face import FaceEncoder

            pack = face_pack_dir(self.spec, self.mirror)
            self._encoder = FaceEncoder(
                pack, self.spec.det_size, self.spec.face, gpu=self.gpu, crop_size=self.spec.face_crop_size
            )
        return self._encoder

    def __call__(self, batch: pa.Table) -> pa.Table:
        jobs = batch.drop_columns(["pixels"]).to_pylist()
        for job, pixels in zip(jobs, _buffers(batch), strict=True):
            job["pixels"] = pixels  # zero-copy views into the Arrow block, not Python bytes
        mine = [j for j in jobs if j["state"] == "todo" and j["encoder"] == self.alias]
        with self._lock:
            extra = [self._uncond()] if self.emit_uncond else []
            self.emit_uncond = False
        if mine and self.spec.type == "clip":
            self._encode_clip(mine)
        elif mine:
            with self._lock:
                extra += self._encode_faces(mine)
        for job in mine:
            job["state"], job["pixels"] = "done", b""
        for job in jobs:  # other encoders' images travel on as bytes
            job["pixels"] = job["pixels"].to_pybytes() if isinstance(job["pixels"], pa.Buffer) else job["pixels"]
        return _table(jobs + extra)

    def _uncond(self) -> dict[str, Any]:
        if self.spec.type == "clip":
            fields = self.encoder.uncond()
        else:
            fields = {"image_embeds": np.zeros(self.encoder.embedding_dim(), dtype=np.float32)}
        origin = {"sha256": "", "uri": "", "notes": "unconditional (negative) embedding, as diffusers computes it"}
        row = {
            **store_row(origin, self.enc_id, "clip" if self.spec.type == "clip" else "face"),
            "key": uncond_key(self.enc_id),
        }
        row.update(fields)
        if "hidden_states" in fields:
            row["hidden_shape"] = list(fields["hidden_states"].shape)
        return _job("", "", self.alias, "done", result=pickle.dumps([row]))

    def _encode_clip(self, jobs: list[dict[str, Any]]) -> None:
        try:
            results = self.encoder.encode([_image(j) for j in jobs])
        except Exception:  # one bad image must not fail its batch: retry one by one to isolate it
            results = [self._encode_one(j) for j in jobs]
        for job, fields in zip(jobs, results, strict=True):
            if "error" in fields:
                row = store_row(job, self.enc_id, "clip", status="error", error=fields["error"])
            else:
                row = store_row(job, self.enc_id, "clip", **fields, **_shape(fields))
            tiles: list[dict[str, Any]] = []
            if self.spec.tiles is not None and "error" not in fields:
                try:
                    tiles = self._tile_rows(job)
                except Exception as exc:  # the image stays un-stored (an error row), its batch goes on
                    error = f"{job['uri']}: tiles of encoder {self.alias} failed ({type(exc).__name__}: {exc})"
                    row = store_row(job, self.enc_id, "clip", status="error", error=error)
            job["result"] = pickle.dumps([row, *tiles])

    def _tile_rows(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """ComfyUI's IPAdapterTiled tiles of one image, as derived rows `<tile_sha>/<encoder id>` (tiles.py)."""
        from ipa_ops.store.encoders.tiles import tile_images, tile_sha

        assert self.spec.tiles is not None
        sharpening = self.spec.tiles.sharpening
        images, plan = tile_images(_image(job), sharpening)
        rows = []
        for i, fields in enumerate(self.encoder.encode(images)):
            where = f"tile {i + 1} of {len(images)}, box {plan.boxes[i]} of the {plan.frame[0]}x{plan.frame[1]} image"
            tile = {"sha256": tile_sha(job["sha256"], i, sharpening), "uri": f"{job['uri']}#tile-{i}", "notes": where}
            rows.append(store_row(tile, self.enc_id, "clip", **fields, **_shape(fields)))
        return rows

    def _encode_one(self, job: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.encoder.encode([_image(job)])[0]
        except Exception as exc:
            return {"error": f"{job['uri']}: encoder {self.alias} failed ({type(exc).__name__}: {exc})"}

    def _encode_faces(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Face rows for `jobs`; returns new jobs that CLIP-encode the aligned crops."""
        crops: list[dict[str, Any]] = []
        for job in jobs:
            try:
                fields = self.encoder.encode(_image(job))
            except Exception as exc:
                fields = {"status": "error", "error": f"face analysis failed ({type(exc).__name__}: {exc})"}
            crop = fields.pop("crop", None)
            if fields["status"] != "ok":
                fields["error"] = f"{job['uri']}: {fields['error']}"
            job["result"] = pickle.dumps([store_row(job, self.enc_id, "face", **fields)])
            if crop is not None and self.crop_encoders:
                crops += self._crop_jobs(job, fields["crop_sha256"], crop)
        return crops

    def _crop_jobs(self, job: dict[str, Any], sha: str, crop: np.ndarray) -> list[dict[str, Any]]:
        keys = [content_key(sha, enc) for enc in self.crop_encoders.values()]
        uri = job["uri"] + CROP_SUFFIX
        wanted = claim(self.claims, keys, [uri] * len(keys))
        fields = {"origin": self.alias, "notes": f"aligned face crop ({self.alias}) of {job['uri']}",
                  "width": crop.shape[1], "height": crop.shape[0], "pixels": crop.tobytes()}  # fmt: skip
        return [
            _job(uri, sha, alias, "todo" if want else "stored", **(fields if want else {"origin": self.alias}))
            for alias, want in zip(self.crop_encoders, wanted, strict=True)
        ]


class DecodingEncodeActor(EncodeActor):
    """CPU pools: the first encoder's actor reads and decodes its own batch of inputs (`decode_batch`), then encodes.

    Ray Data would fuse a decode task into the actor only if their remote args matched, and tasks
    cannot take the pools' `max_restarts=0`; doing it here keeps decoded pixels in the process.
    """

    def __init__(self, decode: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.decode = decode

    def __call__(self, batch: pa.Table) -> pa.Table:
        return super().__call__(decode_batch(batch, self.claims, **self.decode))


def _shape(fields: dict[str, Any]) -> dict[str, list[int]]:
    return {"hidden_shape": list(fields["hidden_states"].shape)} if "hidden_states" in fields else {}


def run_extract(
    flow: Flow,
    stage: ExtractStage,
    commit_rows: int = 256,
    commit_seconds: float = 60.0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Encode every input image not yet in the store; counts per encoder alias (crops as `alias:face-crops`),
    and `faults` when a node or worker was lost on the way.

    `on_batch(n)` is called with the number of finished jobs in each batch that reaches the driver.
    """
    mirror = flow.mirror_root()
    specs = {alias: flow.encoders[alias] for alias in stage.encoders}
    for alias, spec in specs.items():
        if spec.type == "insightface" and spec.face not in ("largest", "best_score") and not spec.face.isdigit():
            raise UserError(f"encoders.{alias}.face: must be largest, best_score or an index, got {spec.face!r}")
    ids = {alias: encoder_id(alias, spec, mirror) for alias, spec in specs.items()}
    kinds = {alias: "clip" if spec.type == "clip" else "face" for alias, spec in specs.items()}
    clips = {a: ids[a] for a in ids if kinds[a] == "clip"}
    counts: dict[str, dict[str, int]] = {a: dict.fromkeys(COUNT_FIELDS, 0) for a in ids}
    uris = expand_inputs(stage.images)
    if not uris:
        return counts
    store = EmbeddingStore(stage.store if "://" in stage.store else os.path.abspath(stage.store))
    store.clean_temp()
    known = store.statuses()
    committer = Committer(store, known, commit_rows, commit_seconds)
    started = ensure_ray(flow.ray.address)
    faces = [ids[a] for a in ids if kinds[a] == "face"]
    claims = claims_on_driver_node(committer.done - faces_missing_crops(store, faces, list(clips.values())))
    progress = Progress("extract", len(uris) * len(ids), unit="images")
    wanted, arrivals = set(uris), Arrivals(len(ids), len(clips))
    earlier: set[tuple[str, str, str]] = set()  # jobs collected by a dataset before: their rows are in already
    this_round: set[tuple[str, str, str]] = set()

    def consume(batch: pa.Table) -> list[str]:
        jobs = batch.drop_columns(["pixels"]).to_pylist()
        fresh = [j for j in jobs if (j["uri"], j["encoder"], j["origin"]) not in earlier]  # not made again after a loss
        for job in fresh:
            this_round.add((job["uri"], job["encoder"], job["origin"]))
            collect(job, ids, kinds, counts, committer)
        inputs = [j for j in fresh if not j["origin"] and j["uri"] in wanted]  # not face crops, not uncond
        failed = sum(j["state"] == "error" for j in inputs)
        progress.update(ok=len(inputs) - failed, errors=failed)
        if on_batch is not None:
            on_batch(batch.num_rows)
        return [uri for uri in map(arrivals.add, jobs) if uri is not None]

    def batches(left: list[str], first: bool) -> Any:
        earlier.update(this_round)
        arrivals.clear()
        unconds = {k for k in committer.done if k.startswith("uncond/")}  # stored, or made this run
        ds = _pipeline(flow, stage, left, ids, kinds, clips, claims, unconds, first)
        return ds.iter_batches(batch_format="pyarrow", batch_size=None)  # closed by `rounds` when it fails

    rounds = recovery.Rounds("extract", progress.stream, unit="image", redo="read and encoded again",
                             promise="every embedding is in the store once")  # fmt: skip
    try:
        rounds.run(uris, str, batches, consume)
        faults = rounds.faults()  # while Ray is up
    finally:
        committer.flush()  # whatever arrived is kept, even when the run fails half-way
        progress.close()
        ray.kill(claims)
        if started:
            ray.shutdown()
    log.info("extract into %s: %d parts written\n%s", stage.store, committer.parts, summarize(counts))
    if not faults:
        return counts
    progress.stream.write(faults["message"] + "\n")
    return {**counts, "faults": faults}  # into the summary and so the ledger record


def _pipeline(flow: Flow, stage: ExtractStage, uris: list[str], ids: dict[str, str], kinds: dict[str, str],
              clips: dict[str, str], claims: Any, unconds: set[str], first: bool) -> ray.data.Dataset:  # fmt: skip
    """decode -> one pool per encoder over `uris`; pools of the asked size at first, elastic after a loss.

    No pool restarts its actors (`max_restarts=0`): a dead one fails its batch and `recovery.Rounds`
    starts the inputs not yet back whole again, rather than waiting on a restart that may never fit.
    """
    with recovery.no_restarts_warning():
        return _stages(flow, stage, uris, ids, kinds, clips, claims, unconds, first)


def _stages(flow: Flow, stage: ExtractStage, uris: list[str], ids: dict[str, str], kinds: dict[str, str],
            clips: dict[str, str], claims: Any, unconds: set[str], first: bool) -> ray.data.Dataset:  # fmt: skip
    res = stage.resources
    gpus = gpus_per_actor(res.num_gpus)
    blocks = max(1, len(uris) // max(res.batch_size, DECODE_BATCH))  # per-block overhead is paid per block
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks)
    if gpus:  # GPU pools: decoding runs in CPU tasks on the CPUs the pools leave free
        free = float(ray.cluster_resources().get("CPU", 1)) - len(ids) * res.actors * res.num_cpus
        cap = None if free >= 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ds.map_batches(
            decode_batch,
            batch_size=DECODE_BATCH,
            batch_format="pyarrow",
            fn_kwargs={"claims": claims, "encoders": ids, "max_pixels": stage.max_pixels},
            num_cpus=1.0 if free >= 1 else max(0.0, free),
            compute=ray.data.TaskPoolStrategy(size=cap),
        )  # a task Ray retries claims what it claimed before (extract_inputs.py): retries are safe
    # GPU actors: one batch at a time unless asked (concurrent forwards multiply activation memory)
    calls = res.calls_per_actor or (1 if gpus else max(1, int(res.num_cpus)))
    for n, alias in enumerate(sorted(ids, key=lambda a: kinds[a] != "face")):  # faces first: crops feed CLIP pools
        spec = flow.encoders[alias]
        decodes = not gpus and n == 0  # CPU pools: the first pool's actors decode, so no pixels cross processes
        ds = ds.map_batches(
            DecodingEncodeActor if decodes else EncodeActor,
            fn_constructor_kwargs={
                **({"decode": {"encoders": ids, "max_pixels": stage.max_pixels}} if decodes else {}),
                "alias": alias,
                "spec_json": spec.model_dump_json(),
                "mirror": flow.mirror_root(),
                "enc_id": ids[alias],
                "gpu": gpus > 0,
                "emit_uncond": f"uncond/{ids[alias]}" not in unconds,
                "claims": claims,
                "crop_encoders": clips if kinds[alias] == "face" else None,
                "torch_threads": max(1, int(res.num_cpus) // calls) if calls > 1 and kinds[alias] == "clip" else 0,
            },  # fmt: skip
            compute=recovery.pool(
                res.actors, first, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1
            ),
            batch_size=res.batch_size,
            batch_format="pyarrow",
            num_cpus=res.num_cpus,
            num_gpus=gpus,
            max_restarts=0,
            **custom_resources(res.custom_resources),
        )
    return ds
