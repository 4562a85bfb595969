"""The extract stage on Ray Data: reference images -> embedding store.

    list inputs (driver) ─► read + sha256 + claim + decode (CPU tasks) ─► face encoder pools
    ─► CLIP encoder pools (also fed the aligned face crops) ─► driver: rows -> store parts

With GPU pools, decoding runs in CPU tasks on the CPUs the pools leave free. With CPU pools the
decode step gets the pools' resources, so Ray Data fuses it into the first pool's actors and no
decoded pixels cross processes. Each actor works on `calls_per_actor` batches at once, in threads:
on a CPU-only machine one actor holding every core decodes and encodes on all of them and pays
the start-up (a process, torch, transformers, the weights) once instead of once per core.

Each row travelling through the pipeline is one (image, encoder) job. A shared `Claims` actor
knows every key already in the store and hands each new key to exactly one task, so an image
stored before, or present twice under two names, is never decoded or encoded again. The driver
commits a part every `commit_rows` rows or `commit_seconds`, so a crash loses at most what was
not yet committed; the next run skips what was. Bad inputs become `error` rows, never exceptions.
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
from ipa_ops.stages import gpus_per_actor
from ipa_ops.stages.extract_rows import COUNT_FIELDS, Committer, collect, faces_missing_crops, store_row, summarize
from ipa_ops.stages.progress import Progress
from ipa_ops.stages.ray_address import init_address
from ipa_ops.store.dataset import EmbeddingStore, content_key, uncond_key
from ipa_ops.store.encoders.ids import clip_folder, encoder_id, face_pack_dir
from ipa_ops.store.images import ImageError, decode_image, expand_inputs, read_bytes, sha256_bytes

log = logging.getLogger(__name__)
DECODE_BATCH = 4  # images decoded per call: small, so encoders start early and memory stays low
JOB = pa.schema(
    [
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("encoder", pa.string()),  # alias
        ("origin", pa.string()),  # "" for inputs, the face alias for aligned face crops
        ("state", pa.string()),  # todo | stored | error | done
        ("error", pa.string()),
        ("notes", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.large_binary()),  # raw RGB, dropped once encoded
        ("result", pa.large_binary()),  # pickled store rows from an encoder actor
    ]
)


def _job(uri: str, sha: str, alias: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"uri": uri, "sha256": sha, "encoder": alias, "origin": "", "state": state, "error": "", "notes": "",
            "width": 0, "height": 0, "pixels": b"", "result": b"", **extra}  # fmt: skip


def _table(jobs: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(jobs, schema=JOB)


@ray.remote(num_cpus=0)
class Claims:
    """Hands out each (image, encoder) key once per run; keys already stored are never handed out."""

    def __init__(self, stored: set[str]):
        self.taken = set(stored)

    def claim(self, keys: list[str]) -> list[bool]:
        out = []
        for key in keys:
            out.append(key not in self.taken)
            self.taken.add(key)
        return out


def decode_batch(batch: pa.Table, claims: Any, encoders: dict[str, str], max_pixels: int) -> pa.Table:
    """CPU task: read and hash each input, claim its keys, decode only what some encoder still needs."""
    jobs: list[dict[str, Any]] = []
    read: list[tuple[str, bytes, str]] = []
    for uri in batch.column("uri").to_pylist():
        try:
            data = read_bytes(uri)
        except ImageError as exc:
            jobs += [_job(uri, "", alias, "error", error=str(exc)) for alias in encoders]
            continue
        read.append((uri, data, sha256_bytes(data)))
    keys = [content_key(sha, enc) for _, _, sha in read for enc in encoders.values()]
    wanted = iter(ray.get(claims.claim.remote(keys)) if keys else [])
    for uri, data, sha in read:
        todo = [alias for alias in encoders if next(wanted)]
        jobs += [_job(uri, sha, alias, "stored") for alias in encoders if alias not in todo]
        if not todo:
            continue
        try:
            image, notes = decode_image(data, uri, max_pixels)
        except ImageError as exc:
            jobs += [_job(uri, sha, alias, "error", error=str(exc)) for alias in todo]
            continue
        pixels = image.tobytes()  # decode_image returns 8-bit RGB: the same bytes as the array, one copy
        fields = {"notes": "; ".join(notes), "width": image.width, "height": image.height, "pixels": pixels}
        jobs += [_job(uri, sha, alias, "todo", **fields) for alias in todo]
    return _table(jobs)


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
        wanted = ray.get(self.claims.claim.remote(keys))
        uri = f"{job['uri']}#face-crop"
        fields = {"origin": self.alias, "notes": f"aligned face crop ({self.alias}) of {job['uri']}",
                  "width": crop.shape[1], "height": crop.shape[0], "pixels": crop.tobytes()}  # fmt: skip
        return [
            _job(uri, sha, alias, "todo" if want else "stored", **(fields if want else {"origin": self.alias}))
            for alias, want in zip(self.crop_encoders, wanted, strict=True)
        ]


def _shape(fields: dict[str, Any]) -> dict[str, list[int]]:
    return {"hidden_shape": list(fields["hidden_states"].shape)} if "hidden_states" in fields else {}


def ensure_ray(address: str | None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded Ray; True when this call started one."""
    if ray.is_initialized():
        return False
    address = init_address(address)  # "local" when embedded: never a stale ray_current_cluster
    if address != "local":
        ray.init(address=address)
    else:  # workers must import ipa_ops even when it runs from a source checkout, not an install
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def run_extract(
    flow: Flow,
    stage: ExtractStage,
    commit_rows: int = 256,
    commit_seconds: float = 60.0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Encode every input image not yet in the store; counts per encoder alias (crops as `alias:face-crops`).

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
    claims = Claims.remote(committer.done - faces_missing_crops(store, faces, list(clips.values())))
    progress = Progress("extract", len(uris) * len(ids), unit="images")
    wanted = set(uris)
    batches: Any = iter(())
    try:
        ds = _pipeline(flow, stage, uris, ids, kinds, clips, claims, {k for k in known if k.startswith("uncond/")})
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        for batch in batches:
            jobs = batch.drop_columns(["pixels"]).to_pylist()
            for job in jobs:
                collect(job, ids, kinds, counts, committer)
            inputs = [j for j in jobs if not j["origin"] and j["uri"] in wanted]  # not face crops, not uncond
            failed = sum(j["state"] == "error" for j in inputs)
            progress.update(ok=len(inputs) - failed, errors=failed)
            if on_batch is not None:
                on_batch(batch.num_rows)
    finally:
        getattr(batches, "close", lambda: None)()  # stops the pipeline at once when the driver fails
        committer.flush()  # whatever arrived is kept, even when the run fails half-way
        progress.close()
        ray.kill(claims)
        if started:
            ray.shutdown()
    log.info("extract into %s: %d parts written\n%s", stage.store, committer.parts, summarize(counts))
    return counts


def _pipeline(flow: Flow, stage: ExtractStage, uris: list[str], ids: dict[str, str], kinds: dict[str, str],
              clips: dict[str, str], claims: Any, unconds: set[str]) -> ray.data.Dataset:  # fmt: skip
    res = stage.resources
    gpus = gpus_per_actor(res.num_gpus)
    if gpus:  # GPU pools: decoding runs in CPU tasks on the CPUs the pools leave free
        free = float(ray.cluster_resources().get("CPU", 1)) - len(ids) * res.actors * res.num_cpus
        cap = None if free >= 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        decode = {"num_cpus": 1.0 if free >= 1 else max(0.0, free), "compute": ray.data.TaskPoolStrategy(size=cap)}
    else:  # CPU pools: same resources, so Ray Data fuses decoding into the first pool's actors (no pixel copies)
        decode = {"num_cpus": res.num_cpus, "compute": ray.data.TaskPoolStrategy(size=res.actors)}
    blocks = max(1, len(uris) // max(res.batch_size, DECODE_BATCH))  # per-block overhead is paid per block
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,
        batch_size=DECODE_BATCH,
        batch_format="pyarrow",
        fn_kwargs={"claims": claims, "encoders": ids, "max_pixels": stage.max_pixels},
        **decode,
    )
    # GPU actors: one batch at a time unless asked (concurrent forwards multiply activation memory)
    calls = res.calls_per_actor or (1 if gpus else max(1, int(res.num_cpus)))
    for alias in sorted(ids, key=lambda a: kinds[a] != "face"):  # faces first: their crops feed CLIP pools
        spec = flow.encoders[alias]
        ds = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
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
            compute=ray.data.ActorPoolStrategy(
                size=res.actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1
            ),
            batch_size=res.batch_size,
            batch_format="pyarrow",
            num_cpus=res.num_cpus,
            num_gpus=gpus,
        )
    return ds
