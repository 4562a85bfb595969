"""The documented diffusers call for a RowRequest, shared by the equivalence tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ipa_ops.generate.contract import RowRequest


def diffusers_call(pipe: Any, row: RowRequest, **kwargs: Any) -> np.ndarray:
    """`pipe(...)` with the row's prompt, steps, guidance and seed; an empty negative prompt is the default call."""
    return pipe(
        prompt=row.prompt,
        negative_prompt=row.negative_prompt or None,
        num_inference_steps=row.steps,
        guidance_scale=row.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(row.seed),
        output_type="np",
        **kwargs,
    ).images[0]
