"""Store rows of the extract stage: made from finished jobs, counted and committed on the driver.

The driver receives finished jobs from the pipeline; `collect` counts each one (new, already
stored, failed, no face) and hands its rows to a `Committer`, which writes them to the store as
Parquet parts every so many rows or seconds, so a run that dies loses only what was not committed.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections import defaultdict
from typing import Any

from ipa_ops.store.commit import commit_lease, unstored
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now, vector_dims

log = logging.getLogger(__name__)
COUNT_FIELDS = ("new", "stored", "failed", "no_face")


def store_row(job: dict[str, Any], enc_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A store row for a job: content key, provenance and the encoder's fields."""
    return {"key": content_key(job["sha256"], enc_id), "image_sha256": job["sha256"], "source_uri": job["uri"],
            "encoder": enc_id, "kind": kind, "status": "ok", "error": "", "notes": job["notes"],
            "created_at": now(), **fields}  # fmt: skip


class Committer:
    """Driver side: buffers store rows per encoder and commits them as parts; keeps keys unique."""

    def __init__(self, store: EmbeddingStore, known: dict[str, tuple[str, str]], rows: int, seconds: float):
        self.store, self.rows_limit, self.seconds = store, rows, seconds
        self.done = {k for k, (status, _) in known.items() if status != "error"}
        self.errors = {k: error for k, (status, error) in known.items() if status == "error"}
        self.buffers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.exemplars: dict[str, dict[str, Any]] = {}
        self.last = time.monotonic()
        self.parts = 0

    def add(self, row: dict[str, Any]) -> None:
        key, enc = row["key"], row["encoder"]
        if key in self.done or (row["status"] == "error" and self.errors.get(key) == row["error"]):
            return  # already stored (or the same failure already recorded)
        if row["status"] != "error":
            self.done.add(key)
        if row.get("image_embeds") is not None and enc not in self.exemplars:
            self.exemplars[enc] = row
        self.buffers[enc].append(row)
        if sum(map(len, self.buffers.values())) >= self.rows_limit or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Commit every buffer whose vector widths are known (from the folder or a row with vectors).

        Under the store's commit lease, rows another extract committed since are dropped first, so
        concurrent extracts into one store never write a key twice (store_commit.py).
        """
        if not any(self.buffers.values()):
            self.last = time.monotonic()
            return
        with commit_lease(self.store):
            self._flush()

    def _flush(self) -> None:
        stored = self.store.statuses()
        for enc, rows in self.buffers.items():
            rows[:] = unstored(rows, stored)
            if not rows:
                continue
            exemplar = self.exemplars.get(enc)
            dims = self.store.dims(enc) or (vector_dims(exemplar) if exemplar else {})
            if not dims:
                continue  # only error rows so far and no schema yet: wait for the encoder's first vectors
            dtype = str(exemplar["hidden_states"].dtype) if exemplar and "hidden_states" in exemplar else "float32"
            self.store.append(build_table(rows, dims, hidden_dtype=dtype))
            self.parts += 1
            rows.clear()
        self.last = time.monotonic()


def faces_missing_crops(store: EmbeddingStore, face_ids: list[str], clip_ids: list[str]) -> set[str]:
    """Stored face keys whose aligned crop has no row yet for one of `clip_ids`.

    A run killed between committing a face row and its crop's CLIP row leaves such faces behind;
    handing their keys out again re-makes the crop rows (the face rows themselves are kept).
    """
    table = store.table()
    if not face_ids or not clip_ids or table.empty or "crop_sha256" not in table:
        return set()
    known = store.statuses()
    faces = table[table["encoder"].isin(face_ids) & (table["status"] == "ok") & table["crop_sha256"].notna()]
    return {
        key
        for key, sha in zip(faces["key"], faces["crop_sha256"], strict=True)
        if any(content_key(sha, clip) not in known for clip in clip_ids)
    }


def summarize(counts: dict[str, dict[str, int]]) -> str:
    """One line per encoder: `vit-h: 0 new, 20 already stored, 0 failed, 0 no face`."""
    return "\n".join(
        f"{alias}: {c['new']} new, {c['stored']} already stored, {c['failed']} failed, {c['no_face']} no face"
        for alias, c in counts.items()
    )


def error_row(job: dict[str, Any], enc_id: str, kind: str) -> dict[str, Any]:
    sha = job["sha256"] or "uri-" + hashlib.sha256(job["uri"].encode()).hexdigest()  # unreadable: no content hash
    return {**store_row({**job, "sha256": sha}, enc_id, kind), "image_sha256": job["sha256"], "status": "error",
            "error": job["error"]}  # fmt: skip


def collect(job: dict[str, Any], ids: dict[str, str], kinds: dict[str, str], counts: dict[str, dict[str, int]],
             committer: Committer) -> None:  # fmt: skip
    """Count one finished job and hand its store rows to the committer."""
    alias = job["encoder"]
    label = f"{alias}:face-crops" if job["origin"] else alias
    tally = counts.setdefault(label, dict.fromkeys(COUNT_FIELDS, 0))
    if job["state"] == "stored":
        tally["stored"] += 1
        return
    if job["state"] == "error":
        committer.add(error_row(job, ids[alias], kinds[alias]))
        tally["failed"] += 1
        log.warning("%s", job["error"])
        return
    for row in pickle.loads(job["result"]) if job["result"] else []:
        committer.add(row)
        if row["key"].startswith("uncond/"):
            continue
        status = row["status"]
        tally["new" if status == "ok" else "no_face" if status == "no_face" else "failed"] += 1
        if status != "ok":
            log.warning("%s", row["error"])
