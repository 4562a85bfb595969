"""The CLIP scorers: prompt agreement (`clip_t`), reference agreement (`clip_i`), and the LAION
aesthetic predictor (`aesthetic`), each batched over a scorer actor's images.

- `clip_t`: cosine of `get_image_features` and `get_text_features` of one CLIPModel (prompts cut at
  77 tokens as CLIP's tokenizer does), and CLIPScore's `100 * max(cos, 0)`.
- `clip_i`: the image embedded by a flow encoder exactly as the extract stage embeds references
  (same class, same preprocessing), so its cosine to the stored reference embeddings is meaningful;
  references missing from the store are encoded here, the others never.
- `aesthetic`: christophschuhmann/improved-aesthetic-predictor: its MLP (Linear 1024, 128, 64, 16,
  1, dropouts between, no activations) on the L2-normalised CLIP ViT-L/14 image embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipa_ops.flow.score_spec import default_encoder
from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.scores.base import References, ScoreItem, Scorer, Value, cosine
from ipa_ops.store.encoders.clip import ClipEncoder, pick_device
from ipa_ops.store.encoders.ids import clip_folder, clip_processor, encoder_id, preprocessing


def features(out: Any) -> torch.Tensor:
    """transformers 5 returns `get_*_features` as an output whose pooler_output is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipTextScore(Scorer):
    name = "clip_t"
    metrics = ("clip_t", "clip_score")

    def folder(self) -> Path:
        return resolve(self.spec.source, self.spec.subfolder, mirror=self.ctx.mirror, what="clip_t model").folder

    def facts(self) -> dict[str, Any]:
        folder = self.folder()
        return {"weights": fingerprint(folder), "preprocess": preprocessing(folder, "center")}

    def load(self) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        folder = self.folder()
        self.device, self.dtype = pick_device(self.ctx.gpu)
        self.model = CLIPModel.from_pretrained(str(folder), dtype=self.dtype).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.processor = clip_processor(folder)

    @torch.inference_mode()
    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        pixels = self.processor([i.image for i in items], return_tensors="pt").pixel_values
        text = self.tokenizer([i.prompt for i in items], padding=True, truncation=True, return_tensors="pt")
        image = features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        prompt = features(
            self.model.get_text_features(
                input_ids=text.input_ids.to(self.device), attention_mask=text.attention_mask.to(self.device)
            )
        )
        cos = torch.nn.functional.cosine_similarity(image.float(), prompt.float(), dim=-1).cpu().numpy()
        return [{"clip_t": float(c), "clip_score": 100.0 * max(float(c), 0.0)} for c in cos]


class ClipImageScore(Scorer):
    name = "clip_i"
    metrics = ("clip_i_mean", "clip_i_min")

    def alias(self) -> str:
        return default_encoder(self.spec.encoder, {a: e.type for a, e in self.ctx.flow.encoders.items()}, "clip")

    def facts(self) -> dict[str, Any]:
        alias = self.alias()
        self.encoder_id = encoder_id(alias, self.ctx.flow.encoders[alias], self.ctx.mirror)
        return {"encoder": self.encoder_id}

    def load(self) -> None:
        spec = self.ctx.flow.encoders[self.alias()]
        self.encoder = ClipEncoder(clip_folder(spec, self.ctx.mirror), crop=spec.crop, gpu=self.ctx.gpu)
        self.refs = References(self.ctx)
        self._embeds: dict[str, np.ndarray] = {}

    def reference(self, ref: str) -> np.ndarray:
        """A reference's embedding: the store's, else encoded here once."""
        sha = self.refs.sha(ref)
        if sha is None:
            raise ValueError(f"reference {ref}: cannot be read and is not a store key")
        if sha not in self._embeds:
            stored = self.refs.stored(sha, self.encoder_id)
            if stored is None:
                stored = self.encoder.encode([self.refs.image(ref, sha)])[0]["image_embeds"]
            self._embeds[sha] = np.asarray(stored, dtype=np.float32)
        return self._embeds[sha]

    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        embeds = self.encoder.encode([i.image for i in items])
        out: list[dict[str, Value]] = []
        for item, emb in zip(items, embeds, strict=True):
            sims = [cosine(emb["image_embeds"], self.reference(r)) for r in item.references]
            out.append({"clip_i_mean": float(np.mean(sims)), "clip_i_min": float(np.min(sims))} if sims
                       else {"clip_i_mean": None, "clip_i_min": None})  # fmt: skip
        return out


def aesthetic_head(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The published MLP, its input width read from the state dict; loads strictly (a wrong file fails)."""
    width = int(state["layers.0.weight"].shape[1])
    nn = torch.nn
    head = nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    wrapper = nn.Module()  # the published module names its Sequential `layers`
    wrapper.layers = head
    wrapper.load_state_dict(state, strict=True)
    return head.eval()


class AestheticScore(Scorer):
    name = "aesthetic"
    metrics = ("aesthetic",)

    def files(self) -> tuple[Path, Path]:
        head = resolve(self.spec.source, None, self.spec.weight_name, mirror=self.ctx.mirror, what="aesthetic head")
        clip = resolve(self.spec.clip, mirror=self.ctx.mirror, what="aesthetic clip model")
        assert head.file is not None
        return head.file, clip.folder

    def facts(self) -> dict[str, Any]:
        head, clip = self.files()
        return {"head": fingerprint(head), "clip": fingerprint(clip), "preprocess": preprocessing(clip, "center")}

    def load(self) -> None:
        head_file, clip = self.files()
        try:
            state = torch.load(str(head_file), map_location="cpu", weights_only=True)
            self.head = aesthetic_head(state)
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            raise ValueError(f"aesthetic head {head_file}: not the LAION predictor's state dict ({exc})") from None
        self.encoder = ClipEncoder(clip, gpu=self.ctx.gpu)
        self.head.to(self.encoder.device)

    @torch.inference_mode()
    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        embeds = np.stack([e["image_embeds"] for e in self.encoder.encode([i.image for i in items])])
        normed = torch.from_numpy(embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).float()
        scores = self.head(normed.to(self.encoder.device)).float().cpu().numpy()[:, 0]
        return [{"aesthetic": float(s)} for s in scores]
