"""The extract stage's inputs: the jobs that carry them, reading and claiming them, and knowing when each is back.

Each row travelling through the pipeline is one (image, encoder) job (`JOB`). `decode_batch` reads
and hashes each input, claims its keys and decodes only what some encoder still needs. A shared
`Claims` actor knows every key already in the store and hands each new key to one owner (the
input's URI, or its face crop's), so an image stored before, or present twice under two names, is
encoded once. A claim is idempotent per owner: a task Ray retries, a block it rebuilds after losing
the node that held it, or the next dataset round (stages/recovery.py) asking again for the same
input gets the same answer, never "already stored" for a key nobody stored. It lives on the
driver's node, so losing another node never loses it.

`Arrivals` tells the driver when every job of an input is back: one per encoder, and the crop jobs
its face made for the CLIP encoders. When a worker is lost, the inputs not back whole go again.
"""

from __future__ import annotations

import pickle
from collections import Counter
from typing import Any

import pyarrow as pa
import ray

from ipa_ops.stages.recovery import on_driver_node
from ipa_ops.store.dataset import content_key
from ipa_ops.store.images import ImageError, decode_image, read_bytes, sha256_bytes

CROP_SUFFIX = "#face-crop"  # a face crop job's uri: its input's, with this
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
    wanted = iter(claim(claims, keys, [uri for uri, _, _ in read for _ in encoders]))
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


@ray.remote(num_cpus=0)
class Claims:
    """Hands out each (image, encoder) key to one owner per run; keys already stored are never handed out."""

    def __init__(self, stored: set[str]):
        self.owners: dict[str, str | None] = dict.fromkeys(stored)

    def claim(self, keys: list[str], owners: list[str]) -> list[bool]:
        """For each key, whether its owner encodes it: the first to ask owns it, and asking again still does."""
        return [self.owners.setdefault(key, owner) == owner for key, owner in zip(keys, owners, strict=True)]


def claims_on_driver_node(stored: set[str]) -> Any:
    return Claims.options(scheduling_strategy=on_driver_node()).remote(stored)


def claim(claims: Any, keys: list[str], owners: list[str]) -> list[bool]:
    return ray.get(claims.claim.remote(keys, owners)) if keys else []


class Arrivals:
    """Counts each input's jobs as they reach the driver; `add` names the input a job completes."""

    def __init__(self, encoders: int, crop_encoders: int):
        self.encoders, self.crop_encoders = encoders, crop_encoders
        self.jobs: Counter[str] = Counter()  # input -> its encoders' jobs back
        self.crops: Counter[str] = Counter()  # input -> its crop jobs back, less those its faces made
        self.complete: set[str] = set()

    def clear(self) -> None:
        """A new dataset: the inputs in it come back whole, from the start."""
        self.jobs.clear()
        self.crops.clear()

    def add(self, job: dict[str, Any]) -> str | None:
        if job["origin"]:
            uri = job["uri"].removesuffix(CROP_SUFFIX)
            self.crops[uri] += 1
        else:
            uri = job["uri"]
            self.jobs[uri] += 1
            if self.crop_encoders and _made_a_crop(job):
                self.crops[uri] -= self.crop_encoders
        if uri in self.complete or self.jobs[uri] < self.encoders or self.crops[uri] < 0:
            return None
        self.complete.add(uri)
        return uri


def _made_a_crop(job: dict[str, Any]) -> bool:
    """Whether a face job's rows carry an aligned crop (the face actor then sent one job per CLIP encoder)."""
    return job["state"] == "done" and bool(job["result"]) and any(
        row.get("crop_sha256") for row in pickle.loads(job["result"])
    )
