"""The staging folder of an export, and its commit: DEST appears whole, or not at all.

An export writes everything into `<parent>/.<name>.ipa-export-<token>/` beside DEST (same
filesystem), with an `owner.json` naming the process. The commit gives the shards their final,
numbered names (in selection order), writes `.ipa-export.json` (what was exported, from where, how
many rows) and renames the folder to DEST in one step. So a half-finished export (killed, out of
disk, a failing shard) never sits under DEST's name: DEST either does not exist or is complete.
Exports are atomic, not resumable: a rerun starts again. A failure removes its staging folder; a
killed export leaves one, which the next export to the same DEST removes once its owner is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from ipa_ops.errors import UserError

MANIFEST = ".ipa-export.json"  # hidden: dataset loaders skip dot files, so it never reads as data
SELECTION = "_selection"
SPILL = "_spill"


class Staging:
    """One export's staging folder beside `dest`."""

    def __init__(self, dest: str):
        if "://" in dest and not dest.startswith("file://"):
            raise UserError(f"export DEST {dest}: must be a local folder (copy it to object storage afterwards)")
        self.dest = os.path.abspath(dest.removeprefix("file://"))
        parent, name = os.path.split(self.dest.rstrip("/"))
        self.prefix = os.path.join(parent, f".{name}.ipa-export-")
        self.path = self.prefix + uuid.uuid4().hex[:12]

    def begin(self) -> Staging:
        self._check_dest()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        remove_stale(self.prefix)
        os.makedirs(self.path)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat()}
        with open(os.path.join(self.path, "owner.json"), "w") as f:
            json.dump(owner, f)
        return self

    def sub(self, name: str) -> str:
        return os.path.join(self.path, name)

    def commit(self, fmt: str, entries: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
        """Name the shards, write the manifest, rename the folder to DEST; returns the manifest."""
        for name in (SELECTION, SPILL, "owner.json"):
            target = self.sub(name)
            shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else _remove(target)
        written = sorted((e for e in entries if e["rows"]), key=lambda e: (e["first"], e["part"]))
        for e in entries:  # shards with no rows (every image gone) are not files of the export
            if not e["rows"]:
                _remove_any(self.sub(e["file"]))
                if e.get("stats"):
                    _remove(self.sub(e["stats"]))
        files = [self._rename(fmt, i, len(written), e) for i, e in enumerate(written)]
        manifest = {
            **manifest,
            "format": fmt,
            "rows": sum(e["rows"] for e in written),
            "missing_images": sum(e["missing"] for e in entries),
            "files": files,
            "finished_at": datetime.now(UTC).isoformat(),
        }
        with open(self.sub(MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, default=str)
        self._check_dest()
        if os.path.isdir(self.dest):  # an empty DEST (checked above) is replaced
            os.rmdir(self.dest)
        os.rename(self.path, self.dest)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _rename(self, fmt: str, index: int, total: int, entry: dict[str, Any]) -> str:
        digits = max(5, len(str(total)))
        if fmt == "imagefolder":
            final = f"{index:0{digits}d}"
        elif fmt == "webdataset":
            final = f"{index:0{digits}d}.tar"
            os.rename(self.sub(entry["stats"]), self.sub(f"{index:0{digits}d}_stats.json"))
        else:
            final = f"train-{index:0{digits}d}-of-{total:0{digits}d}.parquet"
        os.rename(self.sub(entry["file"]), self.sub(final))
        return final

    def _check_dest(self) -> None:
        if os.path.exists(self.dest) and (not os.path.isdir(self.dest) or os.listdir(self.dest)):
            raise UserError(f"export DEST {self.dest}: exists and is not empty; remove it or choose another folder")


def is_finished(dest: str) -> bool:
    """True for a committed export (its manifest is written just before the folder takes its name)."""
    return os.path.isfile(os.path.join(dest, MANIFEST))


def remove_stale(prefix: str) -> list[str]:
    """Remove staging folders of earlier exports to the same DEST whose process is gone (this host)."""
    parent = os.path.dirname(prefix)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name)
        if not path.startswith(prefix) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "owner.json")) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"ipa: removed {path}, the staging folder of an export that did not finish", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_any(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _remove(path)
