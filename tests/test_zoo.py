"""The zoo is layout-exact: everything loads through the real library code paths."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ipa_ops import zoo
from ipa_ops.zoo import TINY, build_zoo, draw_face, draw_faces, face_analysis_kwargs, zoo_configs
from ipa_ops.zoo.faces import blank_image, landmarks

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
IPA = "h94/IP-Adapter"
LAION = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box they stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".zoo.lock"
    }


@pytest.fixture(scope="module")
def sd15(zoo_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / SD15)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def face_app(zoo_dir: Path):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(**face_analysis_kwargs(zoo_dir))
    app.prepare(ctx_id=-1)
    return app


def _faces(app, image):
    return app.get(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))


def _run(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, generator=generator, **kwargs).images[0]


# --- build: cache, determinism, atomicity -------------------------------------------------


def test_rebuild_is_cached_and_byte_identical(zoo_dir: Path, tmp_path: Path) -> None:
    marker = zoo.marker_path(zoo_dir, "tiny")
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_zoo(zoo_dir) == zoo_dir
    assert time.perf_counter() - started < 1.0
    assert marker.stat().st_mtime_ns == before

    started = time.perf_counter()
    fresh = build_zoo(tmp_path / "again", size="tiny")
    print(f"\ntiny zoo build: {time.perf_counter() - started:.2f}s")
    assert zoo.is_built(fresh, "tiny")
    assert _digests(fresh) == _digests(zoo_dir)


def test_interrupted_build_leaves_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path, sizes: object) -> None:
        path.mkdir(parents=True)
        (path / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    faces_only = tuple(r for r in zoo.REPOS if r.path.startswith("insightface"))
    monkeypatch.setattr(zoo, "REPOS", (*faces_only, zoo.Repo("broken/repo", boom)))
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path)
    assert not zoo.is_built(tmp_path, "tiny")
    assert not list(tmp_path.glob(".zoo-build-*")) and not (tmp_path / "broken").exists()

    monkeypatch.setattr(zoo, "REPOS", faces_only)
    build_zoo(tmp_path)
    assert zoo.is_built(tmp_path, "tiny")
    assert (tmp_path / "insightface/models/buffalo_l/det_10g.onnx").is_file()


def test_full_configs_have_real_sizes() -> None:
    cfg = zoo_configs("full")
    unet = cfg["sd15/unet"]
    assert unet["cross_attention_dim"] == 768
    assert tuple(unet["block_out_channels"]) == (320, 640, 1280, 1280)
    assert cfg["sd15/text_encoder"]["hidden_size"] == 768
    assert cfg["vit-h/image_encoder"]["hidden_size"] == 1280
    assert cfg["vit-h/image_encoder"]["projection_dim"] == 1024
    assert cfg["vit-h/image_encoder"]["num_hidden_layers"] == 32
    assert cfg["bigG/image_encoder"]["projection_dim"] == 1280
    assert cfg["sdxl/unet"]["cross_attention_dim"] == 2048
    shapes = cfg["ip_adapters"]
    base = shapes["ip-adapter_sd15"]
    assert base["image_proj.proj.weight"] == [4 * 768, 1024]
    assert base["ip_adapter.1.to_k_ip.weight"] == [320, 768]
    assert base["ip_adapter.29.to_v_ip.weight"] == [320, 768]  # last up block
    assert base["ip_adapter.31.to_v_ip.weight"] == [1280, 768]  # mid block comes last
    assert len(base) == 4 + 2 * 16
    plus = shapes["ip-adapter-plus_sd15"]
    assert plus["image_proj.latents"] == [1, 16, 768]
    assert plus["image_proj.proj_in.weight"] == [768, 1280]
    assert plus["image_proj.layers.0.0.to_q.weight"] == [768, 768]
    assert shapes["ip-adapter-full-face_sd15"]["image_proj.proj.0.weight"] == [1280, 1280]
    assert len(shapes["ip-adapter_sdxl"]) == 4 + 2 * 70
    assert shapes["ip-adapter_sdxl"]["image_proj.proj.weight"] == [4 * 2048, 1280]


# --- Stable Diffusion and IP-Adapter --------------------------------------------------------


def test_sd15_pipeline_generates(sd15) -> None:
    assert sd15.safety_checker is None
    assert sd15.unet.config.cross_attention_dim == TINY.sd15_unet.cross_attention_dim
    assert sd15.text_encoder.config.hidden_size == TINY.sd15_unet.cross_attention_dim
    modules = dict(sd15.unet.named_modules())
    assert "down_blocks.2.attentions.1" in modules and "up_blocks.1.attentions.2" in modules
    assert "down_blocks.3.attentions" not in modules and "up_blocks.0.attentions" not in modules
    assert _run(sd15, height=64, width=64).size == (64, 64)
    assert _run(sd15, height=64, width=96).size == (96, 64)


def test_tokenizer_is_a_real_clip_tokenizer(zoo_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(zoo_dir / SD15 / "tokenizer")
    ids = tok("A portrait of a woman, 4k! Ünïcode ok", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 == tok.model_max_length
    assert ids[0] == tok.bos_token_id and tok.eos_token_id == len(tok) - 1
    assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]


def test_ip_adapter_checkpoints_have_the_real_layout(zoo_dir: Path) -> None:
    from safetensors.torch import load_file

    models = zoo_dir / IPA / "models"
    nested = torch.load(models / "ip-adapter_sd15.bin", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    assert set(nested["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert nested["image_proj"]["proj.weight"].shape == (4 * 32, TINY.vit_h.projection_dim)
    assert sorted({int(k.split(".")[0]) for k in nested["ip_adapter"]}) == list(range(1, 32, 2))
    flat = load_file(models / "ip-adapter_sd15.safetensors")
    assert set(flat) == {f"{p}.{k}" for p, part in nested.items() for k in part}
    for p, part in nested.items():
        for k, t in part.items():
            assert torch.equal(flat[f"{p}.{k}"], t)
    plus = load_file(models / "ip-adapter-plus_sd15.safetensors")
    assert plus["image_proj.latents"].shape == (1, 16, 32)
    assert plus["image_proj.proj_in.weight"].shape == (32, TINY.vit_h.hidden_size)
    assert "image_proj.layers.3.1.3.weight" in plus
    for name in ("ip-adapter-plus_sd15", "ip-adapter-full-face_sd15", "ip-adapter_sd15_light"):
        torch.load(models / f"{name}.bin", weights_only=True)


@pytest.mark.parametrize(
    "weight_name",
    [
        "ip-adapter_sd15.bin",
        "ip-adapter_sd15.safetensors",
        "ip-adapter-plus_sd15.safetensors",
        "ip-adapter-full-face_sd15.bin",
    ],
)
def test_load_ip_adapter_and_generate(sd15, zoo_dir: Path, weight_name: str) -> None:
    sd15.load_ip_adapter(zoo_dir / IPA, subfolder="models", weight_name=weight_name)
    try:
        assert sd15.image_encoder.config.hidden_size == TINY.vit_h.hidden_size
        image = _run(sd15, ip_adapter_image=draw_face((128, 128)), height=64, width=64)
        assert image.size == (64, 64)
    finally:
        sd15.unload_ip_adapter()


def test_two_adapters_with_layer_scales(sd15, zoo_dir: Path) -> None:
    sd15.load_ip_adapter(
        zoo_dir / IPA, subfolder="models", weight_name=["ip-adapter_sd15.bin", "ip-adapter-plus_sd15.safetensors"]
    )
    try:
        sd15.set_ip_adapter_scale([0.6, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}])
        refs = [draw_face(seed=1), draw_face(seed=2)]
        assert _run(sd15, ip_adapter_image=refs, height=64, width=64).size == (64, 64)
    finally:
        sd15.unload_ip_adapter()


def test_bigg_adapter_fails_against_vit_h_encoder(sd15, zoo_dir: Path) -> None:
    """Tiny sizes keep the real consistency rules: a vit-G adapter needs the bigG encoder."""
    sd15.load_ip_adapter(zoo_dir / IPA, subfolder="models", weight_name="ip-adapter_sd15_vit-G.bin")
    try:
        with pytest.raises(RuntimeError):
            _run(sd15, ip_adapter_image=draw_face((128, 128)), height=64, width=64)
    finally:
        sd15.unload_ip_adapter()


def test_sdxl_pipeline_with_vit_h_plus_adapter(zoo_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(zoo_dir / SDXL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        zoo_dir / IPA,
        subfolder="sdxl_models",
        weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
        image_encoder_folder="models/image_encoder",
    )
    assert _run(pipe, ip_adapter_image=draw_face(), height=64, width=64).size == (64, 64)


def test_laion_clip_model_and_processor(zoo_dir: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(zoo_dir / LAION)
    processor = CLIPProcessor.from_pretrained(zoo_dir / LAION)
    inputs = processor(text=["a face", "a cat"], images=draw_face(), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (1, TINY.vit_h.projection_dim)
    assert model.config.vision_config.hidden_size == TINY.vit_h.hidden_size


# --- InsightFace pack -----------------------------------------------------------------------


def test_face_analysis_finds_the_drawn_face(face_app) -> None:
    center, radius = (150.0, 130.0), 70.0
    faces = _faces(face_app, draw_face((320, 256), center=center, radius=radius, seed=3))
    assert len(faces) == 1
    face = faces[0]
    assert face.det_score > 0.9
    expected = [center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius]
    np.testing.assert_allclose(face.bbox, expected, atol=3)
    assert face.kps.shape == (5, 2)
    np.testing.assert_allclose(face.kps, landmarks(center, radius), atol=3)
    assert face.normed_embedding.shape == (512,)
    assert np.isclose(np.linalg.norm(face.normed_embedding), 1.0, atol=1e-4)


@pytest.mark.parametrize("level", [0, 40, 128])
def test_face_analysis_finds_nothing_in_uniform_images(face_app, level: int) -> None:
    assert _faces(face_app, blank_image((256, 256), level)) == []


def test_face_embeddings_identify_drawings(face_app) -> None:
    a = _faces(face_app, draw_face(seed=0))[0].normed_embedding
    b = _faces(face_app, draw_face(seed=1))[0].normed_embedding
    a_moved = _faces(face_app, draw_face((400, 300), center=(160, 150), radius=100, seed=0))[0].normed_embedding
    assert float(a @ b) < 0.8
    assert float(a @ a_moved) > 0.9


def test_two_separate_faces(face_app) -> None:
    image = draw_faces((512, 256), [((128, 128), 70, 0), ((384, 128), 70, 1)])
    assert len(_faces(face_app, image)) == 2


def test_scorer_models_join_a_finished_zoo_without_a_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "REPOS", tuple(r for r in zoo.REPOS if r.path.startswith("insightface")))
    build_zoo(tmp_path)
    detector = tmp_path / "insightface/models/buffalo_l/det_10g.onnx"
    before = detector.stat().st_mtime_ns
    assert not zoo.is_built(tmp_path, "tiny", "scorers-") and not (tmp_path / "openai").exists()
    build_zoo(tmp_path, scorers=True)
    assert zoo.is_built(tmp_path, "tiny") and zoo.is_built(tmp_path, "tiny", "scorers-")
    assert detector.stat().st_mtime_ns == before  # the finished part was left alone
    for repo in zoo.SCORER_REPOS:
        assert any((tmp_path / repo.path).iterdir())
