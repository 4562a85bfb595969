"""Scale schedules: every form parses, composes, and expands layers as diffusers does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ipa_ops.flow.schedules import parse_schedule, schedule_hash, step_profile


def test_scalar_and_json_text_are_the_same() -> None:
    assert parse_schedule(0.6) == parse_schedule("0.6") == parse_schedule('{"value": 0.6}')


def test_window_matches_cutoff_callback_semantics() -> None:
    # IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5) with 10 steps switches off after step 5
    profile = step_profile(parse_schedule({"value": 1.0, "end": 0.5}), 10)
    assert profile.tolist() == [1.0] * 6 + [0.0] * 4
    late = step_profile(parse_schedule({"start": 0.5}), 10)
    assert late.tolist() == [0.0] * 5 + [1.0] * 5


@pytest.mark.parametrize(
    ("curve", "mid"), [("linear", 0.5), ("ease_in", 0.25), ("ease_out", 0.75), ("ease_in_out", 0.5)]
)
def test_curves_rise_from_0_to_1(curve: str, mid: float) -> None:
    profile = step_profile(parse_schedule({"curve": curve}), 5)
    assert profile[0] == 0.0 and profile[-1] == 1.0 and math.isclose(profile[2], mid)
    falling = step_profile(parse_schedule({"curve": curve, "from": 1.0, "to": 0.0}), 5)
    assert falling[0] == 1.0 and falling[-1] == 0.0


def test_explicit_steps_resample_to_step_count() -> None:
    profile = step_profile(parse_schedule({"steps": [1.0, 0.0]}), 5)
    np.testing.assert_allclose(profile, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert step_profile(parse_schedule({"steps": [0.3]}), 4).tolist() == [0.3] * 4


def test_forms_compose_steps_and_window() -> None:
    profile = step_profile(parse_schedule({"steps": [1.0, 1.0, 1.0, 1.0], "end": 0.5}), 4)
    assert profile.tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (float("nan"), "NaN and inf are not scales"),
        ('{"value": NaN}', "NaN and inf are not scales"),
        ({"valeu": 1}, "unknown schedule key(s) ['valeu']"),
        ({"preset": "stlye"}, "unknown preset 'stlye'"),
        ({"curve": "bouncy"}, "unknown curve 'bouncy'"),
        ({"end": 1.5}, "end is a fraction of the steps in [0, 1]"),
        ({"layers": {"down": {"block_2": [0.0, "x"]}}}, "layers.down.block_2[1] must be a number"),
        ("{not json", "not a number or JSON schedule"),
        ({"start": 0.8, "end": 0.2}, "start 0.8 is after end 0.2"),
    ],
)
def test_bad_schedules_say_what_is_wrong(bad: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_schedule(bad)
    assert message in str(err.value)


def test_diffusers_dict_is_accepted_verbatim() -> None:
    blocks = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}
    assert parse_schedule(blocks).layers == blocks
    assert parse_schedule({"layers": blocks}).layers == blocks
    assert parse_schedule(json.dumps(blocks)).layers == blocks


def test_schedule_hash_changes_with_values() -> None:
    a = np.ones((3, 4))
    assert schedule_hash(a) == schedule_hash(a.copy())
    b = a.copy()
    b[1, 2] = 0.5
    assert schedule_hash(a) != schedule_hash(b)
