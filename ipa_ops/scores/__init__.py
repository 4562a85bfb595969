"""Quality scores of generated images: the scorers, no Ray (the score stage in stages/ runs them).

base.py          ScoreItem (an image and its results row), scorer ids, reference look-ups in the store
clip_scores.py   clip_t (prompt), clip_i (references), aesthetic (LAION predictor head)
safety.py        nsfw (Stable Diffusion safety checker concept scores)
faces.py         face_sim / face_count / no_face (insightface)
phash.py         phash and dup_of (near-duplicates across an output)

`build_scorers` turns a flow's `stages.score.scorers` into scorer objects (ids computed, models
not loaded). Imports flow, store and outputs, like generate/; the stage above is the Ray code.
"""

from __future__ import annotations

from ipa_ops.errors import UserError
from ipa_ops.flow.score_spec import Scorers
from ipa_ops.flow.spec import Flow
from ipa_ops.scores.base import ScoreContext, ScoreItem, Scorer

__all__ = ["SCORERS", "ScoreContext", "ScoreItem", "Scorer", "build_scorers", "source_problems"]


def _classes() -> dict[str, type[Scorer]]:
    from ipa_ops.scores.clip_scores import AestheticScore, ClipImageScore, ClipTextScore
    from ipa_ops.scores.faces import FaceScore
    from ipa_ops.scores.phash import PHashScore
    from ipa_ops.scores.safety import NsfwScore

    return {c.name: c for c in (ClipTextScore, ClipImageScore, FaceScore, PHashScore, AestheticScore, NsfwScore)}


SCORERS = tuple(Scorers.model_fields)


def build_scorers(ctx: ScoreContext, scorers: Scorers) -> list[Scorer]:
    """The flow's scorers, in the flow format's order, with their ids."""
    classes = _classes()
    return [classes[name](ctx, getattr(scorers, name)) for name in scorers.names()]


def source_problems(flow: Flow) -> list[str]:
    """One line per scorer whose model does not resolve (what `ipa validate` adds for a `score:` stage)."""
    stage = flow.stages.score
    if stage is None:
        return []
    classes, ctx, problems = _classes(), ScoreContext(flow), []
    for name in stage.scorers.names():
        try:
            classes[name](ctx, getattr(stage.scorers, name))
        except UserError as exc:
            problems.append(f"stages.score.scorers.{name}: {exc}")
    return problems
