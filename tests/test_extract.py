"""The extract stage: equivalence with diffusers / InsightFace, skip-what-is-stored, crash recovery, bad input."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ipa_ops.flow.spec import Flow, parse_flow
from ipa_ops.store.dataset import EmbeddingStore, content_key
from ipa_ops.store.encoders.ids import encoder_id
from ipa_ops.zoo import draw_face, draw_faces, face_analysis_kwargs

ENCODER = {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder", "hidden_states": True}
FACES = {"type": "insightface", "pack": "buffalo_l", "det_size": 320}
N_GOOD = 20


def _flow(zoo: Path, root: Path, images: list[str], max_pixels: int = 40_000) -> Flow:
    return parse_flow({
        "name": "extract-test", "mirror": str(zoo),
        "encoders": {"vit-h": ENCODER, "faces": FACES},
        "stages": {"extract": {
            "images": images, "encoders": ["vit-h", "faces"], "store": str(root / "store"), "max_pixels": max_pixels,
            "resources": {"actors": 1, "num_cpus": 0.5, "batch_size": 4, "calls_per_actor": 2},  # threaded actors
        }},
    })  # fmt: skip


def _inputs(root: Path) -> tuple[list[str], dict[str, str]]:
    """20 distinct images (2 with a face), one duplicate under another name, and one of each bad input."""
    refs = root / "refs"
    refs.mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_GOOD - 2):
        size = (int(rng.integers(24, 64)), int(rng.integers(24, 64)))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(refs / f"img{i:02d}.png")
    draw_face((160, 120), seed=1).save(refs / "face1.png")
    draw_faces((200, 200), [((50, 50), 30, 2), ((140, 140), 45, 3)]).save(refs / "face2.png")
    shutil.copy(refs / "img00.png", root / "copy_of_img00.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    bad_dir = root / "bad"
    bad_dir.mkdir()
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "text.png").write_text("not an image")
    (bad_dir / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad_dir / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    Image.new("RGB", (300, 200)).save(bad_dir / "big.png")
    bad = {
        str(bad_dir / "missing.png"): "file not found",
        str(bad_dir / "empty.png"): "empty file (0 bytes)",
        str(bad_dir / "text.png"): "not an image",
        str(bad_dir / "cut.png"): "corrupt or truncated PNG data",
        str(bad_dir / "cut.jpg"): "corrupt or truncated JPEG data",
        str(bad_dir / "big.png"): "60000 pixels is over the limit of 40000",
        "unknownfs://bucket/x.png": "cannot read",
    }
    return [str(refs), str(root / "copy_of_img00.png"), *bad], bad


@pytest.fixture(scope="module")
def runs(zoo_dir: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run killed after some parts were committed, a leftover temp part, then two complete runs."""
    import ipa_ops.stages.extract as extract

    root = tmp_path_factory.mktemp("extract")
    images, bad = _inputs(root)
    flow = _flow(zoo_dir, root, images)
    stage = flow.stages.extract
    assert stage is not None
    real_collect, seen = extract.collect, []

    def dying_collect(*args: Any) -> None:
        seen.append(1)
        if len(seen) > 12:
            raise RuntimeError("simulated crash")
        real_collect(*args)

    extract.collect = dying_collect
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract.run_extract(flow, stage, commit_rows=4)
    finally:
        extract.collect = real_collect
    ids = {a: encoder_id(a, flow.encoders[a], str(zoo_dir)) for a in ("vit-h", "faces")}
    after_crash = len(EmbeddingStore(stage.store).keys())
    (root / "store" / ids["vit-h"] / ".part-0badc0ffee.parquet.tmp").write_bytes(b"PAR1 truncated")
    first = extract.run_extract(flow, stage, commit_rows=4)
    second = extract.run_extract(flow, stage)
    return {"root": root, "flow": flow, "ids": ids, "bad": bad, "after_crash": after_crash,
            "first": first, "second": second, "store": EmbeddingStore(stage.store)}  # fmt: skip


def test_second_run_encodes_nothing(runs: dict[str, Any]) -> None:
    first, second = runs["first"], runs["second"]
    assert 0 < runs["after_crash"]  # the killed run left committed parts behind
    assert first["vit-h"]["new"] + first["vit-h"]["stored"] == N_GOOD + 1  # the copy counts as stored
    assert first["vit-h"]["failed"] == len(runs["bad"])
    assert second["vit-h"] == {"new": 0, "stored": N_GOOD + 1, "failed": len(runs["bad"]), "no_face": 0}
    assert second["faces"] == {"new": 0, "stored": N_GOOD + 1, "failed": len(runs["bad"]), "no_face": 0}
    store = runs["store"]
    clip_rows = store.table().query(f"encoder == '{runs['ids']['vit-h']}' and status == 'ok'")
    assert len(clip_rows) == N_GOOD + 2 + 1  # 20 images, 2 face crops, the unconditional row; no duplicates
    assert store.stats()["temp_files"] == 1  # the leftover is ignored by readers, never read as a part


def test_faces_stored_without_their_crop_rows_get_them_next_run(zoo_dir: Path, ray_local: None, tmp_path: Path) -> None:
    """A face row whose crop has no CLIP row (a run killed between the two, or a CLIP encoder added
    later) is handed out again: the next run makes the crop row and keeps the face row."""
    import ipa_ops.stages.extract as extract

    face = tmp_path / "face.png"
    draw_face((160, 120), seed=1).save(face)
    flow = _flow(zoo_dir, tmp_path, [str(face)])
    stage = flow.stages.extract
    assert stage is not None
    faces_only = stage.model_copy(update={"encoders": ["faces"]})
    assert extract.run_extract(flow, faces_only)["faces"]["new"] == 1
    ids = {a: encoder_id(a, flow.encoders[a], str(zoo_dir)) for a in ("vit-h", "faces")}
    store = EmbeddingStore(stage.store)
    face_row = store.rows([content_key(_sha(face), ids["faces"])]).iloc[0]
    crop_key = content_key(face_row["crop_sha256"], ids["vit-h"])
    assert store.rows([crop_key]).iloc[0]["status"] == "missing"
    extract.run_extract(flow, stage)
    store.refresh()
    assert store.rows([crop_key]).iloc[0]["status"] == "ok"
    assert store.rows([face_row["key"]]).iloc[0]["created_at"] == face_row["created_at"]  # the face row is kept


def test_bad_inputs_are_error_rows_naming_file_and_reason(runs: dict[str, Any]) -> None:
    table = runs["store"].table()
    errors = table[table["status"] == "error"]
    assert len(errors) == 2 * len(runs["bad"])  # once per encoder, not repeated by the second run
    for uri, reason in runs["bad"].items():
        messages = set(errors[errors["source_uri"] == uri]["error"])
        assert len(messages) == 1, uri
        message = messages.pop()
        assert message.startswith(f"{uri}: ") and reason in message and "\n" not in message


def test_clip_embeddings_equal_diffusers(runs: dict[str, Any], zoo_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / "stable-diffusion-v1-5/stable-diffusion-v1-5")
    store, enc = runs["store"], runs["ids"]["vit-h"]
    paths = [runs["root"] / "refs" / name for name in ("img03.png", "face1.png")]
    keys = [content_key(_sha(path), enc) for path in paths]
    for weights, field in (
        ("ip-adapter_sd15.bin", "image_embeds"),
        ("ip-adapter-plus_sd15.safetensors", "hidden_states"),
    ):
        pipe.load_ip_adapter(str(zoo_dir / "h94/IP-Adapter"), subfolder="models", weight_name=weights)
        for path, key in zip(paths, keys, strict=True):
            (embeds,) = pipe.prepare_ip_adapter_image_embeds(
                ip_adapter_image=[Image.open(path).convert("RGB")], ip_adapter_image_embeds=None, device="cpu",
                num_images_per_prompt=1, do_classifier_free_guidance=True,
            )  # fmt: skip
            negative, positive = embeds.chunk(2)
            torch.testing.assert_close(store.get([key], field)[0], positive[0, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(store.uncond(enc, field), negative[0, 0], atol=1e-5, rtol=0)
        pipe.unload_ip_adapter()


def test_face_rows_equal_insightface(runs: dict[str, Any], zoo_dir: Path) -> None:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(**face_analysis_kwargs(zoo_dir))
    app.prepare(ctx_id=-1, det_size=(320, 320))
    store, ids = runs["store"], runs["ids"]
    for name, n_faces in (("face1.png", 1), ("face2.png", 2)):
        path = runs["root"] / "refs" / name
        faces = app.get(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].copy())
        largest = max(range(len(faces)), key=lambda i: np.prod(faces[i].bbox[2:] - faces[i].bbox[:2]))
        key = content_key(_sha(path), ids["faces"])
        row = store.rows([key]).iloc[0]
        assert row["status"] == "ok" and row["num_faces"] == n_faces and row["face_index"] == largest
        assert row["det_size"] == 320 and list(row["det_sizes_tried"]) == [320]
        np.testing.assert_allclose(store.get([key])[0].numpy(), faces[largest].normed_embedding, atol=1e-6)
        np.testing.assert_allclose(store.get([key], "face_embedding")[0].numpy(), faces[largest].embedding, atol=1e-5)
        np.testing.assert_allclose(store.get([key], "kps")[0].numpy(), faces[largest].kps, atol=1e-4)
        crop = Image.open(io.BytesIO(store.blob(key)))
        assert crop.size == (224, 224)
        crop_row = store.rows([content_key(row["crop_sha256"], ids["vit-h"])]).iloc[0]
        assert crop_row["status"] == "ok" and crop_row["source_uri"].endswith(f"{name}#face-crop")
    no_face = store.rows([content_key(_sha(runs["root"] / "refs" / "img01.png"), ids["faces"])]).iloc[0]
    assert no_face["status"] == "no_face" and "detection sizes tried: 320" in no_face["error"]


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_pandas_reads_the_store(runs: dict[str, Any]) -> None:
    folder = runs["root"] / "store" / runs["ids"]["faces"]
    frame = pd.read_parquet(folder)
    ok = frame[frame["status"] == "ok"]
    assert {len(v) for v in ok["image_embeds"]} == {512} and {len(v) for v in ok["bbox"].dropna()} == {4}


def test_encoder_id_without_loading_and_what_changes_it(zoo_dir: Path, tmp_path: Path) -> None:
    from ipa_ops.flow.spec import EncoderSpec

    folder = tmp_path / "enc"
    folder.mkdir()
    shutil.copy(zoo_dir / "h94/IP-Adapter/models/image_encoder/config.json", folder)
    (folder / "model.safetensors").write_bytes(b"not loadable weights")  # never loaded for an id
    spec = EncoderSpec(type="clip", source=str(folder), hidden_states=True)
    base = encoder_id("vit-h", spec, None)
    assert base.startswith("vit-h@") and len(base.split("@")[1]) == 16
    assert encoder_id("vit-h", spec, None) == base
    variants = [spec.model_copy(update={"crop": "pad"}), spec.model_copy(update={"hidden_states": False})]
    assert len({base, *(encoder_id("vit-h", v, None) for v in variants)}) == 3
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert encoder_id("vit-h", EncoderSpec(type="clip", source=str(folder), hidden_states=True), None) != base
    face = EncoderSpec(type="insightface", pack="buffalo_l")
    ids = {encoder_id("faces", f, str(zoo_dir)) for f in (face, face.model_copy(update={"det_size": 512}))}
    assert len(ids) == 2


@pytest.mark.parametrize(
    "config",
    [
        None,  # no preprocessor_config.json: the processor diffusers builds from the vision config's image_size
        {"size": 48, "crop_size": 40, "resample": 2, "image_mean": [0.5, 0.5, 0.5]},
        {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": False},
        {"size": None, "crop_size": 200, "do_normalize": None, "image_mean": None},  # null stays None
        {"size": [64, 48], "crop_size": [40, 40]},  # pairs are (height, width)
        {"size": 56, "default_to_square": True},
    ],
)
def test_preprocessing_read_from_json_matches_the_processor(zoo_dir: Path, tmp_path: Path, config: Any) -> None:
    import json

    from ipa_ops.store.encoders.ids import clip_processor, preprocessing, processor_settings

    shutil.copy(zoo_dir / "h94/IP-Adapter/models/image_encoder/config.json", tmp_path)
    if config is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    read = preprocessing(tmp_path, "center")
    assert read.pop("crop_mode") == "center"
    assert read == processor_settings(clip_processor(tmp_path))


def test_unreadable_preprocessing_size_is_a_one_line_error(tmp_path: Path) -> None:
    import json

    from ipa_ops.errors import UserError
    from ipa_ops.store.encoders.ids import preprocessing

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": "big"}))
    with pytest.raises(UserError, match=r"preprocessor_config.json has a size or crop_size ipa cannot read \('big'"):
        preprocessing(tmp_path, "center")


def test_encoder_ids_do_not_import_transformers(zoo_dir: Path) -> None:
    """The driver derives ids before anything is encoded; transformers would add seconds to every run."""
    import subprocess
    import sys

    code = (
        "import sys; from ipa_ops.store.encoders.ids import encoder_id; from ipa_ops.flow.spec import EncoderSpec; "
        f"encoder_id('vit-h', EncoderSpec(**{ENCODER!r}), {str(zoo_dir)!r}); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_crop_modes_change_pixels_not_square_images(zoo_dir: Path) -> None:
    from ipa_ops.store.encoders.clip import ClipEncoder

    encoder = ClipEncoder(zoo_dir / "h94/IP-Adapter/models/image_encoder")
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 120, 3), dtype=np.uint8))
    pixels = {}
    for mode in ("center", "pad", "none"):
        encoder.crop = mode
        pixels[mode] = encoder.pixel_values([wide, wide.crop((0, 0, 60, 60))])
    assert not torch.allclose(pixels["center"][0], pixels["pad"][0])
    assert not torch.allclose(pixels["center"][0], pixels["none"][0])
    black = (0 - torch.tensor(encoder.processor.image_mean)) / torch.tensor(encoder.processor.image_std)
    torch.testing.assert_close(pixels["pad"][0, :, 0, 0], black)  # letterbox bars are black
    for mode in ("pad", "none"):  # a square image is never cropped or padded
        torch.testing.assert_close(pixels[mode][1], pixels["center"][1])


def test_face_retries_smaller_sizes_and_choice_rules(zoo_dir: Path) -> None:
    from ipa_ops.store.encoders.face import FaceEncoder

    pack = zoo_dir / "insightface/models/buffalo_l"
    close_up = FaceEncoder(pack, det_size=640).encode(draw_face((640, 640), radius=250, seed=4))
    assert close_up["status"] == "ok" and close_up["det_sizes_tried"] == [640, 576] and close_up["det_size"] == 576
    two = draw_faces((400, 300), [((90, 150), 40, 2), ((280, 150), 70, 3)])
    encoder = FaceEncoder(pack, det_size=320, face="1")
    second = encoder.encode(two)
    assert second["face_index"] == 1 and second["num_faces"] == 2
    encoder.rule = "largest"
    largest = encoder.encode(two)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in (largest["bbox"], second["bbox"])]
    assert areas[0] > areas[1]
    encoder.rule = "2"
    missing = encoder.encode(two)
    assert missing["status"] == "no_face" and "face index 2 requested but 2 face(s) found" in missing["error"]
    nothing = encoder.encode(Image.new("RGB", (64, 64), (90, 90, 90)))
    assert nothing["status"] == "no_face" and nothing["det_sizes_tried"] == [320]
