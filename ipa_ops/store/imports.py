"""Importing embeddings saved with `torch.save` into the store, safely.

Layouts accepted:

* `diffusers` — the `image_embeds.ipadpt` of the diffusers docs: a list with one tensor per
  adapter, shaped [2, n_images, dim] (pooled) or [2, n_images, tokens, dim] (hidden states),
  negative half first, as `prepare_ip_adapter_image_embeds(..., do_classifier_free_guidance=True)`
  returns it (FaceID id embeds [2, n, 512] have the same layout);
* `comfyui` — ComfyUI_IPAdapter_plus's "IPAdapter Save Embeds": one tensor, the `pos_embed` (or
  `neg_embed`) output of "IPAdapter Encoder", shaped [n, dim] or [n, tokens, dim];
* `comfyui-v1` — the legacy ComfyUI node, which stacked (positive, negative): [2, n, dim] or
  [2, n, tokens, dim], positive first.

Files are read with `torch.load(weights_only=True)`; one that needs arbitrary code to unpickle is
refused. Imported rows carry the encoder id the user names and a key derived from the file's
sha256 and the position in it (there is no image to hash).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Literal

import torch

from ipa_ops.errors import UserError
from ipa_ops.store.dataset import EmbeddingStore, build_table, content_key, now, uncond_key, vector_dims

Layout = Literal["auto", "diffusers", "comfyui", "comfyui-v1"]
LAYOUTS = ("auto", "diffusers", "comfyui", "comfyui-v1")


def load_embeds_file(path: str) -> Any:
    """`torch.load(weights_only=True)`, with every failure as one line naming the file."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unsupported global"
        raise UserError(
            f"{path}: refused: unpickling it would run arbitrary code ({reason.strip()}); "
            "only tensors and lists of tensors are imported"
        ) from None
    except Exception as exc:
        raise UserError(f"{path}: not a torch.save file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def split(obj: Any, layout: Layout, path: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(positive [n, ...], negative [n or 1, ...] or None) per adapter entry of the file."""
    if layout == "auto":
        layout = _guess(obj, path)
    if layout == "diffusers":
        if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
            raise UserError(f"{path}: the diffusers layout is a list of tensors, got {type(obj).__name__}")
        out = []
        for i, t in enumerate(obj):
            if t.dim() not in (3, 4) or t.shape[0] % 2:
                raise UserError(
                    f"{path}: entry {i} has shape {list(t.shape)}; expected [2, n, dim] or [2, n, tokens, dim]"
                )
            half = t.shape[0] // 2  # num_images_per_prompt copies; the first of each half is enough
            out.append((t[half], t[0]))
        return out
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path}: the {layout} layout is one tensor, got {type(obj).__name__}")
    if layout == "comfyui":
        if obj.dim() not in (2, 3):
            raise UserError(f"{path}: shape {list(obj.shape)}; comfyui embeds are [n, dim] or [n, tokens, dim]")
        return [(obj, None)]
    if obj.dim() not in (3, 4) or obj.shape[0] != 2:
        raise UserError(f"{path}: shape {list(obj.shape)}; comfyui-v1 embeds are [2, n, dim] or [2, n, tokens, dim]")
    return [(obj[0], obj[1])]


def _guess(obj: Any, path: str) -> Layout:
    if isinstance(obj, (list, tuple)):
        return "diffusers"
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path}: expected a tensor or a list of tensors, got {type(obj).__name__}")
    if obj.dim() == 2:
        return "comfyui"
    if obj.dim() == 4:
        return "comfyui-v1"
    if obj.dim() == 3 and obj.shape[0] != 2:
        return "comfyui"
    raise UserError(
        f"{path}: shape {list(obj.shape)} is ambiguous; pass --layout comfyui ([n, tokens, dim]) "
        "or --layout comfyui-v1 ([positive/negative, n, dim])"
    )


def import_embeddings(
    path: str, encoders: list[str], store_uri: str, layout: Layout = "auto", kind: str = "clip"
) -> dict[str, Any]:
    """Append the file's embeddings to the store; returns counts and the keys, in file order."""
    entries = split(load_embeds_file(path), layout, path)
    if len(encoders) == 1 and len(entries) > 1:
        raise UserError(f"{path}: holds {len(entries)} adapter entries; give --encoder once per entry, in order")
    if len(encoders) != len(entries):
        raise UserError(f"{path}: holds {len(entries)} adapter entries but {len(encoders)} --encoder ids were given")
    file_sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    store = EmbeddingStore(store_uri)
    known = store.keys() | {k for k in store.statuses() if k.startswith("uncond/")}
    result: dict[str, Any] = {"new": 0, "stored": 0, "keys": []}
    for a, ((pos, neg), enc) in enumerate(zip(entries, encoders, strict=True)):
        rows = []
        for i in range(pos.shape[0]):
            sha = hashlib.sha256(f"{file_sha}:{a}:{i}".encode()).hexdigest()
            row = _row(content_key(sha, enc), sha, f"{path}#adapter={a}&image={i}", enc, kind, pos[i])
            result["keys"].append(row["key"])
            if row["key"] in known:
                result["stored"] += 1
                continue
            rows.append(row)
        if neg is not None and uncond_key(enc) not in known:
            rows.append(_row(uncond_key(enc), "", f"{path}#adapter={a}&negative", enc, kind, neg[0]))
        if rows:
            dtype = str(rows[0]["hidden_states"].dtype) if "hidden_states" in rows[0] else "float32"
            store.append(build_table(rows, store.dims(enc) or vector_dims(rows[0]), hidden_dtype=dtype))
            result["new"] += sum(not r["key"].startswith("uncond/") for r in rows)
    return result


def _row(key: str, sha: str, source: str, enc: str, kind: str, value: torch.Tensor) -> dict[str, Any]:
    array = value.detach().cpu().numpy()
    fields: dict[str, Any] = (
        {"image_embeds": array.astype("float32")}
        if array.ndim == 1
        else {"hidden_states": array, "hidden_shape": list(array.shape)}
    )
    notes = "imported from a torch.save file; image_sha256 is a digest of the file and position, not of an image"
    return {"key": key, "image_sha256": sha, "source_uri": source, "encoder": enc, "kind": kind, "status": "ok",
            "error": "", "notes": notes, "created_at": now(), **fields}  # fmt: skip
