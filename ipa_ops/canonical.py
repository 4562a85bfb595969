"""Canonical JSON: one spelling per value, so equal parameters always hash alike.

Row keys, flow hashes and sweep ids are hashes of it; a change here would change every key ever
written (and make done rows look new), so it is tested against fixed spellings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import PurePath
from typing import Any

import numpy as np


def canonical_json(params: Any) -> str:
    """One spelling per value: sorted keys, no spaces, shortest float repr, 1.0 == 1."""
    return json.dumps(_canonical(params, "params"), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _canonical(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"row_key: {path} is {value}; parameters must be finite numbers")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, np.floating):  # its own shortest repr, so float32(0.6) hashes like 0.6
        return _canonical(float(str(value)), path)
    if isinstance(value, np.generic):
        return _canonical(value.item(), path)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        return sorted((_canonical(v, path) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, PurePath | datetime):
        return str(value)
    if hasattr(value, "model_dump"):
        return _canonical(value.model_dump(mode="json"), path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value), path)
    raise TypeError(f"row_key: {path}: cannot hash a {type(value).__name__}; pass plain values")
