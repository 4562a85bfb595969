"""The `score:` stage of a flow: which scorers run, on which output, with which models.

Each scorer is optional; naming it (even as `{}`) turns it on with the defaults below, whose
models are named as transformers / diffusers users name them, so a flow runs against real
weights and against the zoo alike.
"""

from __future__ import annotations

from pydantic import Field

from ipa_ops.flow.models import Strict, custom_resources_field

CLIP_L = "openai/clip-vit-large-patch14"


class ClipTextScorer(Strict):
    source: str = Field(CLIP_L, description="CLIPModel (text and vision towers) the prompt and image are embedded by.")
    subfolder: str | None = Field(None, description="Subfolder of the CLIPModel inside the source.")


class ClipImageScorer(Strict):
    encoder: str | None = Field(
        None,
        description="Alias of the flow's clip encoder the image and its references are embedded by; references "
        "already in the store under it are read, never re-encoded. Default: the flow's first clip encoder.",
    )


class FaceScorer(Strict):
    encoder: str | None = Field(
        None,
        description="Alias of an insightface encoder (the recogniser; it may differ from the one that conditioned "
        "the images, so the score is not circular). Default: the flow's first insightface encoder.",
    )


class PHashScorer(Strict):
    hash_size: int = Field(8, ge=2, le=32, description="imagehash's phash size: 8 gives a 64-bit hash.")
    max_distance: int = Field(
        6, ge=0, description="`dup_of`: an image within this Hamming distance of an earlier one is its duplicate."
    )


class AestheticScorer(Strict):
    source: str = Field(
        "christophschuhmann/improved-aesthetic-predictor", description="Repository (or folder) of the LAION head."
    )
    weight_name: str = Field(
        "sac+logos+ava1-l14-linearMSE.pth", description="The head's torch state dict (loaded with weights_only)."
    )
    clip: str = Field(CLIP_L, description="CLIP ViT-L/14 model whose normalised image embedding feeds the head.")


class NsfwScorer(Strict):
    source: str = Field(
        "CompVis/stable-diffusion-safety-checker", description="diffusers' StableDiffusionSafetyChecker weights."
    )


class Scorers(Strict):
    clip_t: ClipTextScorer | None = Field(
        None, description="`clip_t`: cosine of image and prompt; `clip_score`: 100 * max(cos, 0) (CLIPScore)."
    )
    clip_i: ClipImageScorer | None = Field(
        None, description="`clip_i_mean`, `clip_i_min`: cosine of the image and each reference image of the row."
    )
    face_sim: FaceScorer | None = Field(
        None,
        description="Rows with a face adapter: `face_sim` (ArcFace cosine to the reference face), `face_count`, "
        "`no_face` (1 when the output has no face).",
    )
    phash: PHashScorer | None = Field(
        None, description="`phash` (hex perceptual hash) and `dup_of` (row key of an earlier near-duplicate)."
    )
    aesthetic: AestheticScorer | None = Field(None, description="`aesthetic`: the LAION aesthetic predictor's score.")
    nsfw: NsfwScorer | None = Field(
        None,
        description="`nsfw` (1 when the Stable Diffusion safety checker flags the image), `nsfw_score` (its largest "
        "concept score; > 0 flags). The image is never blacked out.",
    )

    def names(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class ScoreResources(Strict):
    actors: int = Field(1, ge=1, description="Scorer actors in the pool.")
    num_gpus: float = Field(0, ge=0, description="GPUs per scorer actor (0 on CPU-only machines).")
    num_cpus: float = Field(1, gt=0, description="CPUs per scorer actor.")
    batch_size: int = Field(16, ge=1, description="Images per scorer batch.")
    custom_resources: dict[str, float] = custom_resources_field("scorer")


class ScoreStage(Strict):
    output: str | None = Field(None, description="Output directory to score. Default: the generate stage's output.")
    store: str | None = Field(
        None, description="Embedding store the references' embeddings are read from. Default: the generate stage's."
    )
    scorers: Scorers = Field(description="The scorers to run; each is optional.")
    resources: ScoreResources = Field(default_factory=ScoreResources)
    commit_rows: int = Field(
        2000, ge=1, description="Score records buffered before committing them as one part under `<output>/scores/`."
    )


def score_problems(score: ScoreStage, encoder_types: dict[str, str], has_generate: bool) -> list[str]:
    """One line per score-stage reference that points nowhere (the flow's alias check calls this)."""
    problems = []
    if score.output is None and not has_generate:
        problems.append("stages.score.output: required when the flow has no generate stage")
    for name, kind in (("clip_i", "clip"), ("face_sim", "insightface")):
        scorer = getattr(score.scorers, name)
        if scorer is None:
            continue
        where = f"stages.score.scorers.{name}.encoder"
        if scorer.encoder is None:
            if kind not in encoder_types.values():
                problems.append(f"{where}: the flow defines no {kind} encoder; add one under encoders: and name it")
        elif scorer.encoder not in encoder_types:
            known = ", ".join(sorted(encoder_types)) or "none"
            problems.append(f"{where}: unknown alias {scorer.encoder!r}; defined: {known}")
        elif encoder_types[scorer.encoder] != kind:
            found = encoder_types[scorer.encoder]
            problems.append(f"{where}: {scorer.encoder!r} is a {found} encoder; name a {kind} one")
    return problems


def default_encoder(alias: str | None, encoder_types: dict[str, str], kind: str) -> str:
    """The encoder a scorer uses: the one named, else the flow's first of `kind` (checked by `score_problems`)."""
    return alias or next(a for a, t in encoder_types.items() if t == kind)
