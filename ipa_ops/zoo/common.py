"""Small helpers shared by the zoo builders: stable seeds, JSON and tensor writers.

Everything here exists for determinism: a rebuild must give byte-identical files, so seeds are
derived from names (not from build order) and JSON is written with a fixed layout.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: ``ipa_ops.zoo.sizes`` must stay cheap to import
    import torch

ZOO_SEED = 20240601


def seed_for(name: str) -> int:
    """A stable seed per artefact, so builders can run in any order."""
    return (ZOO_SEED + zlib.crc32(name.encode("utf-8"))) % (2**31)


def generator(name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed_for(name))


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[dtype]


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a trailing newline, as the hub files are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def save_pretrained(model: Any, path: Path, dtype: str) -> None:
    """``save_pretrained`` in the zoo dtype, as safetensors, never sharded, without progress bars."""
    from transformers.utils import logging as hf_logging

    if dtype != "float32":
        model = model.to(torch_dtype(dtype))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size="100GB")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` of plain dicts of tensors, loadable with ``weights_only=True``.

    The archive's inner folder is named after the file stem, so writing under the final name
    (never a temp name) keeps the bytes reproducible.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))
