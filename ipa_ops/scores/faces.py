"""`face_sim`, `face_count`, `no_face`: the face in the output against the row's reference faces.

The recogniser is any insightface encoder of the flow, not necessarily the one that conditioned
the image (ArcFace scoring its own conditioning would be circular). A row has reference faces when
it used a face embedding (a store key of one of the flow's insightface encoders: FaceID) or a face
adapter fed aligned crops (plus-face, full-face: then every reference of the row counts, and one
without a face is left out); each reference is looked up in the store under the scorer's encoder,
and detected and embedded here only when the store lacks it. The output face is picked by the
encoder's own rule (`largest` ...).
`face_sim` is the mean ArcFace cosine (normed embeddings) over the reference faces; null for rows
without a face adapter or without a face in the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ipa_ops.flow.score_spec import default_encoder
from ipa_ops.scores.base import References, ScoreItem, Scorer, Value
from ipa_ops.store.encoders.face import FaceEncoder
from ipa_ops.store.encoders.ids import encoder_id, face_pack_dir


class FaceScore(Scorer):
    name = "face_sim"
    metrics = ("face_sim", "face_count", "no_face")

    def alias(self) -> str:
        return default_encoder(self.spec.encoder, {a: e.type for a, e in self.ctx.flow.encoders.items()}, "insightface")

    def facts(self) -> dict[str, Any]:
        flow, mirror = self.ctx.flow, self.ctx.mirror
        self.encoder_id = encoder_id(self.alias(), flow.encoders[self.alias()], mirror)
        self.face_ids = {
            encoder_id(alias, spec, mirror) for alias, spec in flow.encoders.items() if spec.type == "insightface"
        }
        kinds = {alias: spec.type for alias, spec in flow.encoders.items()}
        self.face_adapters = {
            alias
            for alias, spec in flow.adapters.items()
            if spec.crops_faces() or kinds.get(spec.encoder or "") == "insightface"
        }
        return {"encoder": self.encoder_id}

    def load(self) -> None:
        spec = self.ctx.flow.encoders[self.alias()]
        pack = face_pack_dir(spec, self.ctx.mirror)
        self.encoder = FaceEncoder(pack, det_size=spec.det_size, face=spec.face, gpu=self.ctx.gpu)
        self.refs = References(self.ctx)
        self._faces: dict[str, np.ndarray | None] = {}

    def reference_shas(self, item: ScoreItem) -> list[str]:
        """Content hashes of the references whose face embeddings conditioned the row."""
        shas = [k.split("/", 1)[0] for k in item.embedding_keys if "/" in k and k.split("/", 1)[1] in self.face_ids]
        if self.face_adapters & set(item.adapters):
            shas += [s for s in (self.refs.sha(r) for r in item.references) if s is not None]
        return list(dict.fromkeys(shas))

    def reference_face(self, sha: str, item: ScoreItem) -> np.ndarray | None:
        if sha not in self._faces:
            stored = self.refs.stored(sha, self.encoder_id)
            if stored is None:
                ref = next((r for r in item.references if self.refs.sha(r) == sha), None)
                found = self.encoder.encode(self.refs.image(ref, sha)) if ref is not None else {"status": "missing"}
                stored = found["image_embeds"] if found["status"] == "ok" else None
            self._faces[sha] = None if stored is None else np.asarray(stored, dtype=np.float64)
        return self._faces[sha]

    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        out: list[dict[str, Value]] = []
        for item in items:  # insightface analyses one image at a time
            found = self.encoder.encode(item.image)
            if found["status"] != "ok":
                out.append({"face_sim": None, "face_count": 0.0, "no_face": 1.0})
                continue
            face = np.asarray(found["image_embeds"], dtype=np.float64)
            refs = [r for r in (self.reference_face(s, item) for s in self.reference_shas(item)) if r is not None]
            sim = float(np.mean([face @ r for r in refs])) if refs else None
            out.append({"face_sim": sim, "face_count": float(found["num_faces"]), "no_face": 0.0})
        return out
