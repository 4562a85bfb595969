"""Each scorer equals a direct computation with its library on the tiny zoo (CPU, fp32), several
images in one batch: transformers' CLIPModel and CLIPVisionModelWithProjection, the LAION head applied
by hand from its state dict, the safety checker's own forward, imagehash, insightface's FaceAnalysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from ipa_ops.flow.spec import parse_flow
from ipa_ops.scores import ScoreContext, ScoreItem, build_scorers
from ipa_ops.scores.phash import find_duplicates, hamming
from ipa_ops.store.encoders.ids import encoder_id
from ipa_ops.zoo import draw_face
from ipa_ops.zoo.scorers import AESTHETIC, AESTHETIC_FILE, CLIP_L, SAFETY_CHECKER

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a lighthouse on a cliff at dusk", "a bowl of fruit", "portrait of a woman with red hair", "a red car"]
TOL = 1e-5


def _flow(zoo: Path, scorers: dict) -> object:
    return parse_flow(
        {
            "name": "scores",
            "mirror": str(zoo),
            "encoders": {
                "vit-h": {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"},
                "faces": {"type": "insightface", "pack": "buffalo_l", "det_size": 320},
            },
            "stages": {"score": {"output": "unused", "scorers": scorers}},
        }
    )


def _images() -> list[Image.Image]:
    refs = [Image.open(REPO / "data" / "refs" / f"ref-{i}.png").convert("RGB") for i in range(3)]
    return [*refs, draw_face((96, 128), seed=3)]  # one non-square


def _scorer(zoo: Path, name: str, spec: dict | None = None):
    flow = _flow(zoo, {name: spec or {}})
    (scorer,) = build_scorers(ScoreContext(flow), flow.stages.score.scorers)
    scorer.ensure_loaded()
    return scorer


def _items(images: list[Image.Image], refs: list[list[str]] | None = None, keys=None) -> list[ScoreItem]:
    return [
        ScoreItem(f"{i:020x}", f"row-{i}", PROMPTS[i % len(PROMPTS)], im, (refs or [[]] * len(images))[i],
                  (keys or [[]] * len(images))[i])  # fmt: skip
        for i, im in enumerate(images)
    ]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread: None) -> None:
    torch.manual_seed(0)


def test_clip_t_equals_clip_model_forward(scorer_zoo: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = _images()
    got = _scorer(scorer_zoo, "clip_t").score(_items(images))
    folder = scorer_zoo / CLIP_L
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=[PROMPTS[i % 4] for i in range(4)], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        cos = (out.logits_per_image / model.logit_scale.exp()).diagonal().numpy()  # logits = scale * cosine
    assert np.allclose([g["clip_t"] for g in got], cos, atol=TOL)
    assert np.allclose([g["clip_score"] for g in got], 100 * np.maximum(cos, 0), atol=100 * TOL)
    assert len(set(np.round(cos, 4))) == 4  # the images and prompts really differ


def test_clip_i_equals_vision_model_cosines(scorer_zoo: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    images = _images()
    ref_uris = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
    refs = [[ref_uris[3]], [ref_uris[0], ref_uris[3]], [], [ref_uris[1], ref_uris[2], ref_uris[3]]]
    got = _scorer(scorer_zoo, "clip_i").score(_items(images, refs))
    folder = scorer_zoo / "h94/IP-Adapter/models/image_encoder"
    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    processor = CLIPImageProcessor(size=224, crop_size=224)  # what diffusers' load_ip_adapter builds

    def embed(ims: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.normalize(model(processor(ims, return_tensors="pt").pixel_values).image_embeds)

    out = embed(images)
    ref = embed([Image.open(u).convert("RGB") for u in ref_uris])
    for i, row in enumerate(refs):
        sims = [float(out[i] @ ref[ref_uris.index(u)]) for u in row]
        if not sims:
            assert got[i] == {"clip_i_mean": None, "clip_i_min": None}
            continue
        assert got[i]["clip_i_mean"] == pytest.approx(np.mean(sims), abs=TOL)
        assert got[i]["clip_i_min"] == pytest.approx(min(sims), abs=TOL)


def test_aesthetic_equals_the_head_applied_by_hand(scorer_zoo: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = _images()
    got = [g["aesthetic"] for g in _scorer(scorer_zoo, "aesthetic").score(_items(images))]
    folder = scorer_zoo / CLIP_L
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        x = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    x = x / x.norm(dim=-1, keepdim=True)  # the predictor's `normalized(image_features)`
    state = torch.load(scorer_zoo / AESTHETIC / AESTHETIC_FILE, weights_only=True)
    for layer in (0, 2, 4, 6, 7):  # Linear layers; the Dropouts between are identities in eval
        x = x @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    assert np.allclose(got, x[:, 0].numpy(), atol=TOL)
    assert len(set(np.round(got, 6))) == 4


def test_nsfw_equals_the_safety_checkers_own_forward(scorer_zoo: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPImageProcessor

    folder = scorer_zoo / SAFETY_CHECKER
    checker = StableDiffusionSafetyChecker.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    images = [*_images(), *(Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 90, 255))]
    clip_input = processor(images, return_tensors="pt").pixel_values
    arrays = [np.asarray(im, dtype=np.float32) / 255 for im in images]
    with torch.no_grad():
        blacked, flags = checker(clip_input, [a.copy() for a in arrays])
        emb = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = (cosine_distance(emb, checker.special_care_embeds) - checker.special_care_embeds_weights)
        adjust = 0.01 * (special.round(decimals=3) > 0).any(dim=1, keepdim=True)
        scores = cosine_distance(emb, checker.concept_embeds) - checker.concept_embeds_weights + adjust
    got = _scorer(scorer_zoo, "nsfw").score(_items(images))
    assert [bool(g["nsfw"]) for g in got] == list(flags)
    assert np.allclose([g["nsfw_score"] for g in got], scores.max(dim=1).values.numpy(), atol=TOL)
    assert 0 < sum(flags) < len(flags)  # the zoo's thresholds flag some images, not all
    flagged = int(np.argmax(flags))
    assert not np.any(blacked[flagged]) and np.any(arrays[flagged])  # the checker blacks out; the score does not


def test_phash_equals_imagehash_and_dup_of_finds_the_planted_copy(scorer_zoo: Path) -> None:
    import imagehash

    images = _images()
    near = ImageEnhance.Brightness(images[1]).enhance(1.04).resize((200, 200))  # a planted near-duplicate
    items = _items([*images, near])
    got = _scorer(scorer_zoo, "phash").score(items)
    assert [g["phash"] for g in got] == [str(imagehash.phash(i.image)) for i in items]
    hashes = [g["phash"] for g in got]
    assert all(len(h) == 16 for h in hashes)  # 64 bits
    assert hamming(hashes[1], hashes[4]) == imagehash.hex_to_hash(hashes[1]) - imagehash.hex_to_hash(hashes[4])
    ordered = [(i.row_key, h) for i, h in zip(items, hashes, strict=True)]
    found = find_duplicates(ordered, {k for k, _ in ordered}, max_distance=6)
    assert found == {**{items[i].row_key: None for i in range(4)}, items[4].row_key: items[1].row_key}
    assert min(hamming(hashes[4], hashes[i]) for i in (0, 2, 3)) > 6


def test_face_scores_equal_insightface(scorer_zoo: Path, tmp_path: Path) -> None:
    from insightface.app import FaceAnalysis

    from ipa_ops.zoo import face_analysis_kwargs

    ref_img = draw_face((128, 128), seed=7)
    ref_uri = str(tmp_path / "face.png")
    ref_img.save(ref_uri)
    scorer = _scorer(scorer_zoo, "face_sim")
    flow = _flow(scorer_zoo, {"face_sim": {}})
    face_id = encoder_id("faces", flow.encoders["faces"], str(scorer_zoo))
    outputs = [draw_face((128, 128), (60, 66), 34, seed=7), draw_face((128, 128), seed=8), Image.new("RGB", (96, 96))]
    from ipa_ops.store.images import sha256_of

    key = f"{sha256_of(ref_uri)}/{face_id}"
    got = scorer.score(_items(outputs, [[ref_uri]] * 3, [[key]] * 3))
    app = FaceAnalysis(**face_analysis_kwargs(scorer_zoo))
    app.prepare(ctx_id=-1, det_size=(320, 320))

    def face(im: Image.Image):
        faces = app.get(np.asarray(im)[:, :, ::-1].copy())
        return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) if faces else None

    ref = face(ref_img)
    for g, im in zip(got[:2], outputs[:2], strict=True):
        found = face(im)
        assert g["face_sim"] == pytest.approx(float(found.normed_embedding @ ref.normed_embedding), abs=TOL)
        assert g["face_count"] == 1 and g["no_face"] == 0
    assert got[0]["face_sim"] > got[1]["face_sim"]  # the same drawing elsewhere beats another drawing
    assert got[2] == {"face_sim": None, "face_count": 0.0, "no_face": 1.0}
    plain = scorer.score(_items(outputs[:1]))  # no face adapter: counted, not compared
    assert plain[0]["face_sim"] is None and plain[0]["face_count"] == 1


def test_scorer_ids_follow_weights_and_settings(scorer_zoo: Path) -> None:
    flow = _flow(scorer_zoo, {"phash": {}, "clip_t": {}})
    ids = {s.name: s.id for s in build_scorers(ScoreContext(flow), flow.stages.score.scorers)}
    other = _flow(scorer_zoo, {"phash": {"max_distance": 3}, "clip_t": {}})
    again = {s.name: s.id for s in build_scorers(ScoreContext(other), other.stages.score.scorers)}
    assert ids["clip_t"] == again["clip_t"] and ids["phash"] != again["phash"]
    assert ids["clip_t"].startswith("clip_t@") and len(ids["clip_t"].split("@")[1]) == 16


def test_score_stage_references_are_checked_with_their_yaml_paths(tmp_path: Path) -> None:
    from ipa_ops.flow.spec import FlowError

    with pytest.raises(FlowError) as err:
        parse_flow({"name": "x", "encoders": {"vit-h": {"type": "clip", "source": "a/b"}},
                    "stages": {"score": {"scorers": {"clip_i": {"encoder": "faces"}, "face_sim": {}}}}})  # fmt: skip
    assert err.value.problems == [
        "stages.score.output: required when the flow has no generate stage",
        "stages.score.scorers.clip_i.encoder: unknown alias 'faces'; defined: vit-h",
        "stages.score.scorers.face_sim.encoder: the flow defines no insightface encoder; add one under encoders: "
        "and name it",
    ]


def test_validate_names_a_missing_scorer_model(zoo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from ipa_ops.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flow = tmp_path / "flow.yaml"
    scorers = "{output: out, scorers: {phash: {}, nsfw: {}}}"
    flow.write_text(f"name: x\nmirror: {zoo_dir}\nstages:\n  score: {scorers}\n")
    assert main(["validate", str(flow)]) == 1  # the plain tiny zoo has no safety checker
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("stages.score.scorers.nsfw: nsfw safety checker: CompVis/stable-diffusion-safety-checker")


def test_scores_table_takes_each_scorers_latest_id(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from ipa_ops.outputs.folder import OutputDir
    from ipa_ops.outputs.scores import META_KEY, scores_table, write_score_part
    from ipa_ops.storage.quarantine import NewerSchema

    out = OutputDir(str(tmp_path / "out"))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def rec(key: str, scorer: str, metric: str, value=None, text=None, minutes: int = 0) -> dict:
        return {"row_key": key, "id": f"id-{key}", "scorer": scorer, "name": scorer.split("@")[0], "metric": metric,
                "value": value, "text": text, "scored_at": t0 + timedelta(minutes=minutes)}  # fmt: skip

    a, b = "a" * 20, "b" * 20
    write_score_part(out, [rec(a, "clip_t@old", "clip_t", 0.1), rec(b, "clip_t@old", "clip_t", 0.2),
                           rec(a, "phash@p", "phash", text="ff00"), rec(a, "phash@p", "dup_of")])  # fmt: skip
    write_score_part(out, [rec("a" * 20, "clip_t@new", "clip_t", 0.3, minutes=5),
                           rec("b" * 20, "clip_t@new", "error", text="row b: clip_t: broken", minutes=5)])  # fmt: skip
    table = scores_table(out).set_index("row_key")
    assert table.attrs["scorers"] == {"clip_t": "clip_t@new", "phash": "phash@p"}
    assert table.loc["a" * 20, "clip_t"] == 0.3 and "b" * 20 not in table.index  # old numbers never mix in
    assert table.loc["a" * 20, "phash"] == "ff00" and table.loc["a" * 20, "dup_of"] is None
    newer = tmp_path / "out" / "scores" / "part-29990101T000000000000Z-newer.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"row_key": ["x"], "scorer": ["s"], "metric": ["m"]}).replace_schema_metadata(
        {META_KEY: b"9"}), newer)  # fmt: skip
    with pytest.raises(NewerSchema, match="scores schema 9"):
        scores_table(out)
    assert newer.exists()  # refused, never moved
