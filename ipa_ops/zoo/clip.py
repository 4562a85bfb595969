"""CLIP pieces of the zoo: a real byte-level BPE tokenizer, text towers and vision encoders.

The tokenizer is a genuine CLIP vocabulary in the real file format (``vocab.json`` +
``merges.txt``): the 256 byte symbols, the same with ``</w>``, merges learned from a small
built-in English corpus, then ``<|startoftext|>``/``<|endoftext|>`` as the two highest ids (the
text model's legacy pooling takes the arg-max id as end of text, so this order matters). Any
English prompt tokenizes, because every byte has a symbol. The full size pads the merges with
synthetic letter merges up to the real 49408 entries so special-token ids match the real ones.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any

from .common import save_pretrained, seed_for, write_json, write_text
from .sizes import TextSizes, VisionSizes, ZooSizes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

_CORPUS = """
a photo of a cat sitting on a chair in the garden, portrait of a woman with red hair, high quality,
detailed painting of a mountain landscape at sunset, an astronaut riding a horse on the moon,
the best quality masterpiece, a dog running on the beach, oil painting, watercolor, digital art,
studio lighting, close up photograph of a man wearing glasses, city street at night with neon
lights, a bowl of fruit on a wooden table, anime style character, cinematic, sharp focus, blurry,
low quality, bad anatomy, worst quality, ugly, deformed, text, watermark, signature, trees forest
river lake sky clouds snow winter summer flowers house castle dragon robot car ship train bird
smiling girl boy old young face eyes hair dress shirt hat blue green yellow black white purple
orange pink brown gray golden silver light dark bright soft warm cold beautiful realistic style
""".split()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-symbol table (printable symbols for all 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the built-in corpus; ties broken lexically for determinism."""
    table = bytes_to_unicode()
    words = Counter(w.strip(",.").lower() for w in _CORPUS if w.strip(",."))
    seqs = {}
    for word, count in words.items():
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, count in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_seqs = {}
        for seq, count in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + count
        seqs = new_seqs
    return merges


def _synthetic_merges(existing: set[str], count: int) -> list[tuple[str, str]]:
    """Letter-string merges (``ab``, ``ab</w>``, ``abc`` ...) to pad the vocabulary."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: list[tuple[str, str]] = []
    length = 2
    while len(out) < count:
        for combo in product(letters, repeat=length):
            for suffix in ("", "</w>"):
                token = "".join(combo) + suffix
                if token in existing:
                    continue
                prefix = "".join(combo[:-1])
                if prefix not in existing:
                    continue
                out.append((prefix, combo[-1] + suffix))
                existing.add(token)
                if len(out) == count:
                    return out
        length += 1
    return out


@lru_cache(maxsize=4)
def make_vocab(vocab_size: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The CLIP vocabulary and merges of exactly ``vocab_size`` entries."""
    base = list(bytes_to_unicode().values())
    symbols = base + [s + "</w>" for s in base]
    n_merges = vocab_size - len(symbols) - 2
    learned = _learn_merges(min(n_merges, 256))
    existing = set(symbols) | {a + b for a, b in learned}
    merges = learned + _synthetic_merges(existing, n_merges - len(learned))
    tokens = symbols + [a + b for a, b in merges] + [BOS, EOS]
    if len(tokens) != vocab_size or len(set(tokens)) != vocab_size:
        raise AssertionError("zoo vocabulary construction is inconsistent")
    return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def _special(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(path: Path, sizes: ZooSizes, pad_token: str = EOS) -> None:
    """``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json``."""
    vocab, merges = make_vocab(sizes.vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    write_text(path / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(path / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_json(
        path / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS},
    )
    write_json(
        path / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": _special(BOS),
            "do_lower_case": True,
            "eos_token": _special(EOS),
            "errors": "replace",
            "model_max_length": MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": _special(EOS),
        },
    )


def text_config(t: TextSizes, sizes: ZooSizes) -> dict[str, Any]:
    """CLIP text tower config as in the hub files (legacy ``eos_token_id`` 2 included)."""
    return {
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": MAX_LENGTH,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "pad_token_id": 1,
        "projection_dim": t.projection_dim,
        "vocab_size": sizes.vocab_size,
    }


def vision_config(v: VisionSizes) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": v.hidden_act,
        "hidden_size": v.hidden_size,
        "image_size": v.image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": v.patch_size,
        "projection_dim": v.projection_dim,
    }


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor_config(image_size: int = 224) -> dict[str, Any]:
    """``preprocessor_config.json`` as the real CLIP repos ship it (legacy feature-extractor form)."""
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": image_size,
    }


def _seeded(name: str) -> None:
    import torch

    torch.manual_seed(seed_for(name))


def build_text_encoder(path: Path, t: TextSizes, sizes: ZooSizes, name: str, with_projection: bool) -> None:
    """``CLIPTextModel`` (SD1.5, SDXL ``text_encoder``) or ``...WithProjection`` (``text_encoder_2``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    _seeded(name)
    model = cls(CLIPTextConfig(**text_config(t, sizes)))
    save_pretrained(model, path, sizes.dtype)


def build_vision_encoder(path: Path, v: VisionSizes, sizes: ZooSizes, name: str) -> None:
    """``CLIPVisionModelWithProjection`` folder (``config.json`` + ``model.safetensors``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(name)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config(v)))
    save_pretrained(model, path, sizes.dtype)


def build_clip_model(path: Path, sizes: ZooSizes, name: str) -> None:
    """``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: CLIPModel, tokenizer and preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=text_config(sizes.vit_h_text, sizes),
        vision_config=vision_config(sizes.vit_h),
        projection_dim=sizes.vit_h.projection_dim,
        logit_scale_init_value=2.6592,
    )
    _seeded(name)
    save_pretrained(CLIPModel(config), path, sizes.dtype)
    write_tokenizer(path, sizes)
    write_json(path / "preprocessor_config.json", image_processor_config(sizes.vit_h.image_size))


def configs(sizes: ZooSizes) -> dict[str, dict[str, Any]]:
    """Config dicts of the CLIP parts, for dry runs and tests."""
    return {
        "sd15/text_encoder": text_config(sizes.sd15_text, sizes),
        "vit-h/image_encoder": vision_config(sizes.vit_h),
        "bigG/image_encoder": vision_config(sizes.bigg),
        "sdxl/text_encoder": text_config(sizes.sdxl_text, sizes),
        "sdxl/text_encoder_2": text_config(sizes.sdxl_text_2, sizes),
        "laion-vit-h/text": text_config(sizes.vit_h_text, sizes),
    }
