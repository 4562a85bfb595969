"""Which encoders feed a face-reading adapter, decided from the flow alone.

Pre-flight (does the flow name the encoders an adapter needs?) and planning (which store rows
does a row read?) ask the same question; the answer depends only on the flow's encoders and the
adapter's spec, so it lives with the flow format.
"""

from __future__ import annotations

from ipa_ops.flow.spec import AdapterSpec, Flow


def face_encoder_alias(flow: Flow, spec: AdapterSpec) -> str | None:
    """The insightface encoder whose crops feed `spec`: its `face_encoder`, else the flow's only one."""
    if spec.face_encoder:
        return spec.face_encoder
    faces = [a for a, e in flow.encoders.items() if e.type == "insightface"]
    return faces[0] if len(faces) == 1 else None


def crop_clip_alias(flow: Flow, spec: AdapterSpec) -> str | None:
    """FaceID-Plus: the clip encoder of the crops' `clip_embeds`: `clip_encoder`, else the only hidden-states one."""
    if spec.clip_encoder:
        return spec.clip_encoder
    clips = [a for a, e in flow.encoders.items() if e.type == "clip" and e.hidden_states]
    return clips[0] if len(clips) == 1 else None


def shortcut(spec: AdapterSpec) -> bool:
    """FaceID-Plus v2 adds the ID tokens to the resampler output (`shortcut`); by name unless set."""
    return spec.shortcut if spec.shortcut is not None else "plusv2" in spec.weight_name.lower()
