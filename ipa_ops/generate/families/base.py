"""The model-family interface: what differs between base models, behind one small protocol.

A family knows, for the base models it claims: which folders are its own and what pre-flight
reads from them (configs only), how the base pipeline loads, which attention processors become
the batched IP attention and how those layers are named and counted, the presets that address
them, and how a pipeline call is assembled (guidance, prompts, the IP embeddings' layout).
Everything else (rows, schedules over steps, tasks, faces, outputs) is the same for every family.
Adding a family is adding a module that implements this and registering it in `__init__`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ipa_ops.flow.schedules import NoiseLevels, ScheduleSpec, step_profile
from ipa_ops.generate import weight_types
from ipa_ops.generate.checkpoints import AdapterFacts
from ipa_ops.generate.ip_state import IPBatchState


class ModelFamily(Protocol):
    """One family of base models (SD1.5, SDXL, ...); implementations are stateless singletons."""

    name: str  # the family's short name, as presets and docs say it (`sd15`, `sdxl`)
    presets: Mapping[str, Mapping[str, Any]]  # PRESET_NAMES -> layer dict in `expand_layers`' form

    def claims(self, folder: Path) -> bool:
        """Whether a base-model folder (a diffusers pipeline folder) is of this family, from its configs."""
        ...

    def ip_dims(self, folder: Path) -> tuple[int, int]:
        """(cross-attention dim, number of IP layers) an adapter must match, from the folder's configs."""
        ...

    def adapter_facts(self, shapes: dict[str, tuple[int, ...]]) -> AdapterFacts | None:
        """An IP-Adapter checkpoint's facts from its tensor shapes, or None when not in this family's layout."""
        ...

    def load(self, folder: Path, dtype: torch.dtype, variant: str | None) -> Any:
        """The base text-to-image pipeline, progress bar off."""
        ...

    def load_adapters(self, pipe: Any, files: Sequence[Path]) -> None:
        """Load IP-Adapter checkpoint files into `pipe` as diffusers documents for the family (no image encoder)."""
        ...

    def cross_attention_dim(self, pipe: Any) -> int:
        """What an adapter's cross-attention dim must equal to be loaded into `pipe`."""
        ...

    def install_attention(self, pipe: Any) -> list[str]:
        """Swap diffusers' IP processors for batched ones; the IP layer names in the adapters' order."""
        ...

    def bind_attention(self, pipe: Any, state: IPBatchState | None) -> None:
        """Point `pipe`'s batched IP layers at one call's per-row state (None: they add nothing)."""
        ...

    def compile(self, pipe: Any, how: str, mode: str, **options: Any) -> None:
        """torch.compile the denoiser with `fullgraph=True`: `regional` (its repeated blocks) or `whole`.

        `options` go to `torch.compile` as they are (a test passes `backend="eager"` to count graph breaks fast).
        """
        ...

    def dtype(self, pipe: Any) -> torch.dtype:
        """The denoiser's dtype, which the IP embeddings are cast to."""
        ...

    def uses_cfg(self, pipe: Any, guidance_scale: float) -> bool:
        """Whether the pipeline runs classifier-free guidance (an unconditional half) at this scale."""
        ...

    def group_key(self, row: Any) -> tuple:
        """What must be equal for rows (`RowRequest`) to share one call on this family."""
        ...

    def call_kwargs(self, pipe: Any, rows: Sequence[Any]) -> dict[str, Any]:
        """Per-row call inputs the family takes beyond prompts and IP embeddings (undone by `end_call`)."""
        ...

    def prompt_kwargs(self, prompts: list[str], negatives: list[str], do_cfg: bool) -> dict[str, Any]:
        """The call's prompt arguments; rows without negative prompts use the pipeline's own default."""
        ...

    def ip_call(
        self, pipe: Any, positives: list[torch.Tensor], negatives: list[torch.Tensor], do_cfg: bool
    ) -> dict[str, Any]:
        """The call's IP-Adapter arguments from per-adapter [rows, ...] embeddings, taken as given.

        diffusers repeats precomputed embeddings over the batch (one reference for every prompt);
        a family makes its pipeline pass per-row embeddings through unchanged until `end_call`.
        """
        ...

    def end_call(self, pipe: Any) -> None:
        """Undo what `ip_call` did to the pipeline, so the next call starts clean."""
        ...

    def expand_layers(self, pipe: Any, blocks: Mapping[str, Any], layer_names: Sequence[str]) -> list[float]:
        """A per-block scale dict as one value per IP layer, as diffusers' `set_ip_adapter_scale` reads it."""
        ...


class ClassifierFreeGuidance:
    """Calls of families guided by one `guidance_scale` with a negative prompt (UNets, SD3.5): rows
    batch by their request's group key, and `true_cfg_scale` (Flux's) is refused in one line."""

    guidance_note = "this model uses guidance_scale"

    def group_key(self, row: Any) -> tuple:
        return row.group_key()

    def call_kwargs(self, pipe: Any, rows: Sequence[Any]) -> dict[str, Any]:
        flux_only = [r.id for r in rows if r.true_cfg_scale is not None]
        if flux_only:
            raise ValueError(f"row {flux_only[0]}: true_cfg_scale is for Flux; {self.guidance_note}")
        return {}

    def prompt_kwargs(self, prompts: list[str], negatives: list[str], do_cfg: bool) -> dict[str, Any]:
        # no negative prompt means diffusers' default (None): SDXL then uses zero embeddings rather
        # than encoding "", so a row without one never shares a call with rows with one (group_key)
        return {"prompt": prompts, "negative_prompt": negatives if do_cfg and negatives[0] else None}


def layer_profile(family: ModelFamily, spec: ScheduleSpec, pipe: Any, layer_names: Sequence[str]) -> np.ndarray:
    """The per-layer multiplier of a schedule for a pipeline's IP layers (processor names, in order)."""
    blocks = family.presets[spec.preset] if spec.preset is not None else spec.layers
    if blocks is None:
        return np.ones(len(layer_names))
    return np.asarray(family.expand_layers(pipe, blocks, layer_names))


def layer_scales(
    family: ModelFamily, spec: ScheduleSpec, pipe: Any, layer_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """([layers] scale, [layers] bool image on the unconditional side) of a schedule, `value` included.

    A ComfyUI `weight_type` gives its own per-layer weights (and the precise types' swapped layers);
    every other form is `value` times the layer profile, with nothing swapped."""
    if spec.weight_type is not None:
        return weight_types.layer_weights(family.name, spec, layer_names)
    return spec.value * layer_profile(family, spec, pipe, layer_names), np.zeros(len(layer_names), dtype=bool)


def effective(
    family: ModelFamily,
    spec: ScheduleSpec,
    pipe: Any,
    layer_names: Sequence[str],
    num_steps: int,
    noise: NoiseLevels | None = None,
) -> np.ndarray:
    """The [layers, steps] scale array of one adapter of one row (`noise`: the scheduler's, for sigma windows)."""
    return np.outer(layer_scales(family, spec, pipe, layer_names)[0], step_profile(spec, num_steps, noise))
