"""Bad input, fuzzed: manifests and flows that a typo, a script gone wrong or a hostile file make.

Property-based (hypothesis) over the checking and planning functions themselves, not Ray runs:
random types, huge and negative numbers, NaN and inf, unicode and path tricks in ids and URIs,
deeply nested JSON and very long prompts. Every case must end as one-line problems naming the
row (or YAML path) and field; never a traceback, and never a file written anywhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ipa_ops.flow.spec import Flow, FlowError, parse_flow
from ipa_ops.manifest.checks import check_rows
from ipa_ops.manifest.reading import COLUMN_NAMES

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(  # bounded: no shrinking of 20 kB values (minutes); IPA_FUZZ_SHRINK=1 to shrink a failure
    max_examples=int(os.environ.get("IPA_FUZZ_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=list(Phase) if os.environ.get("IPA_FUZZ_SHRINK") else [Phase.explicit, Phase.generate],
)

PATH_TRICKS = ["../../etc/passwd", "/etc/shadow", "..", ".", "", " ", "a/../../b", "C:\\Windows\\x.png", "~/x.png",
               "file:///etc/passwd", "s3://bucket/../../x", "http://127.0.0.1:1/x.png", "a\x00b", "ref-\u202e.png",
               "\ud83d\ude00.png", "x" * 5000, "NUL", "con", "%2e%2e%2f", "a\nb", "row 1: x"]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
)
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(PATH_TRICKS), st.just("a prompt " * 2500))


def nested(depth: int) -> Any:
    """JSON nested `depth` levels (lists and objects alternating): what a generator bug writes."""
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"images": value}
    return value


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
DEEP_TEXT = "[" * 3000 + "1" + "]" * 3000  # valid JSON that json.loads cannot parse (RecursionError)
ANY_VALUE = st.one_of(JSONISH, st.sampled_from([nested(50), nested(40), DEEP_TEXT]), st.builds(json.dumps, JSONISH))
ADAPTER_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "adapter": st.one_of(st.just("style"), TEXT, NUMBERS),
        "images": st.one_of(st.lists(st.one_of(TEXT, NUMBERS), max_size=3), TEXT, NUMBERS),
        "scale": st.one_of(NUMBERS, ANY_VALUE),
        "masks": st.one_of(st.lists(TEXT, max_size=2), ANY_VALUE),
        "combine": st.one_of(st.sampled_from(["concat", "average", "bogus"]), ANY_VALUE),
        "face": ANY_VALUE,
        "extra_key": ANY_VALUE,
    },
)
ADAPTERS = st.one_of(
    st.lists(ADAPTER_ENTRY, max_size=3),
    st.lists(ADAPTER_ENTRY, max_size=3).map(json.dumps),
    ANY_VALUE,
    st.sampled_from(["[" * 3000 + "1" + "]" * 3000, "[" * 100000, '{"adapter": "style", "images": ["a.png"]']),
)
FIELD = {name: ANY_VALUE for name in COLUMN_NAMES} | {
    "id": st.one_of(TEXT, NUMBERS, st.none()),
    "prompt": st.one_of(TEXT, ANY_VALUE),
    "seed": st.one_of(NUMBERS, ANY_VALUE),
    "width": NUMBERS,
    "height": NUMBERS,
    "steps": NUMBERS,
    "guidance_scale": NUMBERS,
    "num_frames": NUMBERS,
    "strength": NUMBERS,
    "task": st.one_of(st.sampled_from(["text2img", "img2img", "inpaint", "controlnet", "video"]), TEXT),
    "init_image": TEXT,
    "mask_image": TEXT,
    "adapters": ADAPTERS,
}
ROW = st.fixed_dictionaries({"id": FIELD["id"]}, optional={k: v for k, v in FIELD.items() if k != "id"})


@pytest.fixture(scope="module")
def flow() -> Flow:
    return parse_flow(
        {
            "name": "fuzz",
            "models": {"sd15": {"source": "x"}},
            "encoders": {"vit-h": {"type": "clip", "source": "y"}},
            "adapters": {"style": {"source": "h", "weight_name": "a.bin", "encoder": "vit-h"}},
            "stages": {"generate": {"manifest": "m.csv", "model": "sd15", "output": "out"}},
        }
    )


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def assert_one_line_naming_the_row(problems: list[Any], ids: list[str]) -> None:
    for problem in problems:
        line = str(problem)
        assert "\n" not in line and "\r" not in line and line.startswith("row "), repr(line[:300])
        assert problem.field and problem.reason, line[:300]
        assert problem.row_id in ids or problem.row_id.startswith("#"), line[:300]
        assert "Traceback" not in line and len(line) < 4000, line[:300]


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=4, unique_by=lambda r: repr(r.get("id"))))
def test_fuzzed_manifest_rows_become_one_line_problems(rows: list[dict[str, Any]], flow: Flow) -> None:
    seen: list[str] = []
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(k for r in rows for k in r)), dtype=object)
    before = _files_under(Path.cwd())
    good, problems = check_rows(
        df,
        flow,
        flow.stages.generate,
        exists=lambda uri: seen.append(uri) or False,  # nothing is ever on disk: no file is opened
        store_has=lambda value: False,
        image_size=lambda uri: (64, 64),
    )
    labels = [r["id"][:80] if isinstance(r.get("id"), str) else "" for r in rows]
    assert_one_line_naming_the_row(problems, [lab for lab in labels if lab] + [str(p.row_id) for p in problems])
    bad_rows = {p.row_id for p in problems}
    assert len(good) + len(bad_rows) == len(rows)  # every row is either good or named
    for row in good:  # a good row really is good: sizes and steps in range, numbers finite
        assert 0 < row.width and 0 < row.height and 0 < row.steps and math.isfinite(row.guidance_scale)
    assert _files_under(Path.cwd()) == before  # checking writes nothing


# -- flow files --------------------------------------------------------------------------------------------


def _quickstart() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "flows" / "quickstart.yaml").read_text())


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    return out


QUICK = _quickstart()
PATHS = _paths(QUICK)[1:]


def _mutate(data: dict[str, Any], path: tuple, value: Any, rename: str | None) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    if rename is not None:
        node[rename] = node.pop(path[-1])
    else:
        node[path[-1]] = value
    return data


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PATHS), ANY_VALUE, st.one_of(st.none(), TEXT.filter(lambda s: len(s) < 60))),
        min_size=1,
        max_size=3,
    )
)
def test_fuzzed_flows_become_one_line_problems_naming_a_yaml_path(edits: list[tuple]) -> None:
    data = QUICK
    for path, value, rename in edits:
        try:
            data = _mutate(data, path, value, rename)
        except (KeyError, TypeError):  # an earlier edit replaced this path's parent
            continue
    before = _files_under(Path.cwd())
    try:
        flow = parse_flow(data, "fuzz.yaml")
    except FlowError as exc:
        assert exc.problems
        for line in exc.problems:
            assert "\n" not in line and "Traceback" not in line and len(line) < 4000, repr(line[:300])
            assert ": " in line, line[:300]  # `<yaml path>: <reason>`
    else:
        assert isinstance(flow, Flow)
        stage = flow.stages.generate
        if stage is not None:
            assert stage.stop_grace_s >= 0 and math.isfinite(stage.stop_grace_s)
    assert _files_under(Path.cwd()) == before


def test_a_flow_nested_thousands_deep_is_one_line(tmp_path: Path) -> None:
    from ipa_ops.flow.spec import load_flow

    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nmodels: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(FlowError) as exc:
        load_flow(deep)
    assert all("\n" not in p for p in exc.value.problems) and str(deep) in str(exc.value)
    os.remove(deep)


# -- planning a manifest file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_plan(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Flow, Path]:
    from zoo_flows import zoo_flow

    root = tmp_path_factory.mktemp("fuzzplan")
    return zoo_flow("quickstart", root, zoo_dir, root / "manifest.jsonl"), root


@settings(FUZZ, max_examples=int(os.environ.get("IPA_FUZZ_EXAMPLES", "15")))
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_fuzzed_manifest_files_plan_to_one_line_errors_and_keys_inside_the_output(
    rows: list[dict[str, Any]], zoo_plan: tuple[Flow, Path]
) -> None:
    from ipa_ops.errors import UserError
    from ipa_ops.generate.manifest_plan import plan_manifest
    from ipa_ops.outputs.folder import OutputDir

    flow, root = zoo_plan
    stage = flow.stages.generate
    assert stage is not None
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as JSON's NaN
    before = _files_under(root) | _files_under(Path.cwd())
    try:
        plans, errors = plan_manifest(flow, stage)
    except UserError as exc:  # a problem of the whole file (e.g. a line that is not JSON): one line
        assert "\n" not in str(exc) and len(str(exc)) < 4000 and str(exc).startswith(str(root)), str(exc)[:300]
        return
    for error in errors:
        line = error["error"]
        assert "\n" not in line and line.startswith("row ") and len(line) < 4000, line[:300]
    out = OutputDir(stage.output)
    for plan in plans:  # whatever the id says, files are named by the hex row key, inside images/
        assert out.image_path(plan.row_key).startswith(f"{stage.output}/images/")
    assert len(plans) + len({e["id"] for e in errors}) >= 1
    assert _files_under(root) | _files_under(Path.cwd()) == before  # planning writes nothing
