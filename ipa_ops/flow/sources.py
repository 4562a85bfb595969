"""Where model weights come from: local paths, the mirror, or the Hugging Face cache/hub.

A flow names weights the way diffusers users do (hub id + subfolder + weight name). The same
flow then runs against real weights on a cluster and against the zoo offline: a mirror root
maps `org/name` to `<mirror>/org/name/` when that folder exists.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ipa_ops.errors import UserError

_SAMPLE = 1 << 20  # bytes hashed from each end of a large weight file
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model")


class SourceNotFound(UserError, FileNotFoundError):
    """A model source that is neither a path, nor in the mirror, nor in the HF cache."""


@dataclass(frozen=True)
class Resolved:
    """A model source resolved to a local folder (and file, when a weight name was given)."""

    root: Path  # the repository (or local) folder
    folder: Path  # root / subfolder
    file: Path | None  # folder / weight_name
    origin: str  # "path", "mirror" or "hf-cache"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve(
    source: str,
    subfolder: str | None = None,
    weight_name: str | None = None,
    mirror: str | None = None,
    what: str = "model",
) -> Resolved:
    """Resolve a source to local files, or raise SourceNotFound with one actionable line."""
    looked: list[str] = []
    candidates: list[tuple[Path, str]] = []
    local = Path(source).expanduser()
    if local.exists():
        candidates.append((local, "path"))
    looked.append(f"path {local}")
    if mirror:
        candidates.append((Path(mirror).expanduser() / source, "mirror"))
        looked.append(f"mirror {Path(mirror) / source}")
    for root, origin in candidates:
        found = _complete(root, subfolder, weight_name)
        if found is not None:
            return Resolved(root, found[0], found[1], origin)
    if "/" in source and not source.startswith((".", "/")):
        hub = _from_hf(source, subfolder, weight_name)
        if hub is not None:
            return hub
        looked.append("the Hugging Face cache" + (" (HF_HUB_OFFLINE=1)" if _offline() else " and hub"))
    target = "/".join(p for p in (source, subfolder, weight_name) if p)
    raise SourceNotFound(
        f"{what}: {target} not found (looked in {'; '.join(looked)}); set `mirror:` or IPA_MIRROR to a mirror "
        f"or zoo directory (`ipa zoo build DIR`), pass a local path, or unset HF_HUB_OFFLINE to download"
    )


def _complete(root: Path, subfolder: str | None, weight_name: str | None) -> tuple[Path, Path | None] | None:
    folder = root / subfolder if subfolder else root
    if not folder.exists():
        return None
    if weight_name:
        file = folder / weight_name
        return (folder, file) if file.is_file() else None
    return folder, None


def _from_hf(source: str, subfolder: str | None, weight_name: str | None) -> Resolved | None:
    """The HF cache (and hub unless offline), through huggingface_hub's own resolution."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        return None
    try:
        if weight_name:
            file = Path(hf_hub_download(source, weight_name, subfolder=subfolder, local_files_only=_offline()))
            return Resolved(file.parent.parent if subfolder else file.parent, file.parent, file, "hf-cache")
        root = Path(snapshot_download(source, local_files_only=_offline()))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None
    folder = root / subfolder if subfolder else root
    return Resolved(root, folder, None, "hf-cache") if folder.exists() else None


def fingerprint(path: str | Path) -> str:
    """A short, stable content fingerprint of a weight file or folder.

    Small files are hashed whole; large ones by size plus their first and last MiB, so
    fingerprinting a multi-GB checkpoint stays cheap while any re-save changes it.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    )
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as fh:
            if size <= 4 * _SAMPLE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()[:16]
