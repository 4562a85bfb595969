"""Per-frame controls of a video row's adapter entry: ComfyUI's unfold_batch and IPAdapterWeights.

Read from ComfyUI_IPAdapter_plus: with `unfold_batch` (the `... Batch` nodes) reference `i`
conditions latent `i` (a frame, for AnimateDiff), its negative and mask too, and `tensor_to_size`
repeats the last one when there are fewer than frames (and drops the rest when there are more); a
list weight then holds one weight per frame. `IPAdapterWeights` makes such a list from its
`weights` text and a `timing` curve between its first and last value over `frames`, held flat before
`start_frame` and after `end_frame`; `weights_invert` is the list reversed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Timing = Literal["custom", "linear", "ease_in_out", "ease_in", "ease_out"]


class FrameOptions(BaseModel):
    """`frames` of an adapter entry (video rows): per-frame references and weights."""

    model_config = ConfigDict(extra="forbid")

    unfold: bool = Field(
        False, description="ComfyUI's unfold_batch: image i (and negative i, mask i) conditions frame i; the last "
        "repeats over the remaining frames, extra ones are dropped.",
    )
    weights: list[float] | str | None = Field(
        None, description="Per-frame weights multiplying the scale: a list, or IPAdapterWeights' text `1.0, 0.0`. "
        "With a `timing` other than custom only the first and last values count.",
    )
    timing: Timing = Field("custom", description="IPAdapterWeights' curve: custom (the list as given), linear, "
                           "ease_in_out, ease_in, ease_out (ComfyUI's formulas and names).")  # fmt: skip
    frames: int | None = Field(None, ge=2, description="Frames the curve spans (IPAdapterWeights' frames); empty: "
                               "the row's num_frames.")  # fmt: skip
    start_frame: int = Field(0, ge=0, description="Frames held at the first weight before the curve starts.")
    end_frame: int = Field(9999, ge=0, description="Frame where the curve reaches the last weight (then held).")
    invert: bool = Field(False, description="IPAdapterWeights' weights_invert: the list reversed.")
    method: Literal["full batch"] | None = Field(
        None, description="IPAdapterWeights with images, `full batch`: each image holds for the curve's frames "
        "(the curve repeating per image); implies unfold.",
    )
    add_starting_frames: int = Field(0, ge=0, description="With `method`: frames of the first image and weight "
                                     "put before.")  # fmt: skip
    add_ending_frames: int = Field(0, ge=0, description="With `method`: frames of the last image and weight after.")

    @field_validator("weights")
    @classmethod
    def _parse(cls, value: list[float] | str | None) -> list[float] | None:
        if not isinstance(value, str):
            return value
        try:
            return [float(w) for w in value.replace("\n", ",").split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"weights: write numbers separated by commas, like '1.0, 0.5'; got {value!r}") from None


def ipadapter_weights(options: FrameOptions, num_frames: int) -> list[float]:
    """IPAdapterWeights' `weights` output (or `weights_invert`), for a video of `num_frames` frames."""
    weights = list(options.weights or [])
    if options.timing != "custom":
        frames = max(options.frames or num_frames, 2)
        start, end = (weights[0], weights[-1]) if weights else (0.0, 1.0)
        end_frame = min(options.end_frame, frames)
        duration = end_frame - options.start_frame
        if duration < 2:
            raise ValueError(
                f"frames: start_frame {options.start_frame} and end_frame {end_frame} (of {frames} frames) leave "
                f"{max(duration, 0)} frame(s) for the {options.timing} curve; leave at least 2"
            )
        curve = {
            "linear": lambda x: x,
            "ease_in_out": lambda x: (1 - math.cos(x * math.pi)) / 2,
            "ease_in": lambda x: math.sin(x * math.pi / 2),  # ComfyUI's name for this shape, kept
            "ease_out": lambda x: 1 - math.cos(x * math.pi / 2),
        }[options.timing]
        weights = [start] * options.start_frame
        weights += [start + (end - start) * curve(i / (duration - 1)) for i in range(duration)]
        weights[-1] = end
        weights += [end] * (frames - end_frame) if end_frame < frames else []
    weights = weights or [0.0]
    return weights[::-1] if options.invert else weights


def per_frame(values: list[float], num_frames: int) -> list[float]:
    """ComfyUI's `tensor_to_size`: the last value repeated up to `num_frames`, extra ones dropped."""
    return (values + values[-1:] * num_frames)[:num_frames]


def frame_slots(count: int, num_frames: int) -> list[int]:
    """Which of `count` references each frame takes under unfold (the last repeats)."""
    return [min(f, count - 1) for f in range(num_frames)]


def frame_checks(at: str, entry: Mapping[str, Any], row: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(field, reason) for an entry's `frames` that cannot apply to its row (the row check reports them)."""
    if row.get("task") != "video":
        yield f"{at}.frames", f"per-frame controls are for task video rows; this row is task {row.get('task')}"
        return
    try:
        options = FrameOptions.model_validate(entry["frames"])
    except ValidationError:
        return  # the row model reports the field itself
    if (options.unfold or options.method) and entry.get("combine") not in (None, "concat"):
        yield f"{at}.combine", "frames.unfold gives each frame its own image; leave combine as concat"
    frames = row.get("num_frames")
    if isinstance(frames, int) and frames > 0:
        try:
            ipadapter_weights(options, frames)
        except ValueError as exc:
            yield f"{at}.frames", str(exc).removeprefix("frames: ")


def frame_plan(options: FrameOptions | None, num_frames: int | None, images: int = 1) -> dict[str, Any] | None:
    """What a row's plan keeps of `frames`: unfold, one weight per frame (None: no per-frame weights) and,
    with `method`, which of the `images` each frame takes (`slots`)."""
    if options is None or num_frames is None:
        return None
    if options.method is not None:
        return _full_batch(options, num_frames, images)
    curve = options.weights is not None or options.timing != "custom"
    weights = per_frame(ipadapter_weights(options, num_frames), num_frames) if curve else None
    if not options.unfold and weights is None:
        return None
    return {"unfold": options.unfold, "weights": weights, "slots": None}


def _full_batch(options: FrameOptions, num_frames: int, images: int) -> dict[str, Any]:
    """IPAdapterWeights' `full batch` outputs (weights, image_1) as per-frame weights and image slots."""
    if options.timing != "custom" and options.frames is None:
        raise ValueError("frames: with method, give `frames` (the frames each image holds for)")
    curve = ipadapter_weights(options, num_frames)
    weights = curve * images
    slots = [i for i in range(images) for _ in curve]
    weights = [weights[0]] * options.add_starting_frames + weights + [weights[-1]] * options.add_ending_frames
    slots = [0] * options.add_starting_frames + slots + [images - 1] * options.add_ending_frames
    return {"unfold": True, "weights": per_frame(weights, num_frames), "slots": per_frame(slots, num_frames)}
