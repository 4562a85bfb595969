"""`ipa store ls|show|stats|import`: look into an embedding store, import torch-saved embeddings."""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_STORE = "stores/emb"


def register(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="inspect the embedding store; import .ipadpt / torch-saved embeddings")
    ssub = store.add_subparsers(dest="store_command", required=True)
    ls = ssub.add_parser("ls", help="one line per row: key, status, source, error")
    ls.add_argument("store", help="store URI (local path, file://, s3://, gs://, memory://)")
    ls.add_argument("--encoder", help="only rows of this encoder id (or alias prefix, e.g. vit-h)")
    ls.add_argument("--status", choices=["ok", "no_face", "error"], help="only rows with this status")
    ls.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    ls.set_defaults(func=_ls)
    show = ssub.add_parser("show", help="every field of one row; vectors summarised")
    show.add_argument("store")
    show.add_argument("key")
    show.set_defaults(func=_show)
    stats = ssub.add_parser("stats", help="rows per encoder and status, vector widths, parts, bytes")
    stats.add_argument("store")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=_stats)
    imp = ssub.add_parser("import", help="import embeddings saved with torch.save (diffusers .ipadpt, ComfyUI)")
    imp.add_argument("file")
    imp.add_argument("--encoder", action="append", required=True, help="encoder id; once per adapter entry")
    imp.add_argument("--store", default=DEFAULT_STORE, help=f"store URI (default: {DEFAULT_STORE})")
    imp.add_argument("--layout", default="auto", choices=["auto", "diffusers", "comfyui", "comfyui-v1"])
    imp.add_argument("--kind", default="clip", choices=["clip", "face"], help="face for FaceID id embeddings")
    imp.set_defaults(func=_import)


def _open(uri: str) -> Any:
    from ipa_ops.errors import UserError
    from ipa_ops.store.dataset import EmbeddingStore

    store = EmbeddingStore(uri)
    if not store.table().shape[0]:
        raise UserError(f"{uri}: no embedding store here (no part files); run the extract stage first")
    return store


def _ls(args: argparse.Namespace) -> int:
    table = _open(args.store).table()
    if args.encoder:
        table = table[(table["encoder"] == args.encoder) | table["encoder"].str.startswith(args.encoder + "@")]
    if args.status:
        table = table[table["status"] == args.status]
    table = table.sort_values(["encoder", "key"])
    if args.limit:
        table = table.head(args.limit)
    for row in table.itertuples():
        print(f"{row.key}\t{row.status}\t{row.source_uri}\t{row.error}".rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    import numpy as np

    from ipa_ops.store.dataset import StoreError

    store = _open(args.store)
    row = store.rows([args.key]).iloc[0]
    if row["status"] == "missing":
        raise StoreError(row["error"])
    for name, value in row.items():
        if isinstance(value, np.ndarray | list):
            value = list(np.asarray(value).tolist())
        print(f"{name}: {value}")
    for field in ("image_embeds", "hidden_states", "face_embedding"):
        try:
            tensor = store.get([args.key], field)[0]
        except StoreError:
            continue
        head = ", ".join(f"{v:.4f}" for v in tensor.reshape(-1)[:4].tolist())
        print(f"{field}: shape {list(tensor.shape)}, norm {tensor.norm():.4f}, first [{head}, ...]")
    if row.get("crop_sha256"):
        print(f"crop_png: {len(store.blob(args.key))} bytes")
    return 0


def _stats(args: argparse.Namespace) -> int:
    stats = _open(args.store).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['uri']}: {stats['parts']} parts, {stats['temp_files']} leftover temp files")
    for enc, info in stats["encoders"].items():
        status = ", ".join(f"{n} {s}" for s, n in info["status"].items())
        dims = ", ".join(f"{k}={v}" for k, v in info["dims"].items())
        uncond = "stored" if info["uncond"] else "missing"
        print(f"{enc} ({info['kind']}): {info['rows']} rows ({status}); uncond {uncond}; {dims}; "
              f"{info['parts']} parts, {info['bytes']} bytes")  # fmt: skip
    return 0


def _import(args: argparse.Namespace) -> int:
    from ipa_ops.store.imports import import_embeddings

    result = import_embeddings(args.file, args.encoder, args.store, layout=args.layout, kind=args.kind)
    print(f"{args.file}: {result['new']} new, {result['stored']} already stored in {args.store}")
    for key in result["keys"]:
        print(key)
    return 0
