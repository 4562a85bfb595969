"""Rows planned before: a rerun knows an unchanged manifest row's key without checking it again.

Planning costs ~0.4 ms a row (cells coerced, checks, schedules parsed, canonical JSON hashed), so a
nightly rerun of 10^6 rows, nearly all done, spent minutes planning rows it then skipped. After a
run plans its rows, it records for each good row the hash of the row *as read* and its row key:

    <output>/_plans/<context>.parquet              raw_hash (16 bytes), row_key; metadata: files token
    <output>/_plans/<context>-<token>.files.parquet  uri, signature (size and mtime / ETag) of every
                                                  file those rows' keys hashed (references, masks, ...)

`context` hashes everything outside a row that decides its key or whether it passes its checks:
the flow (minus resources and Ray settings), the stage, model/adapter/LoRA fingerprints, and the
source of the modules that build row keys, so any change there plans every row again. A cache whose
files changed (a reference edited in place) is dropped whole. A row whose raw hash is known is
then skipped at once when its key is done, and checked and planned as usual when it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ipa_ops.canonical import canonical_json
from ipa_ops.flow.spec import Flow
from ipa_ops.flow.stage_specs import GenerateStage
from ipa_ops.manifest.rows import STORE_KEY, ManifestRow
from ipa_ops.outputs.folder import OutputDir

FOLDER = "_plans"
_TOKEN = b"ipa.plan_files"
_RUNTIME = ("resources", "lease", "commit_rows", "commit_seconds", "stop_grace_s")  # do not decide a row key
_KEY_CODE = ("plan.py", "faceid.py", "tasks.py", "loras.py", "conditioning.py")  # generate/ modules keying rows


def row_hash(record: Mapping[str, Any]) -> bytes:
    """16 bytes naming a manifest row exactly as read (every cell, partition values included)."""
    text = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False, allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def context_hash(flow: Flow, stage: GenerateStage, fingerprints: Mapping[str, str]) -> str:
    """What, besides the row, decides its key: flow, stage, weights and the row-key code."""
    flow_data = flow.model_dump(mode="json", exclude={"ray", "stages"})
    stage_data = stage.model_dump(mode="json", exclude=set(_RUNTIME) & set(type(stage).model_fields))
    here = Path(__file__).parent
    code = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _KEY_CODE}
    code["row_key"] = hashlib.sha256((here.parent / "outputs" / "folder.py").read_bytes()).hexdigest()
    data = {"flow": flow_data, "stage": stage_data, "fingerprints": dict(fingerprints), "code": code}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:20]


def row_files(row: ManifestRow) -> list[str]:
    """The files a row's key hashes (store keys are content-addressed already)."""
    found = [row.init_image, row.mask_image, row.control_image]
    for entry in row.adapters:
        found += [*entry.images, *entry.masks, *entry.negative_images]
    return [f for f in found if f and not STORE_KEY.match(f)]


def signature(uri: str) -> str | None:
    """Size and modification time (ETag on object storage) of a file; None when it is not there."""
    try:
        if "://" not in uri:
            info = os.stat(uri)
            return f"{info.st_size}:{info.st_mtime_ns}"
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        meta = fs.info(path)
        stamp = meta.get("ETag") or meta.get("etag") or meta.get("LastModified") or meta.get("mtime")
        return f"{meta.get('size')}:{stamp}"
    except (OSError, ValueError):
        return None


class PlanCache:
    """The known rows of one context in one output folder."""

    def __init__(self, output_uri: str, context: str):
        self.out = OutputDir(output_uri)
        self.context = context
        self.files: dict[str, str] = {}

    def _path(self, suffix: str = "") -> str:
        return self.out.path(FOLDER, f"{self.context}{suffix}.parquet")

    def load(self) -> dict[bytes, str]:
        """raw hash -> row key; empty when there is no cache, it does not read, or a file changed."""
        try:
            if not self.out.exists(self._path()):
                return {}
            table = pq.read_table(pa.BufferReader(self.out.read_bytes(self._path())))
            token = (table.schema.metadata or {}).get(_TOKEN, b"").decode()
            files = pq.read_table(pa.BufferReader(self.out.read_bytes(self._path(f"-{token}.files"))))
        except (OSError, ValueError, pa.ArrowException):
            return {}  # unreadable: plan every row (the cache is only ever a shortcut)
        recorded = dict(zip(files.column("uri").to_pylist(), files.column("signature").to_pylist(), strict=True))
        if any(signature(uri) != sig for uri, sig in recorded.items()):
            return {}
        self.files = recorded
        return dict(zip(table.column("raw_hash").to_pylist(), table.column("row_key").to_pylist(), strict=True))

    def save(self, known: Mapping[bytes, str], new_files: Iterable[str]) -> None:
        """Record `known` (raw hash -> row key) and the files their keys hashed; old files kept too."""
        files = dict(self.files)
        for uri in new_files:
            if uri not in files:
                sig = signature(uri)
                if sig is not None:
                    files[uri] = sig
        token = uuid.uuid4().hex[:12]
        listed = pa.table({"uri": list(files), "signature": list(files.values())})
        self._write(self._path(f"-{token}.files"), listed)  # 1. the files, under a new name
        table = pa.table(
            {"raw_hash": pa.array(list(known), pa.binary(16)), "row_key": pa.array(list(known.values()), pa.string())}
        )
        self._write(self._path(), table.replace_schema_metadata({_TOKEN: token.encode()}))  # 2. the rows
        for name in self.out.fs.ls(posixpath.join(self.out.root, FOLDER), detail=False):  # 3. older file lists
            base = os.path.basename(str(name))
            if base.startswith(f"{self.context}-") and not base.startswith(f"{self.context}-{token}"):
                self.out.fs.rm(name)

    def _write(self, path: str, table: pa.Table) -> None:
        self.out.write_bytes_atomic(path, lambda f: pq.write_table(table, f))
