"""What every scorer shares: the row it scores, its id, and the reference look-ups of clip_i and face_sim.

A scorer is built on the driver (its id needs no model: it is the scorer's name plus a digest of
its weights' fingerprints and settings, as encoder ids are) and again inside a scorer actor,
where `load` brings its model up once and `score` runs whole batches of decoded images.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ipa_ops.flow.spec import Flow
from ipa_ops.store.dataset import EmbeddingStore, StoreError
from ipa_ops.store.images import ImageError, read_image, sha256_of
from ipa_ops.store.schema import content_key

ALGORITHM = "ipa-score-1"  # bump when the way any score is computed changes
_STORE_KEY = re.compile(r"^[0-9a-f]{64}/.+$")
Value = float | str | None


@dataclass
class ScoreItem:
    """One output image to score and what its results row says about how it was made."""

    row_key: str
    id: str
    prompt: str
    image: Image.Image  # the PNG as written, decoded to RGB
    references: list[str] = field(default_factory=list)  # reference URIs (or store keys) of every adapter
    embedding_keys: list[str] = field(default_factory=list)  # store keys the row used
    adapters: list[str] = field(default_factory=list)  # aliases of the adapters that made it


@dataclass
class ScoreContext:
    """What a scorer may consult: the flow (mirror, encoders), the embedding store, the device."""

    flow: Flow
    store_uri: str | None = None
    gpu: bool = False
    _store: EmbeddingStore | None = None

    @property
    def mirror(self) -> str | None:
        return self.flow.mirror_root()

    @property
    def store(self) -> EmbeddingStore | None:
        if self._store is None and self.store_uri:
            self._store = EmbeddingStore(self.store_uri)
        return self._store


def scorer_id(name: str, facts: dict[str, Any]) -> str:
    """`name@<16 hex>`: any change of weights or settings gives a new id, never mixed with old scores."""
    text = json.dumps({**facts, "algorithm": ALGORITHM}, sort_keys=True, default=str)
    return f"{name}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class Scorer:
    """Base of the scorers: `metrics` they write, an `id`, `load` once, `score` a batch."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]

    def __init__(self, ctx: ScoreContext, spec: Any):
        self.ctx = ctx
        self.spec = spec
        self.id = scorer_id(self.name, self.facts())
        self.loaded = False

    def facts(self) -> dict[str, Any]:
        """Fingerprints and settings that decide the numbers (no model load)."""
        raise NotImplementedError

    def load(self) -> None:
        """Bring the model(s) up; called once per actor, before the first batch."""

    def score(self, items: list[ScoreItem]) -> list[dict[str, Value]]:
        """One dict of metric -> value per item, in order."""
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        if not self.loaded:
            self.load()
            self.loaded = True


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class References:
    """Reference images of rows, by content hash: the stored embedding of an encoder when the store
    has it, else the decoded image (so a scorer encodes only what the store lacks). Cached per actor."""

    def __init__(self, ctx: ScoreContext):
        self.ctx = ctx
        self._sha: dict[str, str | None] = {}

    def sha(self, ref: str) -> str | None:
        """The content hash a reference is stored under (a store key names it; a file is hashed)."""
        if _STORE_KEY.match(ref):
            return ref.split("/", 1)[0]
        if ref not in self._sha:
            try:
                self._sha[ref] = sha256_of(ref)
            except ImageError:
                self._sha[ref] = None
        return self._sha[ref]

    def stored(self, sha: str, encoder_id: str) -> np.ndarray | None:
        """The store's `image_embeds` of this image under `encoder_id`, when it has an ok row."""
        store = self.ctx.store
        key = content_key(sha, encoder_id)
        if store is None or key not in store.keys():
            return None
        try:
            return store.get([key])[0].numpy()
        except StoreError:  # a no_face or error row: nothing stored to compare with
            return None

    def image(self, ref: str, sha: str) -> Image.Image:
        """The reference decoded as the extract stage decodes it (from its URI, else its store row's source)."""
        uri = ref
        if _STORE_KEY.match(ref):
            store = self.ctx.store
            rows = store.rows([ref]) if store is not None else None
            if rows is None or "source_uri" not in rows or not isinstance(rows["source_uri"].iloc[0], str):
                raise ImageError(ref, "not in the store and no image to encode")
            uri = str(rows["source_uri"].iloc[0])
        return read_image(uri).image
