"""`ipa reproduce`: remake a row's image from its record alone, and say whether it equals the original.

The record (a results row's record columns, or the `ipa` chunk inside the image) holds the
complete effective request and the model sources of the flow it ran with, so no manifest and
no flow file are needed: only the weights (found through the record's mirror, or `mirror`, or
IPA_MIRROR; or the sections of another flow file) and the embedding store it names. Before
anything runs, the weights' fingerprints and the input images' sha256 are checked against the
record, so a mismatch is named instead of showing up as a different image.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ipa_ops.errors import UserError
from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.flow.spec import Flow
from ipa_ops.generate import loras
from ipa_ops.generate.generator import Generator
from ipa_ops.generate.plan import AdapterPlan, RowPlan
from ipa_ops.generate.prepare import prepare
from ipa_ops.generate.records import for_image
from ipa_ops.outputs import results_parts
from ipa_ops.outputs.files import Encoded, encode_outputs
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.records.metadata import read_record
from ipa_ops.records.schema import RECORD_COLUMNS, from_columns
from ipa_ops.store.dataset import EmbeddingStore
from ipa_ops.store.images import ImageError, sha256_of

_SECTIONS = ("models", "controlnets", "motion_adapters", "adapters", "encoders", "loras")
_ROW_COLUMNS = ["id", "row_key", "status", "finished_at", "outputs", "prompt", "seed", "model_fingerprint"]


class ReproduceError(UserError):
    """A record that cannot be remade as it was (missing, weights or inputs changed); one line."""


@dataclass
class Original:
    """The record, the files it was written as (the main file first; a video's frames after), and the
    records of the rows that shared its pipeline call (`batch.row_keys` order, itself left out)."""

    record: dict[str, Any]
    files: list[str]
    mates: list[dict[str, Any]] = field(default_factory=list)
    frame: int | None = None  # `--png` on one frame of a video


@dataclass
class Comparison:
    identical_pixels: bool
    identical_bytes: bool
    max_difference: int  # largest |difference| of any pixel value, 0..255
    differing_values: int
    compared: list[str]


def from_output(output: str, row_key: str) -> Original:
    """The latest `ok` results row of `row_key` in OUTPUT, as a record and its files."""
    out = OutputDir(output)
    tables = results_parts.read_parts(out.fs, out.results_dir(), _ROW_COLUMNS + list(RECORD_COLUMNS))
    if not tables:
        raise ReproduceError(f"{output}: no results parts; is this an ipa output folder?")
    table = pa.concat_tables(tables, promote_options="permissive")
    rows = table.filter(pc.and_(pc.equal(table["row_key"], row_key), pc.equal(table["status"], "ok"))).to_pylist()
    if not rows:
        raise ReproduceError(f"{output}: no ok results row with row_key {row_key}; `ipa report {output}` lists them")
    row = max(rows, key=lambda r: r["finished_at"])
    try:
        record = from_columns(row)
    except ValueError as exc:
        raise ReproduceError(str(exc)) from None
    mates = []
    for key in (record.get("batch") or {}).get("row_keys") or []:
        if key == row_key:
            continue
        found = table.filter(pc.and_(pc.equal(table["row_key"], key), pc.equal(table["status"], "ok"))).to_pylist()
        if not found:
            raise ReproduceError(f"{output}: row {record['id']} shared its pipeline call with row key {key}, which has "
                                 f"no ok results row here; remake it from its image with --png")  # fmt: skip
        mates.append(from_columns(max(found, key=lambda r: r["finished_at"])))
    return Original(record, [out.resolve(str(o)) for o in row["outputs"] or []], mates)


def from_image(path: str) -> Original:
    """The record inside a PNG or GIF written by ipa; the file itself is the original."""
    try:
        record = read_record(path)
    except (OSError, ValueError) as exc:
        raise ReproduceError(str(exc)) from None
    mates = record.pop("batch_records", None) or []
    frame = record.pop("frame", None)
    return Original(record, [path], mates, frame)


def flow_of(record: dict[str, Any], mirror: str | None = None, sources_from: Flow | None = None) -> Flow:
    """A flow holding only the record's model sources (or those sections of `sources_from`)."""
    given = record.get("sources") or {}
    sections = (
        {k: getattr(sources_from, k) for k in _SECTIONS} if sources_from else {k: given.get(k) or {} for k in _SECTIONS}
    )
    root = mirror or (sources_from.mirror if sources_from else given.get("mirror"))
    try:
        return Flow.model_validate({"name": "reproduce", "mirror": root, **sections})
    except ValueError as exc:
        raise ReproduceError(f"row {record.get('id')}: the record's model sources do not form a flow: {exc}") from None


def plan_of(record: dict[str, Any]) -> RowPlan:
    """The RowPlan the record describes (what `prepare` turns into a RowRequest)."""
    request: dict[str, Any] = {
        name: record[name]
        for name in ("id", "prompt", "seed", "model", "negative_prompt", "task", "width", "height", "steps")
    }
    request.update(guidance_scale=record["guidance_scale"], scheduler=(record.get("scheduler") or {}).get("name"))
    if record.get("strength") is not None:
        request["strength"] = record["strength"]
    for name in ("controlnet_scale", "num_frames", "true_cfg_scale"):
        if record.get(name) is not None:
            request[name] = record[name]
    adapters = [
        AdapterPlan(
            alias=a["alias"],
            field=a["field"],
            encoder=a["encoder"],
            keys=[r["key"] for r in a["references"]],
            negative_keys=[r["key"] for r in a["negatives"] or []],
            masks=[m["uri"] for m in a["masks"] or []],
            combine=a["combine"],
            scale=a["scale"],
            mask_fit=a.get("mask_fit"),
            soft_masks=bool(a.get("soft_masks")),
            face=a.get("face"),
            **{name: a.get(name) for name in ("image_weights", "embeds_scaling", "frames", "tiles")},
        )
        for a in record.get("adapters") or []
    ]
    uri = {name: (record.get(name) or {}).get("uri") for name in ("init_image", "mask_image", "control_image")}
    return RowPlan(
        record["id"], record["row_key"], request, uri["init_image"], uri["mask_image"], adapters,
        control_image=uri["control_image"], record=record,
    )  # fmt: skip


def check_weights(record: dict[str, Any], flow: Flow) -> None:
    """The weights found now must be the ones the row was made with (same fingerprints)."""
    mirror, rid = flow.mirror_root(), record.get("id")
    model = flow.models.get(record["model"])
    if model is None:
        raise ReproduceError(f"row {rid}: model {record['model']!r} is not among the model sources")
    wanted = [(f"model {record['model']!r}", record.get("model_fingerprint"), model.source, model.subfolder, None)]
    for a in record.get("adapters") or []:
        spec = flow.adapters.get(a["alias"])
        if spec is None:
            raise ReproduceError(f"row {rid}: adapter {a['alias']!r} is not among the model sources")
        wanted.append((f"adapter {a['alias']!r}", a["fingerprint"], spec.source, spec.subfolder, spec.weight_name))
    for c in record.get("components") or []:
        section = flow.controlnets if c["kind"] == "controlnet" else flow.motion_adapters
        spec = section[c["alias"]]
        what = f"{c['kind'].replace('_', ' ')} {c['alias']!r}"
        wanted.append((what, c["fingerprint"], spec.source, spec.subfolder, None))
    for lora in record.get("loras") or []:
        spec = flow.loras[lora["alias"]]
        name = spec.weight_name or loras.DEFAULT_WEIGHT_NAME
        wanted.append((f"lora {lora['alias']!r}", lora["fingerprint"], spec.source, spec.subfolder, name))
    for what, expected, source, subfolder, weight_name in wanted:
        found = resolve(source, subfolder, weight_name, mirror, what)
        actual = fingerprint(found.file or found.folder)
        if expected and actual != expected:
            raise ReproduceError(
                f"row {rid}: {what} at {found.file or found.folder} has fingerprint {actual}, the record says "
                f"{expected}; point --mirror (or --flow) at the weights the row was made with"
            )


def check_inputs(record: dict[str, Any]) -> None:
    """Input images (init, mask, control, adapter masks) must still hold the bytes the row read."""
    found = [(name, record.get(name)) for name in ("init_image", "mask_image", "control_image")]
    for a in record.get("adapters") or []:
        found += [(f"adapters[{a['alias']}].masks", m) for m in a.get("masks") or []]
    for what, image in found:
        if not image:
            continue
        try:
            actual = sha256_of(image["uri"])
        except (OSError, ValueError) as exc:  # ImageError: a ValueError naming the file
            reason = exc.reason if isinstance(exc, ImageError) else str(exc)
            relative = "://" not in image["uri"] and not Path(image["uri"]).is_absolute()
            hint = (
                "; it is a relative path (records written before ipa recorded absolute ones): run "
                "`ipa reproduce` from the folder the run was started in" if relative else ""
            )
            said = f"row {record.get('id')}: {what}: {image['uri']} cannot be read ({reason}){hint}"
            raise ReproduceError(said) from None
        if actual != image["sha256"]:
            raise ReproduceError(
                f"row {record.get('id')}: {what}: {image['uri']} changed since the row was made (sha256 {actual[:12]}, "
                f"the record says {image['sha256'][:12]}); restore it to reproduce the row"
            )


def remake(
    original: Original,
    mirror: str | None = None,
    store: str | None = None,
    sources_from: Flow | None = None,
    device: str | None = None,
) -> np.ndarray:
    """The row's output as uint8, remade from the record: (H, W, 3), or (F, H, W, 3) for a video.

    The row is remade in the pipeline call it was made in: with the rows that shared it, in the
    same order, on as many torch threads (on CPU each changes the last bit of some pixels).
    """
    record = original.record
    flow = flow_of(record, mirror, sources_from)
    by_key = {m["row_key"]: m for m in original.mates}
    batch = record.get("batch") or {}
    missing = [k for k in batch.get("row_keys") or [] if k != record["row_key"] and k not in by_key]
    if missing:
        raise ReproduceError(f"row {record.get('id')}: the records of rows {missing} it was made with are missing")
    call = [by_key.get(k, record) for k in batch.get("row_keys") or []] or [record]
    for made in call:
        check_weights(made, flow)
        check_inputs(made)
    store_uri = store or record.get("store")
    if any(made.get("adapters") for made in call) and not store_uri:
        raise ReproduceError(f"row {record.get('id')}: the record names no embedding store; pass --store")
    try:
        opened = EmbeddingStore(store_uri) if store_uri else None
        requests = [prepare(plan_of(made), opened) for made in call]
    except (OSError, KeyError, ValueError) as exc:
        raise ReproduceError(f"row {record.get('id')}: {exc}") from None
    generator = _generator(flow, device)
    generator.batch_size = len(requests)
    threads = torch.get_num_threads()
    if generator.device == "cpu" and batch.get("torch_threads"):
        torch.set_num_threads(int(batch["torch_threads"]))
    try:
        outputs = generator.generate(requests)
    finally:
        torch.set_num_threads(threads)
    output = outputs[call.index(record)]
    if output.error or output.image is None:
        raise ReproduceError(output.error or f"row {record.get('id')}: the generator returned no image")
    return (np.clip(output.image, 0, 1) * 255).round().astype(np.uint8)


_LOADED: dict[str, Generator] = {}


def _generator(flow: Flow, device: str | None) -> Generator:
    """One loaded Generator per (sources, device) in a process: remaking many rows loads the models once."""
    key = f"{flow.model_dump_json()}|{device}"
    if key not in _LOADED:
        _LOADED.clear()  # one set of pipelines in memory at a time
        _LOADED[key] = Generator(flow, device=device)
    return _LOADED[key]


def write(original: Original, out_dir: str, array: np.ndarray) -> tuple[Encoded, list[str]]:
    """The remade output in DIR as `<row_key>.png` (a video: `.gif` and `<row_key>/<i>.png`), with its record."""
    record = original.record
    encoded = encode_outputs(array, for_image(record, original.mates))
    root = Path(out_dir)
    key = record["row_key"]
    paths = [root / f"{key}.{encoded.ext}"] + [root / key / f"{i:05d}.png" for i in range(len(encoded.frames))]
    for path, data in zip(paths, [encoded.data, *encoded.frames], strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return encoded, [str(p) for p in paths]


def compare(original: Original, encoded: Encoded) -> Comparison:
    """Each original file against its remade counterpart: decoded pixels, and bytes."""
    import fsspec

    remade = {"main": encoded.data, **{f"{i:05d}": frame for i, frame in enumerate(encoded.frames)}}
    pairs = []
    for i, uri in enumerate(original.files):
        name = posixpath.basename(uri)
        if original.frame is not None:  # `--png` on one frame of a video
            which = f"{int(original.frame):05d}"
        elif i == 0:
            which = "main"
        else:
            which = posixpath.splitext(name)[0]
        if which not in remade:
            raise ReproduceError(f"{uri}: the remade row has no counterpart of this file")
        with fsspec.open(uri, "rb") as f:
            pairs.append((uri, f.read(), remade[which]))
    worst, differing, same_pixels, same_bytes = 0, 0, True, True
    for _, old, new in pairs:
        a, b = _pixels(old), _pixels(new)
        same_bytes &= old == new
        if a.shape != b.shape:
            raise ReproduceError(f"the remade image is {b.shape}, the original {a.shape}")
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        worst, differing = max(worst, int(diff.max())), differing + int((diff > 0).sum())
        same_pixels &= not diff.any()
    return Comparison(same_pixels, same_bytes, worst, differing, [p[0] for p in pairs])


def _pixels(data: bytes) -> np.ndarray:
    """Every frame of an image file as uint8 RGB, stacked."""
    import io

    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as image:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
