"""Scale schedules, the format: every accepted form parsed into a `ScheduleSpec`, and its step profile.

A schedule is a layer profile (scalar, diffusers' per-block dict, or a named preset) times a
step profile (window, curve or explicit per-step list). The step profile depends only on the
spec and the step count, so it is computed here; the layer profile depends on the model's
IP layers, so each model family expands it (`generate/families/base.py: layer_profile`), with
diffusers' own helper for UNets, so `{"down": {"block_2": [0.0, 1.0]}}` means exactly what
`set_ip_adapter_scale` makes of it.

Step windows follow diffusers' `IPAdapterScaleCutoffCallback`: the callback switches the
adapter off at the end of step `int(end * N)`, so steps `0..int(end * N)` keep the scale.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CURVES = ("linear", "ease_in", "ease_out", "ease_in_out")
_KEYS = {"value", "layers", "preset", "start", "end", "curve", "from", "to", "steps"}
# UNet blocks as diffusers' set_ip_adapter_scale dict names them; `blocks`: one value (or list) per
# transformer block of the transformer families (Flux's double blocks)
_LAYER_KEYS = {"down", "mid", "up", "blocks"}

# Named layer presets (InstantStyle). Every model family maps each name onto its own blocks
# (`generate/families/<family>.py`); the format only fixes the names.
PRESET_NAMES = ("style", "layout", "style_and_layout")


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed schedule; a model family's `effective()` turns it into the [layers, steps] array."""

    value: float = 1.0
    layers: dict[str, Any] | None = None
    preset: str | None = None
    start: float = 0.0
    end: float = 1.0
    curve: str | None = None
    curve_from: float = 0.0
    curve_to: float = 1.0
    steps: tuple[float, ...] | None = None
    source: Any = field(default=None, compare=False)

    @property
    def constant(self) -> bool:
        """True when the scale is the same at every step (no window, curve or list)."""
        return self.start <= 0 and self.end >= 1 and self.curve is None and self.steps is None


def _number(name: str, obj: Any) -> float:
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        raise ValueError(f"{name} must be a number, got {obj!r}")
    if not math.isfinite(obj):
        raise ValueError(f"{name} must be a finite number, got {obj!r} (NaN and inf are not scales)")
    return float(obj)


def _check_layers(obj: Any, path: str = "layers") -> None:
    """Every leaf of a per-block dict must be a finite number (lists of them per transformer)."""
    if isinstance(obj, dict):
        for key, sub in obj.items():
            _check_layers(sub, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, sub in enumerate(obj):
            _number(f"{path}[{i}]", sub)
    else:
        _number(path, obj)


def parse_schedule(obj: Any) -> ScheduleSpec:
    """Parse any schedule form (number, dict, or their JSON text); ValueError says what is wrong."""
    raw = obj
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"not a number or JSON schedule: {raw!r}") from None
    if obj is None:
        return ScheduleSpec(source=None)
    if not isinstance(obj, dict):
        return ScheduleSpec(value=_number("scale", obj), source=raw)
    if obj and set(obj) <= _LAYER_KEYS:  # diffusers' dict given bare
        obj = {"layers": obj}
    unknown = set(obj) - _KEYS
    if unknown:
        raise ValueError(f"unknown schedule key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    spec: dict[str, Any] = {"source": raw}
    if "value" in obj:
        spec["value"] = _number("value", obj["value"])
    if "layers" in obj:
        if not isinstance(obj["layers"], dict) or not set(obj["layers"]) <= _LAYER_KEYS:
            raise ValueError("layers must be diffusers' dict with keys down / mid / up (UNets) or blocks (Flux)")
        _check_layers(obj["layers"])
        spec["layers"] = obj["layers"]
    if "preset" in obj:
        names = sorted(PRESET_NAMES)
        if obj["preset"] not in names:
            raise ValueError(f"unknown preset {obj['preset']!r}; one of {names}")
        if "layers" in obj:
            raise ValueError("give either layers or preset, not both")
        spec["preset"] = obj["preset"]
    for key in ("start", "end"):
        if key in obj:
            spec[key] = _number(key, obj[key])
            if not 0.0 <= spec[key] <= 1.0:
                raise ValueError(f"{key} is a fraction of the steps in [0, 1], got {obj[key]!r}")
    if spec.get("start", 0.0) > spec.get("end", 1.0):
        raise ValueError(f"start {spec['start']} is after end {spec['end']}")
    if "curve" in obj:
        if obj["curve"] not in CURVES:
            raise ValueError(f"unknown curve {obj['curve']!r}; one of {list(CURVES)}")
        spec["curve"] = obj["curve"]
        spec["curve_from"] = _number("from", obj.get("from", 0.0))
        spec["curve_to"] = _number("to", obj.get("to", 1.0))
    elif "from" in obj or "to" in obj:
        raise ValueError("from / to shape a curve; add curve: linear (or ease_in, ease_out, ease_in_out)")
    if "steps" in obj:
        values = obj["steps"]
        if not isinstance(values, list) or not values:
            raise ValueError("steps must be a non-empty list of per-step scales")
        spec["steps"] = tuple(_number(f"steps[{i}]", v) for i, v in enumerate(values))
    return ScheduleSpec(**spec)


def _curve(name: str, t: np.ndarray) -> np.ndarray:
    if name == "linear":
        return t
    if name == "ease_in":
        return t * t
    if name == "ease_out":
        return 1.0 - (1.0 - t) ** 2
    return t * t * (3.0 - 2.0 * t)  # ease_in_out: smoothstep


def step_profile(spec: ScheduleSpec, num_steps: int) -> np.ndarray:
    """The per-step multiplier, [num_steps] float64."""
    n = max(int(num_steps), 1)
    idx = np.arange(n, dtype=np.float64)
    t = idx / (n - 1) if n > 1 else np.zeros(1)
    profile = np.ones(n)
    if spec.steps is not None:
        src = np.asarray(spec.steps, dtype=np.float64)
        grid = np.linspace(0.0, 1.0, len(src)) if len(src) > 1 else np.zeros(1)
        profile = np.interp(t, grid, src) if len(src) > 1 else np.full(n, src[0])
    if spec.curve is not None:
        profile = profile * (spec.curve_from + (spec.curve_to - spec.curve_from) * _curve(spec.curve, t))
    first, last = int(spec.start * n), int(spec.end * n)
    profile = np.where((idx >= first) & (idx <= last), profile, 0.0)
    return profile


def schedule_hash(array: np.ndarray) -> str:
    """Content hash of an effective schedule, for provenance and row keys."""
    data = np.ascontiguousarray(np.round(np.asarray(array, dtype=np.float64), 9))
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()[:16]


def spec_text(spec: ScheduleSpec) -> str:
    """The schedule as the user wrote it, for reports."""
    return spec.source if isinstance(spec.source, str) else json.dumps(spec.source)
