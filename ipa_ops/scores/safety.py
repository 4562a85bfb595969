"""`nsfw`: the Stable Diffusion safety checker's concept scores, without blacking anything out.

diffusers' `StableDiffusionSafetyChecker.forward` only returns the flag (and black images): the
scores it decides by are computed inside. This scorer computes the same numbers from the checker's
own modules and parameters: the projected CLIP embedding's cosine to each concept embedding, minus
that concept's threshold, plus 0.01 for an image that also meets a special-care concept. The flag
is diffusers' rule (any score, rounded to 3 decimals, above 0); `nsfw_score` is the largest score
unrounded (above 0: flagged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipa_ops.flow.sources import fingerprint, resolve
from ipa_ops.scores.base import ScoreItem, Scorer, Value
from ipa_ops.store.encoders.clip import pick_device

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' `adjustment` once a special-care concept is met


def concept_scores(checker: Any, clip_input: torch.Tensor) -> np.ndarray:
    """[batch, concepts] scores as the checker's forward computes them before its `> 0` test."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    pooled = checker.vision_model(clip_input)[1]
    embeds = checker.visual_projection(pooled)
    special = cosine_distance(embeds, checker.special_care_embeds).float()
    special = special - checker.special_care_embeds_weights.float()
    adjustment = (special.round(decimals=3) > 0).any(dim=1, keepdim=True).float() * SPECIAL_CARE_ADJUSTMENT
    concepts = cosine_distance(embeds, checker.concept_embeds).float() - checker.concept_embeds_weights.float()
    return (concepts + adjustment).cpu().numpy()


class NsfwScore(Scorer):
    name = "nsfw"
    metrics = ("nsfw", "nsfw_score")

    def folder(self) -> Path:
        return resolve(self.spec.source, mirror=self.ctx.mirror, what="nsfw safety checker").folder

    def facts(self) -> dict[str, Any]:
        return {"weights": fingerprint(self.folder())}

    def load(self) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = self.folder()
        self.device, self.dtype = pick_device(self.ctx.gpu)
        self.checker = StableDiffusionSafetyChecker.from_pretrained(str(folder), dtype=self.dtype)
        self.checker.to(self.device).eval()
        has_processor = (folder / "preprocessor_config.json").is_file()
        # SD pipelines pair the checker with a default CLIPImageProcessor (224 px, OpenAI mean/std)
        self.processor = CLIPImageProcessor.from_pretrained(str(folder)) if has_processor else CLIPImageProcessor()

    @torch.inference_mode()
    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        pixels = self.processor([i.image for i in items], return_tensors="pt").pixel_values
        scores = concept_scores(self.checker, pixels.to(self.device, self.dtype))
        flags = (np.round(scores, 3) > 0).any(axis=1)
        return [{"nsfw": float(f), "nsfw_score": float(s.max())} for f, s in zip(flags, scores, strict=True)]
