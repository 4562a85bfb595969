"""Scale schedules, the format: every accepted form parsed into a `ScheduleSpec`, and its step profile.

A schedule is a layer profile (scalar, diffusers' per-block dict, or a named preset) times a
step profile (window, curve or explicit per-step list). The step profile depends only on the
spec and the step count, so it is computed here; the layer profile depends on the model's
IP layers, so each model family expands it (`generate/families/base.py: layer_profile`), with
diffusers' own helper for UNets, so `{"down": {"block_2": [0.0, 1.0]}}` means exactly what
`set_ip_adapter_scale` makes of it.

Step windows follow diffusers' `IPAdapterScaleCutoffCallback`: the callback switches the
adapter off at the end of step `int(end * N)`, so steps `0..int(end * N)` keep the scale.

ComfyUI_IPAdapter_plus's controls are written with its own names, so they never mean two things:
`weight_type` (its layer profiles, names verbatim: "ease in" varies over *layers*, while ipa's
`curve: ease_in` ramps over *steps*), with `composition`, `style_boost` and `composition_boost`;
and `start_at` / `end_at`, its window gated on the noise level (sigma) rather than the step index.
`generate/weight_types.py` computes the weight types; `sigma_window` below the sigma window.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CURVES = ("linear", "ease_in", "ease_out", "ease_in_out")
_KEYS = {"value", "layers", "preset", "start", "end", "curve", "from", "to", "steps", "weight_type", "composition"}
_KEYS |= {"style_boost", "composition_boost", "start_at", "end_at", "layer_weights"}

# ComfyUI_IPAdapter_plus's WEIGHT_TYPES, verbatim, and the type its style + composition node sets with expand_style
WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "strong style and composition",
    "style transfer precise",
    "composition precise",
)
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
    weight_type: str | None = None  # ComfyUI's layer profile, its name verbatim
    composition: float = 1.0  # ComfyUI's weight_composition ("style and composition" types)
    style_boost: float | None = None  # "style transfer precise": weight of its composition layers
    composition_boost: float | None = None  # "composition precise": weight of its style layers
    layer_weights: tuple[tuple[int, float], ...] | None = None  # ComfyUI's IPAdapterMS {index: weight}
    start_at: float = 0.0  # ComfyUI's window, fractions of the noise schedule (gated on sigma)
    end_at: float = 1.0
    source: Any = field(default=None, compare=False)

    @property
    def constant(self) -> bool:
        """True when the scale is the same at every step (no window, curve or list)."""
        steps = self.start <= 0 and self.end >= 1 and self.curve is None and self.steps is None
        return steps and self.start_at <= 0 and self.end_at >= 1

    @property
    def by_sigma(self) -> bool:
        """True when a ComfyUI `start_at` / `end_at` window needs the scheduler's noise levels."""
        return self.start_at > 0 or self.end_at < 1


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
    for key in ("start", "end", "start_at", "end_at"):
        if key in obj:
            spec[key] = _number(key, obj[key])
            if not 0.0 <= spec[key] <= 1.0:
                what = "the steps" if key in ("start", "end") else "the noise schedule"
                raise ValueError(f"{key} is a fraction of {what} in [0, 1], got {obj[key]!r}")
    for first, last in (("start", "end"), ("start_at", "end_at")):
        if spec.get(first, 0.0) > spec.get(last, 1.0):
            raise ValueError(f"{first} {spec[first]} is after {last} {spec[last]}")
    _parse_weight_type(obj, spec)
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


def _parse_weight_type(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    """ComfyUI's weight type and its weights; a boost alone implies its precise type, as in ComfyUI."""
    kind = obj.get("weight_type")
    if "layer_weights" in obj:
        spec["layer_weights"] = _comfy_layer_weights(obj["layer_weights"])
        if kind not in ("style transfer precise", "composition precise"):  # ComfyUI then weighs linearly
            kind = "linear"
    if kind is None and "style_boost" in obj:
        kind = "style transfer precise"
    elif kind is None and "composition_boost" in obj:
        kind = "composition precise"
    if kind is None:
        if "composition" in obj:
            raise ValueError('composition weighs the composition layers of weight_type "style and composition"')
        return
    if kind not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight_type {kind!r} (ComfyUI's names, verbatim); one of {list(WEIGHT_TYPES)}")
    if "layers" in obj or "preset" in obj:
        raise ValueError("give one layer form: weight_type, layers or preset")
    boosts = {"style_boost": "style transfer precise", "composition_boost": "composition precise"}
    for key, owner in boosts.items():
        if key in obj:
            if kind != owner:
                raise ValueError(f'{key} belongs to weight_type "{owner}", not {kind!r}')
            spec[key] = _number(key, obj[key])
    if "composition" in obj:
        if kind not in ("style and composition", "strong style and composition"):
            raise ValueError(f'composition weighs the composition layers of "style and composition", not {kind!r}')
        spec["composition"] = _number("composition", obj["composition"])
    spec["weight_type"] = kind


def _comfy_layer_weights(value: Any) -> tuple[tuple[int, float], ...]:
    """IPAdapterMS's `layer_weights`, as its text ("0:1.0, 3:0.5") or a {index: weight} mapping."""
    if isinstance(value, str):
        try:
            pairs = [item.split(":") for item in value.split(",") if item.strip()]
            value = {int(k): float(v) for k, v in pairs}
        except ValueError:
            raise ValueError(f"layer_weights: write ComfyUI's 'index:weight, ...', got {value!r}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError("layer_weights: give ComfyUI's 'index:weight, ...' text or an {index: weight} mapping")
    out = []
    for key, weight in value.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"layer_weights: {key!r} is not a ComfyUI layer index") from None
        out.append((index, _number(f"layer_weights[{key}]", weight)))
    return tuple(sorted(out))


def _curve(name: str, t: np.ndarray) -> np.ndarray:
    if name == "linear":
        return t
    if name == "ease_in":
        return t * t
    if name == "ease_out":
        return 1.0 - (1.0 - t) ** 2
    return t * t * (3.0 - 2.0 * t)  # ease_in_out: smoothstep


def step_profile(spec: ScheduleSpec, num_steps: int, noise: NoiseLevels | None = None) -> np.ndarray:
    """The per-step multiplier, [num_steps] float64; a `start_at` / `end_at` window needs the scheduler's
    `noise` levels."""
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
    if spec.by_sigma:
        if noise is None:
            raise ValueError("start_at / end_at are gated on the noise level: the scheduler's sigmas are needed")
        profile = profile * sigma_window(spec, noise, n)
    return profile


def percent_to_sigma(percent: float, log_sigmas: np.ndarray) -> float:
    """ComfyUI's `ModelSamplingDiscrete.percent_to_sigma`: 0 -> above every sigma, 1 -> 0."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return _sigma_at((1.0 - percent) * (len(log_sigmas) - 1), log_sigmas)


def _sigma_at(timestep: float, log_sigmas: np.ndarray) -> float:
    """ComfyUI's `ModelSamplingDiscrete.sigma`: log-linear interpolation between training sigmas."""
    t = float(np.clip(timestep, 0, len(log_sigmas) - 1))
    low = int(np.floor(t))
    high = min(low + 1, len(log_sigmas) - 1)
    w = t - low
    return float(np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high]))


@dataclass(frozen=True)
class NoiseLevels:
    """Each denoising step's sigma, as ComfyUI reads it off the step's timestep, and the training sigmas.

    Discrete (DDPM-trained) schedules, as SD1.5 and SDXL are; `of` builds it from a diffusers scheduler's
    timesteps and `alphas_cumprod`."""

    steps: np.ndarray
    log_sigmas: np.ndarray

    @staticmethod
    def of(timesteps: Any, alphas_cumprod: Any) -> NoiseLevels:
        alphas = np.asarray(alphas_cumprod, dtype=np.float64)
        log_sigmas = np.log(((1.0 - alphas) / alphas) ** 0.5)
        steps = np.asarray([_sigma_at(float(t), log_sigmas) for t in np.asarray(timesteps, dtype=np.float64)])
        return NoiseLevels(steps, log_sigmas)


def sigma_window(spec: ScheduleSpec, noise: NoiseLevels, num_steps: int) -> np.ndarray:
    """1 where ComfyUI's `sigma_end <= sigma <= sigma_start` holds for the step's sigma, else 0.

    The loop's steps are the last `num_steps` of the scheduler's (img2img starts part-way down)."""
    at_steps = noise.steps[-num_steps:]
    high, low = percent_to_sigma(spec.start_at, noise.log_sigmas), percent_to_sigma(spec.end_at, noise.log_sigmas)
    window = ((at_steps <= high) & (at_steps >= low)).astype(np.float64)
    return np.pad(window, (num_steps - len(window), 0))


def schedule_hash(array: np.ndarray) -> str:
    """Content hash of an effective schedule, for provenance and row keys."""
    data = np.ascontiguousarray(np.round(np.asarray(array, dtype=np.float64), 9))
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()[:16]


def spec_text(spec: ScheduleSpec) -> str:
    """The schedule as the user wrote it, for reports."""
    return spec.source if isinstance(spec.source, str) else json.dumps(spec.source)
